"""FineTune stage throughput vs a bare torch loop on the same batches.

    .venv/bin/python bench/finetune_throughput.py               # 20,000 ML-100k clicks, 1,000 per batch

The stage: the real `streaming.finetune.FineTune` DoFn in a Beam pipeline on the
FnApiRunner, fed one element per micro-batch (that batch's example dicts, as
UpdateUserSequence emits them), with pipeline.yaml's `model:`, `train:` and
`online:` settings: example decoding, windowing, test-then-train scoring, replay
mixing, the growing item table, the optimiser steps. Every batch tensor the stage
trains on is recorded. The bare loop: the same model and optimiser (a copy of the
stage's learner, so the tables have the same size) running `Trainer.step` over exactly
those recorded batches - forward, backward, AdamW, nothing else.

sequences/s = training windows (the stage's new windows; replayed ones ride along in
the same steps in both) / wall seconds. Reported twice: with test-then-train on (the
default: the stage also scores every batch before training, extra work a bare loop
does not do) and off (`stage_train_only_*`: the stage's pure overhead).

Last stdout line: {"stage_seq_per_s", "bare_seq_per_s", "ratio", "stage_train_only_seq_per_s",
"ratio_train_only", "windows", "steps"}.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import apache_beam as beam
import torch
from apache_beam.utils.shared import Shared

from unirec.config import load
from unirec.model.online import OnlineLearner
from unirec.streaming.finetune import FineTune, FineTuneSpec, LearnerSlot

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from online_vs_frozen import examples_for, load_stream  # noqa: E402


def run_stage(cfg, batches, pieces, evaluate: bool) -> tuple[float, OnlineLearner, list]:
    oc = cfg.online.__class__(**{**cfg.online.__dict__, "evaluate": evaluate})
    learner = OnlineLearner.fresh(cfg.model, cfg.train, oc, pieces_of=pieces)
    recorded = []
    step = learner.trainer.step
    learner.trainer.step = lambda b: (recorded.append(b), step(b))[1]
    handle = Shared()
    slot = handle.acquire(lambda: LearnerSlot(learner))
    spec = FineTuneSpec(handle, cfg.model, cfg.train, oc, str(ROOT / ".cache/unirec/bench-registry-unused"))
    t = time.perf_counter()
    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = (p | "Batches" >> beam.Create([[b] for b in batches], reshuffle=False)
             | "FineTune" >> beam.ParDo(FineTune(spec)))
    seconds = time.perf_counter() - t
    learner.trainer.step = step
    assert slot.learner is learner
    return seconds, learner, recorded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clicks", type=int, default=20000)
    ap.add_argument("--batch-events", type=int, default=1000)
    ap.add_argument("--config", default=str(ROOT / "pipeline.yaml"))
    args = ap.parse_args(argv)
    cfg = load(args.config)
    torch.set_num_threads(max(1, cfg.train.threads))
    clicks, qtext, pieces = load_stream(cfg)
    clicks = clicks[: args.clicks]
    seqs: dict = {}
    batches = [[e.to_dict() for e in examples_for(clicks[s:s + args.batch_events], seqs, qtext,
                                                  cfg.features.max_sequence_length)]
               for s in range(0, len(clicks), args.batch_events)]
    stage_s, learner, recorded = run_stage(cfg, batches, pieces, evaluate=True)
    windows = learner.totals["windows"]
    train_only_s, learner2, _ = run_stage(cfg, batches, pieces, evaluate=False)
    bare = copy.deepcopy(learner2.trainer)
    t = time.perf_counter()
    for b in recorded:
        bare.step(b)
    bare_s = time.perf_counter() - t
    out = {"stage_seq_per_s": round(windows / stage_s, 1), "bare_seq_per_s": round(windows / bare_s, 1),
           "ratio": round(bare_s / stage_s, 3),
           "stage_train_only_seq_per_s": round(learner2.totals["windows"] / train_only_s, 1),
           "ratio_train_only": round(bare_s / train_only_s, 3),
           "windows": windows, "steps": len(recorded), "batches": len(batches),
           "seconds": {"stage": round(stage_s, 1), "stage_train_only": round(train_only_s, 1),
                       "bare": round(bare_s, 1)}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
