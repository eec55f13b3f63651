"""User histories -> padded token tensors (the UniGRF sequence, one token per event).

A user's events become tokens  i i i ...  (one per event):

* `i` item token (type 0): the item, the surface it was clicked on, the hashed
  pieces of the query that led to it (search clicks only: `query`, context for
  every later event), and the feedback label (rating >= 4) of the *previous*
  event (`prev_label`, -1 = none in the window). The label of event t rides on
  the tokens of event t+1, so the ranker at i_t, which must not see its own
  label, sees every earlier one.

Queries are not tokens of their own (late fusion, see `model.py`): the search
state for a click is computed from the state *before* the click (the output of
the previous event's token) fused with the query's encoding, and the query
reaches later events through the click's own token. The first layout put a
query token `q` before each search click, whose output was the search state;
with ~30% of ML-100k clicks being searches that was 57 instead of 46 tokens
per training window, and it made every search a second position the trunk
had to run. Old versions trained that way are refused with a clear error
(`snapshot.py`). Type 2 (QUERY) is kept only so that embedding tables of
older versions keep their shape.

Why not a separate feedback token `b` after each item (the first layout, still
available as `feedback_tokens=True`, and what versions saved before this
option are read with): it carried no information the next event's tokens
cannot carry, and it nearly doubled the sequence (108 vs 61 tokens per
window in the query-token layout), so at the offline bench's equal time
budget the unified model trained on far fewer windows. What is lost: the rec
state at an event's item token has not seen that event's own label (it sees
all earlier ones); the ranker never could.

Targets ride on the tokens (all causal, one pass): `rec_target` at i_t = item
of event t+1 (next-item retrieval; at b_t with feedback tokens);
`search_target` at i_t = the item of a search click t (its own item: the
search state is read off the token *before* it, `model.search_vectors`);
`rank_label` at i_t = label of event t (the ranker sees the candidate as the
token itself). `label` holds each token's own event label (embedded only on
feedback tokens; candidates read their `prev_label` from it). `index` is the
token index inside the window (the rotary index band), `ts` the event's time.

Windows: a history longer than `max_len` events is cut into windows of
`max_len` events ending at n, n - stride, ... (stride = max_len // 2). Each
event is a training target in exactly one window: the one where it sits in the
last `stride` events (so it always has >= stride events of context), except
that the window starting at event 0 trains all of its events. This is SASRec's
"train every position causally", not RecBole's one-sample-per-prefix.
Padding is on the right (item 0, type 3), so the causal mask alone keeps real
tokens from seeing it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import chain

import numpy as np
import torch

from unirec.model.text import hash_pieces
from unirec.model.vocab import Vocab

ITEM, FEEDBACK, QUERY, PAD = 0, 1, 2, 3
REC, SEARCH = 0, 1


@dataclass
class History:
    """One user's time-ordered events as parallel arrays (model rows, not string ids)."""

    items: np.ndarray        # (n,) int64 item rows
    labels: np.ndarray       # (n,) int64 0/1
    ts: np.ndarray           # (n,) int64 epoch seconds
    surfaces: np.ndarray     # (n,) int64 REC/SEARCH
    queries: list            # n entries: list[int] query pieces or None
    query_vecs: list | None = None   # n entries: the query's frozen sentence vector (float32) or None;
                                     # None for all: the model has no sentence encoder (`model.sentence`)

    def __len__(self) -> int:
        return len(self.items)

    def slice(self, start: int, end: int) -> "History":
        return History(self.items[start:end], self.labels[start:end], self.ts[start:end],
                       self.surfaces[start:end], self.queries[start:end],
                       None if self.query_vecs is None else self.query_vecs[start:end])


def history_from_events(events: list[dict], vocab: Vocab, *, n_buckets: int, ngram: int,
                        max_query_pieces: int) -> History:
    """Raw click/query dicts (one user, time-ordered) -> History.

    A query event is attached to the click carrying its `query_id`; a query
    without its click contributes nothing (there is no item to learn from).
    """
    texts = {e["query_id"]: e["text"] for e in events if e.get("schema", "").startswith("query")}
    clicks = [e for e in events if not e.get("schema", "").startswith("query")]
    queries = []
    for e in clicks:
        text = texts.get(e.get("query_id")) if e.get("surface") == "search" else None
        queries.append(None if text is None else
                       hash_pieces(text, n_buckets, ngram=ngram, max_pieces=max_query_pieces) or None)
    return History(
        items=vocab.rows([e["item_id"] for e in clicks]),
        labels=np.array([int(e["label"]) for e in clicks], dtype=np.int64),
        ts=np.array([int(e["ts"]) for e in clicks], dtype=np.int64),
        surfaces=np.array([SEARCH if e.get("surface") == "search" else REC for e in clicks], dtype=np.int64),
        queries=queries,
    )


def windows(n: int, max_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, loss_from) windows over n events; every event is a target once."""
    if n == 0:
        return []
    stride = max(1, min(max_len, stride or max_len // 2))
    out, end = [], n
    while True:
        start = max(0, end - max_len)
        out.append((start, end, start if start == 0 else end - stride))
        if start == 0:
            return out
        end -= stride


def _tokens(h: History, loss_from: int, use_queries: bool, use_feedback: bool, *,
            feedback_tokens: bool = False) -> dict[str, list]:
    """Token lists for one window (events of h, targets from event `loss_from` on)."""
    t = {k: [] for k in ("type", "item", "label", "prev_label", "surface", "ts", "query", "query_vec",
                         "rec_target", "search_target", "rank_label", "event")}
    prev_labels = use_feedback and not feedback_tokens
    vecs = h.query_vecs if use_queries and h.query_vecs is not None else None

    def add(kind, j, item, label=0, query=None):
        t["type"].append(kind)
        t["item"].append(item)
        t["label"].append(label)
        t["prev_label"].append(int(h.labels[j - 1]) if prev_labels and j > 0 else -1)
        t["surface"].append(int(h.surfaces[j]))
        t["ts"].append(int(h.ts[j]))
        t["query"].append(query or [])
        t["query_vec"].append(vecs[j] if query is not None and vecs is not None else None)
        t["rec_target"].append(0)
        t["search_target"].append(0)
        t["rank_label"].append(-1)
        t["event"].append(j)

    last_state = -1   # token whose output is the user state after the previous event
    for j in range(len(h)):
        train = j >= loss_from
        query = h.queries[j] if use_queries else None
        if train and last_state >= 0:
            t["rec_target"][last_state] = int(h.items[j])
        add(ITEM, j, int(h.items[j]), label=int(h.labels[j]), query=query)
        if train:
            t["rank_label"][-1] = int(h.labels[j])
            if query is not None:
                t["search_target"][-1] = int(h.items[j])
        if use_feedback and feedback_tokens:
            add(FEEDBACK, j, int(h.items[j]), label=int(h.labels[j]))
        last_state = len(t["type"]) - 1
    if vecs is None:
        del t["query_vec"]                       # (only histories with sentence vectors have the column)
    return t


def event_tokens(h: History, loss_from: int, use_queries: bool, use_feedback: bool) -> dict:
    """`_tokens(h, loss_from, ...)` for the one-token-per-event layout
    (`feedback_tokens: false`), from the history's columns as whole arrays instead of
    eleven appends per event (tested equal). Every column but `query` is an int64 array
    of its own (not a view of the history): `collate` concatenates arrays instead of
    converting ~50 Python ints per column and window (the columns ~5x faster, a whole
    collate ~2x, measured on the online learner's batches), and a buffered window is a
    dozen objects the garbage collector does not walk. A token without a query holds
    the shared empty tuple."""
    n = len(h)
    lf = min(loss_from, n)
    col = lambda a: np.array(a, dtype=np.int64)                  # a copy
    items, labels = col(h.items), col(h.labels)
    raw = h.queries if use_queries else [None] * n
    rec = np.zeros(n, dtype=np.int64)
    rec[max(lf, 1) - 1: n - 1] = items[max(lf, 1):]            # the state before event j predicts it
    prev = np.full(n, -1, dtype=np.int64)
    if use_feedback:
        prev[1:] = labels[:-1]
    search = np.zeros(n, dtype=np.int64)
    search[lf:] = items[lf:] * np.fromiter((q is not None for q in raw[lf:]), dtype=bool, count=n - lf)
    rank = np.full(n, -1, dtype=np.int64)
    rank[lf:] = labels[lf:]
    out = {"type": np.full(n, ITEM, dtype=np.int64), "item": items, "label": labels, "prev_label": prev,
           "surface": col(h.surfaces), "ts": col(h.ts), "query": [q or () for q in raw], "rec_target": rec,
           "search_target": search, "rank_label": rank, "event": np.arange(n, dtype=np.int64)}
    if use_queries and h.query_vecs is not None:
        out["query_vec"] = [None if q is None else v for q, v in zip(raw, h.query_vecs)]
    return out


_COLLATED = ("type", "item", "label", "prev_label", "surface", "ts", "rec_target", "search_target", "rank_label")


def _padded(B: int, T: int, Lq: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Empty (B, T) token arrays (type PAD, no labels), (B, T, Lq) query pieces and (B,) lengths,
    filled with numpy (one copy per key when they become tensors)."""
    arr = {k: np.zeros((B, T), dtype=np.int64) for k in _COLLATED}
    arr["type"][:], arr["rank_label"][:], arr["prev_label"][:] = PAD, -1, -1
    return arr, np.zeros((B, T, Lq), dtype=np.int64), np.zeros(B, dtype=np.int64)


def _tensors(arr: dict, query: np.ndarray, length: np.ndarray) -> dict[str, torch.Tensor]:
    B, T = length.shape[0], query.shape[1]
    out = {k: torch.from_numpy(v) for k, v in arr.items()}
    out["index"] = torch.arange(T).expand(B, T).clone()
    out["query"], out["length"] = torch.from_numpy(query), torch.from_numpy(length)
    return out


def collate(token_lists: list[dict[str, list]]) -> dict[str, torch.Tensor]:
    """Pad token lists on the right into a batch of (B, T) tensors (+ query pieces (B, T, Lq)).
    A window's columns are lists (`_tokens`) or int64 arrays (`event_tokens`); each column
    of the batch is filled in one assignment (the windows' tokens one after another are the
    (B, T) mask of real tokens in row-major order), the query pieces in another."""
    B = len(token_lists)
    n = np.array([len(t["type"]) for t in token_lists], dtype=np.int64)
    T, total = max(1, int(n.max(initial=0))), int(n.sum())
    queries = list(chain.from_iterable(t["query"] for t in token_lists))
    sizes = np.fromiter(map(len, queries), dtype=np.int64, count=total)
    arr, query, length = _padded(B, T, max(1, int(sizes.max(initial=0))))
    length[:] = n
    real = np.arange(T) < n[:, None]                 # (B, T): row-major order = the lists one after another
    for k in _COLLATED:                              # one conversion per column, not per window
        if isinstance(token_lists[0][k], np.ndarray):  # `event_tokens`' arrays
            arr[k][real] = np.concatenate([t[k] for t in token_lists])
        else:
            arr[k][real] = np.fromiter(chain.from_iterable(t[k] for t in token_lists), dtype=np.int64, count=total)
    last = arr["ts"][np.arange(B), np.maximum(n - 1, 0)]      # (an empty window's padding stays 0)
    arr["ts"][~real] = np.repeat(last, T - n)                  # padding keeps the last timestamp (no huge angles)
    if sizes.any():                                  # every piece of every query at (its token, its place)
        token = np.repeat(np.flatnonzero(real), sizes)
        place = np.arange(len(token)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        query.reshape(B * T, -1)[token, place] = np.fromiter(chain.from_iterable(queries), dtype=np.int64,
                                                             count=len(token))
    out = _tensors(arr, query, length)
    if any("query_vec" in t for t in token_lists):   # (windows of histories with sentence vectors)
        vecs = list(chain.from_iterable(t.get("query_vec") or [None] * len(t["type"]) for t in token_lists))
        if any(v is not None for v in vecs):
            out["query_vec"], out["query_vec_row"] = _query_vec_columns(vecs, np.flatnonzero(real), B, T)
    return out


def _query_vec_columns(vecs: list, token: np.ndarray, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query sentence vectors of a batch as a (1 + Q, D) table (row 0: zeros, no vector)
    and the (B, T) row of each token in it (0 for tokens without one): a search position
    reads `query_vec[query_vec_row]`. `vecs` are the tokens' vectors (or None) in the
    order of the flat token positions `token`."""
    has = np.fromiter((v is not None for v in vecs), dtype=bool, count=len(vecs))
    kept = [v for v in vecs if v is not None]
    table = np.zeros((1 + len(kept), len(kept[0])), dtype=np.float32)
    table[1:] = np.stack(kept)
    rows = np.zeros(B * T, dtype=np.int64)
    rows[token[has]] = np.arange(1, 1 + len(kept))
    return torch.from_numpy(table), torch.from_numpy(rows.reshape(B, T))


def query_vec_tensor(vecs: list | None, n: int, dim: int) -> torch.Tensor | None:
    """(n, dim) float32 sentence vectors of n queries (zeros for a None entry), or None
    when `vecs` is None (a model without the sentence encoder)."""
    if vecs is None:
        return None
    out = torch.zeros(n, dim)
    for b, v in enumerate(vecs):
        if v is not None:
            out[b] = torch.as_tensor(v, dtype=torch.float32)
    return out


def train_batches(histories: list[History], max_len: int, batch_size: int, *, use_queries: bool = True,
                  use_feedback: bool = True, rng: np.random.Generator | None = None,
                  all_targets: bool = False, feedback_tokens: bool = False):
    """Yield collated batches of training windows over `histories`.

    Windows are grouped by length (sorted on length with random jitter when an
    rng is given, then cut into batches whose order is shuffled), so a batch is
    padded to about its own length, not to the longest window of the epoch.
    `all_targets`: every event of every window is a target (the first half of a
    window again, now with a shorter context), so no pass is spent on context only.
    """
    yield from window_batches(train_windows(histories, max_len, use_queries=use_queries, use_feedback=use_feedback,
                                            all_targets=all_targets, feedback_tokens=feedback_tokens),
                              batch_size, rng=rng)


def train_windows(histories: list[History], max_len: int, *, use_queries: bool = True, use_feedback: bool = True,
                  all_targets: bool = False, feedback_tokens: bool = False,
                  use_query_vecs: bool = True) -> list[dict[str, list]]:
    """Token lists of every training window of `histories` (the same every epoch: build once).
    `use_query_vecs=False` leaves the queries' sentence vectors out (a model without them)."""
    if not use_query_vecs:
        histories = [replace(h, query_vecs=None) for h in histories]
    return [_tokens(h.slice(s, e), (s if all_targets else lf) - s, use_queries, use_feedback,
                    feedback_tokens=feedback_tokens)
            for h in histories for (s, e, lf) in windows(len(h), max_len)]


def window_batches(token_lists: list[dict[str, list]], batch_size: int, *, rng: np.random.Generator | None = None):
    """Collated batches of windows grouped by length (see `train_batches`)."""
    lengths = np.array([len(t["type"]) for t in token_lists], dtype=np.float64)
    if rng is not None:
        lengths = lengths * rng.uniform(0.9, 1.1, len(token_lists))
    order = np.argsort(lengths, kind="stable")
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        chunks = [chunks[k] for k in rng.permutation(len(chunks))]
    for chunk in chunks:
        yield collate([token_lists[k] for k in chunk])


def context_batch(histories: list[History], max_len: int, *, use_queries: bool = True,
                  use_feedback: bool = True, feedback_tokens: bool = False) -> dict[str, torch.Tensor]:
    """Inference batch: the last `max_len` events of each history, no targets. The state
    after each history is the output at token `length - 1` (a search fuses it with the
    query: `model.search_vectors_from`).

    With one token per event (`feedback_tokens=False`) the token columns are the history's
    own columns, so they are copied straight into the padded arrays (`_context_columns`,
    ~3x faster than building token lists: this runs on every served request); the token
    lists (`_tokens` + `collate`) stay the definition, and tests/model/test_batching.py
    checks that both give the same tensors."""
    tails = [h.slice(max(0, len(h) - max_len), len(h)) for h in histories]
    if use_feedback and feedback_tokens:
        return collate([_tokens(t, len(t), use_queries, use_feedback, feedback_tokens=True) for t in tails])
    return _context_columns(tails, use_queries, use_feedback)


def _context_columns(tails: list[History], use_queries: bool, use_feedback: bool) -> dict[str, torch.Tensor]:
    """`collate` of the tails' token lists without targets, one item token per event (the
    previous event's label on each token when `use_feedback`)."""
    B, T = len(tails), max(1, max(len(h) for h in tails))
    Lq = max([1] + [len(q) for h in tails for q in h.queries if q]) if use_queries else 1
    arr, query, length = _padded(B, T, Lq)
    for b, h in enumerate(tails):
        n = length[b] = len(h)
        if not n:
            continue
        arr["type"][b, :n], arr["item"][b, :n], arr["label"][b, :n] = ITEM, h.items, h.labels
        arr["surface"][b, :n], arr["ts"][b, :n], arr["ts"][b, n:] = h.surfaces, h.ts, h.ts[-1]
        if use_feedback:
            arr["prev_label"][b, 1:n] = h.labels[: n - 1]
        if use_queries:
            for j, q in enumerate(h.queries):
                if q:
                    query[b, j, : len(q)] = q
    return _tensors(arr, query, length)


def query_tensor(queries: list) -> torch.Tensor:
    """(B, Lq) right-padded query pieces (>= 1 column; an empty query is all padding)."""
    width = max([1] + [len(q or []) for q in queries])
    out = torch.zeros(len(queries), width, dtype=torch.int64)
    for b, q in enumerate(queries):
        if q:
            out[b, : len(q)] = torch.as_tensor(q, dtype=torch.int64)
    return out
