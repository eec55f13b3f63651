"""`unirec run`: the whole chain on embedded defaults (what `make run` does).

1. prepare MovieLens-100k (`unirec data prepare`);
2. use the Kafka cluster in `kafka.bootstrap_servers` if one answers, else start the
   embedded broker there (`unirec broker start`); create the topics;
3. replay the stream into Kafka (`unirec replay`) in a background thread while
4. the micro-batch pipeline (`unirec pipeline run`) validates, merges and writes the
   features to Feast, until the replay is done and the pipeline has caught up;
5. train the unified model offline and test it (`unirec train --offline`);
6. print a summary: what flowed where, the model's figures, and where the artefacts are.

Every step is also its own command; this one only chains them. The embedded broker
keeps running afterwards (`unirec broker stop`), so the topics can be inspected.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="the whole chain on embedded defaults (make run)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="replay only the first N events")
    p.add_argument("--rate", type=float, default=None, metavar="EVENTS_PER_S", help="cap the replay rate")
    p.add_argument("--train-budget", type=float, default=120.0, metavar="S",
                   help="seconds of offline training (default 120, so the demo ends in minutes; "
                        "`unirec train --offline` trains to early stopping)")
    p.add_argument("--skip-train", action="store_true", help="stop after the features are online")
    p.add_argument("--fresh", action="store_true",
                   help="start from nothing: stop the embedded broker and delete its data, the state store "
                        "and the Feast repo first (so a second run does not replay into the first one's topics)")
    p.set_defaults(func=_run)


def _say(msg: str) -> None:
    print(f"[unirec run] {msg}", file=sys.stderr, flush=True)


def _replay_in_background(cfg, events_path, limit, rate, result: dict) -> threading.Thread:
    from unirec.streaming.replay import read_lines, replay

    def work() -> None:
        try:
            result["stats"] = replay(read_lines(events_path), cfg.kafka, rate=rate, limit=limit)
        except Exception as e:  # reported by the main thread
            result["error"] = e

    t = threading.Thread(target=work, name="replay", daemon=True)
    t.start()
    return t


def _event_span_s(events_path) -> int:
    """Event-time span of the stream (the file is in event-time order)."""
    with open(events_path, "rb") as f:
        first = json.loads(f.readline())["ts"]
        f.seek(max(0, f.seek(0, 2) - 4096))
        last = json.loads(f.read().splitlines()[-1])["ts"]
    return int(last - first) + 1


def _stream(cfg, events_path, args) -> dict:
    from unirec.streaming.driver import Driver

    result: dict = {}
    t0 = time.monotonic()
    replayer = _replay_in_background(cfg, events_path, args.limit, args.rate, result)
    batches = 0
    # A full-speed replay squeezes months of event time into seconds, so a query that
    # reaches its batch a few ms after later clicks would look hours late. The replay is
    # history, not live traffic: allow lateness over its whole span (and say so).
    span = _event_span_s(events_path)
    features_cfg = cfg.features
    if args.rate is None and span > features_cfg.allowed_lateness_s:
        features_cfg = dataclasses.replace(features_cfg, allowed_lateness_s=span)
        _say(f"full-speed replay: allowed lateness widened to the stream's span ({span / 86400:.0f} days)")
    with Driver(cfg.kafka, cfg.streaming, features_cfg) as driver:
        while True:
            batches += driver.run(max_batches=1)
            if not replayer.is_alive():
                batches += driver.run(once=True)     # drain what the replay left
                break
        totals = dict(driver.totals)
    if "error" in result:
        raise result["error"]
    return {"replay": result["stats"], "batches": batches, "totals": totals, "seconds": time.monotonic() - t0}


def _sample_user(cfg, events_path) -> dict:
    """One user's sequence as the Feast online store serves it: proof the features landed."""
    from unirec.features.online import OnlineStore

    with open(events_path, encoding="utf-8") as f:
        user_id = json.loads(f.readline())["user_id"]
    seq = OnlineStore(cfg.features).read_users([user_id]).get(user_id)
    if seq is None:
        return {"user_id": user_id, "online": None}
    return {"user_id": user_id, "clicks_online": len(seq.item_ids), "last_items": list(seq.item_ids[-5:]),
            "last_labels": list(seq.labels[-5:]), "recent_queries": list(seq.query_texts[-3:])}


def _wipe(cfg) -> None:
    import shutil
    from pathlib import Path

    from unirec.streaming import broker

    if broker.status(cfg.kafka).running:
        broker.stop(cfg.kafka)
    state = Path(cfg.features.state_path)
    for path in (Path(cfg.kafka.embedded.run_dir), Path(cfg.features.repo_dir), Path(cfg.streaming.work_dir),
                 state, state.with_name(state.name + "-wal"), state.with_name(state.name + "-shm")):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    _say("fresh start: embedded broker data, state store and Feast repo removed")


def _run(args: argparse.Namespace) -> int:
    import logging

    from unirec.config import ConfigError, load
    from unirec.data import DataError, prepare
    from unirec.streaming import broker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    logging.getLogger().setLevel(logging.ERROR)          # Beam's optional-dependency warnings
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # connection failures surface as exceptions
    try:
        cfg = load(args.config)
        data_dir = prepare(cfg.data)
    except (ConfigError, DataError) as e:
        print(f"unirec run: {e}", file=sys.stderr)
        return 2
    if args.fresh:
        _wipe(cfg)
    if broker.answers_metadata(cfg.kafka):
        _say(f"using the Kafka cluster at {cfg.kafka.bootstrap_servers}")
    else:
        _say(f"starting the embedded broker: {broker.start(cfg.kafka)}")
    broker.ensure_topics(cfg.kafka)
    _say("replaying MovieLens-100k into Kafka while the pipeline writes features to Feast")
    flow = _stream(cfg, data_dir / "events.jsonl", args)
    summary = {
        "events_replayed": flow["replay"].events,
        "feast_online_sample": _sample_user(cfg, data_dir / "events.jsonl"),
        "pipeline": {"batches": flow["batches"], "seconds": round(flow["seconds"], 1),
                     **{k: v for k, v in sorted(flow["totals"].items())}},
        "artefacts": {"events": str(data_dir / "events.jsonl"), "feature_repo": cfg.features.repo_dir,
                      "state_store": cfg.features.state_path, "broker_log": f"{cfg.kafka.embedded.run_dir}/broker.log"},
    }
    if not args.skip_train:
        _say("training the unified model offline (RecBole leave-one-out protocol)")
        from unirec.cli.train import train_and_save

        tc = dataclasses.replace(cfg.train, time_budget_s=args.train_budget)
        result = train_and_save(cfg.model, tc, data_dir, log=_say)
        summary["artefacts"]["model"] = result.pop("checkpoint")
        summary["model"] = result
    print(json.dumps(summary, indent=2, default=str))
    return 0
