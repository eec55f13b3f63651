"""`unirec report`: PNG plots of a run and an HTML page showing them (`unirec.ops.report`).

Reads the run log (`monitoring.log_path`) and the registry (`registry.path`) unless
`--log` / `--registry` are given; writes into `--out` (default: `report/` beside the run
log) and prints the HTML page's path. Nothing to report (no log, no published version)
or a bad config is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unirec.config import ConfigError, load


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="plots of a run (run log + registry) as PNGs and an HTML page")
    p.add_argument("--log", default=None, help="run log (default monitoring.log_path)")
    p.add_argument("--registry", default=None, help="registry directory (default registry.path)")
    p.add_argument("--out", default=None, help="output directory (default: report/ beside the run log)")
    p.add_argument("--all-runs", action="store_true", help="every run in the log, not only the last one")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from unirec.ops.report import ReportError, write_report

    try:
        cfg = load(args.config) if (args.log is None or args.registry is None) else None
        log_path = args.log or cfg.monitoring.log_path
        registry = args.registry or cfg.registry.path
        if not log_path:
            raise ReportError("monitoring.log_path is empty (no run log is written): pass --log")
        out = args.out or str(Path(log_path).parent / "report")
        page = write_report(log_path, registry, out, all_runs=args.all_runs,
                            max_drift_items=cfg.monitoring.max_drift_items if cfg else 5000)
    except (ConfigError, ReportError) as e:
        print(f"unirec report: {e}", file=sys.stderr)
        return 2
    print(page)
    return 0
