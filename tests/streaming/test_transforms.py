"""The micro-batch steps: plain functions directly, and the DoFns under Beam's TestPipeline."""
from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from unirec.features import item_stats, sequence
from unirec.features.state import StateStore, decode_user
from unirec.streaming.events import ClickEvent, QueryEvent, encode
from unirec.streaming.transforms import (
    DEAD_LETTER, MAIN, BatchSpec, MultiOutput, ParseEvent, UpdateUserSequence, group_by_key_group,
    order_user_events,
    pack_parsed, parse_records, unpack_parsed, update_items, update_users,
)

NOW = 1_800_000_000
KINDS = {"clicks": "click", "queries": "query"}


def click(n, user="u1", item="i1", ts=1000, label=1, surface="rec", query_id=None):
    return ClickEvent(f"c-{n}", user, item, ts, label, surface, query_id)


def query(n, user="u1", ts=1000, text="star wars"):
    return QueryEvent(f"q-{n}", user, f"q-{n}", text, ts)


def record(event_or_bytes, offset, topic=None, partition=0, ts_ms=None):
    raw = event_or_bytes if isinstance(event_or_bytes, bytes) else encode(event_or_bytes)
    if topic is None:
        topic = "queries" if isinstance(event_or_bytes, QueryEvent) else "clicks"
    return (topic, partition, offset, offset if ts_ms is None else ts_ms, b"k", raw)


def spec(tmp_path, **kw) -> BatchSpec:
    return BatchSpec(kinds=KINDS, state_path=str(tmp_path / "state.sqlite"), **{"key_groups": 4, **kw})


# ----------------------------------------------------------------------------- parse


def test_parse_routes_valid_events_and_dead_letters_with_reason_and_source():
    bad = [b'{"schema": "click/v1"', b"\xff\xfe", json.dumps({**json.loads(encode(click(9))), "ts": "x"}).encode()]
    records = [record(click(1), 0), record(bad[0], 1), record(query(2), 5), record(bad[1], 2),
               record(bad[2], 3)]
    parsed, dead = parse_records(records, KINDS, now_s=NOW, limits=BatchSpec(KINDS, "").limits)
    assert [p.event for p in parsed] == [click(1), query(2)]
    assert [(d.reason, d.source_topic, d.offset, d.original) for d in dead] == [
        ("malformed_json", "clicks", 1, bad[0]), ("invalid_utf8", "clicks", 2, bad[1]),
        ("wrong_type", "clicks", 3, bad[2])]
    assert dead[2].field == "ts"


def test_a_query_on_the_clicks_topic_and_a_tombstone_are_dead_letters():
    records = [record(encode(query(1)), 0, topic="clicks"), ("clicks", 0, 1, 1, b"k", None)]
    parsed, dead = parse_records(records, KINDS, now_s=NOW, limits=BatchSpec(KINDS, "").limits)
    assert parsed == [] and [d.reason for d in dead] == ["unknown_schema", "malformed_json"]
    assert dead[1].original == b""


def test_parse_event_dofn_splits_outputs_under_beam():
    records = [record(click(1, user="a"), 0), record(b"nope", 1), record(click(2, user="b"), 2)]
    with TestPipeline() as p:
        outs = (p | beam.Create([records])
                | MultiOutput(ParseEvent(BatchSpec(KINDS, "", key_groups=1)), (MAIN, DEAD_LETTER)))
        users = outs[MAIN] | beam.FlatMap(lambda kv: [p.event.user_id for p in unpack_parsed(kv[1])])
        reasons = outs[DEAD_LETTER] | beam.FlatMap(lambda ds: [(d.reason, d.offset) for d in ds])
        assert_that(users, equal_to(["a", "b"]), label="users")
        assert_that(reasons, equal_to([("malformed_json", 1)]), label="dead")


# ----------------------------------------------------------------------------- order and merge


def test_order_is_offset_order_per_partition_and_arrival_time_across_topics():
    q = query(1, ts=50)
    c1, c2, c3 = click(1, ts=40), click(2, ts=50, surface="search", query_id="q-1"), click(3, ts=30)
    parsed, _ = parse_records(
        [record(c3, 9, ts_ms=300), record(c2, 8, ts_ms=200), record(q, 4, ts_ms=200), record(c1, 7, ts_ms=100)],
        KINDS, now_s=NOW, limits=BatchSpec(KINDS, "").limits)
    # c1 arrived first; q and c2 arrived in the same ms with the same event ts: the query leads;
    # c3 arrived last although its event time is the oldest.
    assert [p.event for p in order_user_events(parsed)] == [c1, q, c2, c3]


def test_update_users_matches_the_reference_and_rejects_duplicates_and_late(tmp_path):
    s = spec(tmp_path, allowed_lateness_s=100)
    events = [click(1, ts=1000), query(2, ts=1010), click(3, ts=1010, surface="search", query_id="q-2"),
              click(1, ts=1000),           # duplicate event id
              click(4, ts=5000), click(5, ts=4950), click(6, ts=100)]  # 5 in lateness, 6 late
    parsed, _ = parse_records([record(e, i, ts_ms=i) for i, e in enumerate(events)], KINDS, now_s=NOW,
                              limits=s.limits)
    res = update_users(parsed, lambda ids: {}, spec=s)
    ref = sequence.reference(events, **s.merge_kwargs)
    assert res.states == [ref["u1"]]
    assert [(d.reason, d.field, d.offset) for d in res.dead] == [("duplicate", "event_id", 3), ("late", "ts", 6)]
    assert [c.event_id for c in res.applied_clicks] == ["c-1", "c-3", "c-4", "c-5"]


def test_update_users_continues_from_the_stored_state_and_is_idempotent(tmp_path):
    s = spec(tmp_path)
    first = [click(1, ts=10), click(2, ts=20)]
    p1, _ = parse_records([record(e, i, ts_ms=i) for i, e in enumerate(first)], KINDS, now_s=NOW, limits=s.limits)
    stored = {"u1": update_users(p1, lambda ids: {}, spec=s).states[0]}
    again = update_users(p1, lambda ids: stored, spec=s)  # the same records re-delivered
    assert again.states == [] and again.applied_clicks == [] and len(again.dead) == 2
    p2, _ = parse_records([record(click(3, ts=30), 5)], KINDS, now_s=NOW, limits=s.limits)
    assert update_users(p2, lambda ids: stored, spec=s).states == [
        sequence.reference(first + [click(3, ts=30)], **s.merge_kwargs)["u1"]]


def _examples(tmp_path, old_events, new_events, **kw):
    s = spec(tmp_path, examples=True, **kw)
    parse = lambda evs, at: parse_records([record(e, at + i, ts_ms=at + i) for i, e in enumerate(evs)], KINDS,
                                          now_s=NOW, limits=s.limits)[0]
    stored = {"u1": update_users(parse(old_events, 0), lambda ids: {}, spec=s).states[0]} if old_events else {}
    return update_users(parse(new_events, 100), lambda ids: stored, spec=s)


def test_a_burst_longer_than_the_stored_sequence_is_trained_on_whole(tmp_path):
    """More clicks of one user in one batch than the stored sequence keeps: the state stays
    capped, but the example still holds every new click as new (none unscored or untrained)."""
    old = [click(k, item=f"o{k}", ts=10 + k) for k in range(3)]
    burst = [click(10 + k, item=f"n{k}", ts=100 + k) for k in range(8)]
    res = _examples(tmp_path, old, burst, max_len=5)
    assert list(res.states[0].item_ids) == [f"n{k}" for k in range(3, 8)]
    (ex,) = res.examples
    assert ex["n_new"] == 8 and ex["item_ids"][-8:] == [f"n{k}" for k in range(8)]
    assert ex["item_ids"][:-8] == ["o0", "o1", "o2"]          # and the old context before them


def test_a_burst_keeps_the_query_text_of_every_new_search_click(tmp_path):
    events = []
    for k in range(4):
        events += [query(k, ts=100 + 2 * k, text=f"film {k}"),
                   click(k, item=f"n{k}", ts=101 + 2 * k, surface="search", query_id=f"q-{k}")]
    (ex,) = _examples(tmp_path, [], events, max_len=2, max_queries=1).examples
    assert ex["n_new"] == 4 and ex["queries"] == [f"film {k}" for k in range(4)]


def test_a_late_click_older_than_the_whole_stored_sequence_is_still_an_example(tmp_path):
    old = [click(k, item=f"o{k}", ts=10 * (k + 1)) for k in range(5)]            # ts 10..50, full at 5
    late, mid = click(20, item="late", ts=5), click(21, item="mid", ts=35)
    res = _examples(tmp_path, old, [late, mid], max_len=5)
    assert "late" not in res.states[0].item_ids                                    # fell off the capped state
    (ex,) = res.examples
    new_part = ex["item_ids"][len(ex["item_ids"]) - ex["n_new"]:]
    assert new_part[0] == "late" and "mid" in new_part


def test_update_items_counts_applied_clicks_on_top_of_stored_stats(tmp_path):
    s = spec(tmp_path)
    old = [click(1, item="a", ts=3600, label=1), click(2, item="b", ts=3700, label=0)]
    stored = item_stats.apply({}, old, bucket_s=s.item_bucket_s, windows_s=s.item_windows_s)
    new = [click(3, item="a", ts=7300, label=0), click(4, item="c", ts=7400, label=1)]
    got = {st.item_id: st for st in update_items(new, lambda ids: {i: stored[i] for i in ids if i in stored}, spec=s)}
    assert set(got) == {"a", "c"}
    ref = item_stats.reference(old + new, bucket_s=s.item_bucket_s, windows_s=s.item_windows_s)
    for item_id, st in got.items():
        assert item_stats.feature_row(st, bucket_s=s.item_bucket_s, windows_s=s.item_windows_s) == ref[item_id]


def test_update_user_sequence_dofn_reads_the_state_store_under_beam(tmp_path):
    s = spec(tmp_path, key_groups=1)
    stored = sequence.merge(None, "u1", [click(1, ts=10)], **s.merge_kwargs).state
    with StateStore(s.state_path) as store:
        store.commit_batch([stored], [], {("clicks", 0): 1})
    parsed, _ = parse_records([record(click(1, ts=10), 1), record(click(2, ts=20), 2)], KINDS, now_s=NOW,
                              limits=s.limits)
    with TestPipeline() as p:
        outs = (p | beam.Create([(0, pack_parsed(parsed))])
                | beam.GroupByKey()
                | MultiOutput(UpdateUserSequence(s), (MAIN, DEAD_LETTER)))
        lengths = outs[MAIN] | beam.FlatMap(lambda rows: [(st.user_id, st.item_ids) for st in map(decode_user, rows)])
        dead = outs[DEAD_LETTER] | beam.FlatMap(lambda ds: [(d.reason, d.offset) for d in ds])
        assert_that(lengths, equal_to([("u1", ("i1", "i1"))]), label="states")
        assert_that(dead, equal_to([("duplicate", 1)]), label="dead")


@pytest.mark.parametrize("n_groups", [1, 3, 16])
def test_key_groups_do_not_change_the_result(tmp_path, n_groups):
    s = spec(tmp_path, key_groups=n_groups)
    events = [click(i, user=f"u{i % 7}", item=f"i{i % 5}", ts=100 + i) for i in range(60)]
    parsed, _ = parse_records([record(e, i, ts_ms=i) for i, e in enumerate(events)], KINDS, now_s=NOW,
                              limits=s.limits)
    groups = group_by_key_group(parsed, lambda p: p.event.user_id, n_groups)
    states = [st for g in groups.values() for st in update_users(g, lambda ids: {}, spec=s).states]
    assert len(states) == 7  # every user's events met in exactly one group
    assert {st.user_id: st for st in states} == sequence.reference(events, **s.merge_kwargs)


def test_events_rebuilt_after_a_group_by_key_are_the_events_that_went_in():
    """Events cross the GroupByKey as tuples (`event_to_tuple`): rebuilt, they must be
    equal, hash alike and stay frozen."""
    from unirec.streaming.transforms import event_from_tuple, event_to_tuple

    events = [click(1), click(2, surface="search", query_id="q-2"),
              ClickEvent("c-3", "u2", "i9", 5, 0, "rec", None, 4, 2, "r-1"), query(4)]
    for e in events:
        back = event_from_tuple(event_to_tuple(e))
        assert type(back) is type(e) and back == e and hash(back) == hash(e) and repr(back) == repr(e)
        with pytest.raises(AttributeError):
            back.ts = 0
