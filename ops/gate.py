"""The publish gate: pure functions that decide whether a candidate model may become a version.

`check(candidate_metrics, current_metrics, grad_norm, loss, cfg)` refuses a publish
for any of these reasons (every reason that applies is reported, codes in `REASONS`):

* `loss_not_finite`: the training loss is NaN or +-inf. Pass the last loss (or the
  mean since the last publish): one NaN step poisons the weights, so any NaN counts.
* `grad_norm_not_finite` / `grad_norm_exploding`: the gradient norm is NaN/inf or
  above `cfg.max_grad_norm`. Pass the *largest pre-clipping* norm since the last
  publish (`torch.nn.utils.clip_grad_norm_` returns the norm before clipping):
  clipping hides an explosion from the weights' point of view only for one step,
  and the maximum, not the mean, is what shows a single blow-up.
* `metric_not_finite`: the candidate's test-then-train metric is NaN/inf although
  it was computed on enough events.
* `metric_regressed`: the candidate's test-then-train `cfg.metric` (NDCG@10 by
  default) is more than the margin below the current version's:
  - `margin_mode: relative`: refused if `candidate < current * (1 - margin)`
    (scale-free: a 20% drop is a 20% drop whether NDCG is 0.05 or 0.5; the default);
  - `margin_mode: absolute`: refused if `candidate < current - margin`.
  A drop of exactly the margin is accepted. The drop must also be beyond sampling
  noise: refused only if additionally `candidate < current - noise_z * se`, with
  se = sqrt(v * (1/n_candidate + 1/n_current)) and v = c(1 - c), c = current clamped
  to [0, 1]: the largest variance a per-event metric in [0, 1] (NDCG@10, HR@10) with
  mean c can have, taken under "no regression" (both windows at the current value),
  so the floor does not depend on the candidate and a better candidate is never
  refused where a worse one passes. Why: the window a version is judged on ends
  wherever the publish timer fires, and a short one is mostly noise. In
  bench/freshness.py the margin alone refused the run's last version in 3 of 8 runs
  (e.g. NDCG@10 0.0461 on 321 events vs 0.0625 on 3,913: one standard error is
  0.014), leaving up to 4,818 events covered by no version. On windows of
  thousands of events the margin is the binding rule; `noise_z: 0` restores it alone.

No metric comparison is made (the decision rests on loss and gradients alone) when
there is no current version, when the current version has no finite metric, or when
either side was computed on fewer than `cfg.min_eval_events` events (key
`cfg.count_metric`; a missing count counts as 0). Too little evidence is not a
reason to block learning: a noisy NDCG over a handful of events would otherwise
freeze the model. `GateDecision.compared` says whether the comparison happened.

`due(steps_since, seconds_since, cfg)` says when a publish is due: after
`every_steps` steps or `every_seconds` seconds (whichever comes first, 0 turns a
trigger off), and never without at least one new step.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from unirec.ops.config import PublishConfig

REASONS = ("loss_not_finite", "grad_norm_not_finite", "grad_norm_exploding", "metric_not_finite", "metric_regressed")


@dataclass(frozen=True)
class GateDecision:
    ok: bool
    reasons: tuple[str, ...] = ()       # codes from REASONS, in that order
    details: tuple[str, ...] = ()       # one human-readable line per reason
    compared: bool = False              # whether the metric comparison with the current version was made

    def __str__(self) -> str:
        return "publish" if self.ok else "refused: " + "; ".join(self.details)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _count(metrics: Mapping[str, object] | None, key: str) -> float:
    n = _number((metrics or {}).get(key))
    return n if n is not None and math.isfinite(n) else 0.0


def threshold(current: float, cfg: PublishConfig) -> float:
    """The lowest candidate value accepted against `current`."""
    if cfg.margin_mode == "relative":
        return current * (1.0 - cfg.margin)
    return current - cfg.margin


def noise(current: float, n_candidate: float, n_current: float, cfg: PublishConfig) -> float:
    """`noise_z` standard errors of the difference of two window means (see the module doc)."""
    c = min(max(current, 0.0), 1.0)
    return cfg.noise_z * math.sqrt(c * (1.0 - c) * (1.0 / max(n_candidate, 1.0) + 1.0 / max(n_current, 1.0)))


def _compare(candidate: Mapping[str, object], current: Mapping[str, object] | None,
             cfg: PublishConfig) -> tuple[bool, list[tuple[str, str]]]:
    """(compared, [(reason, detail)]) for the metric part of the gate."""
    if current is None:
        return False, []
    cur = _number(current.get(cfg.metric))
    if cur is None or not math.isfinite(cur):
        return False, []
    n_cand, n_cur = _count(candidate, cfg.count_metric), _count(current, cfg.count_metric)
    if n_cand < cfg.min_eval_events or n_cur < cfg.min_eval_events:
        return False, []
    cand = _number(candidate.get(cfg.metric))
    if cand is None or not math.isfinite(cand):
        return True, [("metric_not_finite", f"{cfg.metric}={candidate.get(cfg.metric)!r} is not a finite number")]
    floor, spread = threshold(cur, cfg), noise(cur, n_cand, n_cur, cfg)
    if cand < floor and cand < cur - spread:
        how = f"{cfg.margin:.0%} relative" if cfg.margin_mode == "relative" else f"{cfg.margin:g} absolute"
        return True, [("metric_regressed", f"{cfg.metric} {cand:.4f} on {n_cand:.0f} events < {floor:.4f} "
                                           f"(current {cur:.4f} on {n_cur:.0f} events minus the {how} margin; "
                                           f"sampling noise {spread:.4f})")]
    return True, []


def check(candidate_metrics: Mapping[str, object], current_metrics: Mapping[str, object] | None,
          grad_norm: float, loss: float, cfg: PublishConfig) -> GateDecision:
    """Whether the candidate may be published; see the module docstring for every reason.

    `current_metrics` is the current (latest) version's manifest metrics, or None
    when the registry is empty."""
    found: list[tuple[str, str]] = []
    loss_v = _number(loss)
    if loss_v is None or not math.isfinite(loss_v):
        found.append(("loss_not_finite", f"loss={loss!r}"))
    g = _number(grad_norm)
    if g is None or not math.isfinite(g):
        found.append(("grad_norm_not_finite", f"grad_norm={grad_norm!r}"))
    elif g > cfg.max_grad_norm:
        found.append(("grad_norm_exploding", f"grad_norm={g:.4g} > max_grad_norm={cfg.max_grad_norm:g}"))
    compared, metric_reasons = _compare(candidate_metrics, current_metrics, cfg)
    found += metric_reasons
    found.sort(key=lambda r: REASONS.index(r[0]))
    return GateDecision(ok=not found, reasons=tuple(r for r, _ in found),
                        details=tuple(f"{r}: {d}" for r, d in found), compared=compared)


def due(steps_since: int, seconds_since: float, cfg: PublishConfig) -> bool:
    """Whether a publish is due `steps_since` steps / `seconds_since` s after the last one."""
    if steps_since < 1:
        return False
    if cfg.every_steps and steps_since >= cfg.every_steps:
        return True
    return bool(cfg.every_seconds) and seconds_since >= cfg.every_seconds
