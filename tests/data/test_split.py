"""`unirec.data.split`: RecBole's leave-one-out on a hand-made stream."""
from __future__ import annotations

import pytest

from unirec.data import load_events, prepare
from unirec.data.split import eval_case, leave_one_out, split_cases, train_part, train_targets


def valid_case(h):
    return eval_case(h, "valid")


def case_test(h):
    return eval_case(h, "test")


def click(n, user, item, ts, rating=4, query=None):
    return {"schema": "click/v1", "event_id": f"c-{n}", "user_id": user, "item_id": item, "ts": ts,
            "label": int(rating >= 4), "rating": rating, "surface": "search" if query else "rec",
            "query_id": query, "position": None}


def query(qid, user, ts, text):
    return {"schema": "query/v1", "event_id": qid, "user_id": user, "query_id": qid, "text": text, "ts": ts}


# u1: 5 clicks, deliberately listed out of time order with a tie (i3 and i4 at ts 30: file order wins)
EVENTS = [
    click(1, "u1", "i1", 10),
    click(2, "u2", "i9", 5, rating=2),
    click(3, "u1", "i3", 30),
    query("q-1", "u1", 30, "star wars"),
    click(4, "u1", "i4", 30, rating=1, query="q-1"),
    click(5, "u1", "i2", 20),
    query("q-2", "u1", 50, "comedy"),
    click(6, "u1", "i5", 50, rating=5, query="q-2"),
    click(7, "u3", "i1", 7),
    click(8, "u3", "i2", 8),
    click(9, "u4", "i7", 1),
]


@pytest.fixture
def hist():
    return leave_one_out(EVENTS)


def test_histories_are_stable_time_ordered_with_queries_attached(hist):
    h = hist["u1"]
    assert h.item_ids == ("i1", "i2", "i3", "i4", "i5")
    assert h.ts == (10, 20, 30, 30, 50)
    assert h.labels == (1, 1, 1, 0, 1) and h.ratings == (4, 4, 4, 1, 5)
    assert h.surfaces == ("rec", "rec", "rec", "search", "search")
    assert h.query_ids == (None, None, None, "q-1", "q-2")
    assert h.query_texts == (None, None, None, "star wars", "comedy")
    assert h.event_ids == ("c-1", "c-5", "c-3", "c-4", "c-6")


def test_last_is_test_second_last_is_valid_rest_is_train(hist):
    h = hist["u1"]
    assert train_part(h).item_ids == ("i1", "i2", "i3")
    v, t = valid_case(h), case_test(h)
    assert (v.item_id, v.history.item_ids, v.label, v.query_text) == ("i4", ("i1", "i2", "i3"), 0, "star wars")
    assert (t.item_id, t.history.item_ids, t.query_id, t.surface) == ("i5", ("i1", "i2", "i3", "i4"), "q-2", "search")
    assert t.history.query_texts[-1] == "star wars"  # the valid click's query is part of the test history
    assert train_targets(h) == [1, 2]  # every training prefix predicts its next click


def test_short_users_follow_recbole(hist):
    # one click: train only; two clicks: train + test, no validation (RecBole's legal_leave_one_num)
    assert train_part(hist["u2"]).item_ids == ("i9",) and valid_case(hist["u2"]) is None and case_test(hist["u2"]) is None
    assert train_part(hist["u3"]).item_ids == ("i1",) and valid_case(hist["u3"]) is None
    assert case_test(hist["u3"]).item_id == "i2" and case_test(hist["u3"]).history.item_ids == ("i1",)


def test_split_cases_cover_every_click_once(hist):
    train, valid, test = split_cases(hist)
    n_train = sum(len(t) for t in train)
    assert n_train + len(valid) + len(test) == sum(e["schema"] == "click/v1" for e in EVENTS)
    assert [c.user_id for c in test] == ["u1", "u3"] and [c.user_id for c in valid] == ["u1"]


def test_time_not_file_order_decides(hist):
    moved = [e for e in EVENTS if e["event_id"] != "c-5"] + [EVENTS[5]]  # u1's ts-20 click listed last
    assert EVENTS[5]["event_id"] == "c-5" and leave_one_out(moved) == hist


def test_unknown_split_name_is_an_error(hist):
    with pytest.raises(ValueError, match="valid"):
        eval_case(hist["u1"], "train")


def test_prepared_stream_splits_like_recbole(gen_dir, make_cfg, tiny):
    """Per user, the split equals an independent stable sort of the raw rating file."""
    events = load_events(prepare(make_cfg(gen_dir)))
    ratings, _ = tiny.generated()
    hist = leave_one_out(events)
    for user in {u for u, *_ in ratings}:
        rows = sorted((r for r in ratings if r[0] == user), key=lambda r: r[3])  # stable by ts
        assert hist[user].item_ids == tuple(i for _, i, _, _ in rows)
        assert case_test(hist[user]).item_id == rows[-1][1]
