"""The planner's time cut against a fake time index (no broker): exact counts, few probes."""
from __future__ import annotations

import bisect
from types import SimpleNamespace

from unirec.streaming.config import StreamingConfig
from unirec.streaming.plan import Planner


class FakeIndex:
    """`offsets_for_times` over fixed per-partition timestamp lists (offset = list index)."""

    def __init__(self, stamps: dict):
        self.stamps = stamps

    def offsets_for_times(self, query: dict) -> dict:
        out = {}
        for tp, t in query.items():
            ts = self.stamps[(tp.topic, tp.partition)]
            i = bisect.bisect_left(ts, t)
            out[tp] = SimpleNamespace(offset=i) if i < len(ts) else None
        return out


def steady_log(n: int, per_ms: int) -> dict:
    """Two topics x two partitions, `per_ms` records a ms on each partition."""
    return {(topic, p): [1_000_000 + i // per_ms for i in range(n)] for topic in ("c", "q") for p in (0, 1)}


def test_every_cut_is_within_budget_and_a_steady_backlog_costs_one_probe_a_batch():
    stamps = steady_log(20_000, per_ms=3)
    index, budget = FakeIndex(stamps), 5_000
    positions = {tp: 0 for tp in stamps}
    planner = Planner(StreamingConfig(max_batch_events=budget), index, None, positions)
    ends = {tp: len(ts) for tp, ts in stamps.items()}
    now = max(ts[-1] for ts in stamps.values()) + 10_000
    probes, batches = [], 0
    while sum(ends[tp] - positions[tp] for tp in positions) > budget:
        before = planner.probes
        planner._probes = {}
        cut = planner.time_cut(ends, budget, now)
        at = planner._offsets_at(cut, ends)
        n = sum(at[tp] - positions[tp] for tp in positions)
        assert budget // 2 <= n <= budget, (cut, n)
        assert all(stamps[tp][o - 1] <= cut for tp, o in at.items() if o > positions[tp])  # exact: nothing past the cut
        probes.append(planner.probes - before)
        positions.update(at)
        planner.last_cut = cut
        batches += 1
    assert batches >= 4
    assert all(p == 1 for p in probes[1:]), probes     # the rate guess lands in the band


def test_cuts_stay_exact_when_the_rate_jumps():
    """Bursts and pauses make the rate guess miss; the search still lands every cut in the band."""
    rng_ts, t = [], 1_000_000
    for i in range(30_000):
        t += 0 if i % 7 else (1 if (i // 3000) % 2 else 40)   # alternating dense and sparse stretches
        rng_ts.append(t)
    stamps = {("c", 0): rng_ts, ("c", 1): rng_ts[::2], ("q", 0): rng_ts[::9]}
    index, budget = FakeIndex(stamps), 4_000
    positions = {tp: 0 for tp in stamps}
    planner = Planner(StreamingConfig(max_batch_events=budget), index, None, positions)
    ends = {tp: len(ts) for tp, ts in stamps.items()}
    now = rng_ts[-1] + 10_000
    while sum(ends[tp] - positions[tp] for tp in positions) > budget:
        planner._probes = {}
        cut = planner.time_cut(ends, budget, now)
        at = planner._offsets_at(cut, ends)
        n = sum(at[tp] - positions[tp] for tp in positions)
        # in the band, or the latest cut with at most `budget` (one more ms would exceed it)
        more = sum(o - positions[tp] for tp, o in planner._offsets_at(cut + 1, ends).items())
        assert 0 < n <= budget and (n >= budget // 2 or more > budget), (cut, n, more)
        positions.update(at)
        planner.last_cut = cut
