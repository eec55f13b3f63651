"""The FineTune stage's plain functions: which events of a merged sequence are new, and the example."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from unirec.features.sequence import merge
from unirec.streaming.events import ClickEvent, QueryEvent
from unirec.streaming.finetune import example_of, new_tail

KW = dict(max_len=6, allowed_lateness_s=1000, max_queries=3)


def click(k: int, ts: int, item: str | None = None, **kw) -> ClickEvent:
    return ClickEvent(f"e{k}", "u", item or f"i{k}", ts, 1, kw.pop("surface", "rec"), **kw)


def applied(state, events):
    res = merge(state, "u", events, **KW)
    return res.state, len(res.applied_clicks)


def test_in_order_events_are_the_tail():
    s1, n1 = applied(None, [click(0, 10), click(1, 20)])
    assert new_tail(None, s1, n1) == 2
    s2, n2 = applied(s1, [click(2, 30), click(3, 30)])
    assert new_tail(s1, s2, n2) == 2


def test_a_late_event_makes_every_event_after_it_count_as_new():
    s1, _ = applied(None, [click(k, 10 * k) for k in range(4)])         # ts 0, 10, 20, 30
    s2, n = applied(s1, [click(9, 15)])                                  # lands between 10 and 20
    assert list(s2.ts) == [0, 10, 15, 20, 30]
    assert new_tail(s1, s2, n) == 3


def test_truncation_keeps_the_count_of_new_events():
    s1, _ = applied(None, [click(k, k) for k in range(6)])              # full (max_len 6)
    s2, n = applied(s1, [click(6, 6), click(7, 7)])                      # two oldest fall off
    assert list(s2.item_ids) == [f"i{k}" for k in range(2, 8)] and new_tail(s1, s2, n) == 2


def test_repeated_items_at_equal_times_are_matched_from_the_end():
    s1, _ = applied(None, [click(0, 5, "x"), click(1, 5, "x")])
    s2, n = applied(s1, [click(2, 5, "x")])
    assert new_tail(s1, s2, n) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=10), st.lists(st.integers(0, 60), min_size=1, max_size=6))
def test_the_tail_always_holds_every_new_click(old_ts, new_ts):
    s1, _ = applied(None, [click(k, t) for k, t in enumerate(old_ts)])
    s2, n = applied(s1, [click(100 + k, t) for k, t in enumerate(new_ts)])
    tail = new_tail(s1, s2, n)
    new_ids = {f"i{100 + k}" for k in range(len(new_ts))}
    kept_new = [i for i in s2.item_ids if i in new_ids]
    assert set(kept_new) <= set(s2.item_ids[len(s2) - tail:])
    assert tail == 0 or s2.item_ids[len(s2) - tail] in new_ids             # and starts at a new one


def test_example_carries_the_query_text_of_search_clicks():
    q = QueryEvent("q1", "u", "q1", "space opera", 9)
    res = merge(None, "u", [q, click(0, 10, surface="search", query_id="q1"), click(1, 11)], **KW)
    ex = example_of(res.state, 2)
    assert ex["queries"] == ["space opera", None] and ex["surfaces"] == ["search", "rec"] and ex["n_new"] == 2
