"""Cost of the keyed-state half of one micro-batch: load, merge, item stats, commit, outbox.

    .venv/bin/python bench/features_state.py [--events 20000] [--users 943] [--batches 5]

Simulates `--batches` micro-batches of `--events` click/query events over `--users`
users and 1,682 items (ML-100k-like by default; `--users 100000` for the generated
stream), against a StateStore in a temp dir, and prints per-stage seconds per batch
and events/s for the whole state half as one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from unirec.features import item_stats
from unirec.features.config import FeaturesConfig
from unirec.features.sequence import merge
from unirec.features.state import StateStore


def events(n: int, users: int, start: int, t0: int, rng: random.Random) -> list:
    out = []
    for k in range(start, start + n):
        u, ts = f"{rng.randrange(users)}", t0 + k // 10
        if rng.random() < 0.2:
            out.append(SimpleNamespace(event_id=f"q-{k}", user_id=u, query_id=f"q-{k}", text="star wars sci-fi", ts=ts))
        else:
            out.append(SimpleNamespace(event_id=f"c-{k}", user_id=u, item_id=f"{rng.randrange(1682)}", ts=ts,
                                       label=rng.randrange(2), surface="rec", query_id=None))
    return out


def step(st: StateStore, evs: list, cfg: FeaturesConfig, offset: int, times: dict) -> None:
    t = time.perf_counter()
    by_user: dict[str, list] = {}
    for e in evs:
        by_user.setdefault(e.user_id, []).append(e)
    old = st.get_users(by_user)
    t1 = time.perf_counter()
    res = [merge(old.get(u), u, es, max_len=cfg.max_sequence_length, allowed_lateness_s=cfg.allowed_lateness_s,
                 max_queries=cfg.max_queries) for u, es in by_user.items()]
    clicks = [c for r in res for c in r.applied_clicks]
    t2 = time.perf_counter()
    items = item_stats.apply(st.get_items({c.item_id for c in clicks}), clicks,
                             bucket_s=cfg.item_bucket_s, windows_s=cfg.item_windows_s)
    t3 = time.perf_counter()
    b = st.commit_batch([r.state for r in res], items.values(), {("clicks", 0): offset})
    t4 = time.perf_counter()
    st.mark_pushed(batch=b)
    t5 = time.perf_counter()
    for k, v in (("load_users", t1 - t), ("merge", t2 - t1), ("item_stats", t3 - t2), ("commit", t4 - t3),
                 ("mark_pushed", t5 - t4)):
        times[k] = times.get(k, 0.0) + v
    times["users_touched"] = times.get("users_touched", 0) + len(by_user)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--users", type=int, default=943)
    ap.add_argument("--batches", type=int, default=5)
    args = ap.parse_args()
    cfg, rng = FeaturesConfig(), random.Random(0)
    times: dict = {}
    with tempfile.TemporaryDirectory() as tmp, StateStore(Path(tmp) / "state.db") as st:
        for b in range(args.batches):
            evs = events(args.events, args.users, b * args.events, 880_000_000, rng)
            step(st, evs, cfg, (b + 1) * args.events, times)
        size_mb = (Path(tmp) / "state.db").stat().st_size / 2**20
    total = sum(v for k, v in times.items() if k != "users_touched")
    out = {"events_per_batch": args.events, "users": args.users, "batches": args.batches,
           **{f"{k}_s_per_batch": round(v / args.batches, 4) for k, v in times.items() if k != "users_touched"},
           "users_touched_per_batch": times["users_touched"] // args.batches,
           "events_per_s": round(args.events * args.batches / total), "state_db_mb": round(size_mb, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
