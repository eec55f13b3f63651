"""Where a micro-batch's reads start and stop: the driver's plan step (streaming/driver.py, step 1).

Every (topic, partition) is read from the driver's position (`positions`, owned by
the driver and shared here) under one arrival-time cut, so clicks and queries
advance together. The cut is the latest time no record can still be in flight to
(`Planner.arrival_cut`), or under backlog a time that keeps the batch near
`max_batch_events` (`Planner.time_cut`, interpolated between the last cut and the
partitions' newest records; the broker's time index only for the first batch). The
broker's end offsets and time index are only hints; `kafka_source.read_range`
judges every read from the records themselves.
"""
from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

from unirec.streaming.config import StreamingConfig
from unirec.streaming.kafka_source import ReadRange, tail_timestamps

TP = tuple[str, int]


class Planner:
    """Plans micro-batches over the partitions in `positions` (a dict the driver updates)."""

    def __init__(self, cfg: StreamingConfig, consumer: KafkaConsumer, tails: KafkaConsumer,
                 positions: dict[TP, int]):
        self.cfg, self.consumer, self._tails, self.positions = cfg, consumer, tails, positions
        self.last_cut = 0
        self.lag = 0                               # unread records per the end offsets at the last plan
        self.last_lags: dict[TP, int] = {}         # per partition (replaced, never mutated: safe to read)
        self.tails: dict[TP, int] = {}             # newest record's timestamp per partition, at the last plan
        self.probes = 0                            # time-index round trips so far (`time_cut`)

    def plan(self, *, full: bool) -> list[ReadRange]:
        """Read ranges for the next batch: partitions with news (all if `full`), one time cut."""
        tps = [TopicPartition(*tp) for tp in self.positions]
        ends = {(t.topic, t.partition): o for t, o in self.consumer.end_offsets(tps).items()}
        lags = {tp: max(0, ends.get(tp, 0) - pos) for tp, pos in self.positions.items()}
        self.last_lags = lags
        self.lag = sum(lags.values())
        now_ms = self.arrival_cut(ends, lags)
        cut, expect = now_ms, ends
        if self.lag > self.cfg.max_batch_events:
            cut, expect = self.time_cut(ends, self.cfg.max_batch_events, now_ms)
        self.last_cut = cut
        return [ReadRange(tp[0], tp[1], self.positions[tp], self.cfg.max_batch_events, self.cfg.max_batch_bytes,
                          self.cfg.max_wait_s, self.cfg.idle_poll_ms, expect.get(tp, -1), cut)
                for tp, lag in lags.items() if lag > 0 or full]

    def arrival_cut(self, ends: dict[TP, int], lags: dict[TP, int]) -> int:
        """The latest arrival time up to which every partition is complete: a batch reads
        records with a Kafka timestamp <= this, on every partition alike.

        A record stamped t can reach the broker after records stamped later on another
        partition (producer linger, a round trip, retries). Two bounds say when nothing
        stamped <= t can still be in flight to partition p:
        * t <= now - `arrival_grace_ms` (records arrive within the grace), and
        * t <= the timestamp of p's newest record (one producer appends to a partition
          in timestamp order: a record in flight to p is stamped later than p's tail).
        The cut is the minimum over partitions of the larger bound. On a busy stream
        every partition's tail is a few ms old, so the cut follows the stream closely
        instead of lagging by the whole grace (bench/ingest.py's latency runs: the grace
        was most of the wait). A partition with nothing unread, or whose tail does not
        come back in time, holds the cut at now - grace. Under many producers per
        partition the tail bound is a heuristic; in live traffic (event time ~ arrival
        time) an event overtaken by a few ms is still merged in event-time order (late
        only beyond `features.allowed_lateness_s`), so the features come out the same."""
        now_ms = int(time.time() * 1000)
        floor = now_ms - self.cfg.arrival_grace_ms
        self.tails = {}
        if self.cfg.arrival_grace_ms == 0:
            return now_ms
        if not lags or any(lag == 0 for lag in lags.values()):
            return floor
        self.tails = tails = tail_timestamps(self._tails, {tp: ends[tp] for tp in lags},
                                             timeout_ms=min(100, self.cfg.arrival_grace_ms))
        return min(min(now_ms, max(floor, tails.get(tp, floor))) for tp in lags)

    def _offsets_at(self, t_ms: int, ends: dict[TP, int]) -> dict[TP, int]:
        """Per partition: the offset of the first record with a Kafka timestamp > t_ms."""
        self.probes += 1
        found = self.consumer.offsets_for_times({TopicPartition(*tp): t_ms + 1 for tp in self.positions})
        return {tp: (hit.offset if (hit := found.get(TopicPartition(*tp))) is not None else ends.get(tp, pos))
                for tp, pos in self.positions.items()}

    def _count_until(self, t_ms: int, ends: dict[TP, int]) -> int:
        """Unread records with a Kafka timestamp <= t_ms (from the broker's time index)."""
        at = self._offsets_at(t_ms, ends)
        return sum(max(0, at[tp] - pos) for tp, pos in self.positions.items())

    def time_cut(self, ends: dict[TP, int], budget: int, now_ms: int) -> tuple[int, dict[TP, int]]:
        """Under backlog: an arrival time t such that about `budget` unread records have a
        Kafka timestamp <= t, and each partition's offset at t (the reads' end hints).

        The broker's time index (`offsets_for_times`) answers this exactly, but on the
        embedded broker (noida-db) each probe scans the partition's log, ~1.4 us per
        record before the probed time (measured: 140 ms at 100k records a partition,
        ~0.4 s at 280k), and a search takes several probes: deep into a large backlog
        the plan cost ~1 s of every batch. So after the first batch the cut is
        interpolated from what the plan knows for free: each partition holds its lag
        between the last cut and its newest record's timestamp (`tails`), spread evenly
        in time, and t is where that model reaches 7/8 of the budget. The batch size is
        only an estimate then (a burst packed in the early part of the span makes a
        larger batch); what a batch reads stays exact, since every read stops at t
        judged from the records, and a range still stops at `max_batch_events`. The
        first batch after start, with no last cut, searches the index instead."""
        lags = {tp: max(0, ends.get(tp, 0) - pos) for tp, pos in self.positions.items()}
        if not self.tails:  # the arrival cut fell back to the grace without asking
            self.tails = tail_timestamps(self._tails, {tp: ends[tp] for tp, lag in lags.items() if lag},
                                         timeout_ms=100)
        newest = max(self.tails.values(), default=-1)
        if 0 < self.last_cut < newest <= now_ms:
            return self._interpolated_cut(lags, budget * 7 // 8, newest)
        cut = self._searched_cut(ends, budget, now_ms)
        return cut, self._offsets_at(cut, ends)

    def _interpolated_cut(self, lags: dict[TP, int], target: int, newest: int) -> tuple[int, dict[TP, int]]:
        lo = self.last_cut
        spans = {tp: max(1, self.tails.get(tp, newest) - lo) for tp, lag in lags.items() if lag}
        share = lambda t: {tp: min(1.0, (t - lo) / span) for tp, span in spans.items()}  # noqa: E731
        a, b = lo + 1, newest                     # the first t whose modelled count reaches the target
        while a < b:
            mid = (a + b) // 2
            if sum(lags[tp] * f for tp, f in share(mid).items()) < target:
                a = mid + 1
            else:
                b = mid
        at = share(a)
        return a, {tp: pos + round(lags[tp] * at.get(tp, 0.0)) for tp, pos in self.positions.items()}

    def _searched_cut(self, ends: dict[TP, int], budget: int, now_ms: int) -> int:
        """The exact search on the time index: between 3/4 of `budget` and `budget` records
        <= t (or the latest t with at most `budget`, when no t hits that band), at least
        one ms worth of records, so a batch is never empty. Interpolates on the counts
        and bisects on every other probe (a probe is one round trip)."""
        count = lambda t: self._count_until(t, ends)  # noqa: E731
        lo = self.last_cut
        c_lo = count(lo)
        if c_lo > budget:
            lo, c_lo = 0, 0
        hi, c_hi = now_ms + 1, max(c_lo + 1, sum(max(0, ends.get(tp, 0) - p) for tp, p in self.positions.items()))
        probe = 0
        while hi - lo > 1 and c_lo < budget * 3 // 4:   # invariant: count(lo) <= budget < count(hi)
            if probe % 2 == 0 and c_hi > c_lo:
                mid = lo + int((hi - lo) * (budget - c_lo) / (c_hi - c_lo))
            else:
                mid = (lo + hi) // 2
            mid = min(max(mid, lo + 1), hi - 1)
            c = count(mid)
            if c <= budget:
                lo, c_lo = mid, c
            else:
                hi, c_hi = mid, c
            probe += 1
        return lo if c_lo > 0 else lo + 1
