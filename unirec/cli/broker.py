"""`unirec broker start|stop|status`: the embedded Kafka-protocol broker (noida-db) on loopback."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from unirec.config import ConfigError, load


def register(subparsers: argparse._SubParsersAction) -> None:
    broker = subparsers.add_parser("broker", help="embedded Kafka broker for local runs and tests")
    sub = broker.add_subparsers(dest="broker_command", required=True)
    start = sub.add_parser("start", help="start it in the background, wait until it answers, create the topics")
    start.add_argument("--timeout", type=float, default=None, help="seconds to wait (default kafka.embedded.start_timeout_s)")
    start.add_argument("--no-topics", action="store_true", help="do not create the project's topics")
    sub.add_parser("stop", help="stop it (messages and committed offsets are kept)")
    sub.add_parser("status", help="running or stopped, with the address (exit code 0 / 3)")
    for p in sub.choices.values():
        p.add_argument("--run-dir", default=None, help="pid file, log and data (default kafka.embedded.run_dir)")
    broker.set_defaults(func=_run)


def _kafka_cfg(args: argparse.Namespace):
    cfg = load(args.config).kafka
    if args.run_dir:
        cfg = dataclasses.replace(cfg, embedded=dataclasses.replace(cfg.embedded, run_dir=args.run_dir))
    return cfg


def _run(args: argparse.Namespace) -> int:
    from unirec.streaming import broker

    try:
        cfg = _kafka_cfg(args)
        if args.broker_command == "start":
            st = broker.start(cfg, timeout_s=args.timeout)
            print(f"broker {st}")
            if not args.no_topics:
                created = broker.ensure_topics(cfg)
                print(f"topics: {', '.join(broker.topic_names(cfg))} ({len(created)} created, "
                      f"{cfg.partitions} partitions each when new)")  # fmt: skip
            return 0
        if args.broker_command == "stop":
            print(f"broker {broker.stop(cfg)}")
            return 0
        st = broker.status(cfg)
        print(f"broker {st}")
        return 0 if st.running else 3
    except (ConfigError, broker.BrokerError) as e:
        print(f"unirec broker {args.broker_command}: {e}", file=sys.stderr)
        return 2
