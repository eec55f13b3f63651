"""Bounded Kafka reads with kafka-python: the source of every micro-batch.

Beam's `ReadFromKafka` needs a Java expansion service that is not available
here, so the pipeline reads with kafka-python inside a DoFn. A read is a work
item, `ReadRange(topic, partition, start, max_records, max_bytes, max_wait_s,
idle_poll_ms)`, and `read_range` turns it into the records actually read plus
the offset after the last of them. Design choices:

* **The stop bound never trusts the broker's end offsets.** Some Kafka-wire
  brokers under-report them (and on a live topic they move anyway). A read
  stops at whichever comes first: `max_records`, `max_bytes`, an empty poll of
  `idle_poll_ms` (the partition is caught up for now) or `max_wait_s`. The
  offset handed on is `last record read + 1` (or `start` if nothing was read),
  so committing it can never skip a record, even across gaps in the offsets
  (compaction, transaction markers). The end offset seen when the batch was
  planned (`end_hint`) is only a hint against stopping too early: below it an
  empty poll (a first fetch still in flight) does not end the read, but
  `max_wait_s` still does, so an over-reported end costs at most that wait and
  an under-reported one nothing but a later batch.
* **A time cut aligns the topics.** With `until_ms` a read also stops before the
  first record whose Kafka timestamp is later, so every partition of a batch
  covers the same span of arrival time (the driver picks the cut; see
  streaming/driver.py). Without it, one topic could run ahead of the other and
  its events would move a user's watermark past events still unread in the
  other topic, turning them `late`.
* **One partition per fetch.** Reading all of a batch's partitions through one
  consumer (one fetch request for all) cut a light-load batch's reads from ~100
  to ~20 ms, but noida-db 0.2.3 never answers a multi-partition fetch that starts
  far behind on partitions of ~200k records (20 s without a response, a full core
  busy; single-partition fetches of the same data take ~1 s), so it was reverted.
* **Manual assignment, no consumer group.** The reader assigns one partition
  and seeks; it never joins a group (a group join is slow and, on the embedded
  broker, can hang) and never commits: the driver decides what is committed,
  after the features are durable.
* **Record batches are decoded by `kafka_records`** (`new_reader` installs it on
  every reader): the same `ConsumerRecord`s as kafka-python's own decode, with
  about a third less CPU per record (see streaming/kafka_records.py).
* **One reader per partition keeps its place (read-ahead).** A `PartitionReader`
  is a consumer that stays assigned to one partition; the reading DoFn takes it
  from the process's `POOL` for one range and returns it. When the next batch's
  range starts where the last one ended (the normal case), it continues without a
  seek: what kafka-python buffered past the last cut, the fetch it pipelined when
  its buffer ran dry (answered while the driver merged and committed), and the
  record that showed the cut are used, not fetched again. Re-assigning one shared
  consumer per range, as before, dropped all of that: each range waited for a
  fresh fetch, and the broker sent up to `max_partition_fetch_bytes` of which a
  batch used a fraction.

Records are plain tuples `(topic, partition, offset, timestamp_ms, key, value)`
so that Beam's coders handle them without pickling.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from kafka import KafkaConsumer, TopicPartition

from unirec.streaming.kafka_records import install

# (topic, partition, offset, timestamp_ms, key, value)
Record = tuple[str, int, int, int, bytes | None, bytes | None]

# Reader settings: no group, no auto commit, large fetches; the broker answers an
# empty fetch within the idle poll so that "caught up" is detected quickly.
_READER_DEFAULTS = {
    "group_id": None,
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "max_partition_fetch_bytes": 8 << 20,
    "fetch_max_bytes": 32 << 20,
    "check_crcs": True,
}


_TAIL_STEP = 256  # records per poll once past the planned end


class ReadRange(NamedTuple):
    """One bounded read of one partition (a micro-batch's work item)."""

    topic: str
    partition: int
    start: int               # first offset to read
    max_records: int
    max_bytes: int           # payload (key + value) bytes
    max_wait_s: float        # wall-clock budget for this read
    idle_poll_ms: int        # an empty poll this long ends the read (once past end_hint)
    end_hint: int = -1       # where the plan expects the read to end (end offset or the cut's offset; -1: unknown)
    until_ms: int = -1       # read only records with a Kafka timestamp <= this (-1: no bound)


class RangeRead(NamedTuple):
    """What a read produced: the records, the offset after them, why it stopped."""

    records: list
    next_offset: int
    stop: str                # "max_records" | "max_bytes" | "idle" | "max_wait" | "time_cut"


def reader_config(client_kwargs: dict, idle_poll_ms: int) -> dict:
    """kafka-python consumer settings for a reader (client_kwargs: bootstrap + security)."""
    return {**_READER_DEFAULTS, "fetch_max_wait_ms": max(1, idle_poll_ms), **client_kwargs}


def new_reader(config: dict) -> KafkaConsumer:
    """A reader consumer whose v2 record batches are decoded by `kafka_records` (exactly
    kafka-python's records, ~2x less CPU per record; see streaming/kafka_records.py)."""
    consumer = KafkaConsumer(**config)
    install(consumer)
    return consumer


def read_range(consumer: KafkaConsumer, rng: ReadRange, *,
               clock: Callable[[], float] = time.monotonic) -> RangeRead:
    """Read `rng` with `consumer` (assigned and seeked here); see the module docstring
    for the bounds. One-shot: what the consumer fetched past the range is dropped by
    the next assign or seek (a `PartitionReader` keeps it)."""
    return PartitionReader(consumer, rng.topic, rng.partition).read(rng, clock=clock)


class PartitionReader:
    """A consumer that stays assigned to one partition and keeps its place between reads.

    When a read starts at the offset the previous one handed on, nothing is fetched
    again: the records kafka-python still buffers, the fetch it pipelined when its
    buffer ran dry (in flight while the batch is merged), and the records this reader
    took past the previous range's end (the one that showed the time cut or did not
    fit `max_bytes`) all continue the stream. Any other start (a retried batch, a
    restart, a rewind) seeks and drops them. A read that fails leaves no place to
    continue from, so the next one seeks."""

    def __init__(self, consumer: KafkaConsumer, topic: str, partition: int):
        self.consumer = consumer
        self.tp = TopicPartition(topic, partition)
        consumer.assign([self.tp])
        self._resume: int | None = None   # offset a read may start at without a seek
        self._held: list = []              # records taken from the consumer, not yet handed on
        self.seeks = 0

    def read(self, rng: ReadRange, *, clock: Callable[[], float] = time.monotonic) -> RangeRead:
        if (rng.topic, rng.partition) != (self.tp.topic, self.tp.partition):
            raise ValueError(f"reader of {self.tp} asked to read {rng.topic}[{rng.partition}]")
        if rng.start != self._resume:
            self._held = []
            self.consumer.seek(self.tp, rng.start)
            self.seeks += 1
        self._resume = None
        res, self._held = _read(self.consumer, self.tp, rng, self._held, clock)
        self._resume = res.next_offset
        return res

    def close(self) -> None:
        self.consumer.close()


def _read(consumer: KafkaConsumer, tp: TopicPartition, rng: ReadRange, held: list,
          clock: Callable[[], float]) -> tuple[RangeRead, list]:
    """The bounded read loop: (what was read, records taken from the consumer past it).
    `held` records (the previous read's leftovers, in offset order) come before the
    consumer's; the consumer's position is right after them."""
    records: list = []
    nbytes, next_offset = 0, rng.start
    deadline = clock() + rng.max_wait_s
    while True:
        remaining = rng.max_records - len(records)
        if remaining <= 0:
            return RangeRead(records, next_offset, "max_records"), held
        if held:
            batch, held = held[:remaining], held[remaining:]
        else:
            left_ms = (deadline - clock()) * 1000.0
            if left_ms <= 0:
                return RangeRead(records, next_offset, "max_wait"), held
            # Take only what the plan expects (+1 to see the cut), then small steps: every
            # record taken past the cut is decoded by kafka-python before its batch needs it.
            want = rng.end_hint - next_offset + 1 if next_offset < rng.end_hint else _TAIL_STEP
            polled = consumer.poll(timeout_ms=max(1, int(min(rng.idle_poll_ms, left_ms))),
                                   max_records=max(1, min(remaining, want)))
            batch = polled.get(tp, ())
            if not batch:
                if next_offset < rng.end_hint:
                    continue  # records are known to exist: a slow first fetch is not "caught up"
                return RangeRead(records, next_offset, "idle"), held
        for i, r in enumerate(batch):
            if 0 <= rng.until_ms < r.timestamp:
                # It belongs to a later batch: held, with the rest, for the next read.
                return RangeRead(records, next_offset, "time_cut"), list(batch[i:]) + held
            size = len(r.value or b"") + len(r.key or b"")
            if records and nbytes + size > rng.max_bytes:
                # Stop before this record: it is the first one of the next batch.
                return RangeRead(records, next_offset, "max_bytes"), list(batch[i:]) + held
            records.append((r.topic, r.partition, r.offset, r.timestamp, r.key, r.value))
            nbytes += size
            next_offset = r.offset + 1


def tail_timestamps(consumer: KafkaConsumer, ends: dict[tuple[str, int], int], *,
                    timeout_ms: int = 200) -> dict[tuple[str, int], int]:
    """The Kafka timestamp of the newest record of each (topic, partition) with an end
    offset > 0 (one fetch for all of them, from `end - 1`; a partition whose record
    does not come back within `timeout_ms` is left out). Records that arrived after
    `ends` was read only make a tail newer. The driver's arrival-time cut uses these
    (see streaming/driver.py, `Driver.plan`)."""
    tps = {TopicPartition(*tp): end for tp, end in ends.items() if end > 0}
    if not tps:
        return {}
    consumer.assign(list(tps))
    for tp, end in tps.items():
        consumer.seek(tp, end - 1)
    out: dict[tuple[str, int], int] = {}
    deadline = time.monotonic() + timeout_ms / 1000.0
    while len(out) < len(tps):
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        for tp, records in consumer.poll(timeout_ms=left_ms, max_records=4096).items():
            if records:
                key = (tp.topic, tp.partition)
                out[key] = max(out.get(key, -1), max(r.timestamp for r in records))
                consumer.pause(tp)        # one answer per partition is enough
    consumer.resume(*consumer.paused())
    return out


class ReaderPool:
    """Idle `PartitionReader`s per (client configuration, topic, partition), shared by one
    process: one consumer (a connection and a network thread) per partition the process
    reads, as Beam's Java KafkaIO keeps one consumer per partition split."""

    def __init__(self) -> None:
        self._idle: dict[str, dict[tuple[str, int], PartitionReader]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(config: dict) -> str:
        return repr(sorted(config.items()))

    def acquire(self, config: dict, topic: str, partition: int) -> PartitionReader:
        with self._lock:
            reader = self._idle.get(self._key(config), {}).pop((topic, partition), None)
        return reader if reader is not None else PartitionReader(new_reader(config), topic, partition)

    def release(self, config: dict, reader: PartitionReader) -> None:
        slot = (reader.tp.topic, reader.tp.partition)
        with self._lock:
            idle = self._idle.setdefault(self._key(config), {})
            if slot not in idle:
                idle[slot] = reader
                return
        reader.close()   # two reads of one partition ran at once: one reader is kept

    def idle_count(self, config: dict) -> int:
        with self._lock:
            return len(self._idle.get(self._key(config), ()))

    def close_idle(self, config: dict) -> int:
        """Close the idle readers of one configuration (a driver closing: nothing will
        take them again, and each holds a connection and a network thread); returns how many."""
        with self._lock:
            idle = self._idle.pop(self._key(config), {})
        for r in idle.values():
            r.close()
        return len(idle)

    def close_all(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for idle in pools.values():
            for r in idle.values():
                r.close()


POOL = ReaderPool()


def read_pooled(config: Mapping[str, Any], rng: ReadRange) -> RangeRead:
    """Read `rng` with this process's pooled reader of its partition (see `PartitionReader`)."""
    config = dict(config)
    reader = POOL.acquire(config, rng.topic, rng.partition)
    try:
        return reader.read(rng)
    finally:
        POOL.release(config, reader)
