"""`unirec train --offline`: train the unified model on the prepared stream and test it.

Trains with the `model:` and `train:` sections of pipeline.yaml (early stopping
on validation NDCG@10, RecBole's leave-one-out protocol, see `unirec.offline`),
prints the test metrics as one JSON line and saves a checkpoint (model weights,
the item vocabulary and both config sections) to `train.checkpoint`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the unified model")
    p.add_argument("--offline", action="store_true", required=True,
                   help="train on the prepared MovieLens-100k stream and evaluate (the only mode for now)")
    p.add_argument("--budget", type=float, default=None, help="override train.time_budget_s (seconds)")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import os
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from unirec.config import ConfigError, load
    from unirec.data import DataError, prepare

    try:
        cfg = load(args.config)
        data_dir = prepare(cfg.data)
    except (ConfigError, DataError) as e:
        print(f"unirec train: {e}", file=sys.stderr)
        return 2
    tc = cfg.train if args.budget is None else dataclasses.replace(cfg.train, time_budget_s=args.budget)
    try:
        result = train_and_save(cfg.model, tc, data_dir, log=lambda s: print(s, file=sys.stderr, flush=True))
    except DataError as e:            # e.g. the sentence encoder's files cannot be had
        print(f"unirec train: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def train_and_save(mc, tc, data_dir: Path, *, log) -> dict:
    """Train on the prepared stream, test, save the checkpoint; returns test metrics, fit info, path."""
    import torch

    from unirec import offline

    offline.tune_malloc()
    ds = offline.load(data_dir, mc)
    model, info = offline.train(ds, mc, tc, log=log)
    metrics = offline.evaluate(model, ds, ranking=mc.use_feedback, search=mc.use_queries)
    path = Path(tc.checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "vocab": ds.vocab.state_dict(),
                "model_config": dataclasses.asdict(mc), "train_config": dataclasses.asdict(tc),
                "fit": info, "test": metrics}, path)
    log(f"saved {path}")
    return {"test": metrics, "fit": info, "checkpoint": str(path)}
