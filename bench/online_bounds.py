"""How much can learning online buy on ML-100k's last 30%? Two leaky upper bounds for
bench/online_vs_frozen.py's ratio.

    .venv/bin/python bench/online_bounds.py                 # online.passes, 4 user folds, 100-click batches
    .venv/bin/python bench/online_bounds.py --passes 3

Both start from online_vs_frozen's offline checkpoint (the same head, steps and config)
and fine-tune it with the pipeline's online learner (pipeline.yaml's `online:` and
`train:` settings), on the whole tail in time order in `--batch-events` micro-batches,
`--passes` times, *before* scoring the tail. Every click is then scored as
online_vs_frozen scores it (batch by batch, full ranking, no masking), so the ratios
divide by the same frozen NDCG@10:

* `leaky`: fine-tuned on every user's clicks, the scored ones included. No online model
  can do this: test-then-train never trains on a click before scoring it.
* `others`: users are split into `--folds` groups by a hash of their id. For each group,
  the checkpoint is fine-tuned on every *other* group's clicks of the whole tail, the
  ones after the scored clicks included; then it streams the group's own clicks
  test-then-train, as the online arm does (each micro-batch scored, then trained on).
  When an online model scores a click it knows less than this: the other users' clicks
  before it, not after, and the same of the user's own (earlier batches trained on,
  the click's own batch as context only). So `others_ratio` bounds what learning online
  can add with this model and learner; it is a little low, as each group's model sees
  (folds - 1) / folds of the other users.

`leaky_ratio - others_ratio` is what a user's own clicks are worth to a model trained on
them before they are scored: the part of the leaky bound no online protocol can reach.

At pipeline.yaml's settings, in 100-click micro-batches: leaky 1.445, others 1.190, against
online_vs_frozen's 1.137 (2,000-click batches: 1.448 / 1.171 / 1.131).

Last stdout line: {"frozen_ndcg@10", "leaky_ndcg@10", "leaky_ratio", "others_ndcg@10",
"others_ratio", "folds", "passes", ...}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

from unirec.model.prequential import EvalSums

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from online_vs_frozen import examples_for, from_args, from_checkpoint, score_into, stream_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stream_args(ap)
    ap.add_argument("--passes", type=int, default=1, help="times the tail is fed to the learner before scoring "
                    "(each feeding makes online.passes optimiser passes over a batch, as the online arm does)")
    ap.add_argument("--folds", type=int, default=4, help="user groups for the `others` bound")
    args = ap.parse_args(argv)
    if args.folds < 2:
        ap.error("--folds must be at least 2")
    t_start = time.perf_counter()
    cfg, ck = from_args(args)
    tail, seqs, qtext = ck["tail"], ck["seqs"], ck["qtext"]
    keep = cfg.features.max_sequence_length
    # the tail's micro-batches as online_vs_frozen streams them (each Example holds its own lists)
    batches = [examples_for(tail[s:s + args.batch_events], seqs, qtext, keep)
               for s in range(0, len(tail), args.batch_events)]

    def fold_of(user: str) -> int:                        # a stable user group, the same in every run
        return zlib.crc32(user.encode()) % args.folds

    sums = {arm: EvalSums(k=10) for arm in ("frozen", "leaky", "others")}

    def learner():
        return from_checkpoint(ck["snap"], cfg, ck["pieces"], ck["sentence_of"], ck["qv"])

    def tuned(trains_on):
        """The checkpoint fine-tuned on the tail's examples of the users `trains_on` keeps."""
        lrn = learner()
        for _ in range(args.passes):
            for ex in batches:
                if part := [e for e in ex if trains_on(e.user_id)]:
                    lrn.process(part, evaluate=False, fuse=False)
        return lrn

    def score(lrn, arm: str, scored_on=lambda user: True, then_train: bool = False) -> None:
        for ex in batches:
            if part := [e for e in ex if scored_on(e.user_id)]:
                score_into(lrn, part, sums[arm])
                if then_train:                            # test-then-train, as the online arm does
                    lrn.process(part, evaluate=False, fuse=False)

    score(learner(), "frozen")
    score(tuned(lambda user: True), "leaky")
    for k in range(args.folds):
        score(tuned(lambda user: fold_of(user) != k), "others", lambda user: fold_of(user) == k, then_train=True)
        print(f"fold {k + 1}/{args.folds}: others ndcg@10 so far {sums['others'].means()['ndcg@10']:.4f}",
              file=sys.stderr, flush=True)
    m = {arm: s.means() for arm, s in sums.items()}
    fr = max(1e-12, m["frozen"]["ndcg@10"])
    out = {"frozen_ndcg@10": round(m["frozen"]["ndcg@10"], 4),
           "leaky_ndcg@10": round(m["leaky"]["ndcg@10"], 4), "leaky_ratio": round(m["leaky"]["ndcg@10"] / fr, 3),
           "others_ndcg@10": round(m["others"]["ndcg@10"], 4), "others_ratio": round(m["others"]["ndcg@10"] / fr, 3),
           "eval_events": m["frozen"]["eval_events"], "others_eval_events": m["others"]["eval_events"],
           "folds": args.folds, "passes": args.passes, "offline_steps": ck["info"]["steps"],
           "batch_events": args.batch_events, "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
