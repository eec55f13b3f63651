"""Exactly-once effect of the state half: crashes anywhere in a batch, restart, compare with the source."""
from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest

from unirec.features import item_stats, verify
from unirec.features.config import FeaturesConfig
from unirec.features.online import OnlineStore
from unirec.features.sequence import merge
from unirec.features.state import StateStore

TP = ("clicks", 0)


def source(n: int, seed: int) -> list:
    """A stream with queries, out-of-order and late events and duplicated event ids."""
    rng, out = random.Random(seed), []
    for k in range(n):
        u, ts = f"u{rng.randrange(12)}", 10_000 + 30 * k + rng.randrange(-4000, 200)
        if rng.random() < 0.2:
            out.append(SimpleNamespace(event_id=f"q{k}", user_id=u, query_id=f"q{k}", text=f"t{k}", ts=ts))
        else:
            out.append(SimpleNamespace(event_id=f"c{k}", user_id=u, item_id=f"i{rng.randrange(8)}", ts=ts,
                                       label=rng.randrange(2), surface=rng.choice(["rec", "search"]),
                                       query_id=None))
        if rng.random() < 0.05:
            out.append(out[rng.randrange(len(out))])  # a producer retry of an earlier event
    return out


def run_batch(store: StateStore, online: OnlineStore, events: list, start: int, n: int, cfg, crash: str) -> None:
    """One driver step; `crash` says where the process dies ("" = it does not)."""
    by_user: dict[str, list] = {}
    for e in events[start:start + n]:
        by_user.setdefault(e.user_id, []).append(e)
    old = store.get_users(by_user)
    res = [merge(old.get(u), u, evs, max_len=cfg.max_sequence_length, allowed_lateness_s=cfg.allowed_lateness_s,
                 max_queries=cfg.max_queries) for u, evs in by_user.items()]
    clicks = [c for r in res for c in r.applied_clicks]
    items = item_stats.apply(store.get_items({c.item_id for c in clicks}), clicks,
                             bucket_s=cfg.item_bucket_s, windows_s=cfg.item_windows_s)
    if crash == "before_commit":
        return
    users = [r.state for r in res if r.applied]
    batch = store.commit_batch(users, items.values(), {TP: start + n})
    if crash == "before_push":
        return
    online.push_users(users[: len(users) // 2])  # crash in the middle of the push
    if crash == "mid_push":
        return
    online.push_users(users)
    online.push_items(list(items.values()))
    if crash == "before_mark":
        return
    store.mark_pushed(batch=batch)


def recover(store: StateStore, online: OnlineStore) -> None:
    pending = store.pending_push()
    online.push_users(pending.users)
    online.push_items(pending.items)
    store.mark_pushed(batch=pending.batch)


@pytest.mark.integration
@pytest.mark.parametrize("seed", [1, 2])
def test_crashes_anywhere_in_a_batch_lose_nothing_and_apply_nothing_twice(tmp_path, seed):
    cfg = FeaturesConfig(repo_dir=str(tmp_path / "feast"), state_path=str(tmp_path / "state.db"),
                         max_sequence_length=6, max_queries=3, allowed_lateness_s=600,
                         item_bucket_s=60, item_windows_s=(60, 600))
    events, rng = source(600, seed), random.Random(seed)
    online = OnlineStore(cfg)
    online.apply()
    store, crashes = StateStore(cfg.state_path), 0
    while (pos := store.offsets().get(TP, 0)) < len(events):
        crash = rng.choice(["", "", "before_commit", "before_push", "mid_push", "before_mark"])
        run_batch(store, online, events, pos, rng.randrange(1, 60), cfg, crash)
        if crash:  # the process dies: reopen everything, re-push the outbox, seek to the stored offset
            crashes += 1
            store.close()
            store = StateStore(cfg.state_path)
            online = OnlineStore(cfg)
            recover(store, online)
    assert crashes >= 5 and not store.pending_push()
    report = verify.compare(online, events, cfg)
    assert report.ok, report
    assert report.users == 12 and report.items == 8


@pytest.mark.integration
def test_replaying_from_behind_the_stored_offset_changes_nothing(tmp_path):
    cfg = FeaturesConfig(repo_dir=str(tmp_path / "feast"), state_path=str(tmp_path / "state.db"),
                         max_sequence_length=6, max_queries=3, allowed_lateness_s=600,
                         item_bucket_s=60, item_windows_s=(60, 600))
    events = source(300, 3)
    online = OnlineStore(cfg)
    online.apply()
    with StateStore(cfg.state_path) as store:
        for start in range(0, len(events), 50):
            run_batch(store, online, events, start, 50, cfg, "")
        for start in range(100, len(events), 70):  # at-least-once delivery re-sends a tail
            run_batch(store, online, events, start, 70, cfg, "")
    assert verify.compare(online, events, cfg).ok


@pytest.mark.integration
def test_verify_reports_a_click_applied_twice(tmp_path):
    cfg = FeaturesConfig(repo_dir=str(tmp_path / "feast"), max_sequence_length=6, item_bucket_s=60,
                         item_windows_s=(60,))
    events = [e for e in source(50, 4) if hasattr(e, "item_id")]
    online = OnlineStore(cfg)
    online.apply()
    want_users, _ = verify.expected(events, cfg)
    states = list(want_users.values())
    states[0] = dataclasses.replace(states[0], total_clicks=states[0].total_clicks + 1)
    online.push_users(states)
    report = verify.compare(online, events, cfg)
    assert report.duplicated == 1 and report.users_mismatched == 1 and not report.ok
