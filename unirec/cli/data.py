"""`unirec data prepare`: fetch MovieLens-100k and write the event stream."""
from __future__ import annotations

import argparse
import sys

from unirec.config import ConfigError, load


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="MovieLens-100k data")
    sub = data.add_subparsers(dest="data_command", required=True)
    prep = sub.add_parser("prepare", help="fetch ml-100k and write events.jsonl / items.jsonl")
    prep.add_argument("--force", action="store_true", help="rebuild even if the prepared files are up to date")
    prep.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from unirec.data.prepare import prepare_with_summary
    from unirec.data.source import DataError

    try:
        cfg = load(args.config).data
        out, s = prepare_with_summary(cfg, force=args.force)
    except (ConfigError, DataError) as e:
        print(f"unirec data prepare: {e}", file=sys.stderr)
        return 2
    note = " (up to date)" if s["cached"] else ""
    rejected = f", {s['rejected']} rejected rows in rejected.jsonl" if s["rejected"] else ""
    print(f"ml-100k: {s['users']} users, {s['items']} items, {s['clicks']} clicks "
          f"({s['positive_share']:.1%} positive), {s['queries']} queries{rejected} -> {out}{note}")
    return 0
