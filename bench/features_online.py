"""Feast online-store throughput: push and read rows/s for users and items, SQLite and Redis.

    .venv/bin/python bench/features_online.py [--rows 10000] [--seq-len 200] [--backends sqlite,sqlite_batched,sqlite_feast,redis]
                                              [--profile sqlite:direct:users]

Builds `rows` synthetic user states (`seq-len` clicks and 20 queries each) and item
stats, pushes them through each write path (`push` = FeatureStore.push,
`direct` = FeatureStore.write_to_online_store, `batch` = rows built from the
dataclasses into the store's online_write_batch), reads them back with
get_online_features, checks the values round-trip, and prints one JSON object as
the last stdout line. Starts its own redis-server on a free port and stops it.
`--profile backend:path:kind` prints a cProfile of that one step to stderr.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from unirec.features import item_stats, redis_local
from unirec.features.config import FeaturesConfig
from unirec.features.online import OnlineStore
from unirec.features.sequence import merge


def make_states(n: int, seq_len: int, n_items: int):
    users, clicks = [], []
    for u in range(n):
        evs = [SimpleNamespace(event_id=f"q{u}-{k}", user_id=f"u{u}", query_id=f"q{u}-{k}",
                               text=f"query text {k}", ts=1_000_000 + k) for k in range(20)]
        for k in range(seq_len):
            evs.append(SimpleNamespace(event_id=f"c{u}-{k}", user_id=f"u{u}", item_id=f"i{(u * 7 + k) % n_items}",
                                       ts=1_000_000 + 60 * k, label=k % 2, surface="rec", query_id=None))
        res = merge(None, f"u{u}", evs, max_len=seq_len, allowed_lateness_s=0, max_queries=20)
        users.append(res.state)
        clicks += res.applied_clicks[:3]
    stats = item_stats.apply({}, clicks, bucket_s=3600, windows_s=(3600, 86400, 604800))
    return users, list(stats.values())


def timed(fn, profile: bool):
    """(result, wall s); also records this process's CPU s in CPU[-1] (the machine is shared,
    so CPU time is the steadier number; it excludes redis-server's own CPU)."""
    prof = cProfile.Profile() if profile else None
    t, c = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    out = fn()
    if prof:
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(35)
    CPU.append(time.process_time() - c)
    return out, time.perf_counter() - t


CPU: list[float] = []


def run_backend(backend: str, root: Path, users, items, profile: str, paths: list[str]) -> dict:
    """backend: sqlite (packed rows), sqlite_batched (Feast's tables, batched writes), sqlite_feast
    (Feast's own SQLite write) or redis."""
    server = redis_local.start(root / "redis") if backend == "redis" else None
    try:
        cfg = FeaturesConfig(repo_dir=str(root / backend), online_store="redis" if server else "sqlite",
                             sqlite_store={"sqlite": "packed", "sqlite_batched": "batched"}.get(backend, "feast"),
                             redis_connection_string=server.connection_string if server else "127.0.0.1:6379")
        out = {}
        for path in paths:
            store = OnlineStore(cfg, write_path=path)
            store.apply()
            store.push_users(users[:10])  # warm caches (registry, connections)
            for kind, rows, fn in (("users", users, store.push_users), ("items", items, store.push_items)):
                _, dt = timed(lambda: fn(rows), profile == f"{backend}:{path}:{kind}")
                out[f"push_{path}_{kind}_rows_per_s"] = round(len(rows) / dt)
                out[f"push_{path}_{kind}_rows_per_cpu_s"] = round(len(rows) / CPU[-1])
        ids = [s.user_id for s in users]
        want = {s.item_id: item_stats.feature_row(s, bucket_s=3600, windows_s=cfg.item_windows_s) for s in items}
        for mode, fast in (("feast", False), ("fast", True)):
            got, dt = timed(lambda: store.read_users(ids, fast=fast), profile == f"{backend}:read_{mode}:users")
            out[f"read_{mode}_users_rows_per_s"] = round(len(ids) / dt)
            out[f"read_{mode}_users_rows_per_cpu_s"] = round(len(ids) / CPU[-1])
            out[f"read_{mode}_users_roundtrip_ok"] = all(got[s.user_id] == s.for_serving() for s in users)
            got_items, dt = timed(lambda: store.read_items(list(want), fast=fast), profile == f"{backend}:read_{mode}:items")
            out[f"read_{mode}_items_rows_per_s"] = round(len(items) / dt)
            out[f"read_{mode}_items_rows_per_cpu_s"] = round(len(items) / CPU[-1])
            out[f"read_{mode}_items_roundtrip_ok"] = got_items == want
        return out
    finally:
        if server:
            server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--seq-len", type=int, default=200)
    ap.add_argument("--backends", default="sqlite,sqlite_batched,sqlite_feast,redis")
    ap.add_argument("--profile", default="")
    ap.add_argument("--paths", default="batch,direct,push", help="write paths to time")
    args = ap.parse_args()
    users, items = make_states(args.rows, args.seq_len, n_items=args.rows)
    gc.freeze()  # the states are long-lived; keep the collector from rescanning them per push
    result = {"rows": args.rows, "seq_len": args.seq_len, "items": len(items)}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            for k, v in run_backend(backend, Path(tmp), users, items, args.profile,
                                        args.paths.split(",")).items():
                result[f"{backend}_{k}"] = v
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
