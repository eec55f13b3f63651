"""Freshness: time from an event's arrival in Kafka to the first published model version that covers it.

    .venv/bin/python bench/freshness.py                    # 1,000 events/s for 60 s of ML-100k
    .venv/bin/python bench/freshness.py --rate 1000 --seconds 90 --every-seconds 5

Starts an embedded broker (noida-db, free port, temp dir), a fresh SQLite Feast store and
an empty registry, then runs the real pipeline (`Driver` + `OnlineLoop`: Beam
FnApiRunner with the FineTune stage, publishing through the gate to the registry,
Feast `item_embedding` and the `model-updates` topic) while a producer process offers
ML-100k events (`events.jsonl`, time order) at `--rate` events/s.

A version *covers* a record when its manifest's Kafka offsets (next offset per
partition) are past the record's offset. Freshness of a record = wall time at which
the first covering version was published (the registry commit returned) - the
record's Kafka timestamp (CreateTime: set by the producer when it sent the record).
Every record produced is counted: one that no version covers by the end enters the
figures with (end of run - arrival), a lower bound, and is counted in `uncovered`.

Config: pipeline.yaml defaults, except `registry.publish.every_seconds`
(`--every-seconds`, default 5) and `online.max_steps_per_batch` (`--max-steps`,
default 12): under a sustained load the learner trains on at most that many steps per
micro-batch and the rest of the windows go to the replay buffer (counted as
`deferred`), which bounds the time a batch takes and therefore freshness.

Last stdout line: {"freshness_p50_s", "freshness_p95_s", "versions", "events", "uncovered",
"deferred_windows", "steps", "offered_per_s"}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import unirec  # noqa: F401  (binds prometheus_client before Feast)
from unirec.config import load
from unirec.streaming import broker
from unirec.streaming.replay import replay

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.freshness")


def _produce(kafka, lines, rate) -> None:
    replay(lines, kafka, rate=rate)


def covered_at(versions: list[tuple[float, dict]], tp: tuple[str, int], offset: int) -> float | None:
    """Publish time of the first version whose offsets are past `offset` on `tp`."""
    for t, offsets in versions:
        if offsets.get(tp[0], {}).get(tp[1], 0) > offset:
            return t
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--every-seconds", type=float, default=5.0)
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--config", default=str(ROOT / "pipeline.yaml"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from kafka import KafkaConsumer

    from unirec.features.config import FeaturesConfig
    from unirec.streaming.broker import client_kwargs
    from unirec.streaming.driver import Driver
    from unirec.streaming.online import from_config
    from unirec.streaming.synthetic import source_stream

    cfg = load(args.config)
    tmp = Path(tempfile.mkdtemp(prefix="unirec-freshness-"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kafka = dataclasses.replace(cfg.kafka, bootstrap_servers=f"127.0.0.1:{port}",
                                embedded=dataclasses.replace(cfg.kafka.embedded, run_dir=str(tmp / "broker")))
    broker.start(kafka)
    try:
        broker.ensure_topics(kafka)
        publish = dataclasses.replace(cfg.registry.publish, every_seconds=args.every_seconds, every_steps=0)
        cfg = dataclasses.replace(
            cfg, kafka=kafka,
            registry=dataclasses.replace(cfg.registry, path=str(tmp / "registry"), publish=publish),
            online=dataclasses.replace(cfg.online, max_steps_per_batch=args.max_steps),
            features=FeaturesConfig(repo_dir=str(tmp / "feast"), state_path=str(tmp / "state.sqlite"),
                                    allowed_lateness_s=10**9),
            streaming=dataclasses.replace(cfg.streaming, work_dir=str(tmp / "work")))
        lines = source_stream(ROOT / ".cache/unirec/ml-100k/events.jsonl", int(args.rate * args.seconds))
        learning = from_config(cfg, catalogue=str(ROOT / ".cache/unirec/ml-100k/items.jsonl"))
        published: list[tuple[float, dict]] = []
        driver = Driver(cfg.kafka, cfg.streaming, cfg.features, learning=learning).open()
        orig = learning.publish

        def timed_publish(*a, **kw):
            res = orig(*a, **kw)
            if res.accepted:
                published.append((time.time(), res.manifest.offsets))
            return res

        learning.publish = timed_publish
        runner = threading.Thread(target=driver.run, daemon=True)
        runner.start()
        producer = mp.get_context("spawn").Process(target=_produce, args=(kafka, lines, args.rate))
        producer.start()
        producer.join()
        deadline = time.time() + 120
        while driver.totals["records"] < len(lines) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(args.every_seconds + 1)          # the last batch's publish falls due
        while (learning.learner.publish_figures()["steps"] and time.time() < deadline + 60):
            time.sleep(0.5)
        end = time.time()
        records_read = driver.totals["records"]
        driver.stop()
        runner.join()
        driver.close()
        consumer = KafkaConsumer(**client_kwargs(kafka), enable_auto_commit=False)
        from kafka import TopicPartition

        tps = [TopicPartition(t, p) for t in (kafka.topics.clicks, kafka.topics.queries)
               for p in consumer.partitions_for_topic(t)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        fresh, uncovered, n = [], 0, 0
        while n < len(lines):
            batch = consumer.poll(timeout_ms=2000)
            if not batch:
                break
            for tp, records in batch.items():
                for r in records:
                    n += 1
                    t = covered_at(published, (tp.topic, tp.partition), r.offset)
                    if t is None:                 # counted at the end time: a lower bound, not dropped
                        uncovered += 1
                        fresh.append(end - r.timestamp / 1000.0)
                    else:
                        fresh.append(t - r.timestamp / 1000.0)
        consumer.close()
    finally:
        broker.stop(kafka)
    q = statistics.quantiles(fresh, n=100) if len(fresh) > 1 else [float("nan")] * 99
    out = {"freshness_p50_s": round(q[49], 2), "freshness_p95_s": round(q[94], 2), "versions": len(published),
           "events": n, "uncovered": uncovered, "records_read": records_read, "deferred_windows": learning.learner.totals["deferred"],
           "steps": learning.learner.totals["steps"], "offered_per_s": args.rate,
           "every_seconds": args.every_seconds, "max_steps_per_batch": args.max_steps,
           "publish_seconds_mean": {k: round(statistics.mean(v["seconds"].get(k, 0.0) for v in learning.versions), 2)
                                    for k in ("registry", "feast", "notice")} if learning.versions else None}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
