"""State store: atomic batch commits, offsets, outbox and crash recovery."""
from __future__ import annotations

import multiprocessing
import os
import sqlite3
from types import SimpleNamespace

import pytest

from unirec.features import item_stats
from unirec.features.sequence import merge
from unirec.features.state import StateStore

KW = dict(max_len=3, allowed_lateness_s=100, max_queries=2)


def click(eid, user, item, ts, label=1):
    return SimpleNamespace(event_id=eid, user_id=user, item_id=item, ts=ts, label=label,
                           surface="rec", query_id=None)


def batch(store, events, offsets):
    """One driver step: load states, merge, commit; returns the batch id."""
    by_user = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    old = store.get_users(by_user)
    results = [merge(old.get(u), u, evs, **KW) for u, evs in by_user.items()]
    clicks = [c for r in results for c in r.applied_clicks]
    items = item_stats.apply(store.get_items({c.item_id for c in clicks}), clicks,
                             bucket_s=60, windows_s=(60,))
    return store.commit_batch([r.state for r in results], items.values(), offsets)


def test_commit_roundtrips_states_and_offsets(tmp_path):
    with StateStore(tmp_path / "s.db") as st:
        b = batch(st, [click("a", "u", "x", 10), click("b", "v", "x", 20, 0)], {("clicks", 0): 2})
        assert b == 1
        users = st.get_users(["u", "v", "missing"])
        assert set(users) == {"u", "v"} and users["u"].item_ids == ("x",)
        assert st.get_items(["x"])["x"].clicks == 2
        assert st.offsets() == {("clicks", 0): 2}


def test_state_survives_reopen_and_offsets_never_move_back(tmp_path):
    path = tmp_path / "s.db"
    with StateStore(path) as st:
        batch(st, [click("a", "u", "x", 10)], {("clicks", 0): 5, ("clicks", 1): 3})
        st.commit_batch([], [], {("clicks", 0): 4})
    with StateStore(path) as st:
        assert st.offsets() == {("clicks", 0): 5, ("clicks", 1): 3}
        assert st.get_users(["u"])["u"].seen == {"a": 10}


def test_outbox_lists_committed_but_unpushed_states_until_marked(tmp_path):
    with StateStore(tmp_path / "s.db") as st:
        assert not st.pending_push()
        b1 = batch(st, [click("a", "u", "x", 10)], {("clicks", 0): 1})
        p = st.pending_push()
        assert p.batch == b1 and [s.user_id for s in p.users] == ["u"] and [s.item_id for s in p.items] == ["x"]
        # the next batch rewrites u before batch 1's push is confirmed
        b2 = batch(st, [click("b", "u", "y", 11)], {("clicks", 0): 2})
        st.mark_pushed(batch=b1)  # confirms only what batch 1 wrote
        p = st.pending_push()
        assert p.batch == b2 and [s.user_id for s in p.users] == ["u"] and {s.item_id for s in p.items} == {"y"}
        assert p.users[0].item_ids == ("x", "y")
        st.mark_pushed(batch=p.batch)
        assert not st.pending_push() and st.counts()["outbox"] == 0


def test_a_failed_commit_leaves_nothing_behind(tmp_path):
    class Boom(Exception):
        pass

    class BadOffsets(dict):
        def items(self):
            raise Boom

    with StateStore(tmp_path / "s.db") as st:
        with pytest.raises(Boom):
            batch(st, [click("a", "u", "x", 10)], BadOffsets())
        assert st.counts() == {"users": 0, "items": 0, "offsets": 0, "outbox": 0, "train_log": 0}
        assert batch(st, [click("a", "u", "x", 10)], {("clicks", 0): 1}) == 1


def _commit_then_die(path, n):
    st = StateStore(path)
    for i in range(n):
        batch(st, [click(f"e{i}", "u", "x", i)], {("clicks", 0): i + 1})
    os._exit(0)  # no close(): like a SIGKILL right after the last commit returned


def test_committed_batches_survive_a_process_that_dies_without_closing(tmp_path):
    path = tmp_path / "s.db"
    p = multiprocessing.get_context("fork").Process(target=_commit_then_die, args=(path, 5))
    p.start()
    p.join(60)
    with StateStore(path) as st:
        assert st.offsets() == {("clicks", 0): 5}
        assert st.get_items(["x"])["x"].clicks == 5
        assert st.get_users(["u"])["u"].item_ids == ("x", "x", "x") and st.get_users(["u"])["u"].total_clicks == 5


def test_many_keys_are_read_in_chunks(tmp_path):
    with StateStore(tmp_path / "s.db") as st:
        evs = [click(f"e{i}", f"u{i}", f"i{i % 7}", i) for i in range(1200)]
        batch(st, evs, {("clicks", 0): 1200})
        assert len(st.get_users([f"u{i}" for i in range(1200)])) == 1200
        assert len(st.pending_push().users) == 1200


def test_a_store_with_the_former_per_key_outbox_is_converted_on_open(tmp_path):
    """Stores written before the outbox became one row per batch keep every unpushed key."""
    path = tmp_path / "s.db"
    with StateStore(path) as st:
        b1 = batch(st, [click("a", "u", "x", 10), click("b", "v", "y", 11)], {("clicks", 0): 2})
        b2 = batch(st, [click("c", "u", "z", 12)], {("clicks", 0): 3})
    db = sqlite3.connect(path)
    with db:   # rewrite the outbox as the former schema held it: one row per key, its last batch
        db.execute("DROP TABLE push_outbox")
        db.execute("CREATE TABLE outbox (kind TEXT NOT NULL, key TEXT NOT NULL, batch INTEGER NOT NULL, "
                   "PRIMARY KEY (kind, key)) WITHOUT ROWID")
        db.executemany("INSERT INTO outbox VALUES (?, ?, ?)",
                       [("user", "u", b2), ("user", "v", b1), ("item", "x", b1), ("item", "y", b1), ("item", "z", b2)])
    db.close()
    with StateStore(path) as st:
        p = st.pending_push()
        assert p.batch == b2 and {s.user_id for s in p.users} == {"u", "v"}
        assert {s.item_id for s in p.items} == {"x", "y", "z"} and st.counts()["outbox"] == 5
        st.mark_pushed(batch=b1)                    # batch 1's keys pushed: u and z remain
        assert {s.user_id for s in st.pending_push().users} == {"u"}
        assert {s.item_id for s in st.pending_push().items} == {"z"}
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "outbox" not in tables and "push_outbox" in tables
