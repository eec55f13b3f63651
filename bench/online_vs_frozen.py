"""Online vs frozen: does fine-tuning on the stream beat the same model trained once and frozen?

    .venv/bin/python bench/online_vs_frozen.py                  # the last 30%, 100-click batches, 3 seeds
    .venv/bin/python bench/online_vs_frozen.py --batch-events 2000 --seeds 1   # coarser and quicker
    .venv/bin/python bench/online_vs_frozen.py --split 0.5 --end 0.7   # a validation stream, for tuning
    .venv/bin/python bench/online_vs_frozen.py --no-validation --train-steps 1000

ML-100k (`events.jsonl`, time order) is cut at 70% (`--split`) of its event-time span.

1. **Offline checkpoint** (both arms start from it): a model trained on the first 70%
   as `unirec train --offline` trains: `Trainer.fit` over every window of every user,
   epochs of shuffled length-grouped batches, cosine learning-rate decay over
   `train.max_steps` (`--train-steps`), early stopping on validation NDCG@10 with
   RecBole's leave-one-out: each head user's last head click is held out (context for
   the tail, never trained on) and the best-validating weights are the checkpoint. A
   step budget, not seconds: the checkpoint is the same on a busy machine.
   Nothing about the checkpoint is chosen on the tail. It matters: fixed budgets without
   validation (`--no-validation`, every head click trained, the annealed model at the
   budget's end) gave frozen 0.0901 / 0.0876 / 0.0871 / 0.0826 and ratios 1.018 /
   1.086 / 1.085 / 1.126 at 700 / 1,000 / 1,250 / 1,500 steps (1,000 was this bench's
   default until validation replaced it). Validation picks epoch 6 of 10 (0.0856).
   Both arms are rebuilt from its snapshot
   arrays the way the pipeline opens the registry's latest version
   (`OnlineLearner.from_arrays`: weights, item table, optimiser moments, step count).
2. **The last 30%** is streamed in micro-batches of `--batch-events` clicks, in time
   order, exactly as the pipeline's FineTune stage sees them (each changed user's
   recent sequence with the batch's events as the new tail, `model.online.Example`; all
   of them even when one user brought more than the stored sequence keeps).
   Both arms score each batch before anything trains on it (test-then-train, in a pass
   of its own: `process(fuse=False)`; the pipeline scores off its training steps, see
   model/online.py, which lets later steps of a batch score with the earlier ones' updates):
   `frozen` never updates (new items still get rows and their text, so it can rank
   them); `online` then trains on the batch (`OnlineLearner.process` with
   pipeline.yaml's `online:` and `train:` settings: learning-rate schedule, replay
   buffer, growing table).
   *Micro-batch size.* 100 clicks by default: about 5 hours of the stream's event time
   (2,000 clicks are 4.5 days). The pipeline publishes seconds after an event arrives
   (bench/freshness.py), so at ML-100k's own pace (a click every ~3 minutes) the model
   that scores an event is minutes old at most. A step per click is out of reach here;
   100 keeps a run near two minutes, and 50 did no better on the validation stream
   (1.166 against 1.163). Coarser batches score more of the stream with an older
   model: on the last 30% the ratio is 1.137 at 100 clicks and 1.132 at 2,000; on the
   validation stream 1.166 / 1.163 / 1.149 / 1.140 at 50 / 100 / 500 / 2,000
   (model/online.py, where small batches first needed their steps' learning rate scaled).
   Finer is not better on the last 30% either: 1.127 / 1.123 at 50 / 25 clicks (2 seeds);
   where the stream is cut moves the ratio by about +-0.008. ML-100k users rate in
   sessions, so a 100-click batch of the last 30% holds 4.4 users on average (25 clicks:
   2.2, 2,000: 44): about one window per user and one optimiser step per pass, at the
   rate for a short step (model/online.py), each window with ~23 new events as targets.
   *Seeds.* The online arm runs `--seeds` times (default 3) from the one checkpoint; a
   seed sets its replay draws and new items' first vectors. The figures are the seeds'
   mean (their events pooled) and `ratio_per_seed` lists each: 1.137 / 1.137 / 1.138 at
   100 clicks, 1.133 / 1.135 / 1.129 at 2,000. The frozen arm does not depend on them.
3. NDCG@10 / HR@10 of the next item (full ranking over the live items, no masking,
   scored as offline evaluation scores: retrieval + the repeat logit), ranking AUC and
   search Recall@10, each the exact mean over the events of the 30%; NDCG@10 and the
   ratio also apart for `returning` users (with clicks in the first 70%) and `new` ones
   (the batch is scored in two calls, one per group, then trained on whole). On ML-100k
   85% of the scored clicks are new users', and the ratio is about the same for both
   groups (1.144 / 1.137): what online learning adds here is not about the users it
   has seen.
   `ratio_by_tenth`: the ratio over each tenth of the scored batches, in time order. The
   online model starts level with the frozen one and pulls ahead as the stream drifts
   away from the head: 1.01 in the first tenth, 1.09-1.14 in the next four, 1.15-1.21 in
   the last five (3 seeds, 100 clicks). The ratio over the whole 30% is the mean of a
   gap that opens with time since the checkpoint.
   bench/online_bounds.py bounds the ratio from above: models trained on the tail
   before scoring it, with and without the scored users' own clicks.

The learner is the pipeline's own (`unirec.model.online.OnlineLearner`), driven in
process: the Kafka/Beam/Feast path around it is measured by bench/freshness.py and
bench/ingest.py; this bench isolates what learning online buys.

Last stdout line: {"online_ndcg@10", "frozen_ndcg@10", "ratio", ..., "ratio_returning",
"ratio_new", "ratio_by_tenth", ...}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from unirec.config import load
from unirec.data import load_events, load_items
from unirec.model.online import Example, OnlineLearner
from unirec.model.prequential import EvalSums
from unirec.model.sentence import query_vectors
from unirec.model.snapshot import history_from_columns
from unirec.model.text import hash_pieces
from unirec.model.vocab import item_text
from unirec.streaming.finetune import sentence_lookup

ROOT = Path(__file__).resolve().parents[1]


def columns(clicks: list[dict], qtext: dict) -> tuple[list, list, list, list, list]:
    """Clicks as `Example` / `history_from_columns` columns: items, labels, ts, surfaces, query texts."""
    return ([c["item_id"] for c in clicks], [c["label"] for c in clicks], [c["ts"] for c in clicks],
            [c["surface"] for c in clicks], [qtext.get(c.get("query_id")) for c in clicks])


def score_into(learner: OnlineLearner, examples: list[Example], *sums: EvalSums) -> None:
    """Score `examples` with `learner` as it is (a pass of its own, no step); add the figures to `sums`."""
    learner.process(examples, train=False, fuse=False)
    for into in sums:
        into.merge(learner.since["eval"])
    learner.published()                                   # per-call sums, merged above


def examples_for(batch: list[dict], seqs: dict[str, list[dict]], qtext: dict, keep: int) -> list[Example]:
    new: dict[str, int] = {}
    for c in batch:
        seqs.setdefault(c["user_id"], []).append(c)
        new[c["user_id"]] = new.get(c["user_id"], 0) + 1
    out = []
    for u, n in new.items():
        # as the pipeline's examples: the stored sequence (the last `keep` clicks), and the
        # whole batch when one user brought more new clicks than that (streaming.transforms)
        s = seqs[u][-(keep if n <= keep else keep + n):]
        out.append(Example(u, *columns(s, qtext), min(n, len(s))))
    return out


def load_stream(cfg):
    """ML-100k prepared stream: (clicks in time order, query text by id, item id -> text pieces)."""
    data = ROOT / ".cache/unirec/ml-100k"
    events = load_events(data / "events.jsonl")
    items = load_items(data / "items.jsonl")
    mc = cfg.model
    by_id = {i: hash_pieces(item_text(it), mc.n_buckets, ngram=mc.ngram, max_pieces=mc.max_item_pieces)
             for i, it in items.items()}                 # hashed once, as streaming.finetune.pieces_lookup does
    pieces = lambda i: by_id.get(i, [])
    qtext = {e["query_id"]: e["text"] for e in events if e["schema"].startswith("query")}
    return [e for e in events if e["schema"].startswith("click")], qtext, pieces


def offline_train(learner: OnlineLearner, seqs: dict[str, list[dict]], qtext: dict, steps: int,
                  validate: bool = True) -> dict:
    """Train `learner` on the head as `unirec train --offline` trains (`Trainer.fit`: every
    window of every user, cosine learning-rate decay over `steps`), with early stopping on
    RecBole's leave-one-out inside the head: each head user with two or more head clicks
    holds out the last one, scored as the tail is scored (`OnlineLearner.evaluate`), and
    the best-validating weights are the checkpoint. The held-out clicks stay in their
    users' sequences as context for the tail; no model trains on them. `validate=False`:
    every head click trains and the annealed model at the end of `steps` is the checkpoint."""
    mc, tr = learner.mc, learner.trainer
    hist, held = [], []
    for u, cs in seqs.items():
        cols = columns(cs, qtext)
        learner._pending_new = []
        learner.table.assign(cols[0], cols[2])
        learner._sync_table()
        if validate and len(cs) > 1:
            held.append(Example(u, *cols, 1))
            cols = tuple(col[:-1] for col in cols)
        hist.append(history_from_columns(*cols, learner.table, mc, query_vectors=learner.query_vectors))
    # the held-out clicks' windows, built once: their items all have rows by now
    lists = [w for e in held for w in learner._windows(learner._history(learner._needed(e)), 1)]
    score = (lambda: learner.evaluate(lists).means()["ndcg@10"]) if lists else (lambda: float(tr.steps))
    tc = tr.cfg
    tr.cfg = dataclasses.replace(tc, max_steps=steps, time_budget_s=0.0)
    info = tr.fit(hist, score, log=lambda line: print(line, file=sys.stderr, flush=True))
    tr.cfg = tc
    return info | {"valid_clicks": len(lists)}


def from_checkpoint(snap: dict, cfg, pieces, sentence_of=None, query_vectors=None) -> OnlineLearner:
    """A learner from a snapshot's arrays, as the pipeline opens the registry's latest version
    (`streaming.finetune.open_learner`): weights, item table, optimiser moments, step count."""
    return OnlineLearner.from_arrays(cfg.model, cfg.train, cfg.online, item_ids=snap["item_ids"],
                                     weights=snap["ranking"], table_arrays=snap["extra"]["idtable"],
                                     trainer_arrays=snap["extra"]["trainer"], pieces_of=pieces,
                                     sentence_of=sentence_of, query_vectors=query_vectors)


def checkpoint(cfg, train_steps: int, split: float, validate: bool = True, end: float = 1.0) -> dict:
    """The offline checkpoint both arms start from (module doc, 1.) and the stream around it:
    ML-100k's clicks cut at `split` of their event-time span into `head` (trained on, and
    `seqs`: each head user's clicks) and `tail` (streamed), the snapshot `snap` and the
    lookups the learners need (item text `pieces`, `sentence_of`, query vectors `qv`)."""
    torch.set_num_threads(max(1, cfg.train.threads))
    mc = cfg.model
    clicks, qtext, pieces = load_stream(cfg)
    # with model.sentence_encoder: the catalogue's MiniLM vectors, as the pipeline's FineTune stage has them
    sentence_of = sentence_lookup(str(ROOT / ".cache/unirec/ml-100k/items.jsonl"), mc, str(ROOT / ".cache/unirec"))
    qv = query_vectors(mc, str(ROOT / ".cache/unirec"))      # and the queries' (None without the option)
    t0, t1 = clicks[0]["ts"], clicks[-1]["ts"]
    cut, stop = t0 + split * (t1 - t0), t0 + end * (t1 - t0)
    head = [c for c in clicks if c["ts"] <= cut]
    tail = [c for c in clicks if cut < c["ts"] <= stop]
    seqs: dict[str, list[dict]] = {}
    for c in head:
        seqs.setdefault(c["user_id"], []).append(c)
    t = time.perf_counter()
    # the head trains as `unirec train --offline` does: with the model's dropout (the online arms fine-tune without)
    offline = OnlineLearner.fresh(mc, cfg.train, dataclasses.replace(cfg.online, dropout=True), pieces_of=pieces,
                                  sentence_of=sentence_of, query_vectors=qv)
    info = offline_train(offline, seqs, qtext, train_steps, validate)
    return {"qtext": qtext, "pieces": pieces, "sentence_of": sentence_of, "qv": qv,
            "head": head, "tail": tail, "seqs": seqs, "snap": offline.snapshot(), "info": info,
            "offline_s": time.perf_counter() - t}


def slice_figures(slices: dict, group: str) -> dict:
    """NDCG@10 of both arms and their ratio over one group of users' events."""
    on, fr = (slices[arm][group].means() for arm in ("online", "frozen"))
    if not fr["eval_events"]:
        return {"ratio": None, "eval_events": 0}
    return {"online_ndcg@10": round(on["ndcg@10"], 4), "frozen_ndcg@10": round(fr["ndcg@10"], 4),
            "ratio": ratio_of(slices["online"][group], slices["frozen"][group]), "eval_events": fr["eval_events"]}


def ratio_of(online: EvalSums, frozen: EvalSums) -> float | None:
    """Online / frozen NDCG@10 over the events both scored (None when there are none)."""
    on, fr = online.means()["ndcg@10"], frozen.means()["ndcg@10"]
    return None if on is None or not fr else round(on / fr, 3)


def stream_args(ap: argparse.ArgumentParser) -> None:
    """The arguments of the checkpoint and the stream (this bench's and bench/online_bounds.py's)."""
    ap.add_argument("--train-steps", type=int, default=None,
                    help="offline optimiser step budget on the head (default: train.max_steps)")
    ap.add_argument("--no-validation", action="store_true",
                    help="no early stopping: train on every head click, the checkpoint is the model at the budget's end")
    ap.add_argument("--batch-events", type=int, default=100, help="clicks per micro-batch (module doc, 2.)")
    ap.add_argument("--split", type=float, default=0.7, help="head / stream cut, share of the event-time span")
    ap.add_argument("--end", type=float, default=1.0, help="the stream ends here (share of the span): "
                    "--split 0.5 --end 0.7 streams a validation period before the last 30%%")
    ap.add_argument("--config", default=str(ROOT / "pipeline.yaml"))


def from_args(args: argparse.Namespace) -> tuple:
    """(config, `checkpoint(...)`) as `stream_args`' arguments say."""
    cfg = load(args.config)
    return cfg, checkpoint(cfg, args.train_steps or cfg.train.max_steps, args.split,
                           validate=not args.no_validation, end=args.end)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stream_args(ap)
    ap.add_argument("--seeds", type=int, default=3,
                    help="online runs from the same checkpoint, seeds 0..N-1 (replay draws, new rows): the figures are their mean")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds: at least 1")
    cfg, ck = from_args(args)
    qtext, pieces, sentence_of, qv = ck["qtext"], ck["pieces"], ck["sentence_of"], ck["qv"]
    head, tail, seqs, snap, info, offline_s = (ck[k] for k in ("head", "tail", "seqs", "snap", "info", "offline_s"))
    keep = cfg.features.max_sequence_length
    head_users = set(seqs)
    batches = []
    for s in range(0, len(tail), args.batch_events):
        ex = examples_for(tail[s:s + args.batch_events], seqs, qtext, keep)
        batches.append((ex, {"returning": [e for e in ex if e.user_id in head_users],
                             "new": [e for e in ex if e.user_id not in head_users]}))
    sums = {"online": EvalSums(k=10), "frozen": EvalSums(k=10)}
    secs = {"online": 0.0, "frozen": 0.0}
    slices = {arm: {"returning": EvalSums(k=10), "new": EvalSums(k=10)} for arm in sums}
    tenths = {arm: [EvalSums(k=10) for _ in range(10)] for arm in sums}   # by stream position (time order)
    per_seed, steps = [], 0
    # the frozen arm once, then the online arm once per seed (its replay draws and new rows' initial
    # vectors); the sums pool every seed's events, so the means are the seeds' mean
    for seed in [None] + list(range(args.seeds)):
        name = "frozen" if seed is None else "online"
        learner = from_checkpoint(snap, cfg, pieces, sentence_of, qv)
        if seed:
            learner.rng.seed(cfg.train.seed + seed)
            learner.trainer.gen.manual_seed(cfg.train.seed + seed)
        mine = EvalSums(k=10)
        t = time.perf_counter()
        for i, (ex, groups) in enumerate(batches):
            for g, part in groups.items():        # the batch scored before any step,
                if part:                          # users with a head history and the others apart
                    score_into(learner, part, slices[name][g], sums[name], mine, tenths[name][i * 10 // len(batches)])
            if seed is not None:
                learner.process(ex, evaluate=False, fuse=False)
            if i % 5 == 4 or i == len(batches) - 1:
                print(f"{name} seed {seed}: {min(len(tail), (i + 1) * args.batch_events)}/{len(tail)} "
                      f"ndcg@10 {mine.means()['ndcg@10']:.4f}", file=sys.stderr, flush=True)
        secs[name] += time.perf_counter() - t
        if seed is not None:
            per_seed.append(mine.means()["ndcg@10"])
            steps = learner.totals["steps"]
            table_added = learner.table.added
    m = {k: v.means() for k, v in sums.items()}
    out = {"online_ndcg@10": round(m["online"]["ndcg@10"], 4), "frozen_ndcg@10": round(m["frozen"]["ndcg@10"], 4),
           "ratio": round(m["online"]["ndcg@10"] / max(1e-12, m["frozen"]["ndcg@10"]), 3),
           "online_hr@10": round(m["online"]["hr@10"], 4), "frozen_hr@10": round(m["frozen"]["hr@10"], 4),
           "online_auc": m["online"]["auc"] and round(m["online"]["auc"], 4),
           "frozen_auc": m["frozen"]["auc"] and round(m["frozen"]["auc"], 4),
           "online_search_recall@10": m["online"]["search_recall@10"] and round(m["online"]["search_recall@10"], 4),
           "frozen_search_recall@10": m["frozen"]["search_recall@10"] and round(m["frozen"]["search_recall@10"], 4),
           "eval_events": m["frozen"]["eval_events"], "head_clicks": len(head), "tail_clicks": len(tail),
           "offline_steps": info["steps"], "offline_best_steps": info.get("best_steps"), "offline_valid_ndcg@10": info["valid_clicks"] and round(info["best_valid"], 4),
           "offline_valid_clicks": info["valid_clicks"], "offline_seconds": round(offline_s, 1),
           "online_seconds": round(secs["online"] / args.seeds, 1), "frozen_seconds": round(secs["frozen"], 1),
           **{f"{k}_{g}": v for g in ("returning", "new") for k, v in slice_figures(slices, g).items()},
           "ratio_by_tenth": [ratio_of(on, fr) for on, fr in zip(tenths["online"], tenths["frozen"])],
           "seeds": args.seeds, "ratio_per_seed": [round(x / max(1e-12, m["frozen"]["ndcg@10"]), 3) for x in per_seed],
           "online_steps": steps, "items_new_in_tail": table_added - len(
               {c["item_id"] for c in head})}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
