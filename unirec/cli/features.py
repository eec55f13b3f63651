"""`unirec features apply|show|status|repush`: the Feast repo and the keyed state behind it."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from unirec.config import ConfigError, load


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("features", help="Feast feature repo and online features")
    sub = p.add_subparsers(dest="features_command", required=True)
    sub.add_parser("apply", help="generate feature_store.yaml and register entities and views").set_defaults(func=_apply)
    show = sub.add_parser("show", help="print online features of users or items as JSON")
    show.add_argument("kind", choices=["user", "item"])
    show.add_argument("ids", nargs="+")
    show.add_argument("--state", action="store_true", help="print the state-store value instead of the online one")
    show.set_defaults(func=_show)
    sub.add_parser("status", help="state store: rows, outbox, source offsets").set_defaults(func=_status)
    sub.add_parser(
        "repush", help="write every user and item state of the state store to the online store, e.g. after "
        "switching features.online_store or features.sqlite_store (a new store starts empty); run it with "
        "the pipeline stopped, or a state it pushes meanwhile may be overwritten by an older one",
    ).set_defaults(func=_repush)


def _config(args):
    try:
        return load(args.config).features
    except ConfigError as e:
        print(f"unirec features: {e}", file=sys.stderr)
        return None


def _applied_store(cfg):
    """The configured online store, its views registered (idempotent)."""
    from unirec.features.online import OnlineStore

    store = OnlineStore(cfg)
    store.apply()
    return store


def _apply(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    store = _applied_store(cfg)
    print(f"applied user_sequence and item_stats ({cfg.online_store} online store) in {store.repo_path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    if args.state:
        from unirec.features.state import StateStore

        with StateStore(cfg.state_path) as st:
            got = st.get_users(args.ids) if args.kind == "user" else st.get_items(args.ids)
        rows = {k: asdict(v) for k, v in got.items()}
    else:
        from unirec.features.online import OnlineStore

        store = OnlineStore(cfg)
        if args.kind == "user":
            rows = {k: asdict(v) for k, v in store.read_users(args.ids).items()}
        else:
            rows = store.read_items(args.ids)
    for i in args.ids:
        print(json.dumps({"id": i, "features": rows.get(i)}, ensure_ascii=False, default=list))
    return 0 if all(i in rows for i in args.ids) else 1


def _status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    from unirec.features.state import StateStore

    with StateStore(cfg.state_path) as st:
        counts = st.counts()
        offsets = {f"{t}/{p}": o for (t, p), o in sorted(st.offsets().items())}
    print(json.dumps({"state_path": cfg.state_path, **counts, "offsets": offsets}))
    return 0


def _repush(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    from itertools import islice

    from unirec.features.state import StateStore

    store = _applied_store(cfg)
    counts = {"users": 0, "items": 0}
    with StateStore(cfg.state_path) as st:
        for kind, states, push in (("users", st.all_users(), store.push_users),
                                   ("items", st.all_items(), store.push_items)):
            while chunk := list(islice(states, cfg.push_batch_rows)):
                counts[kind] += push(chunk)
    print(json.dumps({"online_store": cfg.online_store, **counts}))
    return 0
