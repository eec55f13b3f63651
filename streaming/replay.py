"""Publish a recorded event stream into Kafka, in order, at a chosen pace.

`replay(events, producer_or_cfg, rate=, speedup=, limit=, start=)` sends each
event to the topic of its schema (click/v1 -> `topics.clicks`, query/v1 ->
`topics.queries`), keyed by `user_id`, in the order given, which for the
prepared stream (`events.jsonl`) is event-time order.

Design choices:
* Order: one key always maps to one partition (the default murmur2
  partitioner) and the producer is idempotent (`enable_idempotence`), so
  retries cannot reorder or duplicate a user's events: per-user order in
  Kafka is the order of the file. Order *across* users/partitions is not a
  Kafka guarantee and the pipeline does not rely on it.
* Bytes: a line of the stream is published as it is (it is already a valid
  payload); dicts are JSON-encoded compactly; event objects via `encode`.
* Pace: `rate` caps the send rate (event i is not sent before i/rate s);
  `speedup` replays event time `speedup` times faster than it happened (event i
  not before (ts_i - ts_first)/speedup s, using the running max of ts so an
  out-of-order event never waits); with both, the later of the two deadlines
  holds. With neither, events go as fast as the producer takes them. The
  replay sleeps only once it is more than `PACE_SLACK_S` (5 ms) ahead, so an
  event may leave up to 5 ms before its deadline (its Kafka timestamp is still
  the moment it was sent).
* Routing parses a line with orjson (the strict `json` parser only for what
  orjson refuses, so errors read the same): the topic, key and timestamp are
  all the replay needs from it.
  With both, replaying 50k generated events at 5,000/s costs 68 instead of 82 us
  of CPU per event (two runs each, idle machine; it sleeps every 25 events
  instead of every 5, and parses faster). This matters to bench/ingest.py,
  whose latency runs offer their load from the same two cores the pipeline runs on.
* Batching: kafka-python batches per partition (`linger_ms`, `batch_size`);
  `replay` flushes once at the end (and every `flush_every` events if set) and
  raises `ReplayError` if any send failed, so "replayed N" means N acknowledged.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from unirec.streaming.broker import client_kwargs
from unirec.streaming.config import KafkaConfig, KafkaTopics
from unirec.streaming.events import ClickEvent, QueryEvent, encode, kind_of

PRODUCER_DEFAULTS = {
    "acks": "all",
    "enable_idempotence": True,   # per-partition order and no duplicates across retries
    "linger_ms": 20,              # let batches fill: throughput over per-event latency here
    "batch_size": 512 * 1024,
}
PACE_SLACK_S = 0.005   # an event may be sent this long before it is due (see module doc)


class ReplayError(RuntimeError):
    """An event could not be routed or a send was not acknowledged."""


@dataclass(frozen=True)
class ReplayStats:
    events: int
    clicks: int
    queries: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"replayed {self.events} events ({self.clicks} clicks, {self.queries} queries) "
            f"in {self.seconds:.2f} s: {self.events_per_s:,.0f} events/s"
        )


def make_producer(cfg: KafkaConfig, **overrides: Any):
    """A KafkaProducer for bulk, ordered publishing (see PRODUCER_DEFAULTS)."""
    from kafka import KafkaProducer

    return KafkaProducer(**{**client_kwargs(cfg), **PRODUCER_DEFAULTS, **overrides})


def read_lines(path: str | Path) -> Iterator[bytes]:
    """The non-empty lines of a JSON-lines file, as bytes, without reading it all."""
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def count_lines(path: str | Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def route(event: Any, topics: KafkaTopics) -> tuple[str, bytes, bytes, int]:
    """(topic, key, value, ts) for an event object, a dict or a JSON line (bytes/str)."""
    if isinstance(event, (ClickEvent, QueryEvent)):
        topic = topics.clicks if isinstance(event, ClickEvent) else topics.queries
        return topic, event.user_id.encode(), encode(event), event.ts
    value = event.encode() if isinstance(event, str) else event
    try:
        obj = _loads(value) if isinstance(value, bytes) else value
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        kind, key, ts = kind_of(obj.get("schema")), str(obj["user_id"]).encode(), int(obj["ts"])
    except (KeyError, TypeError, ValueError) as e:
        raise ReplayError(f"cannot route {str(event)[:80]}: {e!r}") from None
    if isinstance(value, dict):
        value = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    return (topics.clicks if kind == "click" else topics.queries), key, value, ts


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)   # the strict parser's reading, or its error message


class Pacer:
    """When each event is due, relative to the start of the replay (see module doc)."""

    def __init__(self, rate: float | None, speedup: float | None) -> None:
        if rate is not None and rate <= 0 or speedup is not None and speedup <= 0:
            raise ValueError("rate and speedup must be > 0")
        self.rate, self.speedup = rate, speedup
        self.first_ts: int | None = None
        self.max_ts = 0

    def due(self, i: int, ts: int) -> float:
        due = i / self.rate if self.rate else 0.0
        if self.speedup:
            if self.first_ts is None:
                self.first_ts = self.max_ts = ts
            self.max_ts = max(self.max_ts, ts)
            due = max(due, (self.max_ts - self.first_ts) / self.speedup)
        return due


def replay(
    events: Iterable[Any],
    producer_or_cfg: Any,
    *,
    rate: float | None = None,
    speedup: float | None = None,
    limit: int | None = None,
    start: int = 0,
    topics: KafkaTopics | None = None,
    progress: bool = False,
    total: int | None = None,
    flush_every: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayStats:
    """Publish events[start:start+limit] (see module doc); returns counts and timing.

    `producer_or_cfg` is a KafkaConfig (a producer is made and closed here, and
    its topics are used) or a kafka-python style producer (then `topics`, or
    the default topic names). `clock`/`sleep` are injectable for tests.
    """
    own = isinstance(producer_or_cfg, KafkaConfig)
    producer = make_producer(producer_or_cfg) if own else producer_or_cfg
    topics = topics or (producer_or_cfg.topics if own else KafkaTopics())
    pacer = Pacer(rate, speedup)
    stream = itertools.islice(events, start, None if limit is None else start + limit)
    if total is None and hasattr(events, "__len__"):
        total = max(0, min(len(events) - start, limit if limit is not None else len(events)))
    failures: list[BaseException] = []
    counts = {topics.clicks: 0, topics.queries: 0}
    bar = _progress(total, progress)
    t0 = clock()
    try:
        n = 0
        for n, event in enumerate(stream, 1):
            topic, key, value, ts = route(event, topics)
            wait = pacer.due(n - 1, ts) - (clock() - t0)
            if wait > PACE_SLACK_S:
                sleep(wait)
            producer.send(topic, key=key, value=value).add_errback(failures.append)
            counts[topic] += 1
            bar.update(1)
            if flush_every and n % flush_every == 0:
                producer.flush()
        producer.flush()
    finally:
        bar.close()
        if own:
            producer.close()
    if failures:
        raise ReplayError(f"{len(failures)} of {n} sends failed; first: {failures[0]!r}")
    return ReplayStats(n, counts[topics.clicks], counts[topics.queries], clock() - t0)


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="ev", unit_scale=True,
                mininterval=0.5, desc="replay")  # fmt: skip
