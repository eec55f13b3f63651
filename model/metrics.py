"""Evaluation metrics: full-ranking top-k, AUC / GAUC, and list-based search metrics.

Full ranking (RecBole's `mode: full`): every item in the catalogue is a
candidate for every case. Choices, each a parameter with the default stated:

* **Ties are broken pessimistically**: the 0-based rank of the target is the
  number of *other* candidate items whose score is >= the target's score. A
  model that scores everything equally therefore gets the worst rank, never a
  lucky one (RecBole's `torch.topk` breaks ties by position, which would reward
  such a model). NaN scores count as -inf.
* **Padding column**: column `pad_index` (default 0, the model's padding id) is
  never a candidate. Pass `pad_index=None` when there is none.
* **Already-seen items are NOT masked by default** (`exclude=None`), matching
  RecBole's sequential models (SASRec, GRU4Rec), whose full-sort evaluation
  scores every item. Pass `exclude` (a boolean matrix (N, n_items) or, per
  case, a sequence of item indices) to mask, e.g., the user's history, as
  RecBole does for non-sequential models such as Pop. The target itself is
  never masked, so a repeated item can still be found.

Per case with 0-based rank r: HR@k = [r < k], NDCG@k = [r < k] / log2(r + 2)
(one relevant item, so the ideal DCG is 1), MRR@k = [r < k] / (r + 1); the
reported value is the mean over cases.

`auc` is the Mann-Whitney statistic with average ranks for ties (a tied
positive/negative pair counts 1/2); `gauc` is the per-user AUC averaged with
weights = the user's number of scored items, skipping users whose items are
all one class (their AUC is undefined), as in RecBole's GAUC.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

DEFAULT_KS = (10, 20)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; no torch import needed
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def target_ranks(scores, targets, *, pad_index: int | None = 0, exclude=None) -> np.ndarray:
    """0-based pessimistic rank of each target among all candidate items.

    scores: (N, n_items) float; targets: (N,) item indices; exclude: None, a
    bool (N, n_items) matrix, or a length-N sequence of index collections.
    """
    s = _np(scores).astype(np.float64, copy=True)  # (N, n_items)
    t = _np(targets).astype(np.int64).reshape(-1)  # (N,)
    if s.ndim != 2 or s.shape[0] != t.shape[0]:
        raise ValueError(f"scores must be (N, n_items) with N = len(targets); got {s.shape} and {t.shape}")
    if ((t < 0) | (t >= s.shape[1])).any() or (pad_index is not None and (t == pad_index).any()):
        raise ValueError("targets must be item indices in [0, n_items) and not the padding index")
    s[np.isnan(s)] = -np.inf
    rows = np.arange(len(t))
    target = s[rows, t]  # (N,)
    candidates = np.ones(s.shape, dtype=bool)  # (N, n_items): the items the target competes with
    if pad_index is not None:
        candidates[:, pad_index] = False
    if exclude is not None:
        candidates &= ~_exclude_mask(exclude, s.shape)
    candidates[rows, t] = False  # "other" items only; the target itself is never excluded
    return ((s >= target[:, None]) & candidates).sum(axis=1)


def _exclude_mask(exclude, shape: tuple[int, int]) -> np.ndarray:
    if hasattr(exclude, "shape") and tuple(exclude.shape) == shape:
        return _np(exclude).astype(bool, copy=True)
    if len(exclude) != shape[0]:
        raise ValueError(f"exclude must have one entry per case ({shape[0]}), got {len(exclude)}")
    mask = np.zeros(shape, dtype=bool)
    for i, items in enumerate(exclude):
        idx = np.asarray(list(items), dtype=np.int64)
        if idx.size:
            mask[i, idx] = True
    return mask


def metrics_from_ranks(ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean HR@k, NDCG@k, MRR@k over cases, from 0-based target ranks."""
    r = _np(ranks).astype(np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("no cases to evaluate")
    out = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (r + 1.0), 0.0).mean())
    return out


def full_ranking(scores, targets, ks: Sequence[int] = DEFAULT_KS, *, pad_index: int | None = 0,
                 exclude=None) -> dict[str, float]:
    """HR@k / NDCG@k / MRR@k for a score matrix (N, n_items) and target indices (N,)."""
    return metrics_from_ranks(target_ranks(scores, targets, pad_index=pad_index, exclude=exclude), ks)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last element of each tie group
    return (ends - (counts - 1) / 2.0)[inverse]


def auc(labels, scores) -> float:
    """ROC AUC (Mann-Whitney, ties count 1/2); NaN if only one class is present."""
    y = _np(labels).astype(bool).reshape(-1)
    s = _np(scores).astype(np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(groups, labels, scores) -> float:
    """Per-group AUC weighted by group size; single-class groups skipped; NaN if none remain."""
    g = _np(groups).reshape(-1)
    y = _np(labels).astype(bool).reshape(-1)
    s = _np(scores).astype(np.float64).reshape(-1)
    if not (g.shape == y.shape == s.shape):
        raise ValueError("groups, labels and scores must have the same length")
    order = np.argsort(g, kind="stable")
    g, y, s = g[order], y[order], s[order]
    bounds = np.flatnonzero(np.r_[True, g[1:] != g[:-1], True])
    total, weight = 0.0, 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        value = auc(y[a:b], s[a:b])
        if not np.isnan(value):
            total += value * (b - a)
            weight += b - a
    return total / weight if weight else float("nan")


def recall_at_k(ranked: Iterable[Sequence[Hashable]], relevant: Iterable[Iterable[Hashable]], k: int) -> float:
    """Mean over queries of |top-k of `ranked` & relevant| / |relevant| (queries with no relevant item skipped)."""
    values = []
    for items, rel in zip(ranked, relevant, strict=True):
        rel = set(rel)
        if rel:
            values.append(len(rel.intersection(list(items)[:k])) / len(rel))
    return float(np.mean(values)) if values else float("nan")


def ndcg_at_k(ranked: Iterable[Sequence[Hashable]], relevant: Iterable[Iterable[Hashable]], k: int) -> float:
    """Mean binary-relevance NDCG@k (ideal DCG = all relevant items first; no relevant item -> skipped)."""
    values = []
    for items, rel in zip(ranked, relevant, strict=True):
        rel = set(rel)
        if not rel:
            continue
        dcg = sum(1.0 / np.log2(i + 2.0) for i, item in enumerate(list(items)[:k]) if item in rel)
        ideal = sum(1.0 / np.log2(i + 2.0) for i in range(min(k, len(rel))))
        values.append(dcg / ideal)
    return float(np.mean(values)) if values else float("nan")
