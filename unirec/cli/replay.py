"""`unirec replay`: publish the prepared event stream into Kafka in event-time order."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unirec.config import ConfigError, load


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("replay", help="publish events.jsonl into the clicks/queries topics, keyed by user")
    p.add_argument("--events", default=None, help="JSON-lines stream (default <data.cache_dir>/ml-100k/events.jsonl)")
    p.add_argument("--rate", type=float, default=None, metavar="EVENTS_PER_S", help="cap the send rate")
    p.add_argument("--speedup", type=float, default=None, metavar="FACTOR",
                   help="replay event time FACTOR times faster than it happened")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, metavar="N", help="publish at most N events")
    p.add_argument("--from", dest="start", type=int, default=0, metavar="N", help="skip the first N events")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from unirec.streaming.broker import answers_metadata, ensure_topics
    from unirec.streaming.replay import ReplayError, count_lines, read_lines, replay

    try:
        cfg = load(args.config)
        path = Path(args.events) if args.events else Path(cfg.data.cache_dir) / "ml-100k" / "events.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (run `unirec data prepare` first, or pass --events)")
        if args.start < 0 or (args.limit is not None and args.limit < 0):
            raise ValueError("--from and --limit must be >= 0")
        n = max(0, count_lines(path) - args.start)
        total = n if args.limit is None else min(n, args.limit)
        if not answers_metadata(cfg.kafka, timeout_s=5.0):
            print(f"unirec replay: no Kafka broker answers at {cfg.kafka.bootstrap_servers} "
                  "(start the embedded one with `unirec broker start`)", file=sys.stderr)  # fmt: skip
            return 1
        ensure_topics(cfg.kafka)
        # flush_every bounds the records the producer buffers on a long replay
        stats = replay(read_lines(path), cfg.kafka, rate=args.rate, speedup=args.speedup, limit=args.limit,
                       start=args.start, progress=not args.no_progress, total=total, flush_every=100_000)
    except (ConfigError, OSError, ValueError, ReplayError) as e:
        print(f"unirec replay: {e}", file=sys.stderr)
        return 2
    except KafkaError as e:  # no broker, auth, ...
        print(f"unirec replay: cannot publish to {cfg.kafka.bootstrap_servers}: {e!r}", file=sys.stderr)
        return 1
    print(f"{stats} -> {cfg.kafka.topics.clicks}, {cfg.kafka.topics.queries} at {cfg.kafka.bootstrap_servers}")
    return 0
