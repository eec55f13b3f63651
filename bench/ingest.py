"""Kafka -> Beam -> Feast online ingestion benchmark: throughput, latency, correctness.

    .venv/bin/python bench/ingest.py                       # ML-100k + 1M generated events over 100k users
    .venv/bin/python bench/ingest.py --events 200000 --users 20000 --latency-seconds 10
    .venv/bin/python bench/ingest.py --skip ml100k --skip latency --set push_nice=0   # an A/B of one setting

Starts an embedded broker (noida-db, free port, temp dir) and a fresh SQLite Feast
store per stage (`--online-store redis`: a Redis one, on a redis-server of its own),
the way `unirec broker start` / `unirec pipeline run` do (a broker per stage: see
`own_broker`), then:

1. Throughput, per source (ML-100k `events.jsonl` if prepared, and a generated
   stream of `--events` over `--users`): all events are produced first, then the
   driver (`streaming.driver.Driver`, default StreamingConfig: Beam FnApiRunner)
   starts from scratch and runs until caught up. events_per_s = events / wall time
   from the driver's first batch to its last completed Feast push.
2. Latency, per source (the first rate x seconds events of ML-100k, and a generated
   stream over n/10 users): a separate producer process offers `--latency-rate`
   events/s (default 5,000) for `--latency-seconds`; the driver runs continuously. Latency of a record
   = time its batch's Feast push completed - its Kafka timestamp (CreateTime, set
   by the producer when it sent the record).
3. Correctness: every user's online sequence and every item's online counts are
   read back from Feast and compared with values computed directly from the source
   events (`streaming.synthetic.expected`): `lost` / `duplicated` are applied
   clicks missing / extra online (should be 0).

Last stdout line: {"events", "events_per_s", "latency_p50_s", "latency_p95_s", "lost",
"duplicated", "dead_letter", "peak_rss_mb", "runs"}: events_per_s = all throughput
events / the sum of their wall times; latency = the worst p50 / p95 of the latency
runs; lost / duplicated summed over every run; "runs" holds each stream's numbers. `--profile FILE` writes a
cProfile of the generated-stream throughput run (CPU time of the driver's main thread).
Per throughput run, CPU microseconds per event of the driver, the push process and the
embedded broker (the third process on the two cores; `cpu_us_per_event` stays driver +
pusher), and `plan_probes`, the broker time-index probes the planner made.
Per latency run, `cpu_cores`: the CPU each process used per second of the run, from the
first send to the last push (driver, push process, broker, and the load generator, which
offers its events from the same two cores), so a reader can see how much of the machine
the pipeline had.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import json
import logging
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from unirec.features import redis_local
from unirec.features.config import FeaturesConfig
from unirec.streaming import broker
from unirec.streaming.config import EmbeddedBroker, KafkaConfig, KafkaTopics, StreamingConfig
from unirec.streaming.driver import Driver
from unirec.streaming.replay import replay
from unirec.streaming.synthetic import compare, expected, generated_stream, source_stream

log = logging.getLogger("bench.ingest")
ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT / ".cache/unirec/ml-100k/events.jsonl"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def own_broker(tmp: Path, name: str):
    """A fresh embedded broker for one stage of the bench. noida-db rewrites its whole
    store about a second after any write (a produce, an offset commit): measured 0.7 s
    of CPU per write at 300k stored records (~2.5 s at 1.1M, extrapolated). Sharing one
    broker would bill each stage for the records of the stages before it (the latency
    runs, whose producer writes continuously, came after 1.1M records of throughput runs)."""
    kafka = KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", partitions=3,
                        embedded=EmbeddedBroker(run_dir=str(tmp / f"broker-{name}")))
    broker.start(kafka)
    try:
        yield kafka
    finally:
        broker.stop(kafka)


ONLINE_STORE = "sqlite"            # --online-store; with "redis", each stage gets its own redis-server
_REDIS: list = []                  # servers started by `fresh`, stopped at the end of main


def fresh(kafka: KafkaConfig, tmp: Path, name: str) -> tuple[KafkaConfig, FeaturesConfig]:
    sfx = f"{name}-{uuid.uuid4().hex[:6]}"
    k = dataclasses.replace(kafka, topics=KafkaTopics(f"clicks-{sfx}", f"queries-{sfx}", f"dead-{sfx}"))
    broker.ensure_topics(k)
    f = FeaturesConfig(repo_dir=str(tmp / f"feast-{sfx}"), state_path=str(tmp / f"state-{sfx}.sqlite"))
    if ONLINE_STORE == "redis":
        _REDIS.append(redis_local.start(tmp / f"redis-{sfx}"))
        f = dataclasses.replace(f, online_store="redis", redis_connection_string=_REDIS[-1].connection_string)
    return k, f


def _cpu_of(pid: int | None) -> float:
    """CPU seconds process `pid` has used (0 without one): CPU time per event is what the
    machine's other load does not change, unlike events/s."""
    if pid is None:
        return 0.0
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pusher_cpu(driver: Driver) -> float:
    return _cpu_of(getattr(getattr(driver, "_pushes", None), "pid", None))


def _broker_cpu(kafka: KafkaConfig) -> float:
    """The embedded broker's CPU seconds: the third process on the two cores (its fetches
    and time-index probes scan the log, see streaming/plan.py)."""
    return _cpu_of(broker.status(kafka).pid)


def throughput(name: str, lines: list[bytes], kafka: KafkaConfig, scfg: StreamingConfig, tmp: Path,
               profile: str | None) -> dict:
    k, f = fresh(kafka, tmp, name)
    t = time.perf_counter()
    replay(lines, k)
    produce_s = time.perf_counter() - t
    reports = []
    with Driver(k, dataclasses.replace(scfg, group_id=f"bench-{name}"), f, on_batch=reports.append) as d:
        # thread CPU time, not wall time: on the shared machine, preemption would otherwise
        # be charged to whatever function was running
        prof = cProfile.Profile(time.thread_time) if profile else None
        t0, cpu0, child0, broker0 = time.time(), time.process_time(), _pusher_cpu(d), _broker_cpu(kafka)
        if prof:
            prof.enable()
        d.run(once=True)
        if prof:
            prof.disable()
            prof.dump_stats(profile)
        seconds = max(r.pushed_at for r in reports) - t0
        cpu = {"driver": round(time.process_time() - cpu0, 2), "pusher": round(_pusher_cpu(d) - child0, 2),
               "broker": round(_broker_cpu(kafka) - broker0, 2)}
        t = time.perf_counter()
        check = compare(d.online, expected(lines, f))
        verify_s = time.perf_counter() - t
        dead = sum(v for key, v in d.totals.items() if key.startswith("dead_letter."))
        pushed = {k: d.totals[k] for k in ("pushes", "users_written_online", "items_written_online")}
        probes = getattr(d.planner, "probes", None)
    phases = {p: round(sum(r.seconds.get(p, 0.0) for r in reports), 2) for p in reports[0].seconds}
    return {"source": name, "events": len(lines), "events_per_s": round(len(lines) / seconds),
            "seconds": round(seconds, 2), "batches": len(reports), "phase_seconds": phases, "plan_probes": probes,
            "cpu_s": cpu, "cpu_us_per_event": round(1e6 * (cpu["driver"] + cpu["pusher"]) / len(lines), 1),
            "cpu_us_per_event_driver": round(1e6 * cpu["driver"] / len(lines), 1),
            "cpu_us_per_event_pusher": round(1e6 * cpu["pusher"] / len(lines), 1),
            "cpu_us_per_event_broker": round(1e6 * cpu["broker"] / len(lines), 1),
            # the pusher writes each key once per push however many batches touched it, so its
            # CPU per event depends on how far behind it ran; per row pushed it does not
            "pushed_rows": {"users": pushed["users_written_online"], "items": pushed["items_written_online"],
                            "pushes": pushed["pushes"]},
            "pusher_cpu_us_per_row": round(1e6 * cpu["pusher"] / max(1, pushed["users_written_online"]
                                                                      + pushed["items_written_online"]), 1),
            "produce_s": round(produce_s, 1), "verify_s": round(verify_s, 1), "lost": check.lost,
            "duplicated": check.duplicated, "mismatched_users": len(check.mismatched_users),
            "mismatched_items": len(check.mismatched_items), "dead_letter": dead}


def _produce(kafka: KafkaConfig, lines: list[bytes], rate: float, cpu_out) -> None:
    t0, cpu0 = time.time(), time.process_time()   # after the spawned process's imports
    replay(lines, kafka, rate=rate)
    cpu_out.put((t0, time.process_time() - cpu0))  # first send; CPU seconds, all its threads


def latency(name: str, lines: list[bytes], rate: float, kafka: KafkaConfig, scfg: StreamingConfig,
            tmp: Path) -> dict:
    k, f = fresh(kafka, tmp, f"latency-{name}")
    reports = []
    driver = Driver(k, dataclasses.replace(scfg, group_id="bench-latency"), f, on_batch=reports.append).open()
    runner = threading.Thread(target=driver.run, daemon=True)
    runner.start()
    time.sleep(2.0)  # the first batch builds the Beam pipeline; measure the steady state
    ctx = mp.get_context("spawn")
    cpu_out = ctx.Queue()
    producer = ctx.Process(target=_produce, args=(k, lines, rate, cpu_out))
    cpu0, child0, broker0 = time.process_time(), _pusher_cpu(driver), _broker_cpu(k)
    producer.start()
    producer.join()
    deadline = time.time() + 60
    while sum(r.records for r in reports) < len(lines) and time.time() < deadline:
        time.sleep(0.1)
    driver.stop()
    runner.join()
    first_send, load_cpu = cpu_out.get(timeout=10)
    seconds = max(r.pushed_at for r in reports) - first_send
    cpu = {"driver": time.process_time() - cpu0, "pusher": _pusher_cpu(driver) - child0,
           "broker": _broker_cpu(k) - broker0, "load_generator": load_cpu}
    check = compare(driver.online, expected(lines, f))
    driver.close()
    for r in reports:
        log.info("%s %s", r, {p: round(v, 3) for p, v in r.seconds.items()})
    lat = sorted(r.pushed_at - ts / 1000.0 for r in reports for ts in r.arrival_ms)
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [0.0] * 99
    return {"source": name, "events": len(lines), "offered_per_s": rate, "applied": len(lat),
            "latency_p50_s": round(q[49], 3), "latency_p95_s": round(q[94], 3), "latency_max_s": round(lat[-1], 3),
            "batches": len(reports), "mean_batch": round(len(lat) / max(1, len(reports))),
            # where the two cores went while the load was offered and drained (the pipeline is
            # driver + pusher; the broker and the load generator share the machine with it)
            "cpu_cores": {p: round(c / seconds, 2) for p, c in cpu.items()},
            "lost": check.lost, "duplicated": check.duplicated,
            "mismatched_users": len(check.mismatched_users)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="size of the generated stream")
    ap.add_argument("--users", type=int, default=100_000, help="users of the generated stream")
    ap.add_argument("--items", type=int, default=5_000, help="items of the generated stream")
    ap.add_argument("--latency-rate", type=float, default=5000.0, help="events/s offered in the latency run")
    ap.add_argument("--latency-seconds", type=float, default=30.0, help="length of the latency run")
    ap.add_argument("--max-batch-events", type=int, default=None, help="override streaming.max_batch_events")
    ap.add_argument("--in-process-below", type=int, default=None, help="override streaming.in_process_below")
    ap.add_argument("--kafka-commit-interval", type=float, default=None,
                    help="override streaming.kafka_commit_interval_s")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a numeric streaming setting, e.g. --set state_cache_users=0")
    ap.add_argument("--skip", choices=("ml100k", "generated", "latency", "latency-ml100k", "latency-generated"),
                    action="append", default=[])
    ap.add_argument("--profile", default=None, help="write a cProfile of the generated throughput run here")
    ap.add_argument("--online-store", choices=("sqlite", "redis"), default="sqlite",
                    help="Feast online store: the embedded SQLite default, or Redis (a redis-server per stage)")
    args = ap.parse_args(argv)
    global ONLINE_STORE
    ONLINE_STORE = args.online_store
    try:
        return _main(args)
    finally:
        for server in _REDIS:
            server.stop()


def _main(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    scfg = StreamingConfig()
    if args.max_batch_events:
        scfg = dataclasses.replace(scfg, max_batch_events=args.max_batch_events)
    if args.in_process_below is not None:
        scfg = dataclasses.replace(scfg, in_process_below=args.in_process_below)
    if args.kafka_commit_interval is not None:
        scfg = dataclasses.replace(scfg, kafka_commit_interval_s=args.kafka_commit_interval)
    for item in args.set:
        name, _, value = item.partition("=")
        scfg = dataclasses.replace(scfg, **{name: type(getattr(scfg, name))(value)})
    runs, lats = [], []
    with tempfile.TemporaryDirectory(prefix="unirec-bench-") as tmp_s:
        tmp = Path(tmp_s)
        scfg = dataclasses.replace(scfg, work_dir=str(tmp / "work"))
        if "ml100k" not in args.skip and ML100K.exists():
            with own_broker(tmp, "ml100k") as kafka:
                runs.append(throughput("ml100k", source_stream(ML100K, 10**9), kafka, scfg, tmp, None))
            print(json.dumps(runs[-1]), flush=True)
        if "generated" not in args.skip:
            lines = generated_stream(args.events, args.users, n_items=args.items, seed=1)
            with own_broker(tmp, "generated") as kafka:
                runs.append(throughput("generated", lines, kafka, scfg, tmp, args.profile))
            print(json.dumps(runs[-1]), flush=True)
        if "latency" not in args.skip:
            n = int(args.latency_rate * args.latency_seconds)
            if "latency-ml100k" not in args.skip and ML100K.exists():  # the prepared stream, as a user would replay it
                with own_broker(tmp, "latency-ml100k") as kafka:
                    lats.append(latency("ml100k", source_stream(ML100K, n), args.latency_rate, kafka, scfg, tmp))
                print(json.dumps(lats[-1]), flush=True)
            if "latency-generated" not in args.skip:
                lines = generated_stream(n, max(1000, n // 10), n_items=args.items, seed=2)
                with own_broker(tmp, "latency-generated") as kafka:
                    lats.append(latency("generated", lines, args.latency_rate, kafka, scfg, tmp))
                print(json.dumps(lats[-1]), flush=True)
    events = sum(r["events"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    # Headline latency: the worst of the latency runs (each stream's own numbers are under "runs").
    summary = {
        "events": events,
        "online_store": ONLINE_STORE,
        "events_per_s": round(events / seconds) if seconds else None,
        "latency_p50_s": max((x["latency_p50_s"] for x in lats), default=None),
        "latency_p95_s": max((x["latency_p95_s"] for x in lats), default=None),
        "lost": sum(r["lost"] for r in runs + lats),
        "duplicated": sum(r["duplicated"] for r in runs + lats),
        "dead_letter": sum(r["dead_letter"] for r in runs),
        # this process plus its largest waited-for child (the push process or the broker)
        "peak_rss_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                              + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024),
        "runs": {
            "throughput": {r["source"]: {"events": r["events"], "events_per_s": r["events_per_s"],
                                         "cpu_us_per_event": r["cpu_us_per_event"],
                                         "cpu_us_per_event_driver": r["cpu_us_per_event_driver"],
                                         "cpu_us_per_event_pusher": r["cpu_us_per_event_pusher"],
                                         "cpu_us_per_event_broker": r["cpu_us_per_event_broker"],
                                         "pusher_cpu_us_per_row": r["pusher_cpu_us_per_row"],
                                         "phase_seconds": r["phase_seconds"]} for r in runs},
            "latency": {x["source"]: {"offered_per_s": x["offered_per_s"], "events": x["events"],
                                      "p50_s": x["latency_p50_s"], "p95_s": x["latency_p95_s"],
                                      "mean_batch": x["mean_batch"], "cpu_cores": x["cpu_cores"]} for x in lats},
        },
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
