"""Where a micro-batch's reads start and stop: the driver's plan step (streaming/driver.py, step 1).

Every (topic, partition) is read from the driver's position (`positions`, owned by
the driver and shared here) under one arrival-time cut, so clicks and queries
advance together. The cut is the latest time no record can still be in flight to
(`Planner.arrival_cut`), or under backlog the latest time that keeps the batch
within `max_batch_events` (`Planner.time_cut`, from the broker's time index). The
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
        self.rate = 0.0                            # records per ms of arrival time in the last time cut
        self.probes = 0                            # time-index probes so far (one round trip each)
        self._probes: dict[int, dict[TP, int]] = {}   # this plan's probes: time -> offsets

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
            self._probes = {}
            cut = self.time_cut(ends, self.cfg.max_batch_events, now_ms)
            expect = self._offsets_at(cut, ends)   # probed by the search: no round trip
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
        if self.cfg.arrival_grace_ms == 0:
            return now_ms
        if not lags or any(lag == 0 for lag in lags.values()):
            return floor
        tails = tail_timestamps(self._tails, {tp: ends[tp] for tp in lags},
                                timeout_ms=min(100, self.cfg.arrival_grace_ms))
        return min(min(now_ms, max(floor, tails.get(tp, floor))) for tp in lags)

    def _offsets_at(self, t_ms: int, ends: dict[TP, int]) -> dict[TP, int]:
        """Per partition: the offset of the first record with a Kafka timestamp > t_ms
        (remembered for the rest of the plan: the search's last probe is the plan's hints)."""
        if t_ms in self._probes:
            return self._probes[t_ms]
        self.probes += 1
        found = self.consumer.offsets_for_times({TopicPartition(*tp): t_ms + 1 for tp in self.positions})
        at = {tp: (hit.offset if (hit := found.get(TopicPartition(*tp))) is not None else ends.get(tp, pos))
              for tp, pos in self.positions.items()}
        self._probes[t_ms] = at
        return at

    def _count_until(self, t_ms: int, ends: dict[TP, int]) -> int:
        """Unread records with a Kafka timestamp <= t_ms (from the broker's time index)."""
        at = self._offsets_at(t_ms, ends)
        return sum(max(0, at[tp] - pos) for tp, pos in self.positions.items())

    def time_cut(self, ends: dict[TP, int], budget: int, now_ms: int) -> int:
        """An arrival time t such that between 3/4 of `budget` and `budget` unread records
        have a timestamp <= t (between 1/2 and all of it for a guessed t, below; or the
        latest t with at most `budget`, when no t hits the band); at least one ms worth
        of records, so a batch is never empty.

        Every count is exact, from the broker's time index (`offsets_for_times`): the
        reads then stop at the cut on every partition, never at `max_records` first,
        so clicks and queries stay aligned. Each probe is one round trip, and not a cheap
        one on the embedded broker: noida-db scans the partition's log, ~0.35-1.4 us per
        record before the probed time (measured: 50-90 ms a partition at 150-300k
        records), so deep into the 1M-event bench every probe costs ~0.3 s. Hence:

        * The first probe is a guess from the arrival rate of the previous cut
          (records per ms, aimed at 3/4 of the budget), accepted if it holds between
          1/2 and all of the budget: under a steady backlog it does, and the plan
          reuses that probe's offsets as the reads' hints, so a batch costs one probe
          instead of ~6 (the last cut's own count, ~4 search steps, the hints);
          tests/streaming/test_plan.py counts them. bench/ingest.py, 1M generated
          events: plan phase 33.9 s -> 13.7 s with a guess accepted only in the
          search's 3/4 band (118 probes for 23 batches, 42 of them for the first cut,
          which has no rate yet), 14.1 s with the 1/2 band on a busier machine (100
          probes for 27 batches). The broker's CPU in that run is still ~1 core
          (bench "cpu_us_per_event_broker" ~95-118): its fetches, too, scan the log.
        * A miss falls back to the search: interpolating on the counts (records
          arrive at a roughly steady rate) and bisecting on every other probe, which
          bounds it by twice a binary search's probes.

        Interpolating the cut from the last cut and the partition tails WITHOUT probing
        was tried before: under backlog it read the same records, but in
        tests/streaming/test_exactly_once.py (SIGKILL restarts during a replay) it lost
        349-2,192 of 10,000 events (a cut with more than `budget` records makes a read
        stop at `max_records` before the cut, so one topic runs ahead of the other: a
        likely cause). Here a guess is only ever accepted with its probed count."""
        count = lambda t: self._count_until(t, ends)  # noqa: E731
        lag = sum(max(0, ends.get(tp, 0) - p) for tp, p in self.positions.items())
        lo, c_lo = self.last_cut, None                 # count(lo) probed only when needed
        hi, c_hi = now_ms + 1, max(1, lag)
        if self.rate > 0 and hi - lo > 2:
            guess = min(max(lo + int(budget * 0.75 / self.rate), lo + 1), hi - 1)
            c = count(guess)
            if budget // 2 <= c <= budget:
                return self._took(guess, c)            # a guessed cut may hold half the budget
            if c <= budget:
                lo, c_lo = guess, c
            else:
                hi, c_hi = guess, c
        if c_lo is None:
            c_lo = count(lo)
            if c_lo > budget:
                lo, c_lo = 0, 0
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
        if self.last_cut <= 0 and c_hi > c_lo and hi > lo:
            self.rate = (c_hi - c_lo) / (hi - lo)       # first cut: the density around it
        return self._took(lo if c_lo > 0 else lo + 1, c_lo)

    def _took(self, cut: int, count: int) -> int:
        """`cut` holds `count` unread records: remember the arrival rate for the next guess."""
        if count > 0 and cut > self.last_cut > 0:
            self.rate = count / (cut - self.last_cut)   # records per ms over this batch
        return cut
