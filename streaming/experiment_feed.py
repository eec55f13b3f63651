"""A/B attribution inside the pipeline: exposures from Kafka, clicks from the micro-batches.

`unirec serve` writes an `exposure/v1` record for every served list (request id,
user, arm, version, items, latency) to the exposures topic. A click event that
carries the `request_id` of such a list is attributed to the list's arm
(`unirec.ops.attribution.Attributor`: the item must have been shown, within the
attribution window, each (request, item) once). `ExperimentFeed` keeps the
per-arm figures of the current experiment epoch up to date and exports them as
Prometheus gauges (`unirec.ops.experiments.Tracker`):

* **Clicks** come from the pipeline itself: after each micro-batch is committed,
  the driver hands over the clicks the batch *applied* that carry a request id
  (the merges dropped duplicates and late events already, so a click replayed by
  at-least-once delivery is not counted twice).
* **Exposures** are read with a plain consumer (manual assignment, no group
  join) from where the last batch left off, up to `max_exposures` per batch.
  A record that is not a valid exposure goes to the dead-letter topic with
  reason `bad_exposure` and is counted; it never stops the pipeline.

What survives a restart. The figures are a pure function of the topics'
content for the epoch, so on `open` the feed rebuilds them: every exposure
from the beginning of the exposures topic, and every click from the beginning
of the clicks topic up to the driver's positions (what the state store says is
applied). Clicks after that point arrive through the batches as usual. The
rebuild costs one read of both topics; `unirec rollout status` does the same
read on demand. Dead letters for bad exposures are sent again only for records
after the exposures offset committed for the feed's group
(`<streaming.group_id>-exposures`), which is committed after each batch.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from unirec.streaming.broker import client_kwargs
from unirec.streaming.deadletter import DeadLetter, send_dead_letters
from unirec.streaming.events import DecodeError, decode

log = logging.getLogger(__name__)
BAD_EXPOSURE = "bad_exposure"
_REQUIRED = ("request_id", "user_id", "arm", "items", "ts")


def parse_exposure(raw: bytes | None) -> dict:
    """An exposure/v1 record as a dict, or ValueError naming what is wrong."""
    try:
        e = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(e, dict):
        raise ValueError(f"not a JSON object: {type(e).__name__}")
    missing = [k for k in _REQUIRED if k not in e]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if not isinstance(e["items"], list) or not all(isinstance(i, str) for i in e["items"]):
        raise ValueError("items: must be a list of item ids")
    if not isinstance(e["ts"], (int, float)) or isinstance(e["ts"], bool):
        raise ValueError(f"ts: must be a number, got {e['ts']!r}")
    for k in ("request_id", "user_id", "arm"):
        if not isinstance(e[k], str) or not e[k]:
            raise ValueError(f"{k}: must be a non-empty string")
    return e


def read_until(consumer: KafkaConsumer, until: Mapping[TopicPartition, int], timeout_s: float) -> Iterable:
    """Records of the assigned partitions from their positions up to `until` (exclusive)."""
    deadline = time.monotonic() + timeout_s
    todo = {tp: end for tp, end in until.items() if consumer.position(tp) < end}
    while todo:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sorted(tp.topic for tp in todo)}: not read up to the requested offsets "
                               f"within {timeout_s:g} s")
        for tp, records in consumer.poll(timeout_ms=500).items():
            for r in records:
                if tp in todo and r.offset < todo[tp]:
                    yield r
        todo = {tp: end for tp, end in todo.items() if consumer.position(tp) < end}


class ExperimentFeed:
    """The driver's A/B hook: `open(positions)`, then `after_batch(applied clicks)` per batch."""

    def __init__(self, kafka_cfg, experiments_cfg, limits, *, group_id: str, registry=None,
                 max_exposures: int = 50000, rebuild_timeout_s: float = 300.0):
        from unirec.ops.experiments import Tracker

        self.kafka_cfg, self.limits, self.group_id = kafka_cfg, limits, f"{group_id}-exposures"
        self.tracker = Tracker(experiments_cfg, registry)
        self.max_exposures, self.rebuild_timeout_s = max_exposures, rebuild_timeout_s
        self.counts: Counter = Counter()
        self.last: dict[str, Any] | None = None
        self._dead_from: dict[TopicPartition, int] = {}
        self._parts: list[TopicPartition] = []

    # ------------------------------------------------------------------ lifecycle

    def open(self, click_positions: Mapping[tuple[str, int], int]) -> ExperimentFeed:
        kw = client_kwargs(self.kafka_cfg)
        self.consumer = KafkaConsumer(**kw, group_id=self.group_id, enable_auto_commit=False,
                                      auto_offset_reset="earliest")
        self.producer = KafkaProducer(**kw, acks="all", linger_ms=5)
        topic = self.kafka_cfg.topics.exposures
        parts = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or ())]
        self.consumer.assign(parts)
        self._parts = parts
        self._dead_from = {tp: self.consumer.committed(tp) or 0 for tp in parts}
        self.consumer.seek_to_beginning(*parts)
        ends = self.consumer.end_offsets(parts)
        exposures = self._exposures(read_until(self.consumer, ends, self.rebuild_timeout_s))
        clicks = self._applied_clicks(click_positions)
        self.last = self.tracker.update(exposures, clicks)
        self.counts["rebuilt_exposures"] += len(exposures)
        self.counts["rebuilt_clicks"] += len(clicks)
        self._commit()
        log.info("A/B attribution rebuilt from %d exposures and %d clicks with a request id",
                 len(exposures), len(clicks))
        return self

    def close(self) -> None:
        for name in ("consumer", "producer"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()

    # ------------------------------------------------------------------ per batch

    def after_batch(self, clicks: list) -> dict[str, Any] | None:
        """Attribute the batch's applied clicks with a request id, plus the exposures
        that arrived since the last batch; export the gauges; returns the summary."""
        exposures, n = [], 0
        while self._parts and n < self.max_exposures:
            polled = self.consumer.poll(timeout_ms=0, max_records=self.max_exposures - n)
            if not polled:
                break
            batch = [r for records in polled.values() for r in records]
            n += len(batch)
            exposures += self._exposures(batch)
        self.counts["exposures"] += len(exposures)
        self.counts["clicks"] += len(clicks)
        if exposures or clicks:
            self.last = self.tracker.update(exposures, clicks)
            self._commit()
        return self.last

    # ------------------------------------------------------------------ helpers

    def _exposures(self, records: Iterable) -> list[dict]:
        good, dead = [], []
        for r in records:
            try:
                good.append(parse_exposure(r.value))
            except ValueError as e:
                self.counts[f"dead_letter.{BAD_EXPOSURE}"] += 1
                tp = TopicPartition(r.topic, r.partition)
                if r.offset >= self._dead_from.get(tp, 0):
                    dead.append(DeadLetter(BAD_EXPOSURE, "value", str(e), r.topic, r.partition, r.offset,
                                           r.value or b"", r.key))
        if dead:
            log.warning("%d bad exposure records sent to %s", len(dead), self.kafka_cfg.topics.dead_letter)
            send_dead_letters(self.producer, self.kafka_cfg.topics.dead_letter, dead)
        return good

    def _applied_clicks(self, positions: Mapping[tuple[str, int], int]) -> list:
        """Clicks with a request id the state store has applied (before `positions`)."""
        topic = self.kafka_cfg.topics.clicks
        until = {TopicPartition(t, p): o for (t, p), o in positions.items() if t == topic and o > 0}
        if not until:
            return []
        reader = KafkaConsumer(**client_kwargs(self.kafka_cfg), group_id=None, enable_auto_commit=False)
        try:
            reader.assign(list(until))
            reader.seek_to_beginning(*until)
            out, now = [], time.time()
            for r in read_until(reader, until, self.rebuild_timeout_s):
                if b"request_id" not in (r.value or b""):
                    continue                     # cheap skip: most clicks come from no served list
                try:
                    c = decode(r.value, "click", now_s=now, limits=self.limits)
                except DecodeError:
                    continue                     # the pipeline dead-lettered it when it read it
                if c.request_id is not None:
                    out.append(c)
            return out
        finally:
            reader.close()

    def _commit(self) -> None:
        offsets = {tp: OffsetAndMetadata(self.consumer.position(tp), "", -1) for tp in self.consumer.assignment()}
        if not offsets:
            return
        try:
            self.consumer.commit(offsets)
            self._dead_from.update({tp: o.offset for tp, o in offsets.items()})
        except Exception as e:  # noqa: BLE001 - only decides which dead letters are re-sent
            log.warning("committing the exposures offsets failed: %s", e)


def from_config(cfg, *, registry=None) -> ExperimentFeed | None:
    """The feed of a PipelineConfig (None when `experiments.attribute_in_pipeline` is off)."""
    if not cfg.experiments.attribute_in_pipeline:
        return None
    return ExperimentFeed(cfg.kafka, cfg.experiments, cfg.kafka.limits, group_id=cfg.streaming.group_id,
                          registry=registry)
