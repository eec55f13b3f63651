"""`unirec rollout status|promote|rollback|resume`: read and steer the A/B experiment.

* `status` reads the exposures topic and the clicks topic from the beginning,
  attributes clicks that carry a request id (`unirec.ops.experiments.Attributor`,
  current experiment epoch only), adds the server's request and error counts from
  its /metrics when it answers (guardrails), and prints per-arm CTR with
  confidence intervals, NDCG, latency and each treatment's decision
  (`--json` for the raw summary). Exit code 0 whatever the verdict.
* `promote [--arm NAME]`: the control serves the treatment's current version
  (pinned in the registry), shares back to pipeline.yaml's, a new epoch.
* `rollback`: every user to the control, pinned to the version it serves now.
* `resume`: back to pipeline.yaml's shares after a rollback.

The running server picks the change up within `serving.poll_s`, without a restart.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rollout", help="A/B rollout: status with a decision, promote, rollback")
    sub = p.add_subparsers(dest="rollout_command", required=True)
    st = sub.add_parser("status", help="per-arm CTR/NDCG/latency with intervals and the test's decision")
    st.add_argument("--json", action="store_true", help="print the summary as JSON")
    st.add_argument("--metrics-url", default=None, help="the server's /metrics (default http://<serving.bind>/metrics)")
    st.add_argument("--timeout-s", type=float, default=30.0, help="give up reading the topics after this long")
    pr = sub.add_parser("promote", help="make a treatment the control")
    pr.add_argument("--arm", default=None, help="the treatment to promote (default: the only one)")
    sub.add_parser("rollback", help="all traffic to the control, pinned")
    sub.add_parser("resume", help="back to the configured shares after a rollback")
    p.set_defaults(func=_run)


def read_topic(kafka_cfg, topic: str, timeout_s: float):
    """Every record of `topic` from the beginning to the end offsets at the start (values)."""
    from kafka import KafkaConsumer, TopicPartition

    from unirec.streaming.broker import client_kwargs
    from unirec.streaming.experiment_feed import read_until

    consumer = KafkaConsumer(**client_kwargs(kafka_cfg), enable_auto_commit=False, group_id=None)
    try:
        parts = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or ())]
        if not parts:
            return
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        for r in read_until(consumer, consumer.end_offsets(parts), timeout_s):
            yield r.value
    finally:
        consumer.close()


def server_counts(url: str) -> dict[str, tuple[int, int]]:
    """{arm: (requests, 5xx errors)} from the server's /metrics, {} if it does not answer."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = requests.get(url, timeout=2).text
    except requests.RequestException:
        return {}
    out: dict[str, list[int]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "unirec_serving_requests":
            continue
        for s in family.samples:
            if s.name.endswith("_total") and s.labels.get("arm", "-") != "-":
                c = out.setdefault(s.labels["arm"], [0, 0])
                c[0] += int(s.value)
                c[1] += int(s.value) if s.labels.get("status", "").startswith("5") else 0
    return {arm: (n, e) for arm, (n, e) in out.items()}


def _status(cfg, args) -> int:
    import orjson

    from unirec.ops import experiments as ex
    from unirec.streaming.events import DecodeError, decode

    exp = ex.experiment(cfg.experiments, ex.load_state(cfg.experiments.state_path))
    att = ex.Attributor(exp.id, cfg.experiments.attribution_window_s, expire=False)
    for raw in read_topic(cfg.kafka, cfg.kafka.topics.exposures, args.timeout_s):
        try:
            att.add_exposure(orjson.loads(raw))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            att.ignored.setdefault("bad_exposure", 0)
            att.ignored["bad_exposure"] += 1
    now = time.time()
    for raw in read_topic(cfg.kafka, cfg.kafka.topics.clicks, args.timeout_s):
        try:
            att.add_click(decode(raw, "click", now_s=now, limits=cfg.kafka.limits))
        except DecodeError:
            pass
    for arm, (n, errors) in server_counts(args.metrics_url or f"http://{cfg.serving.bind}/metrics").items():
        s = att.arm(arm)
        s.requests, s.errors = n, errors
    summary = ex.summary(att.stats, exp, cfg.experiments)
    summary["ignored"] = att.ignored
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"experiment {summary['experiment']}  test {summary['test']}  alpha {summary['alpha']}")
    fmt = "  {:<12} {:<9} {:>5}  {:>9}  {:>7}  {:<17}  {:>6}  {:>8}"
    print(fmt.format("ARM", "VERSION", "SHARE", "EXPOSURES", "CTR", "CTR CI", "NDCG", "P99 MS"))
    for name, a in summary["arms"].items():
        ci = "-" if not a["exposures"] else f"[{a['ctr_ci'][0]:.4f}, {a['ctr_ci'][1]:.4f}]"
        p99 = "-" if a["p99_ms"] is None else f"{a['p99_ms']:.1f}"
        print(fmt.format(name, a["version"], f"{a['share']:.2f}", a["exposures"], f"{a['ctr']:.4f}", ci,
                         f"{a['ndcg']:.4f}", p99))
    for d in summary["decisions"]:
        print(f"{d['arm']}: {d['verdict'].upper()}  diff {d['diff']:+.4f}  CI [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
              f"  p {d['p_value']:.4g}  ({'; '.join(d['reasons'])})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from unirec.config import ConfigError, load
    from unirec.ops import experiments as ex
    from unirec.ops.registry import Registry, RegistryError

    try:
        cfg = load(args.config)
        if args.rollout_command == "status":
            return _status(cfg, args)
        ecfg, path = cfg.experiments, cfg.experiments.state_path
        state = ex.load_state(path)
        reg = Registry.from_config(cfg.registry, create=False)
        if args.rollout_command == "promote":
            treatments = [a.name for a in ecfg.arms[1:]]
            arm = args.arm or (treatments[0] if len(treatments) == 1 else None)
            if arm is None:
                raise ValueError(f"several treatments ({', '.join(treatments)}): name one with --arm")
            new = ex.promote(ecfg, state, arm, reg.resolve)
        elif args.rollout_command == "rollback":
            new = ex.rollback(ecfg, state, reg.resolve)
        else:
            new = ex.resume(ecfg, state)
        control = ex.experiment(ecfg, new).control
        reg.pin(control.version)      # retention must never delete what the control serves
        ex.save_state(path, new)
        exp = ex.experiment(ecfg, new)
        print(f"{args.rollout_command}: experiment {exp.id}: "
              + ", ".join(f"{a.name}={a.version} ({a.share:.0%})" for a in exp.arms))
        return 0
    except (ConfigError, RegistryError, ValueError, TimeoutError) as e:
        print(f"unirec rollout {args.rollout_command}: {e}", file=sys.stderr)
        return 2
