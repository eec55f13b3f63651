"""`unirec pipeline run`: the continuous Kafka -> Beam -> Feast micro-batch driver, with online
learning, A/B attribution and /metrics on `monitoring.bind`."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from unirec.config import ConfigError, load
from unirec.data import DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    pipe = subparsers.add_parser("pipeline", help="the streaming pipeline (Kafka -> Beam -> Feast)")
    sub = pipe.add_subparsers(dest="pipeline_command", required=True)
    run = sub.add_parser("run", help="run micro-batches until stopped (SIGINT/SIGTERM finish the current batch)")
    run.add_argument("--once", action="store_true", help="stop as soon as a batch finds nothing new (caught up)")
    run.add_argument("--max-batches", type=int, default=None, metavar="N", help="stop after N non-empty batches")
    run.add_argument("-q", "--quiet", action="store_true", help="no per-batch log lines")
    run.add_argument("--no-learn", action="store_true",
                     help="features only: no fine-tuning or publishing (same as online.enabled: false)")
    run.set_defaults(func=_run)
    status = sub.add_parser("status", help="state-store offsets, Kafka end offsets and the lag per partition")
    status.set_defaults(func=_status)


def _run(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from unirec.streaming.broker import ensure_topics
    from unirec.streaming.driver import Driver

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr, force=True)
    for noisy in ("kafka", "apache_beam", "feast"):
        logging.getLogger(noisy).setLevel(logging.ERROR if noisy == "kafka" else logging.WARNING)
    monitor = None
    try:
        cfg = load(args.config)
        ensure_topics(cfg.kafka)
        from unirec.streaming import experiment_feed

        monitor = _monitor(cfg)
        learning = None
        if cfg.online.enabled and not args.no_learn:
            from unirec.streaming.online import from_config

            learning = from_config(cfg, monitor=monitor)
        feed = experiment_feed.from_config(cfg, registry=monitor.metrics.registry)
        driver = Driver(cfg.kafka, cfg.streaming, cfg.features, learning=learning, experiments=feed,
                        on_batch=lambda report: monitor.on_batch(report, driver.last_lags))
        with driver:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: driver.stop())
            n = driver.run(once=args.once, max_batches=args.max_batches)
            totals = driver.totals
            if learning is not None:
                print(f"online learning: {learning.summary()}")
    except (ConfigError, DataError) as e:      # DataError: e.g. the sentence encoder's files
        print(f"unirec pipeline run: {e}", file=sys.stderr)
        return 2
    except KafkaError as e:
        print(f"unirec pipeline run: Kafka at {cfg.kafka.bootstrap_servers}: {e!r} "
              "(is the broker running? `unirec broker start`)", file=sys.stderr)
        return 1
    finally:
        if monitor is not None:
            monitor.close()
    dead = {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("dead_letter.")}
    print(f"{n} batches, {totals['records']} records, {totals['users_pushed']} user and "
          f"{totals['items_pushed']} item states pushed, dead letters: {sum(dead.values())} {dead or ''}".rstrip())
    return 0


def _monitor(cfg):
    """The process's Monitor; /metrics on `monitoring.bind` (a busy port loses only the endpoint)."""
    from unirec.ops.monitor import Monitor

    t = cfg.kafka.topics
    monitor = Monitor(cfg.monitoring, topics=[t.clicks, t.queries])
    try:
        monitor.start()
        if monitor.port is not None:
            logging.getLogger(__name__).info("metrics at http://%s:%d/metrics",
                                             cfg.monitoring.bind.rsplit(":", 1)[0], monitor.port)
    except RuntimeError as e:
        print(f"unirec pipeline run: no /metrics endpoint ({e}); running on", file=sys.stderr)
    return monitor


def _status(args: argparse.Namespace) -> int:
    from kafka import KafkaConsumer, TopicPartition

    from unirec.features.state import StateStore
    from unirec.streaming.broker import client_kwargs

    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"unirec pipeline status: {e}", file=sys.stderr)
        return 2
    with StateStore(cfg.features.state_path) as store:
        stored, counts = store.offsets(), store.counts()
    consumer = KafkaConsumer(**client_kwargs(cfg.kafka), group_id=cfg.streaming.group_id, enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t in (cfg.kafka.topics.clicks, cfg.kafka.topics.queries)
               for p in sorted(consumer.partitions_for_topic(t) or ())]
        ends = consumer.end_offsets(tps) if tps else {}
        for tp in tps:
            pos = stored.get((tp.topic, tp.partition), 0)
            print(f"{tp.topic}[{tp.partition}]: applied up to {pos}, end {ends[tp]}, lag {ends[tp] - pos}, "
                  f"kafka committed {consumer.committed(tp)}")
    finally:
        consumer.close()
    print(f"state: {counts['users']} users, {counts['items']} items, {counts['outbox']} keys waiting to be pushed")
    return 0
