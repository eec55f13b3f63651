"""Test-then-train (prequential) figures: each new event is scored by the model as it
stands before anything trains on it, and the figures are summed per micro-batch.

What is scored and why (the choices are the online learner's, see model/online.py):
next-item HR@k / NDCG@k over the whole live catalogue as `recommend_scores` gives
them (retrieval plus the repeat logit; seen items not masked; pessimistic ties),
search Recall@k as `search_scores` gives them, and the ranking probability of every
labelled item token for AUC. `score_states` reads them off one forward's hidden
states; where the training loss already holds the full-catalogue logits of the same
positions (`Trainer.losses`' `scored`), it ranks those instead of computing them again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from unirec.model import metrics
from unirec.model.model import UnifiedRecommender


@dataclass
class EvalSums:
    """Sums and counts of test-then-train figures; `means()` turns them into metrics."""

    k: int = 10
    rec_n: int = 0
    hits: float = 0.0
    ndcg: float = 0.0
    search_n: int = 0
    search_hits: float = 0.0
    search_ndcg: float = 0.0
    probs: list = field(default_factory=list)
    labels: list = field(default_factory=list)

    def add_ranks(self, ranks: np.ndarray, search: bool) -> None:
        hit = ranks < self.k
        ndcg = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).sum())
        if search:
            self.search_n, self.search_hits, self.search_ndcg = (self.search_n + len(ranks),
                                                                 self.search_hits + hit.sum(), self.search_ndcg + ndcg)
        else:
            self.rec_n, self.hits, self.ndcg = self.rec_n + len(ranks), self.hits + hit.sum(), self.ndcg + ndcg

    def merge(self, other: EvalSums) -> None:
        for name in ("rec_n", "hits", "ndcg", "search_n", "search_hits", "search_ndcg"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.probs += other.probs
        self.labels += other.labels

    def means(self) -> dict:
        k, labels = self.k, np.asarray(self.labels)
        both = len(labels) and 0 < labels.sum() < len(labels)
        return {f"hr@{k}": self.hits / self.rec_n if self.rec_n else None,
                f"ndcg@{k}": self.ndcg / self.rec_n if self.rec_n else None,
                "auc": metrics.auc(labels, np.asarray(self.probs)) if both else None,
                f"search_recall@{k}": self.search_hits / self.search_n if self.search_n else None,
                f"search_ndcg@{k}": self.search_ndcg / self.search_n if self.search_n else None,
                "eval_events": self.rec_n, "eval_search_events": self.search_n, "eval_rank_events": len(labels)}


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, n_cols: int | None = None) -> np.ndarray:
    """`metrics.target_ranks` (pessimistic ties, column 0 never a candidate, NaN = -inf,
    nothing else masked) in one comparison over the score matrix, without its float64
    copy (numpy's compare, summed as bytes: ~2x torch's). Column 0 (padding) scores -inf,
    so a finite target never counts it; a target scored -inf or NaN (a broken model) takes
    the plain path. `n_cols`: compare only the first columns (every later one is a free
    row past the table's last live row, scored -inf by `item_bias`)."""
    t = scores.gather(1, targets[:, None])                              # (N, 1)
    if not torch.isfinite(t).all():
        return metrics.target_ranks(scores, targets)
    s, t = scores.numpy()[:, :n_cols], t.numpy()
    at_least = (s >= t).view(np.uint8).sum(1, dtype=np.int32).astype(np.int64)
    return at_least - 1 - (s[:, 0] >= t[:, 0])       # the target is >= itself; column 0 counts if not -inf


@torch.no_grad()
def score_states(m: UnifiedRecommender, batch: dict, h: torch.Tensor, items: torch.Tensor, sums: EvalSums,
                 n: int | None = None, block: int = 128, scored: dict | None = None) -> None:
    """Add the test-then-train figures of the first `n` rows of `batch` (all if None) to `sums`,
    from one forward's hidden states `h` (B, T, d) and item vectors `items` (N_rows, d).

    Next-item scores are `recommend_scores`' (offline evaluation, serving): retrieval plus
    the repeat logit on the items of the state's context window; search scores are
    `search_scores`' (dense query state plus the lexical channel); ranking probabilities
    at the item tokens that carry a label. `scored`: what `Trainer.losses` hands its
    `inspect` - the training loss's own logits of the batch's rec and search positions
    (full-catalogue negatives: the same sums of the same floats, so the same ranks) and its
    ranking logits - ranked as they are instead of computed a second time; what it lacks
    is computed here, `block` states at a time: each (block, N_rows) matrix is built,
    shifted and compared while it is in cache (~1.5x faster than one (states, N_rows)
    pass per step, measured on 1 thread)."""
    if n is not None and n < h.shape[0]:
        batch, h = {k: v[:n] for k, v in batch.items()}, h[:n]
    B, T, d = h.shape
    hf = h.reshape(B * T, d)
    scored = scored or {}
    live = m.item_live.nonzero()
    n_cols = int(live[-1]) + 1 if len(live) else None       # later rows are free: they score -inf
    for key, search in (("rec_target", False), ("search_target", True)):
        target = batch[key].reshape(-1)
        given = scored.get("search" if search else "rec", {})
        if given.get("scores") is not None:          # the loss's rows: the whole batch's, in flat order
            k = int((given["rows"] < B * T).sum())   # the first n rows' positions come first
            sums.add_ranks(target_ranks(given["scores"][:k], target[given["rows"][:k]], n_cols), search=search)
            continue
        for r in (target > 0).nonzero().squeeze(1).split(block):
            scores = _scores(m, batch, h, hf, items, r, search)
            sums.add_ranks(target_ranks(scores, target[r], n_cols), search=search)
    if m.cfg.use_feedback:
        mask = batch["rank_label"] >= 0
        if mask.any():
            logits = scored["rank"][:B][mask] if scored.get("rank") is not None else m.rank_logits(h[mask])
            sums.probs += torch.sigmoid(logits).tolist()
            sums.labels += batch["rank_label"][mask].tolist()


def _scores(m: UnifiedRecommender, batch: dict, h: torch.Tensor, hf: torch.Tensor, items: torch.Tensor,
            r: torch.Tensor, search: bool) -> torch.Tensor:
    """(R, N_rows) evaluation scores of the rec (or search) states at flat positions `r`."""
    if search:                                       # late fusion: the state before the click + the query
        scores = m.retrieval_scores(m.search_vectors(h, batch, r), items)
        extra = m.batch_query_channel_scores(batch, r)
        return scores if extra is None else scores + extra
    scores = m.retrieval_scores(m.user_vectors(hf[r]), items)
    return m.add_repeat_scores_(scores, batch, r) if m.cfg.repeat_bias else scores
