"""Reference scorers the unified model is compared against (numpy + stdlib only).

* `popularity(train_items, n_items)`: an item's score is its number of
  training clicks (RecBole's Pop). The same vector for every user; whether
  already-seen items are masked is the evaluation's choice
  (`unirec.model.metrics`, `exclude=`).
* `TextMatch`: the search baseline. Items and queries are bags of tokens from
  the project tokenizer (`unirec.model.text.tokenize`; an item's text is its
  title plus its genres). Weights are TF-IDF with raw term counts and smoothed
  idf = ln((1 + n_docs) / (1 + df)) + 1 (every term keeps a positive weight),
  vectors L2-normalised, score = cosine. Query terms that no item has carry no
  signal and are ignored. Ties (most often: all items with cosine 0, or several
  items sharing the matched words) are broken by popularity: the score is
  `round(cosine, 9) + 1e-10 * popularity / (max_popularity + 1)`, so any
  cosine difference >= 1e-9 decides first and popularity only orders equals.
  Scoring walks an inverted index (term -> items), so a query costs
  O(postings of its terms), not O(vocabulary x items).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from unirec.model.text import tokenize


def popularity(train_items: Iterable[int] | Iterable[Sequence[int]], n_items: int, *, pad_index: int | None = 0) -> np.ndarray:
    """Training-click counts per item index, shape (n_items,); accepts flat indices or per-user sequences."""
    counts = np.zeros(n_items, dtype=np.float64)
    for x in train_items:
        if isinstance(x, (int, np.integer)):
            counts[int(x)] += 1
        else:
            np.add.at(counts, np.asarray(list(x), dtype=np.int64), 1.0)
    if pad_index is not None:
        counts[pad_index] = 0.0
    return counts


class TextMatch:
    """TF-IDF cosine between a query and each item's text, ties broken by popularity."""

    def __init__(self, item_texts: Sequence[str | None], item_popularity: Sequence[float] | None = None):
        """item_texts[i] is the text of item index i (None/"" for padding or unknown items)."""
        self.n_items = len(item_texts)
        docs = [Counter(tokenize(t or "")) for t in item_texts]
        df = Counter(term for d in docs for term in d)
        n_docs = sum(1 for d in docs if d)
        self.idf = {term: math.log((1 + n_docs) / (1 + c)) + 1.0 for term, c in df.items()}
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for i, d in enumerate(docs):
            weights = {term: tf * self.idf[term] for term, tf in d.items()}
            norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
            for term, w in weights.items():
                idx, ws = postings.setdefault(term, ([], []))
                idx.append(i)
                ws.append(w / norm)
        self.postings = {t: (np.array(i, dtype=np.int64), np.array(w)) for t, (i, w) in postings.items()}
        pop = np.zeros(self.n_items) if item_popularity is None else np.asarray(item_popularity, dtype=np.float64)
        if pop.shape != (self.n_items,):
            raise ValueError(f"item_popularity must have shape ({self.n_items},), got {pop.shape}")
        self.tiebreak = 1e-10 * pop / (pop.max(initial=0.0) + 1.0)

    def cosine(self, query: str) -> np.ndarray:
        """Cosine similarity of `query` with every item, shape (n_items,)."""
        terms = {t: tf * self.idf[t] for t, tf in Counter(tokenize(query)).items() if t in self.idf}
        out = np.zeros(self.n_items)
        norm = math.sqrt(sum(w * w for w in terms.values()))
        for term, w in terms.items():
            idx, ws = self.postings[term]
            out[idx] += ws * (w / norm)
        return out

    def scores(self, query: str) -> np.ndarray:
        """Ranking scores (cosine, then popularity), shape (n_items,)."""
        return np.round(self.cosine(query), 9) + self.tiebreak

    def scores_batch(self, queries: Sequence[str]) -> np.ndarray:
        """Scores for several queries, shape (N, n_items)."""
        return np.stack([self.scores(q) for q in queries]) if queries else np.zeros((0, self.n_items))
