"""Producer throughput of `unirec replay` into the embedded broker.

Starts noida-db on a free port in a temp dir (as `unirec broker start` does),
replays the prepared ML-100k stream (or `--generate N` synthetic events over
`--users` users), reads the topics' end offsets back to check nothing is
missing, stops the broker. Last stdout line: one JSON object.

    .venv/bin/python bench/replay.py [--events PATH | --generate 200000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import time

from kafka import KafkaConsumer, TopicPartition

from unirec.streaming import broker
from unirec.streaming.broker import client_kwargs
from unirec.streaming.config import EmbeddedBroker, KafkaConfig, KafkaTopics
from unirec.streaming.replay import read_lines, replay


def generated(n: int, users: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        e = {"schema": "click/v1", "event_id": f"c-{i}", "user_id": str(rng.randrange(users)),
             "item_id": str(rng.randrange(20000)), "ts": 1_700_000_000 + i // 10, "label": rng.randrange(2),
             "rating": None, "surface": "rec", "query_id": None, "position": rng.randrange(20)}  # fmt: skip
        out.append(json.dumps(e, separators=(",", ":")).encode())
    return out


def end_total(cfg: KafkaConfig, topics: list[str]) -> int:
    consumer = KafkaConsumer(**client_kwargs(cfg))
    tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t))]
    total = sum(consumer.end_offsets(tps).values())
    consumer.close()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", default=".cache/unirec/ml-100k/events.jsonl")
    ap.add_argument("--generate", type=int, default=0, help="N synthetic click events instead of --events")
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3, help="replays (fresh topics each); the best is reported")
    args = ap.parse_args()
    lines = generated(args.generate, args.users) if args.generate else list(read_lines(args.events))
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}", embedded=EmbeddedBroker(run_dir=tmp))
        t0 = time.perf_counter()
        broker.start(cfg)
        start_s = time.perf_counter() - t0
        runs, missing = [], 0
        try:
            for r in range(args.repeat):
                topics = KafkaTopics(clicks=f"clicks-{r}", queries=f"queries-{r}", dead_letter=f"dl-{r}")
                run_cfg = KafkaConfig(bootstrap_servers=cfg.bootstrap_servers, topics=topics)
                broker.ensure_topics(run_cfg)
                stats = replay(lines, run_cfg)
                missing += stats.events - end_total(run_cfg, [topics.clicks, topics.queries])
                runs.append(stats.events_per_s)
                print(f"run {r}: {stats}", file=sys.stderr)
        finally:
            broker.stop(cfg)
    print(json.dumps({"events": len(lines), "events_per_s": round(max(runs)), "events_per_s_runs": [round(x) for x in runs],
                      "missing": missing, "broker_start_s": round(start_s, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
