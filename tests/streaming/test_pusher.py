"""The push process: committed states reach the real Feast store, coverage is reported in
batch order, failures surface in the driver, and the child never outlives the driver."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from unirec.features import item_stats
from unirec.features.config import FeaturesConfig
from unirec.features.online import OnlineStore
from unirec.features.sequence import merge
from unirec.features.state import StateStore
from unirec.streaming.pusher import PushError, PushProcess


def click(eid, user, item, ts):
    return SimpleNamespace(event_id=eid, user_id=user, item_id=item, ts=ts, label=1, surface="rec",
                           query_id=None)


def commit(store: StateStore, events: list, old: dict) -> int:
    """Merge `events` into the stored users and commit them as one batch."""
    per_user: dict[str, list] = {}
    for e in events:
        per_user.setdefault(e.user_id, []).append(e)
    res = [merge(old.get(u), u, evs, max_len=10, allowed_lateness_s=100, max_queries=3) for u, evs in per_user.items()]
    clicks = [c for r in res for c in r.applied_clicks]
    items = item_stats.apply(store.get_items({c.item_id for c in clicks}), clicks, bucket_s=3600, windows_s=(3600,))
    old.update((r.state.user_id, r.state) for r in res)
    return store.commit_batch([r.state for r in res], items.values(), {("clicks", 0): len(events)})


@pytest.fixture
def cfg(tmp_path) -> FeaturesConfig:
    return FeaturesConfig(repo_dir=str(tmp_path / "feast"), state_path=str(tmp_path / "state.sqlite"),
                          item_windows_s=(3600,), item_bucket_s=3600)


def test_committed_batches_reach_feast_and_coverage_is_reported(cfg):
    online = OnlineStore(cfg)
    online.apply()
    store, users = StateStore(cfg.state_path), {}
    proc = PushProcess(cfg)
    try:
        b1 = commit(store, [click("e1", "u1", "i1", 10), click("e2", "u2", "i1", 11)], users)
        proc.submit(b1)
        b2 = commit(store, [click("e3", "u1", "i2", 12)], users)
        proc.submit(b2)
        answers = proc.wait(b2)
        assert proc.covered >= b2 and answers and max(a.batch for a in answers) == proc.covered
        assert [a.batch for a in answers] == sorted(a.batch for a in answers)
        got = online.read_users(["u1", "u2"])
        assert got["u1"].item_ids == ("i1", "i2") and got["u2"].item_ids == ("i1",)
        assert online.read_items(["i1"])["i1"]["clicks_all"] == 2
        assert not store.pending_push()          # the outbox is cleared up to the covered batch
    finally:
        proc.close()
        store.close()


def test_a_failing_push_is_raised_in_the_driver(cfg, tmp_path):
    (tmp_path / "not-a-dir").write_text("x")
    bad = FeaturesConfig(repo_dir=str(tmp_path / "not-a-dir" / "feast"), state_path=cfg.state_path)
    store = StateStore(cfg.state_path)
    proc = PushProcess(bad)
    try:
        batch = commit(store, [click("e1", "u1", "i1", 10)], {})
        proc.submit(batch)
        with pytest.raises(PushError, match="push process (failed|died)"):
            proc.wait(batch, timeout_s=120)
    finally:
        proc.close()
        store.close()


def test_the_push_process_dies_with_its_driver(cfg):
    """A pusher left behind by a killed driver could write an older state after the
    restarted driver wrote a newer one."""
    script = textwrap.dedent(f"""
        import sys, time
        from unirec.features.config import FeaturesConfig
        from unirec.streaming.pusher import PushProcess
        p = PushProcess(FeaturesConfig(repo_dir={cfg.repo_dir!r}, state_path={cfg.state_path!r}))
        print(p.pid, flush=True)
        time.sleep(600)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(driver.stdout.readline())
    assert _alive(child)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie has exited
    except FileNotFoundError:
        return False


def test_the_push_process_yields_the_cpu_to_the_driver_by_its_configured_niceness(cfg):
    import os

    proc = PushProcess(cfg, nice=7)
    try:
        proc.wait_ready()
        assert os.getpriority(os.PRIO_PROCESS, proc._proc.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    finally:
        proc.close()
