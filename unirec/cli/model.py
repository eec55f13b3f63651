"""`unirec model list|show|rollback|pin|unpin`: inspect and steer the model registry.

The registry path is `registry.path` from pipeline.yaml unless `--registry` is given.
Every refusal (unknown version, incomplete or corrupt version, no registry) is one
line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from unirec.config import ConfigError, load

# metrics shown by `list`, in this order, when a version has them
KEY_METRICS = ("ndcg@10", "hr@10", "auc", "search_recall@10", "eval_events")


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="published model versions (registry)")
    sub = model.add_subparsers(dest="model_command", required=True)
    sub.add_parser("list", help="versions, oldest first; * marks latest, P pinned")
    show = sub.add_parser("show", help="a version's manifest as JSON")
    show.add_argument("version", help="a version name (v000012) or 'latest'")
    show.add_argument("--verify", action="store_true", help="also check every file's sha256")
    rb = sub.add_parser("rollback", help="point 'latest' at an earlier complete version")
    rb.add_argument("--to", required=True, metavar="VERSION", help="the version to make latest")
    rb.add_argument("--reason", default="", help="recorded in the registry's history.jsonl")
    for name, what in (("pin", "keep a version whatever the retention"), ("unpin", "let retention delete it again")):
        p = sub.add_parser(name, help=what)
        p.add_argument("version")
    for p in sub.choices.values():
        p.add_argument("--registry", default=None, help="registry directory (default registry.path)")
    model.set_defaults(func=_run)


def _config(args: argparse.Namespace):
    from unirec.ops.config import RegistryConfig

    if args.registry:
        return RegistryConfig(path=args.registry)
    return getattr(load(args.config), "registry", None) or RegistryConfig()


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _metrics(metrics: dict) -> str:
    out = []
    for k in KEY_METRICS:
        v = metrics.get(k)
        if k in metrics:
            out.append(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={'-' if v is None else v}")
    return " ".join(out) or "-"


def _list(reg) -> int:
    versions, incomplete = reg.scan()
    if not versions and not incomplete:
        print(f"no versions in {reg.root}")
        return 0
    latest, pins = reg.latest(), set(reg.pinned())
    rows = [("", "VERSION", "CREATED_AT", "PARENT", "WATERMARK", "ITEMS", "METRICS")]
    for m in versions:
        mark = ("*" if m.version == latest else " ") + ("P" if m.version in pins else " ")
        rows.append((mark, m.version, m.created_at[:19] + "Z", m.parent or "-", _when(m.watermark),
                     str(m.item_count), _metrics(m.metrics)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    for name, why in incomplete.items():
        print(f"incomplete: {name}: {why}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from unirec.ops.registry import Registry, RegistryError

    try:
        cfg = _config(args)
        if args.model_command == "list" and not Path(cfg.path, "versions").is_dir():
            print(f"no versions in {cfg.path} (nothing published yet)")
            return 0
        reg = Registry.from_config(cfg, create=False)
        if args.model_command == "list":
            return _list(reg)
        if args.model_command == "show":
            m = reg.verify(args.version) if args.verify else reg.show(args.version)
            print(m.to_json(), end="")
            return 0
        if args.model_command == "rollback":
            previous = reg.rollback(args.to, reason=args.reason)
            print(f"latest: {previous or '-'} -> {reg.latest()}")
            return 0
        if args.model_command == "pin":
            print(f"pinned {reg.pin(args.version)}")
            return 0
        reg.unpin(args.version)
        print(f"unpinned {args.version}")
        return 0
    except (ConfigError, RegistryError) as e:
        print(f"unirec model {args.model_command}: {e}", file=sys.stderr)
        return 2
