"""FineTune stage throughput vs a bare torch loop on the same batches.

    .venv/bin/python bench/finetune_throughput.py               # 20,000 ML-100k clicks, 1,000 per batch

The stage: the real `streaming.finetune.FineTune` DoFn in a Beam pipeline on the
FnApiRunner, fed one element per micro-batch (that batch's example dicts, as
GatherExamples hands them over), with pipeline.yaml's `model:`, `train:` and `online:`
settings: example decoding, cutting each sequence to what its windows read,
tokenising, the growing item table (rows, text, lexical index), test-then-train
scoring, replay mixing, collating, the optimiser steps. Every batch tensor the stage
trains on is recorded. The bare loop: the same model and optimiser (a copy of the
stage's learner, so the tables have the same size) running `Trainer.step` over exactly
those recorded batches - forward, backward, AdamW, nothing else.

What the ratios compare (sequences/s = the stage's new training windows / wall
seconds; replayed windows ride along in the same steps in both):
* `ratio` = bare / stage with test-then-train on (the pipeline's default): every new
  window is scored off the forward of the step that trains on it (model/online.py:
  detached, before that step's update), so on top of the bare loop's work the stage
  only ranks each new event against the whole catalogue and reads the ranking
  probabilities - no second forward, and no second score matrix where the trainer
  hands over its loss's full-catalogue logits (repeat logit and lexical channel
  included); otherwise the stage computes those scores.
* `ratio_train_only` = bare / stage with `online.evaluate: false`: the stage's own
  overhead around the same optimiser steps (conversion, table, Beam).
Not timed: the process's one-time costs (Beam's runner imports, torch's first calls;
`warm_up`; the catalogue's text pieces, hashed when it is read, as
`streaming.finetune.pieces_lookup` does at setup) and the input's delivery (the
batches reach the stage from memory through a Shared handle, as the learner does;
see `Batches`). `seconds` splits each stage run into `steps` (inside `Trainer.step`,
scoring included), `scoring` (the test-then-train ranking inside those steps),
`learner` (inside `OnlineLearner.process`) and `stage` (the whole Beam run). On a
shared machine one run's seconds vary by +-30%: the three are run back to back
`--repeats` times and each figure is the median.
`ratio_cpu` / `ratio_train_only_cpu`: the same ratios in process CPU seconds (less
sensitive to other processes; all threads of the process count, Beam's included).
`step_share` / `step_share_train_only` = the share of a stage run's wall time spent
inside `Trainer.step` doing the bare loop's work, i.e. test-then-train scoring excluded
(median over runs): the same ratio measured within one run, so it does not depend on
the machine being as busy during the bare loop as during the stage.

Last stdout line: {"stage_seq_per_s", "bare_seq_per_s", "ratio", "stage_train_only_seq_per_s",
"ratio_train_only", "ratio_cpu", "ratio_train_only_cpu", "step_share", "step_share_train_only", "windows", "steps", "batches", "repeats",
"seconds"} (median seconds).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import apache_beam as beam
import torch
from apache_beam.utils.shared import Shared

from unirec.config import load
from unirec.model.online import OnlineLearner
from unirec.streaming.finetune import FineTune, FineTuneSpec, LearnerSlot, learn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from online_vs_frozen import examples_for, load_stream  # noqa: E402


class Batches:
    """The bench's input, handed to the pipeline through a Beam `Shared` handle (as the
    learner is): the stage reads batch i from process memory, so the bench measures the
    stage, not Beam's encoding of 20 MB of input into the pipeline graph (`beam.Create`
    of the example dicts type-infers and pickles every value: ~10 s)."""

    def __init__(self, batches: list):
        self.batches = batches


class FromMemory(beam.DoFn):
    def __init__(self, handle: Shared):
        self.handle = handle

    def setup(self):
        self.data = self.handle.acquire(lambda: Batches([]))

    def process(self, i):
        yield [self.data.batches[i]]                       # one element per micro-batch, as GatherExamples


def warm_up(cfg, batch: list, pieces) -> None:
    """Pay the process's one-time costs before timing: Beam's runner modules are imported on
    the first run (seconds with PYTHONDONTWRITEBYTECODE) and torch's first forward, backward
    and fused AdamW step initialise kernels. A throwaway learner test-then-trains one batch."""
    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = p | beam.Create([0]) | beam.Map(lambda x: x)
    learn(OnlineLearner.fresh(cfg.model, cfg.train, cfg.online, pieces_of=pieces), batch, evaluate=True)


def run_stage(cfg, batches, pieces, evaluate: bool) -> tuple[dict, OnlineLearner, list]:
    oc = cfg.online.__class__(**{**cfg.online.__dict__, "evaluate": evaluate})
    learner = OnlineLearner.fresh(cfg.model, cfg.train, oc, pieces_of=pieces)
    recorded, secs = [], {"steps": 0.0, "learner": 0.0, "scoring": 0.0}
    step, process = learner.trainer.step, learner.process

    def timed(fn, key):
        def call(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            secs[key] += time.perf_counter() - t
            return out
        return call

    def recorded_step(b, inspect=None, lr_mult=1.0):  # test-then-train scoring rides on the step's forward
        recorded.append((b, lr_mult))
        return step(b, inspect=inspect and timed(inspect, "scoring"), lr_mult=lr_mult)

    learner.trainer.step = timed(recorded_step, "steps")
    learner.process = timed(process, "learner")
    handle, data = Shared(), Batches(batches)
    handle.acquire(lambda: data)
    lhandle = Shared()
    slot = lhandle.acquire(lambda: LearnerSlot(learner))
    spec = FineTuneSpec(lhandle, cfg.model, cfg.train, oc, str(ROOT / ".cache/unirec/bench-registry-unused"))
    t, cpu = time.perf_counter(), time.process_time()
    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = (p | "Batches" >> beam.Create(list(range(len(batches))), reshuffle=False)
             | "FromMemory" >> beam.ParDo(FromMemory(handle))
             | "FineTune" >> beam.ParDo(FineTune(spec)))
    secs["stage"], secs["stage_cpu"] = time.perf_counter() - t, time.process_time() - cpu
    del learner.trainer.step, learner.process                # back to the class methods
    assert slot.learner is learner and learner.totals["batches"] == len(batches)
    return secs, learner, recorded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clicks", type=int, default=20000)
    ap.add_argument("--batch-events", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="runs of all three; medians are reported")
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
    warm_up(cfg, batches[0], pieces)
    runs = []
    for _ in range(args.repeats):          # stage, train-only stage and bare loop back to back, each time
        stage, learner, recorded = run_stage(cfg, batches, pieces, evaluate=True)
        train_only, learner2, _ = run_stage(cfg, batches, pieces, evaluate=False)
        bare = copy.deepcopy(learner2.trainer)
        t, cpu = time.perf_counter(), time.process_time()
        for b, lr_mult in recorded:
            bare.step(b, lr_mult=lr_mult)
        runs.append({"bare": time.perf_counter() - t, "bare_cpu": time.process_time() - cpu} | {f"stage_{k}": v for k, v in stage.items()}
                    | {f"train_only_{k}": v for k, v in train_only.items()})
        print(json.dumps({k: round(v, 2) for k, v in runs[-1].items()}), file=sys.stderr, flush=True)
    sec = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    windows = learner.totals["windows"]
    assert learner2.totals["windows"] == windows
    r = lambda x, n=1: round(x, n)
    out = {"stage_seq_per_s": r(windows / sec["stage_stage"]), "bare_seq_per_s": r(windows / sec["bare"]),
           "ratio": r(sec["bare"] / sec["stage_stage"], 3),
           "stage_train_only_seq_per_s": r(windows / sec["train_only_stage"]),
           "ratio_train_only": r(sec["bare"] / sec["train_only_stage"], 3),
           "ratio_cpu": r(sec["bare_cpu"] / sec["stage_stage_cpu"], 3),
           "ratio_train_only_cpu": r(sec["bare_cpu"] / sec["train_only_stage_cpu"], 3),
           "step_share": r(statistics.median((x["stage_steps"] - x["stage_scoring"]) / x["stage_stage"]
                                             for x in runs), 3),
           "step_share_train_only": r(statistics.median(x["train_only_steps"] / x["train_only_stage"] for x in runs), 3),
           "windows": windows, "steps": len(recorded), "batches": len(batches), "repeats": args.repeats,
           "seconds": {k: r(v, 2) for k, v in sec.items()}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
