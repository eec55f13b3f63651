"""Per-user merge: event-time order, bounds, lateness, idempotency (pure logic)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unirec.features import sequence
from unirec.features.sequence import DUPLICATE, LATE, merge


@dataclass(frozen=True)
class Click:  # duck-typed like unirec.streaming.events.ClickEvent
    event_id: str
    user_id: str
    item_id: str
    ts: int
    label: int = 1
    surface: str = "rec"
    query_id: str | None = None


@dataclass(frozen=True)
class Query:  # duck-typed like unirec.streaming.events.QueryEvent
    event_id: str
    user_id: str
    query_id: str
    text: str
    ts: int


KW = dict(max_len=4, allowed_lateness_s=100, max_queries=2)


def run(events, state=None, user="u", **kw):
    return merge(state, user, events, **{**KW, **kw})


def test_clicks_are_ordered_by_event_time_and_ties_keep_arrival_order():
    evs = [Click("a", "u", "i1", 10), Click("b", "u", "i2", 5), Click("c", "u", "i3", 10),
           Click("d", "u", "i4", 5)]
    s = run(evs, max_len=10).state
    assert s.item_ids == ("i2", "i4", "i1", "i3")
    assert s.ts == (5, 5, 10, 10)
    assert s.watermark == 10 and s.total_clicks == 4


def test_sequence_is_bounded_to_the_most_recent_clicks():
    evs = [Click(f"e{t}", "u", f"i{t}", t) for t in range(10)]
    s = run(evs).state
    assert s.item_ids == ("i6", "i7", "i8", "i9")
    assert s.total_clicks == 10


def test_duplicate_changes_nothing_and_is_reported():
    first = run([Click("a", "u", "i1", 10, label=0)]).state
    again = run([Click("a", "u", "i1", 10, label=0)], state=first)
    assert again.state == first
    assert again.applied == [] and [r for _, r in again.rejected] == [DUPLICATE]


def test_duplicate_with_other_payload_is_still_a_duplicate():
    first = run([Click("a", "u", "i1", 10)]).state
    res = run([Click("a", "u", "i9", 12)], state=first)
    assert res.state == first and res.rejected[0][1] == DUPLICATE


def test_late_event_is_rejected_and_allowed_late_event_is_inserted_in_order():
    s = run([Click("a", "u", "i1", 1000), Click("b", "u", "i2", 1100)]).state
    res = run([Click("c", "u", "i3", 999), Click("d", "u", "i4", 1000)], state=s)
    assert [(e.event_id, r) for e, r in res.rejected] == [("c", LATE)]
    assert res.state.item_ids == ("i1", "i4", "i2")   # 1000 (a), 1000 (d arrived later), 1100
    assert res.state.watermark == 1100


def test_old_replay_after_its_id_was_forgotten_is_late_not_applied():
    s = run([Click("a", "u", "i1", 0)]).state
    s = run([Click("b", "u", "i2", 500)], state=s).state
    assert "a" not in s.seen           # fell out of the lateness horizon ...
    res = run([Click("a", "u", "i1", 0)], state=s)
    assert res.state == s and res.rejected[0][1] == LATE   # ... and still changes nothing


def test_seen_holds_exactly_the_events_inside_the_lateness_horizon():
    s = run([Click("a", "u", "i", 0), Click("b", "u", "i", 50), Click("c", "u", "i", 120)]).state
    assert dict(s.seen) == {"b": 50, "c": 120}   # 0 < 120 - 100


def test_queries_are_bounded_and_joined_to_their_click():
    evs = [Query("q1", "u", "q1", "star wars", 10), Click("c1", "u", "i1", 10, surface="search", query_id="q1"),
           Query("q2", "u", "q2", "alien", 20), Query("q3", "u", "q3", "heat", 30),
           Click("c2", "u", "i2", 31)]
    s = run(evs).state
    assert s.query_ids == ("q2", "q3") and s.query_texts == ("alien", "heat")
    assert s.click_query_ids == ("q1", "")
    assert s.surfaces == ("search", "rec")
    assert s.query_text_of(0) is None          # q1 fell off the bounded query list
    s2 = run(evs, max_queries=5).state
    assert s2.query_text_of(0) == "star wars" and s2.query_text_of(1) is None


def test_events_of_another_user_are_refused():
    with pytest.raises(ValueError, match="user"):
        run([Click("a", "v", "i", 1)])


def test_record_roundtrip_through_json():
    evs = [Query("q1", "u", "q1", "é ünï", 10), Click("c1", "u", "i1", 10, query_id="q1", label=0)]
    s = run(evs).state
    back = sequence.from_record("u", json.loads(json.dumps(sequence.to_record(s))))
    assert back == s


# -- properties ------------------------------------------------------------------------------

def _stream(draw, n_max=40, spread=60):
    """A user's events in source order: distinct ids, timestamps within `spread` s."""
    n = draw(st.integers(1, n_max))
    evs = []
    for k in range(n):
        t = draw(st.integers(0, spread))
        if draw(st.booleans()):
            evs.append(Click(f"c{k}", "u", f"i{draw(st.integers(0, 5))}", t,
                             label=draw(st.integers(0, 1)), surface=draw(st.sampled_from(["rec", "search"]))))
        else:
            evs.append(Query(f"q{k}", "u", f"q{k}", f"text {k}", t))
    return evs


@st.composite
def streams(draw, spread=60):
    return _stream(draw, spread=spread)


@st.composite
def stream_and_redelivery(draw):
    """Source events, and a delivery that reorders them (equal ts keep their relative
    order, as one Kafka partition does) and duplicates some, cut into batches."""
    evs = _stream(draw)
    # Shuffle across timestamps only: order by a random rank per distinct ts, then source order.
    rank = {t: draw(st.integers(0, 100)) for t in sorted({e.ts for e in evs})}
    order = sorted(range(len(evs)), key=lambda i: (rank[evs[i].ts], i))
    delivered = [evs[i] for i in order]
    for _ in range(draw(st.integers(0, 10))):  # a re-delivery comes after the first delivery
        e = draw(st.sampled_from(evs))
        delivered.insert(draw(st.integers(delivered.index(e) + 1, len(delivered))), e)
    cuts = sorted(draw(st.lists(st.integers(0, len(delivered)), max_size=5)))
    return evs, delivered, cuts


def _apply_in_batches(delivered, cuts, **kw):
    state, bounds = None, [0, *cuts, len(delivered)]
    for a, b in zip(bounds, bounds[1:]):
        state = merge(state, "u", delivered[a:b], **kw).state
    return state


@settings(max_examples=300, deadline=None)
@given(stream_and_redelivery(), st.integers(1, 6), st.integers(1, 4))
def test_any_reordering_and_duplication_within_lateness_equals_applying_once_in_order(
        case, max_len, max_queries):
    evs, delivered, cuts = case
    kw = dict(max_len=max_len, allowed_lateness_s=60, max_queries=max_queries)  # spread <= lateness
    in_order = merge(None, "u", sorted(evs, key=lambda e: e.ts), **kw)
    assert in_order.rejected == []
    assert _apply_in_batches(delivered, cuts, **kw) == in_order.state


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(1, 6), st.integers(0, 30))
def test_merge_equals_reference_computed_from_source_events(data, max_len, lateness):
    evs = data.draw(streams(spread=200))
    dups = data.draw(st.lists(st.sampled_from(evs), max_size=5))
    stream = evs + dups
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    kw = dict(max_len=max_len, allowed_lateness_s=lateness, max_queries=3)
    got = _apply_in_batches(stream, cuts, **kw)
    assert got == sequence.reference(stream, **kw)["u"]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_rejections_do_not_depend_on_batch_boundaries(data):
    evs = data.draw(streams(spread=300))
    stream = evs + data.draw(st.lists(st.sampled_from(evs), max_size=5))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    kw = dict(max_len=3, allowed_lateness_s=50, max_queries=2)
    whole = merge(None, "u", stream, **kw).rejected
    state, bounds, parts = None, [0, *cuts, len(stream)], []
    for a, b in zip(bounds, bounds[1:]):
        res = merge(state, "u", stream[a:b], **kw)
        state, parts = res.state, parts + res.rejected
    assert parts == whole


def test_serving_view_drops_only_the_dedup_ids():
    s = run([Click("a", "u", "i1", 10)]).state
    assert s.for_serving() == dataclasses.replace(s, seen={}) and s.for_serving().item_ids == ("i1",)
