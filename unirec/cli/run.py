"""`unirec run`: the whole chain on embedded defaults (what `make run` does).

1. prepare MovieLens-100k (`unirec data prepare`);
2. use the Kafka cluster in `kafka.bootstrap_servers` if one answers, else start the
   embedded broker there (`unirec broker start`); create the topics;
3. replay the stream into Kafka (`unirec replay`, 2,000 events/s by default) in a
   background thread while
4. the micro-batch pipeline (`unirec pipeline run`) validates, merges and writes the
   features to Feast, test-then-trains the unified model on every micro-batch
   (FineTune stage) and publishes a new version every `registry.publish.every_seconds`
   (registry, Feast `item_embedding`, `model-updates` topic), until the replay is
   done and the pipeline has caught up; a last version is published at the end;
5. print a summary: events, versions, test-then-train figures over time, where the
   artefacts are (and write the run report when `unirec report` is available).

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
    p.add_argument("--rate", type=float, default=2000.0, metavar="EVENTS_PER_S",
                   help="replay rate (default 2000/s: ML-100k in ~1 minute; 0 = as fast as possible)")
    p.add_argument("--no-learn", action="store_true",
                   help="features only: no fine-tuning, no publishing (online.enabled: false does the same)")
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


def _learning(cfg, data_dir, monitor):
    from unirec.streaming.online import from_config

    return from_config(cfg, monitor=monitor, catalogue=str(data_dir / "items.jsonl"))


def _stream(cfg, events_path, args, learning=None, monitor=None) -> dict:
    from unirec.streaming import experiment_feed
    from unirec.streaming.driver import Driver

    result: dict = {}
    t0 = time.monotonic()
    replayer = _replay_in_background(cfg, events_path, args.limit, args.rate or None, result)
    batches = 0
    # A full-speed replay squeezes months of event time into seconds, so a query that
    # reaches its batch a few ms after later clicks would look hours late. The replay is
    # history, not live traffic: allow lateness over its whole span (and say so).
    span = _event_span_s(events_path)
    features_cfg = cfg.features
    if span > features_cfg.allowed_lateness_s:
        features_cfg = dataclasses.replace(features_cfg, allowed_lateness_s=span)
        _say(f"fast replay: allowed lateness widened to the stream's span ({span / 86400:.0f} days)")
    on_batch = None if monitor is None else (lambda report: monitor.on_batch(report, driver.last_lags))
    feed = experiment_feed.from_config(cfg, registry=monitor.metrics.registry if monitor is not None else None)
    with Driver(cfg.kafka, cfg.streaming, features_cfg, learning=learning, on_batch=on_batch,
                experiments=feed) as driver:
        last_say = time.monotonic()
        while True:
            batches += driver.run(max_batches=1)
            if learning is not None and time.monotonic() - last_say > 15:
                last_say = time.monotonic()
                _say(_progress(driver, learning))
            if not replayer.is_alive():
                batches += driver.run(once=True)     # drain what the replay left
                break
        if learning is not None and learning.learner.publish_figures()["steps"]:
            learning.publish(learning.learner.state_batch, dict(driver.positions))   # the last steps too
        totals = dict(driver.totals)
    if "error" in result:
        raise result["error"]
    return {"replay": result["stats"], "batches": batches, "totals": totals, "seconds": time.monotonic() - t0}


def _progress(driver, learning) -> str:
    last = learning.state.last_stats or {}
    ev = last.get("eval") or {}
    ndcg = ev.get("ndcg@10")
    return (f"{driver.totals['records']:,} records, {learning.learner.totals['steps']} steps, "
            f"{learning.state.published} versions (latest {learning.learner.version}), "
            f"last batch test-then-train NDCG@10 {'n/a' if ndcg is None else f'{ndcg:.4f}'}")


def over_time(history: list[dict], slices: int = 8) -> list[dict]:
    """Test-then-train figures in `slices` consecutive spans of batches, each the exact
    mean over its events (weighted by the events each batch scored)."""
    rows = [h for h in history if h.get("eval_events")]
    if not rows:
        return []
    out, per = [], max(1, -(-len(rows) // slices))
    for i in range(0, len(rows), per):
        span = rows[i:i + per]
        n = sum(r["eval_events"] for r in span)
        ns = sum(r.get("eval_search_events") or 0 for r in span)
        mean = lambda k, w: (sum((r.get(k) or 0.0) * (r.get(w) or 0) for r in span) / max(1, sum(
            r.get(w) or 0 for r in span)) if any(r.get(k) is not None for r in span) else None)
        out.append({"until_event_time": time.strftime("%Y-%m-%d", time.gmtime(span[-1]["watermark"] or 0)),
                    "events": n, "hr@10": mean("hr@10", "eval_events"), "ndcg@10": mean("ndcg@10", "eval_events"),
                    "auc": mean("auc", "eval_rank_events"),
                    "search_recall@10": mean("search_recall@10", "eval_search_events") if ns else None})
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in out]


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
                 Path(cfg.registry.path),
                 state, state.with_name(state.name + "-wal"), state.with_name(state.name + "-shm")):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    _say("fresh start: embedded broker data, state store, Feast repo and model registry removed")


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
        if cfg.model.sentence_encoder and cfg.online.enabled and not args.no_learn:
            from unirec.model import sentence

            sentence.fetch(cfg.data.cache_dir, cfg.model.sentence_encoder_path)   # before anything starts
    except (ConfigError, DataError) as e:
        print(f"unirec run: {e}", file=sys.stderr)
        return 2
    if args.fresh:
        _wipe(cfg)
    if broker.answers_metadata(cfg.kafka):
        _say(f"using the Kafka cluster at {cfg.kafka.bootstrap_servers}")
        embedded = None
    else:
        embedded = broker.start(cfg.kafka)
        _say(f"starting the embedded broker: {embedded}")
    broker.ensure_topics(cfg.kafka)
    learn = cfg.online.enabled and not args.no_learn
    monitor = _monitor(cfg)
    learning = _learning(cfg, data_dir, monitor) if learn else None
    _say("replaying MovieLens-100k into Kafka while the pipeline writes features to Feast"
         + (", fine-tunes the model on every micro-batch and publishes versions" if learn else ""))
    flow = _stream(cfg, data_dir / "events.jsonl", args, learning, monitor)
    summary = {
        "events_replayed": flow["replay"].events,
        "feast_online_sample": _sample_user(cfg, data_dir / "events.jsonl"),
        "pipeline": {"batches": flow["batches"], "seconds": round(flow["seconds"], 1),
                     **{k: v for k, v in sorted(flow["totals"].items())}},
        "artefacts": {"events": str(data_dir / "events.jsonl"), "feature_repo": cfg.features.repo_dir,
                      "state_store": cfg.features.state_path, "broker_log": f"{cfg.kafka.embedded.run_dir}/broker.log"},
    }
    if learning is not None:
        summary["online_learning"] = learning.summary() | {
            "test_then_train_over_time": over_time(learning.history),
            "versions": [{"version": v["version"], "accepted": v["accepted"], "reasons": v["reasons"],
                          "until_event_time": time.strftime("%Y-%m-%d", time.gmtime(v["watermark"] or 0)),
                          "ndcg@10": v["metrics"].get("ndcg@10"), "eval_events": v["metrics"].get("eval_events")}
                         for v in learning.versions]}
        summary["artefacts"]["registry"] = cfg.registry.path
    if monitor is not None:
        monitor.close()
        summary["artefacts"]["metrics_log"] = cfg.monitoring.log_path
        try:
            from pathlib import Path

            from unirec.ops.report import write_report

            html = write_report(cfg.monitoring.log_path, cfg.registry.path, Path(cfg.monitoring.log_path).parent / "report")
            summary["artefacts"]["report"] = str(html)
        except Exception as e:  # noqa: BLE001 - the run's results stand without the plots
            _say(f"report not written: {e}")
    print(json.dumps(summary, indent=2, default=str))
    if "report" in summary["artefacts"]:
        _say(f"report: {summary['artefacts']['report']}")
    if embedded is not None:
        _say(f"the embedded broker keeps running at {embedded.address} (topics can be inspected); "
             "stop it with `unirec broker stop`")
    return 0


def _monitor(cfg):
    """Prometheus /metrics + the run log (a busy port only loses the endpoint, not the run)."""
    from pathlib import Path

    from unirec.ops.monitor import Monitor

    log_path = Path(cfg.monitoring.log_path)
    if log_path.exists():
        log_path.unlink()                     # one run per log: the report reads this run only
    t = cfg.kafka.topics
    monitor = Monitor(cfg.monitoring, topics=[t.clicks, t.queries])
    try:
        monitor.start()
        _say(f"metrics at http://{cfg.monitoring.bind.rsplit(':', 1)[0]}:{monitor.port}/metrics")
    except (RuntimeError, OSError) as e:
        _say(f"no /metrics endpoint ({e}); the run log is still written")
    return monitor
