"""Offline training and evaluation of the unified model on the prepared event stream.

Protocol = RecBole's sequential benchmark on ml-100k (`unirec.data.split`): per
user, time-ordered leave-one-out; the model trains on all but the last two
clicks, early-stops on validation NDCG@10 and is tested on the last click given
everything before it. Full ranking over every item; already-seen items are
NOT masked (RecBole's sequential models do not mask them either), with
pessimistic ties (`unirec.model.metrics`). Recommendation scores are
`model.recommend_scores`, which include the model's learned repeat logit on the
items of its context window (see `unirec.model.model`; off in the bench's
`unified_no_repeat` row).

Other held-out measures, on the same never-trained-on clicks:
* ranking AUC / GAUC: each user's validation and test clicks, scored by the
  ranking head (`rank`) with their own preceding history at the click's
  timestamp; label = rating >= 4. AUC over all of them; GAUC = per-user AUC
  weighted by count over the users whose two held-out clicks have both labels
  (users with two equal labels have no defined AUC and are skipped).
* search Recall@10 / NDCG@10: the validation and test clicks that carry a
  query; the state after the history fused with the query (late fusion,
  `model/model.py`) ranks all items;
  one relevant item, so Recall@10 = HR@10.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from unirec.data import load_events, load_items
from unirec.data.split import EvalCase, UserHistory, leave_one_out, split_cases
from unirec.model import metrics
from unirec.model.batching import REC, SEARCH, History
from unirec.model.config import ModelConfig, TrainConfig
from unirec.model.model import UnifiedRecommender
from unirec.model.text import hash_pieces
from unirec.model.trainer import Trainer
from unirec.model.vocab import Vocab, item_text


def tune_malloc() -> None:
    """Keep freed memory in the process (glibc): no mmap per large tensor, no trimming.

    Training allocates and frees the same few-MB activations every step; by
    default glibc hands each back to the OS and page-faults it in again, which
    on a small VM costs more than the arithmetic. Best effort, Linux/glibc only.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)          # M_MMAP_MAX: serve large blocks from the heap
        libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD: do not give the heap back
        libc.mallopt(-2, 1 << 28)    # M_TOP_PAD: grow the heap in big steps
    except (OSError, AttributeError):
        pass


@dataclasses.dataclass
class Dataset:
    vocab: Vocab
    train: list[UserHistory]
    valid: list[EvalCase]
    test: list[EvalCase]
    items: dict[str, dict]
    full: dict[str, History]       # each user's whole history in model form (cases slice it)
    query_vectors: object = None   # model.sentence.QueryVectors with `sentence_encoder`, else None

    def history(self, case: EvalCase) -> History:
        return self.full[case.user_id].slice(0, len(case.history))


def load(data_dir: Path, mcfg: ModelConfig, cache_dir: Path | None = None) -> Dataset:
    """The prepared stream in `data_dir` (`<cache_dir>/ml-100k` by default: the sentence
    encoder's files and vectors are cached in `cache_dir`, default its parent)."""
    items = load_items(data_dir / "items.jsonl")
    encode = qv = None
    users = leave_one_out(load_events(data_dir / "events.jsonl"))
    if mcfg.sentence_encoder:   # items' and queries' texts, each encoded once (disk cache)
        from unirec.model import sentence

        cache_dir = Path(data_dir).parent if cache_dir is None else Path(cache_dir)
        qv = sentence.query_vectors(mcfg, cache_dir)
        encode = lambda texts: sentence.encode_cached(qv.encoder, texts, cache_dir)  # noqa: E731
        qv.preload([q for h in users.values() for q in h.query_texts if q is not None], cache_dir)
    vocab = Vocab.build(items, n_buckets=mcfg.n_buckets, ngram=mcfg.ngram, max_pieces=mcfg.max_item_pieces,
                        encode=encode)
    train, valid, test = split_cases(users)
    full = {u: to_history(h, vocab, mcfg, qv) for u, h in users.items()}
    return Dataset(vocab, train, valid, test, items, full, qv)


def to_history(h: UserHistory, vocab: Vocab, mcfg: ModelConfig, query_vectors=None) -> History:
    """unirec.data's UserHistory (string ids) -> the model's History (rows, hashed queries,
    and the queries' sentence vectors when `query_vectors` is given)."""
    return History(
        items=vocab.rows(h.item_ids),
        labels=np.asarray(h.labels, dtype=np.int64),
        ts=np.asarray(h.ts, dtype=np.int64),
        surfaces=np.array([SEARCH if s == "search" else REC for s in h.surfaces], dtype=np.int64),
        queries=[None if q is None else (hash_pieces(q, mcfg.n_buckets, ngram=mcfg.ngram,
                                                     max_pieces=mcfg.max_query_pieces) or None)
                 for q in h.query_texts],
        query_vecs=None if query_vectors is None else query_vectors(list(h.query_texts)))


def _chunks(seq, n):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


@torch.no_grad()
def retrieval_metrics(model: UnifiedRecommender, ds: Dataset, cases: list[EvalCase], *, search: bool = False,
                      batch: int = 64) -> dict[str, float]:
    """Full-ranking HR/NDCG/MRR@10,20 of the rec (or search) state over `cases`."""
    model.eval()
    v, mc = model.vocab, model.cfg
    ranks = []
    for chunk in _chunks(cases, batch):
        hs = [ds.history(c) for c in chunk]
        if search:
            q = [hash_pieces(c.query_text, mc.n_buckets, ngram=mc.ngram, max_pieces=mc.max_query_pieces)
                 for c in chunk]
            qv = None if ds.query_vectors is None else ds.query_vectors([c.query_text for c in chunk])
            scores = model.search_scores(hs, q, [c.ts for c in chunk], query_vecs=qv)
        else:
            scores = model.recommend_scores(hs)
        ranks.append(metrics.target_ranks(scores, v.rows([c.item_id for c in chunk]), pad_index=0))
    return metrics.metrics_from_ranks(np.concatenate(ranks))


@torch.no_grad()
def ranking_metrics(model: UnifiedRecommender, ds: Dataset, cases: list[EvalCase], batch: int = 64) -> dict[str, float]:
    """AUC and GAUC of the ranking head on held-out clicks (see module docstring)."""
    model.eval()
    v = model.vocab
    probs = []
    for chunk in _chunks(cases, batch):
        hs = [ds.history(c) for c in chunk]
        cand = torch.as_tensor(v.rows([c.item_id for c in chunk]))[:, None]
        probs.append(model.rank(hs, cand, torch.tensor([c.ts for c in chunk]))[:, 0].numpy())
    p = np.concatenate(probs)
    y = np.array([c.label for c in cases])
    users = np.array([c.user_id for c in cases])
    return {"auc": metrics.auc(y, p), "gauc": metrics.gauc(users, y, p)}


def popularity_metrics(ds: Dataset, cases: list[EvalCase], *, mask_seen: bool) -> dict[str, float]:
    """RecBole's Pop: training-click counts; RecBole masks seen items for it (mask_seen=True)."""
    from unirec.model.baselines import popularity
    pop = popularity([ds.vocab.rows(h.item_ids) for h in ds.train], ds.vocab.n_rows)
    targets = ds.vocab.rows([c.item_id for c in cases])
    scores = np.broadcast_to(pop, (len(cases), len(pop)))
    exclude = [ds.vocab.rows(c.history.item_ids) for c in cases] if mask_seen else None
    return metrics.full_ranking(scores, targets, pad_index=0, exclude=exclude)


def text_match_metrics(ds: Dataset, cases: list[EvalCase]) -> dict[str, float]:
    """The text-match-only search baseline (TF-IDF cosine, popularity tie-break)."""
    from unirec.model.baselines import TextMatch, popularity
    pop = popularity([ds.vocab.rows(h.item_ids) for h in ds.train], ds.vocab.n_rows)
    texts = [None] + [item_text(ds.items[i]) for i in ds.vocab.item_ids]
    tm = TextMatch(texts, pop)
    scores = tm.scores_batch([c.query_text for c in cases])
    return metrics.full_ranking(scores, ds.vocab.rows([c.item_id for c in cases]), pad_index=0)


def search_cases(ds: Dataset) -> list[EvalCase]:
    return [c for c in ds.valid + ds.test if c.query_text]


def train(ds: Dataset, mcfg: ModelConfig, tcfg: TrainConfig, *, log=print) -> tuple[UnifiedRecommender, dict]:
    """Train to early stopping on validation NDCG@10; returns the best model and fit info."""
    torch.manual_seed(tcfg.seed)
    torch.set_num_threads(tcfg.threads)
    model = UnifiedRecommender(mcfg, ds.vocab)
    trainer = Trainer(model, tcfg)
    hist = [ds.full[h.user_id].slice(0, len(h)) for h in ds.train if len(h)]
    info = trainer.fit(hist, lambda: retrieval_metrics(model, ds, ds.valid)["ndcg@10"], log=log)
    return model, info


def evaluate(model: UnifiedRecommender, ds: Dataset, *, ranking: bool, search: bool) -> dict[str, float | None]:
    """Test metrics of one trained model (None for what it cannot produce)."""
    out: dict[str, float | None] = dict(retrieval_metrics(model, ds, ds.test))
    out.update(ranking_metrics(model, ds, ds.valid + ds.test) if ranking else {"auc": None, "gauc": None})
    if search:
        s = retrieval_metrics(model, ds, search_cases(ds), search=True)
        out.update({"search_recall@10": s["hr@10"], "search_ndcg@10": s["ndcg@10"]})
    else:
        out.update({"search_recall@10": None, "search_ndcg@10": None})
    return out


def mean_over_seeds(rows: list[dict]) -> dict[str, float | None]:
    """Per metric, the mean over runs (seeds) of the values that are not None (None if none is)."""
    keys = {k for r in rows for k in r}
    out: dict[str, float | None] = {}
    for k in sorted(keys):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def paired_difference(a: list[dict], b: list[dict], key: str) -> dict[str, float | int]:
    """Mean and standard error of a[i][key] - b[i][key] over paired runs (the same seed i):
    the seed's data order and initialisation are shared, so pairing removes part of the spread."""
    d = np.array([x[key] - y[key] for x, y in zip(a, b, strict=True)], dtype=float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "n": len(d), "per_seed": [float(v) for v in d]}
