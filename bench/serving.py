"""Serving latency under load: `unirec serve` in its own process, an open-loop load of
GET /recommend from this one.

    .venv/bin/python bench/serving.py [--rate 200] [--duration 30] [--warmup 5] [--no-cache]
                                      [--registry PATH] [--no-kafka] [--profile FILE]

Set-up (in a temp dir, nothing of the working tree is touched):
* a registry version of the ML-100k catalogue with the default model config,
  weights from the offline checkpoint (`train.checkpoint`) when it exists
  (random otherwise: same cost), unless `--registry` names a real registry;
* a Feast SQLite online store holding every ML-100k user's sequence (the
  newest `features.max_sequence_length` clicks, their queries);
* an embedded Kafka broker for the exposures (`--no-kafka`: an unreachable
  bootstrap address, so exposures are dropped and counted instead).
Then `unirec serve` starts as a subprocess with a generated pipeline.yaml.

Load: requests are scheduled at a fixed rate (open loop) for uniformly drawn
ML-100k users, sent over `--connections` keep-alive HTTP/1.1 connections by
asyncio; latency counts from the *scheduled* time, so a stalled server cannot
hide queueing (no coordinated omission). Before measuring, every user is
requested once (closed loop, 2 at a time) and then `--warmup` seconds of the
measured load run unmeasured. With the cache on (default) the measured requests
are then users whose sequence has not changed (the ranked list is reused: a
feature read, no model pass), i.e. the steady state between publishes;
`--no-cache` measures every request through the model (retrieval + re-ranking).

`--profile FILE`: the server runs under cProfile (event-loop thread, inference thread and
exposure thread, each its own profile) and writes the three tables to FILE when it stops
(latency under the profiler is not meaningful; use it for where the CPU goes).

Last stdout line: {"qps", "p50_ms", "p99_ms", "errors", ...details}; the details include
the server's CPU time per measured request (less dependent on what else runs on the
machine), split by thread ("main" is the event loop; the largest other one is the
inference thread) and the share of it spent in the kernel, the server-side latency
quantiles (upper bound of their histogram bucket: arrival at the inference queue to
answer), the mean number of requests answered per model pass, and the 1-minute load
average (the machine is shared: latency is not).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def publish_ml100k(cfg, registry_path: Path, data_dir: Path) -> str:
    """A registry version of the ML-100k catalogue (checkpoint weights when available)."""
    import torch

    from unirec.data import load_items
    from unirec.model.config import OnlineConfig
    from unirec.model.online import OnlineLearner
    from unirec.model.text import hash_pieces
    from unirec.model.vocab import item_text
    from unirec.ops.registry import Registry

    mc, items = cfg.model, load_items(data_dir)
    ids = sorted(items, key=lambda s: (len(s), s))              # Vocab.build's row order
    pieces_of = lambda i: hash_pieces(item_text(items[i]), mc.n_buckets, ngram=mc.ngram,  # noqa: E731
                                      max_pieces=mc.max_item_pieces)
    learner = OnlineLearner.fresh(mc, cfg.train, OnlineConfig(item_capacity=len(ids) + 1), pieces_of=pieces_of)
    learner.table.assign(ids, [0] * len(ids))
    learner.model.refresh_items()
    ckpt = Path(cfg.train.checkpoint)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)["model"]
        own = learner.model.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                if k in own and own[k].shape == v.shape:
                    own[k].copy_(v)
                elif k == "item_emb.weight":
                    own[k][: v.shape[0]].copy_(v)
        print(f"weights from {ckpt}", file=sys.stderr)
    snap = learner.snapshot()
    reg = Registry(registry_path)
    return reg.publish(item_embeddings=snap["item_embeddings"], item_ids=snap["item_ids"], ranking=snap["ranking"],
                       extra={"idtable": snap["extra"]["idtable"]}, watermark=None, offsets={}, metrics={},
                       model_config=mc).version


def fill_store(fcfg, data_dir: Path) -> list[str]:
    """Every user's newest sequence into the Feast online store; returns the user ids."""
    from unirec.data import load_events
    from unirec.data.split import user_histories
    from unirec.features.online import OnlineStore
    from unirec.features.sequence import UserSequence

    n, q = fcfg.max_sequence_length, fcfg.max_queries
    states = []
    for u, h in user_histories(load_events(data_dir)).items():
        qs = [(t, qid, text) for t, qid, text in zip(h.ts, h.query_ids, h.query_texts) if qid][-q:]
        states.append(UserSequence(u, h.item_ids[-n:], h.labels[-n:], h.ts[-n:], h.surfaces[-n:],
                                   tuple(x or "" for x in h.query_ids[-n:]), tuple(x[1] for x in qs),
                                   tuple(x[2] for x in qs), tuple(x[0] for x in qs), watermark=h.ts[-1],
                                   total_clicks=len(h)))
    store = OnlineStore(fcfg)
    store.apply()
    store.push_users(states)
    return [s.user_id for s in states]


def plain(obj):
    """Dataclass config -> YAML-able dict (tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


async def http_get(conn, path: str) -> int:
    reader, writer = conn
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def load(port: int, users: list[str], rate: float, seconds: float, connections: int, seed: int):
    """Open-loop load; returns [(scheduled s, latency s, status)]."""
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    rng, out, tasks = random.Random(seed), [], []
    start = time.perf_counter() + 0.05

    async def one(at: float, user: str):
        conn = await pool.get()
        try:
            status = await http_get(conn, f"/recommend?user_id={user}&k=10")
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            status, conn = 599, await asyncio.open_connection("127.0.0.1", port)
        out.append((at - start, time.perf_counter() - at, status))
        pool.put_nowait(conn)

    for i in range(int(rate * seconds)):
        at = start + i / rate
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(at, rng.choice(users))))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait()[1].close()
    return out


async def sweep(port: int, users: list[str], parallel: int = 2) -> None:
    """Every user once, `parallel` at a time (fills the cache the way returning users would)."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(parallel)]

    async def worker(conn, part):
        for u in part:
            await http_get(conn, f"/recommend?user_id={u}&k=10")

    await asyncio.gather(*(worker(c, users[i::parallel]) for i, c in enumerate(conns)))
    for _, w in conns:
        w.close()


def cpu_seconds(stat: Path) -> tuple[float, float]:
    """(user + system, system) CPU seconds so far of the process or thread whose /proc stat
    file this is (Linux)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    user, system = (int(f) / os.sysconf("SC_CLK_TCK") for f in fields[11:13])
    return user + system, system


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread of a process: {"main": .., "<thread id>": ..}."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out["main" if task.name == str(pid) else task.name] = cpu_seconds(task / "stat")[0]
        except (FileNotFoundError, ProcessLookupError):   # a thread that ended meanwhile
            pass
    return out


def scrape(port: int) -> dict:
    """Counters, the batch-size histogram and the server-side latency histogram of the server."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {"latency_le": {}}
    for fam in text_string_to_metric_families(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text):
        for s in fam.samples:
            if s.name in ("unirec_serving_cache_total", "unirec_serving_exposures_total"):
                out[f"{s.name[15:-6]}_{next(iter(s.labels.values()))}"] = int(s.value)
            elif s.name in ("unirec_serving_batch_size_requests_sum", "unirec_serving_batch_size_requests_count"):
                out[s.name.rsplit("_", 1)[1]] = s.value
            elif s.name == "unirec_serving_request_duration_seconds_bucket" and s.labels["endpoint"] == "recommend":
                le = float(s.labels["le"])
                out["latency_le"][le] = out["latency_le"].get(le, 0) + s.value
    return out


def server_quantile(before: dict, after: dict, q: float) -> float:
    """Upper bound (ms) of the server-side latency bucket holding quantile q of the requests
    between two scrapes."""
    cum = sorted((le, after["latency_le"][le] - before["latency_le"].get(le, 0)) for le in after["latency_le"])
    total = cum[-1][1]
    return next(le for le, n in cum if n >= q * total) * 1000


# `unirec serve` with one cProfile per thread that runs request work; tables written at exit
PROFILED_SERVE = """
import cProfile, pstats, sys, threading
from unirec.ops import exposures, serving
out, profiles = sys.argv.pop(1), []
def profiled(cls, name, label):
    inner, local = getattr(cls, name), threading.local()
    def run(self, *a, **k):
        if not hasattr(local, "p"):
            local.p = cProfile.Profile()
            profiles.append((label, local.p))
        local.p.enable()
        try:
            return inner(self, *a, **k)
        finally:
            local.p.disable()
    setattr(cls, name, run)
profiled(serving.Service, "_drain", "inference thread")
profiled(exposures.ExposureLog, "_send_queued", "exposure thread")
from unirec.cli import main
loop = cProfile.Profile()
profiles.append(("event loop thread (includes start-up)", loop))
try:
    loop.runcall(main)
finally:
    with open(out, "w") as f:
        for label, p in profiles:
            stats = pstats.Stats(p, stream=f)
            f.write(f"===== {label}: {stats.total_tt:.2f} s\\n")
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(40)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds of load first")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--no-cache", action="store_true", help="serving.cache_users = 0")
    ap.add_argument("--no-kafka", action="store_true", help="no broker: exposures dropped (counted)")
    ap.add_argument("--registry", default=None, help="serve this registry instead of a generated version")
    ap.add_argument("--dump", default=None, help="write (scheduled s, latency s, status) rows as JSON here")
    ap.add_argument("--profile", default=None, help="run the server under cProfile; its tables go to this file")
    ap.add_argument("-c", "--config", default=str(ROOT / "pipeline.yaml"))
    args = ap.parse_args()

    from unirec.config import load as load_config
    from unirec.data import prepare
    from unirec.streaming import broker

    cfg = load_config(args.config)
    data_dir = prepare(cfg.data)
    tmp = Path(tempfile.mkdtemp(prefix="unirec-bench-serving-"))
    kafka = dataclasses.replace(cfg.kafka, bootstrap_servers=f"127.0.0.1:{free_port()}",
                                embedded=dataclasses.replace(cfg.kafka.embedded, run_dir=str(tmp / "broker")))
    if not args.no_kafka:
        broker.start(kafka)
    port = free_port()
    features = dataclasses.replace(cfg.features, repo_dir=str(tmp / "feast"), state_path=str(tmp / "state.sqlite"))
    registry = args.registry or str(tmp / "registry")
    if args.registry is None:
        print(f"published {publish_ml100k(cfg, Path(registry), data_dir)}", file=sys.stderr)
    users = fill_store(features, data_dir)
    serving = dataclasses.replace(cfg.serving, bind=f"127.0.0.1:{port}", cache_users=0 if args.no_cache else
                                  cfg.serving.cache_users)
    experiments = dataclasses.replace(cfg.experiments, state_path=str(tmp / "experiment.json"))
    config = {**plain(cfg), "kafka": plain(kafka), "features": plain(features), "serving": plain(serving),
              "experiments": plain(experiments), "registry": {**plain(cfg.registry), "path": registry}}
    (tmp / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = (PROFILED_SERVE, str(Path(args.profile).resolve())) if args.profile else \
        ("import sys; from unirec.cli import main; sys.exit(main())",)
    server = subprocess.Popen([sys.executable, "-c", *code, "-c", str(tmp / "pipeline.yaml"), "serve"],
                              env=env, cwd=ROOT, stderr=open(tmp / "server.log", "w"))
    try:
        import requests
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not come up; see {tmp / 'server.log'}")
            time.sleep(0.2)
        asyncio.run(sweep(port, users))
        asyncio.run(load(port, users, args.rate, args.warmup, args.connections, seed=1))
        before = scrape(port)
        stat = Path(f"/proc/{server.pid}/stat")
        t, cpu0, threads = time.perf_counter(), cpu_seconds(stat), thread_cpu_seconds(server.pid)
        res = asyncio.run(load(port, users, args.rate, args.duration, args.connections, seed=2))
        wall, (cpu, sys_cpu) = time.perf_counter() - t, (a - b for a, b in zip(cpu_seconds(stat), cpu0))
        threads = {k: v - threads.get(k, 0.0) for k, v in thread_cpu_seconds(server.pid).items()}
        time.sleep(0.5)
        counters = scrape(port)
    finally:
        # SIGINT: uvicorn shuts down and returns (on SIGTERM it re-raises the signal after its
        # shutdown, so the profiled run's `finally` would not write the tables)
        server.send_signal(signal.SIGINT if args.profile else signal.SIGTERM)
        server.wait(30)
        if not args.no_kafka:
            broker.stop(kafka)
    if args.dump:
        Path(args.dump).write_text(json.dumps(res))
    lat = np.array([r[1] for r in res]) * 1000
    errors = sum(r[2] != 200 for r in res)
    hits, misses = counters.get("cache_hit", 0) - before.get("cache_hit", 0), \
        counters.get("cache_miss", 0) - before.get("cache_miss", 0)
    batches = counters.get("count", 0) - before.get("count", 0)
    print(json.dumps({"qps": round(len(res) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 2),
                      "p99_ms": round(float(np.percentile(lat, 99)), 2), "errors": errors,
                      "requests": len(res), "rate": args.rate, "max_ms": round(float(lat.max()), 2),
                      "cache": not args.no_cache, "cache_hit_ratio": round(hits / max(1, hits + misses), 3),
                      "exposures": {k[10:]: v for k, v in counters.items() if k.startswith("exposures_")},
                      "server_cpu_ms_per_request": round(1000 * cpu / len(res), 3), "users": len(users),
                      "server_system_cpu_share": round(sys_cpu / max(cpu, 1e-9), 3),
                      "server_thread_cpu_ms_per_request": {k: round(1000 * v / len(res), 3) for k, v in sorted(
                          threads.items(), key=lambda kv: -kv[1]) if v > 0},
                      "server_p50_ms_le": server_quantile(before, counters, 0.5),
                      "server_p99_ms_le": server_quantile(before, counters, 0.99),
                      "mean_batch": round((counters.get("sum", 0) - before.get("sum", 0)) / max(1, batches), 2),
                      "load_average_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
