"""Drift statistics: pure functions of plain arrays and counts (numpy only).

Each function answers one operator question and is exported as a gauge by
`unirec.ops.metrics`. Definitions (where the issue is silent, the choice made):

* **Embedding drift** between two published versions (`embedding_drift`), over
  the ids present in both (`shared`):
  - `mean_cosine_distance`: mean over shared ids of `1 - cos(a_i, b_i)`, in
    [0, 2]. A zero vector has no direction; its cosine with anything is taken
    as 0 (distance 1), as scikit-learn's `cosine_similarity` does.
  - `neighbour_overlap`: for each shared id, its top-k nearest neighbours by
    cosine similarity *among the shared ids, itself excluded*, in version a and
    in version b; the overlap is `|N_a ∩ N_b| / k_eff`, averaged over shared
    ids, in [0, 1] (1 = every item keeps its neighbourhood). Neighbours are
    searched among shared ids only, so that items added or expired between the
    versions do not count as drift here (the new-id share measures those).
    With fewer than k + 1 shared ids, `k_eff = n_shared - 1`; with fewer than
    2 shared ids the overlap is NaN. Ties in similarity go to the id that sorts
    first (string order), so the result is deterministic. Rows are processed in
    chunks, so memory is O(chunk * n_shared), not O(n_shared^2); time is
    O(n_shared^2 log n_shared) (exact search: fine up to ~10^4-10^5 items).
  With `max_items` set and more shared ids than that, both statistics are
  computed over an evenly spaced subset of the sorted shared ids (deterministic,
  so consecutive publishes compare the same items); `shared` still counts all.
  Embedding drift is only meaningful between versions trained from one another
  (fine-tuning keeps the space); a retrain from scratch can rotate the space
  and shows as large cosine distance with a high neighbour overlap.
* **PSI** (`psi`) between a reference and a current sample of scores. Bins are
  the `bins`-quantiles of the *reference* sample (equal-mass in the reference;
  repeated edges from ties are merged, so fewer bins may result); the outer
  bins are open, so current values outside the reference range still count.
  A value equal to an edge goes to the upper bin. Proportions are smoothed
  additively, `p_i = (c_i / n + eps) / (1 + B * eps)`, so an empty bin gives a
  large but finite term. `PSI = sum_i (q_i - p_i) * ln(q_i / p_i)` (natural
  log, so the usual rule of thumb applies: < 0.1 stable, > 0.25 shifted).
* **Jensen-Shannon divergence** (`js_divergence`) between two count maps (e.g.
  item popularity in two windows), over the union of keys (a missing key counts
  0), base 2, so it lies in [0, 1] (0 = same distribution, 1 = disjoint
  supports). No smoothing is needed: the mixture is positive wherever either
  distribution is.
* **New-id share** (`new_id_share`): share of the *distinct* ids of a window
  that are absent from a reference set (`by_events=True`: share of the window's
  occurrences instead, i.e. of the traffic that hits new ids).
* **Input drift of a window** (`input_drift`): the item-popularity JS divergence
  and the query-term divergence against the *previous* window, and the share of
  the window's distinct items / users never seen in any earlier window. The
  first window has no reference: every field is NaN (not 1.0: "all ids are new"
  would only say that the pipeline just started). A window without clicks has
  NaN item fields; one side without query terms gives a NaN query divergence.
* **Query-term divergence** (`query_term_divergence`): JS divergence (as above)
  between the term counts of two windows of query texts; terms are lower-cased
  runs of word characters (`\\w+`).
* **Calibration drift** (`calibration`): `gap = mean predicted probability -
  observed positive rate` (> 0: over-confident), and the expected calibration
  error over `bins` equal-width bins of [0, 1] (the last bin includes 1.0):
  `ECE = sum_b (n_b / n) * |mean_pred_b - positive_rate_b|`.

Edge cases: empty inputs, mismatched lengths, duplicate ids, non-finite values
or negative counts raise `ValueError` naming the argument (the caller skips the
gauge update for an empty window: it has nothing to report). A statistic that
is undefined on valid inputs (no shared ids; fewer than 2 shared ids for the
neighbour overlap) is NaN, which Prometheus exposes as NaN and which compares
false in every alert threshold.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Hashable, NamedTuple

import numpy as np

_TERM = re.compile(r"\w+")


class EmbeddingDrift(NamedTuple):
    mean_cosine_distance: float   # in [0, 2]; NaN if no shared ids
    neighbour_overlap: float      # in [0, 1]; NaN if fewer than 2 shared ids
    shared: int                   # ids present in both versions
    k: int                        # neighbours compared per id (min(k, shared - 1))


class InputDrift(NamedTuple):
    item_popularity_js: float     # vs the previous window, base 2, in [0, 1]
    new_item_share: float         # distinct items never seen in earlier windows
    new_user_share: float         # distinct users never seen in earlier windows
    query_terms_js: float         # vs the previous window


class Calibration(NamedTuple):
    mean_predicted: float
    observed_rate: float
    gap: float                    # mean_predicted - observed_rate
    ece: float                    # expected calibration error, equal-width bins


# ---- helpers ---------------------------------------------------------------------------------
def _finite_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d sequence, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return a


def _embedding_table(ids: Sequence[Hashable], emb, name: str) -> tuple[dict, np.ndarray]:
    e = np.asarray(emb, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"emb_{name}: expected a 2-d array (n, d), got shape {e.shape}")
    ids = list(ids)
    if len(ids) == 0:
        raise ValueError(f"ids_{name}: empty")
    if len(ids) != e.shape[0]:
        raise ValueError(f"ids_{name}: {len(ids)} ids for {e.shape[0]} embedding rows")
    index = {i: r for r, i in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError(f"ids_{name}: duplicate ids")
    if not np.isfinite(e).all():
        raise ValueError(f"emb_{name}: contains NaN or infinite values")
    return index, e


def _unit_rows(e: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero (cosine 0 with everything)."""
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    return np.divide(e, norms, out=np.zeros_like(e), where=norms > 0)


def _top_k(unit: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """(n, k) indices of each row's k most similar other rows, ties to the lower index."""
    n = unit.shape[0]
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        sim = unit[rows] @ unit.T                                   # (c, n)
        sim[np.arange(len(rows)), rows] = -np.inf                   # never its own neighbour
        # stable sort on -sim keeps the lower index first among equal similarities
        out[rows] = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return out


# ---- embedding drift -------------------------------------------------------------------------
def embedding_drift(ids_a: Sequence[Hashable], emb_a, ids_b: Sequence[Hashable], emb_b, *,
                    k: int = 10, chunk: int = 1024, max_items: int | None = None) -> EmbeddingDrift:
    """Drift of item embeddings from version a to version b (see the module docstring)."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if max_items is not None and max_items < 2:
        raise ValueError(f"max_items: must be >= 2, got {max_items}")
    index_a, ea = _embedding_table(ids_a, emb_a, "a")
    index_b, eb = _embedding_table(ids_b, emb_b, "b")
    if ea.shape[1] != eb.shape[1]:
        raise ValueError(f"emb_a, emb_b: dimensions differ ({ea.shape[1]} vs {eb.shape[1]})")
    shared = sorted(index_a.keys() & index_b.keys(), key=str)
    n = len(shared)
    if n == 0:
        return EmbeddingDrift(math.nan, math.nan, 0, 0)
    if max_items is not None and n > max_items:
        shared = [shared[i] for i in np.linspace(0, n - 1, max_items).round().astype(np.int64)]
    ua = _unit_rows(ea[[index_a[i] for i in shared]])                # (n, d)
    ub = _unit_rows(eb[[index_b[i] for i in shared]])                # (n, d)
    cos_dist = float(np.mean(1.0 - np.einsum("nd,nd->n", ua, ub)))
    k_eff = min(k, len(shared) - 1)
    if k_eff == 0:
        return EmbeddingDrift(cos_dist, math.nan, n, 0)
    na, nb = _top_k(ua, k_eff, chunk), _top_k(ub, k_eff, chunk)
    # overlap per row: neighbours of a that are also neighbours of b
    hits = (na[:, :, None] == nb[:, None, :]).any(axis=2).sum(axis=1)  # (n,)
    return EmbeddingDrift(cos_dist, float(np.mean(hits / k_eff)), n, k_eff)


# ---- score distribution ----------------------------------------------------------------------
def psi(reference, current, *, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `current` against `reference` (quantile bins of the reference)."""
    if bins < 2:
        raise ValueError(f"bins: must be >= 2, got {bins}")
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps}")
    ref = _finite_1d(reference, "reference")
    cur = _finite_1d(current, "current")
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1))[1:-1])  # interior edges
    n_bins = len(edges) + 1
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=n_bins) / ref.size
    q = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=n_bins) / cur.size
    p = (p + eps) / (1.0 + n_bins * eps)
    q = (q + eps) / (1.0 + n_bins * eps)
    return float(np.sum((q - p) * np.log(q / p)))


# ---- categorical distributions ---------------------------------------------------------------
def js_divergence(counts_p: Mapping[Hashable, float], counts_q: Mapping[Hashable, float]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two count maps."""
    keys = list(counts_p.keys() | counts_q.keys())
    p = np.array([counts_p.get(key, 0) for key in keys], dtype=np.float64)
    q = np.array([counts_q.get(key, 0) for key in keys], dtype=np.float64)
    for name, c in (("counts_p", p), ("counts_q", q)):
        if not np.isfinite(c).all() or (c < 0).any():
            raise ValueError(f"{name}: counts must be finite and >= 0")
        if c.sum() <= 0:
            raise ValueError(f"{name}: empty (no positive count)")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    # clip the float error around the bounds
    return min(1.0, max(0.0, 0.5 * kl(p) + 0.5 * kl(q)))


def new_id_share(window: Iterable[Hashable], reference: Iterable[Hashable] | set, *,
                 by_events: bool = False) -> float:
    """Share of the window's distinct ids (or of its occurrences) not in `reference`."""
    window = list(window)
    if not window:
        raise ValueError("window: empty")
    ref = reference if isinstance(reference, (set, frozenset)) else set(reference)
    items = window if by_events else set(window)
    return sum(1 for i in items if i not in ref) / len(items)


def term_counts(texts: Iterable[str]) -> Counter:
    """Counts of lower-cased word terms (`\\w+`) over `texts`."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(_TERM.findall(text.lower()))
    return counts


def query_term_divergence(reference_texts: Iterable[str], current_texts: Iterable[str]) -> float:
    """JS divergence (base 2) between the term distributions of two windows of queries."""
    ref, cur = term_counts(reference_texts), term_counts(current_texts)
    if not ref:
        raise ValueError("reference_texts: no terms")
    if not cur:
        raise ValueError("current_texts: no terms")
    return js_divergence(ref, cur)


def input_drift(items: Mapping[Hashable, float], users: Iterable[Hashable], terms: Mapping[str, float], *,
                previous_items: Mapping[Hashable, float] | None, previous_terms: Mapping[str, float] | None,
                seen_items: set, seen_users: set) -> InputDrift:
    """Drift of one window of input (item click counts, users, query-term counts) against the
    previous window and the ids of all earlier windows; `previous_items=None`: the first window."""
    if previous_items is None:
        return InputDrift(math.nan, math.nan, math.nan, math.nan)
    users = set(users)
    has_items = any(c > 0 for c in items.values())
    js_items = js_divergence(previous_items, items) if has_items and any(
        c > 0 for c in previous_items.values()) else math.nan
    new_items = new_id_share([i for i, c in items.items() if c > 0], seen_items) if has_items else math.nan
    new_users = new_id_share(users, seen_users) if users else math.nan
    js_terms = js_divergence(previous_terms, terms) if previous_terms and terms else math.nan
    return InputDrift(js_items, new_items, new_users, js_terms)


# ---- calibration -----------------------------------------------------------------------------
def calibration(predicted, labels, *, bins: int = 10) -> Calibration:
    """Mean predicted probability vs observed positive rate, and the ECE over equal-width bins."""
    if bins < 1:
        raise ValueError(f"bins: must be >= 1, got {bins}")
    p = _finite_1d(predicted, "predicted")
    y = _finite_1d(labels, "labels")
    if p.size != y.size:
        raise ValueError(f"predicted, labels: lengths differ ({p.size} vs {y.size})")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("predicted: probabilities must lie in [0, 1]")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels: must be 0 or 1")
    b = np.minimum(np.floor(p * bins).astype(np.int64), bins - 1)  # bin of each prediction
    sum_p = np.bincount(b, weights=p, minlength=bins)
    sum_y = np.bincount(b, weights=y, minlength=bins)
    ece = float(np.sum(np.abs(sum_p - sum_y)) / p.size)            # sum_b n_b/n * |mean_p - mean_y|
    mean_p, rate = float(p.mean()), float(y.mean())
    return Calibration(mean_p, rate, mean_p - rate, ece)
