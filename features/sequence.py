"""Per-user sequence state and its merge: pure functions, no Feast, no I/O.

A user's state is the most recent `max_len` clicks in event-time order (item ids,
labels, timestamps, surfaces, the query id each click came from) plus the most
recent `max_queries` queries (ids, texts, timestamps). `merge` folds a batch of
that user's events into the state. Design choices, each tested in
tests/features/test_sequence.py:

* **Event-time order, stable.** A click is inserted after every kept click with a
  timestamp <= its own (`bisect_right`), so equal timestamps keep arrival order.
  Per-user arrival order is deterministic: events are keyed by user, so one user's
  events come from one Kafka partition in offset order, on every replay too.
* **Watermark and lateness.** The user's watermark W is the largest timestamp of an
  applied event. An event with `ts < W - allowed_lateness_s` is rejected as `late`;
  any later event is applied and inserted in order, even if older than the last one.
* **Idempotent on event_id.** A re-delivered event changes nothing and is rejected as
  `duplicate`. The state cannot remember every id forever, and it does not need to:
  it keeps (in `seen`) the id of every applied event with `ts >= W - allowed_lateness_s`.
  A re-delivered event either has `ts < W - L`, so it is `late` and rejected without
  looking at ids, or `ts >= W - L`; then its id is still in `seen`, because ids are
  only dropped once their ts falls below `W' - L` for some earlier W' <= W. Checking
  `late` *before* `duplicate` makes the reason independent of how the stream is cut
  into batches. Memory per user is bounded by the events in one lateness horizon.
* **Bounded.** After inserting, only the last `max_len` clicks are kept. Inserting
  in order and then truncating keeps exactly the last `max_len` of the stably sorted
  applied clicks, as `reference` computes directly from the source events.
* **Queries** are kept the same way (bounded to `max_queries`) and joined to their
  click through `click_query_ids[i]` == `query_ids[j]`; "" means the click did not
  come from a search.

Events are duck-typed: a click has `item_id`, `label`, `surface`, `query_id`; a
query has `query_id` and `text`; both have `event_id`, `user_id`, `ts` (int epoch s).
Event ids are assumed unique per user; the same id under another user is another key.
"""
from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

DUPLICATE = "duplicate"
LATE = "late"


@dataclass(frozen=True)
class UserSequence:
    user_id: str
    item_ids: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    ts: tuple[int, ...] = ()
    surfaces: tuple[str, ...] = ()
    click_query_ids: tuple[str, ...] = ()   # "" when the click did not follow a query
    query_ids: tuple[str, ...] = ()
    query_texts: tuple[str, ...] = ()
    query_ts: tuple[int, ...] = ()
    watermark: int | None = None            # max ts of any applied event; also `last_event_ts`
    total_clicks: int = 0                   # applied clicks ever, including those that fell off
    # event_id -> ts of applied events with ts >= watermark - allowed_lateness_s (dedup only;
    # state-store data, not pushed to Feast). Treat as read-only.
    seen: Mapping[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.item_ids)

    def for_serving(self) -> UserSequence:
        """The state without the dedup ids: what the online store holds and returns."""
        return dataclasses.replace(self, seen={})

    def query_text_of(self, i: int) -> str | None:
        """Text of the query that led to click i, if that query is still kept."""
        qid = self.click_query_ids[i]
        if not qid:
            return None
        try:
            return self.query_texts[self.query_ids.index(qid)]
        except ValueError:
            return None


_FIELDS = tuple(f.name for f in dataclasses.fields(UserSequence))


def _make(*values: Any) -> UserSequence:
    """UserSequence(*values) without the frozen-dataclass __init__ (one object.__setattr__
    per field, ~3.5 us); merge runs once per touched user per batch, so this matters."""
    s = object.__new__(UserSequence)
    s.__dict__.update(zip(_FIELDS, values))
    return s


class MergeResult(NamedTuple):
    state: UserSequence
    applied: list            # events that changed the state, in arrival order
    rejected: list           # (event, reason) with reason in {"duplicate", "late"}

    @property
    def applied_clicks(self) -> list:
        return [e for e in self.applied if is_click(e)]


def is_click(event: Any) -> bool:
    return getattr(event, "item_id", None) is not None


def _insert(cols: tuple[list, ...], ts: int, values: tuple) -> None:
    """Insert one row into parallel columns (cols[0] is the sorted ts column)."""
    tss = cols[0]
    if tss and tss[-1] > ts:  # out of order: the stable position after equal timestamps
        pos = bisect.bisect_right(tss, ts)
        tss.insert(pos, ts)
        for col, v in zip(cols[1:], values):
            col.insert(pos, v)
    else:
        tss.append(ts)
        for col, v in zip(cols[1:], values):
            col.append(v)


def merge(state: UserSequence | None, user_id: str, events: Iterable[Any], *, max_len: int,
          allowed_lateness_s: int, max_queries: int) -> MergeResult:
    """Fold `events` (this user's, in arrival order) into `state`; never mutates `state`."""
    if state is None:
        state = UserSequence(user_id)
    elif state.user_id != user_id:
        raise ValueError(f"state of user {state.user_id!r} merged as {user_id!r}")
    seen = dict(state.seen)
    wm = state.watermark
    clicks = queries = None  # column lists, copied from the state on first use
    n_clicks = 0
    applied, rejected = [], []
    for e in events:
        ts = e.ts
        if e.user_id != user_id:
            raise ValueError(f"event {e.event_id!r} of user {e.user_id!r} merged into {user_id!r}")
        if wm is not None and ts < wm - allowed_lateness_s:
            rejected.append((e, LATE))
            continue
        eid = e.event_id
        if eid in seen:
            rejected.append((e, DUPLICATE))
            continue
        seen[eid] = ts
        applied.append(e)
        if wm is None or ts > wm:
            wm = ts
        item_id = getattr(e, "item_id", None)
        if item_id is not None:
            if clicks is None:
                clicks = (list(state.ts), list(state.item_ids), list(state.labels), list(state.surfaces),
                          list(state.click_query_ids))
            n_clicks += 1
            _insert(clicks, ts, (item_id, int(e.label), e.surface, e.query_id or ""))
        else:
            if queries is None:
                queries = (list(state.query_ts), list(state.query_ids), list(state.query_texts))
            _insert(queries, ts, (e.query_id, e.text))
    if not applied:
        return MergeResult(state, applied, rejected)
    horizon = wm - allowed_lateness_s
    if min(seen.values()) < horizon:
        seen = {k: t for k, t in seen.items() if t >= horizon}
    if clicks is None:
        cts, items, labels, surfaces, cq = state.ts, state.item_ids, state.labels, state.surfaces, state.click_query_ids
    else:
        cts, items, labels, surfaces, cq = (tuple(c[-max_len:]) for c in clicks)
    if queries is None:
        qts, qids, qtexts = state.query_ts, state.query_ids, state.query_texts
    else:
        qts, qids, qtexts = (tuple(c[-max_queries:]) for c in queries)
    new = _make(user_id, items, labels, cts, surfaces, cq, qids, qtexts, qts, wm,
                state.total_clicks + n_clicks, seen)
    return MergeResult(new, applied, rejected)


def accepted(events: Iterable[Any], *, allowed_lateness_s: int) -> list:
    """The events a correct pipeline applies, from a whole source stream in arrival order.

    Independent of `merge`: an unbounded id set and a running max per user.
    """
    ids: dict[str, set] = {}
    wms: dict[str, int] = {}
    out = []
    for e in events:
        wm, seen = wms.get(e.user_id), ids.setdefault(e.user_id, set())
        if (wm is not None and e.ts < wm - allowed_lateness_s) or e.event_id in seen:
            continue
        seen.add(e.event_id)
        wms[e.user_id] = e.ts if wm is None else max(wm, e.ts)
        out.append(e)
    return out


def reference(events: Iterable[Any], *, max_len: int, allowed_lateness_s: int,
              max_queries: int) -> dict[str, UserSequence]:
    """Every user's state computed directly from a whole source stream (arrival order):
    the accepted events, stably sorted by ts, tails kept. Used by tests and end-to-end
    checks that compare the online store with the source."""
    per_user: dict[str, list] = {}
    for e in accepted(events, allowed_lateness_s=allowed_lateness_s):
        per_user.setdefault(e.user_id, []).append(e)
    out = {}
    for user_id, evs in per_user.items():
        wm = max(e.ts for e in evs)
        cl = sorted((e for e in evs if is_click(e)), key=lambda e: e.ts)
        qs = sorted((e for e in evs if not is_click(e)), key=lambda e: e.ts)
        kept, kq = cl[-max_len:], qs[-max_queries:]
        out[user_id] = UserSequence(
            user_id,
            tuple(e.item_id for e in kept), tuple(int(e.label) for e in kept),
            tuple(e.ts for e in kept), tuple(e.surface for e in kept),
            tuple(e.query_id or "" for e in kept),
            tuple(e.query_id for e in kq), tuple(e.text for e in kq), tuple(e.ts for e in kq),
            wm, len(cl), {e.event_id: e.ts for e in evs if e.ts >= wm - allowed_lateness_s})
    return out


# -- compact serialization for the state store ---------------------------------------------

def to_record(s: UserSequence) -> list:
    """A compact JSON-able list (positional, no key names repeated per user)."""
    # tuples encode as JSON arrays; no copies needed
    return [s.item_ids, s.labels, s.ts, s.surfaces, s.click_query_ids, s.query_ids, s.query_texts,
            s.query_ts, s.watermark, s.total_clicks, tuple(s.seen), tuple(s.seen.values())]


def from_record(user_id: str, r: list) -> UserSequence:
    return _make(user_id, tuple(r[0]), tuple(r[1]), tuple(r[2]), tuple(r[3]), tuple(r[4]),
                 tuple(r[5]), tuple(r[6]), tuple(r[7]), r[8], r[9], dict(zip(r[10], r[11])))
