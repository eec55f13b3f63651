"""Item counts and CTR over sliding event-time windows (pure logic)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from unirec.features import item_stats
from unirec.features.item_stats import ItemStats, feature_row, window_counts, window_name
from unirec.features.sequence import merge

H = 3600
KW = dict(bucket_s=H, windows_s=(H, 24 * H))


@dataclass(frozen=True)
class Click:
    event_id: str
    user_id: str
    item_id: str
    ts: int
    label: int = 1
    surface: str = "rec"
    query_id: str | None = None


def test_window_names():
    assert [window_name(s) for s in (3600, 86400, 604800, 90, 120)] == ["1h", "1d", "7d", "90s", "2m"]
    assert item_stats.feature_names((3600,)) == [
        "clicks_1h", "positives_1h", "ctr_1h", "clicks_all", "positives_all", "ctr_all", "last_event_ts"]


def test_counts_and_ctr_over_windows_relative_to_the_item_watermark():
    t0 = 100 * 24 * H
    clicks = [Click("a", "u", "x", t0, 1), Click("b", "u", "x", t0 + 2 * H, 0),
              Click("c", "v", "x", t0 + 23 * H, 1), Click("d", "v", "x", t0 + 23 * H + 5, 0)]
    s = item_stats.apply({}, clicks, **KW)["x"]
    row = feature_row(s, **KW)
    assert (row["clicks_1h"], row["positives_1h"], row["ctr_1h"]) == (2, 1, 0.5)
    assert (row["clicks_1d"], row["positives_1d"]) == (4, 2)   # t0 is in the 24th bucket back
    assert (row["clicks_all"], row["positives_all"], row["ctr_all"]) == (4, 2, 0.5)
    assert row["last_event_ts"] == t0 + 23 * H + 5
    assert window_counts(s, now_s=t0 + 24 * H, **KW) == {H: (0, 0), 24 * H: (3, 1)}


def test_old_buckets_are_dropped_but_all_time_totals_keep_counting():
    s = item_stats.apply({}, [Click("a", "u", "x", 0, 1)], **KW)
    s = item_stats.apply(s, [Click("b", "u", "x", 30 * H, 0)], **KW)
    assert list(s["x"].buckets) == [30 * H]
    s = item_stats.apply(s, [Click("c", "u", "x", 1, 1)], **KW)   # too old for any window
    row = feature_row(s["x"], **KW)
    assert row["clicks_1d"] == 1 and row["clicks_all"] == 3 and row["positives_all"] == 2


def test_no_clicks_means_zero_ctr_not_an_error():
    assert feature_row(ItemStats("x"), **KW)["ctr_all"] == 0.0


def test_only_touched_items_are_returned_and_inputs_are_not_mutated():
    before = item_stats.apply({}, [Click("a", "u", "x", 10), Click("b", "u", "y", 10)], **KW)
    snapshot = {k: (v.clicks, dict(v.buckets)) for k, v in before.items()}
    after = item_stats.apply(before, [Click("c", "u", "x", 20)], **KW)
    assert set(after) == {"x"} and after["x"].clicks == 2
    assert {k: (v.clicks, dict(v.buckets)) for k, v in before.items()} == snapshot


def test_duplicates_never_double_count_when_fed_from_the_user_merge():
    c = Click("a", "u", "x", 10, 1)
    state, stats = None, {}
    for _ in range(3):  # the same event delivered three times
        res = merge(state, "u", [c], max_len=5, allowed_lateness_s=100, max_queries=2)
        state = res.state
        stats.update(item_stats.apply(stats, res.applied_clicks, **KW))
    assert stats["x"].clicks == 1


def test_record_roundtrip_through_json():
    s = item_stats.apply({}, [Click("a", "u", "x", 10), Click("b", "u", "x", 5000, 0)], **KW)["x"]
    assert item_stats.from_record("x", json.loads(json.dumps(item_stats.to_record(s)))) == s


@st.composite
def click_batches(draw):
    n = draw(st.integers(1, 40))
    clicks = [Click(f"e{k}", "u", draw(st.sampled_from("xyz")), draw(st.integers(0, 60 * H)),
                    draw(st.integers(0, 1))) for k in range(n)]
    order = draw(st.permutations(range(n)))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    return clicks, [clicks[i] for i in order], cuts


@settings(max_examples=200, deadline=None)
@given(click_batches(), st.sampled_from([(H,), (H, 24 * H), (2 * H, 6 * H, 48 * H)]))
def test_any_order_and_batching_equals_the_reference(case, windows):
    clicks, shuffled, cuts = case
    kw = dict(bucket_s=H, windows_s=windows)
    stats, bounds = {}, [0, *cuts, len(shuffled)]
    for a, b in zip(bounds, bounds[1:]):
        stats.update(item_stats.apply(stats, shuffled[a:b], **kw))
    got = {k: feature_row(v, **kw) for k, v in stats.items()}
    assert got == item_stats.reference(clicks, **kw)
