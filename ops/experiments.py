"""A/B experiments: sticky assignment, click attribution, per-arm statistics, the rollout decision.

Everything here is plain functions on plain values (no HTTP, no Kafka), so the
server, the pipeline, `unirec rollout` and the simulation share one definition.

**Assignment.** `bucket(user, salt)` hashes salt and user id with sha256 to a
number in [0, 1); the arms own contiguous ranges of [0, 1) in their config order
(control first), as wide as their shares. So assignment is deterministic and
sticky (same salt, same shares: same arm, in every process, after restarts),
and changing shares moves only users whose bucket lies between the old and the
new range boundaries: with two arms exactly |delta share| of the users, the least
any scheme can move (`moved_share` computes it for any change). With three or
more arms contiguous ranges can move more than the minimum when an inner arm
changes; keep changing arms last in the list. A new salt reshuffles everyone.

**Exposures and attribution** (CTR, NDCG@list and latency per arm, user-clustered
variances) live in `unirec.ops.attribution`; `Attributor`, `ArmStats`, `attribute`
and `list_ndcg` are re-exported here.

**The test** (`ExperimentsConfig.test`):

* `sequential` (default): mSPRT with a normal mixing distribution N(0, tau^2)
  over the CTR difference (Johari, Pekelis, Walsh 2017; Robbins 1970). With
  theta = CTR_t - CTR_c and V its estimated (user-clustered) variance,
  Lambda = sqrt(V / (V + tau^2)) * exp(theta^2 tau^2 / (2 V (V + tau^2))).
  Lambda is a (asymptotic) martingale under "no difference", so by Ville's
  inequality P(Lambda ever >= 1/alpha) <= alpha: reading `status` after every
  exposure is allowed. The matching always-valid confidence sequence is
  theta +- sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V))).
  A decision is taken the first time Lambda >= 1/alpha; act on it then (a later
  read can fall back to "continue", which does not undo the evidence).
* `fixed`: the two-proportion z-test (z = theta / sqrt(V)), read once both arms reach
  `horizon` exposures (before that: "continue"); reading it earlier and acting
  on it inflates the false-positive rate, which is what the sequential test is for.

No CTR decision before `min_exposures` per arm. **Guardrails** come first: a
treatment whose p99 latency or error rate breaks its limit (once it has
`guardrails.min_requests`) is "guardrail_breach", to be rolled back whatever its CTR.

**State.** `promote` / `rollback` / `resume` write `state_path` (JSON, atomic
replace): arm versions that override the config, shares that override the
config, and an epoch that starts a new experiment id (so status never mixes
exposures of two configurations). The server re-reads it every `poll_s`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from unirec.ops.abstats import Proportion, confidence_sequence, msprt, norm_ppf, z_test
from unirec.ops.attribution import ArmStats, Attributor, attribute, list_ndcg  # noqa: F401  (re-exported)
from unirec.ops.config import ExperimentsConfig
from unirec.ops.durable import replace_atomic
from unirec.ops.metrics import ExperimentMetrics  # noqa: F401  (declared with every other metric)

EXPOSURE_SCHEMA = "exposure/v1"
VERDICTS = ("insufficient_data", "continue", "treatment_wins", "control_wins", "no_difference", "guardrail_breach")


# ---------------------------------------------------------------- assignment

def bucket(user_id: str, salt: str) -> float:
    """sha256(salt, user) -> [0, 1), uniform; 53 bits so the float is exact."""
    h = hashlib.sha256(f"{salt}\x1f{user_id}".encode()).digest()
    return (int.from_bytes(h[:8], "big") >> 11) / float(1 << 53)


def ranges(shares: Sequence[tuple[str, float]]) -> list[tuple[str, float, float]]:
    """(arm, lo, hi) contiguous ranges in the given order; the last one ends at exactly 1."""
    out, lo = [], 0.0
    for i, (name, share) in enumerate(shares):
        hi = 1.0 if i == len(shares) - 1 else min(1.0, lo + share)
        out.append((name, lo, hi))
        lo = hi
    return out


def arm_of(u: float, shares: Sequence[tuple[str, float]]) -> str:
    """The arm whose range holds bucket value u."""
    for name, lo, hi in ranges(shares):
        if lo <= u < hi:
            return name
    return shares[-1][0]


def assign(user_id: str, salt: str, shares: Sequence[tuple[str, float]]) -> str:
    return arm_of(bucket(user_id, salt), shares)


def moved_share(old: Sequence[tuple[str, float]], new: Sequence[tuple[str, float]]) -> float:
    """Share of the bucket space whose arm differs between two share vectors (exact)."""
    cuts = sorted({0.0, 1.0} | {b for r in (ranges(old), ranges(new)) for _, lo, hi in r for b in (lo, hi)})
    return sum(b - a for a, b in zip(cuts, cuts[1:]) if b > a and arm_of((a + b) / 2, old) != arm_of((a + b) / 2, new))


# ---------------------------------------------------------------- the experiment and its state

@dataclass(frozen=True)
class Arm:
    name: str
    version: str          # "latest" or a version name (a "pinned" arm resolved through the state)
    share: float


@dataclass(frozen=True)
class Experiment:
    name: str
    epoch: int
    salt: str
    arms: tuple[Arm, ...]

    @property
    def id(self) -> str:
        return f"{self.name}/{self.epoch}"

    @property
    def control(self) -> Arm:
        return self.arms[0]

    @property
    def shares(self) -> list[tuple[str, float]]:
        return [(a.name, a.share) for a in self.arms]

    def assign(self, user_id: str) -> Arm:
        name = assign(user_id, self.salt, self.shares)
        return next(a for a in self.arms if a.name == name)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """The rollout state file ({} when none was written yet)."""
    try:
        state = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a rollout state object")
    return state


def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write atomically and durably (temp file, fsync, rename): the server never reads half a state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomic(path, (json.dumps(dict(state), indent=2, sort_keys=True) + "\n").encode())


def experiment(cfg: ExperimentsConfig, state: Mapping[str, Any]) -> Experiment:
    """The effective experiment: config arms with the state's version and share overrides.

    A "pinned" arm without a version in the state is not servable yet: call `pin_unresolved` first."""
    versions, shares = state.get("versions", {}), state.get("shares") or {}
    arms = []
    for a in cfg.arms:
        version = versions.get(a.name, a.version)
        if version == "pinned":
            raise ValueError(f"arm {a.name}: pinned but not resolved yet (no version in the rollout state)")
        arms.append(Arm(a.name, version, float(shares.get(a.name, a.share))))
    return Experiment(cfg.name, int(state.get("epoch", 1)), cfg.salt, tuple(arms))


def _event(state: dict, action: str, **fields: Any) -> dict:
    at = datetime.now(UTC).isoformat(timespec="seconds")
    state["history"] = [*state.get("history", []), {"at": at, "action": action, **fields}][-100:]
    return state


def pin_unresolved(cfg: ExperimentsConfig, state: Mapping[str, Any], latest: str) -> dict | None:
    """A new state with every unresolved "pinned" arm fixed to `latest`, or None if none was."""
    versions = dict(state.get("versions", {}))
    todo = [a.name for a in cfg.arms if versions.get(a.name, a.version) == "pinned"]
    if not todo:
        return None
    versions.update({name: latest for name in todo})
    return _event({**state, "versions": versions, "epoch": int(state.get("epoch", 1))}, "pin", arms=todo, version=latest)


def promote(cfg: ExperimentsConfig, state: Mapping[str, Any], arm: str, resolve: Callable[[str], str]) -> dict:
    """The control serves what `arm` serves now (resolved to a fixed version); shares back to
    the config's; a new epoch. `resolve("latest") -> "v000012"`."""
    exp = experiment(cfg, state)
    if arm == exp.control.name or arm not in {a.name for a in exp.arms}:
        raise ValueError(f"promote: {arm!r} is not a treatment arm (arms: {', '.join(a.name for a in exp.arms)})")
    version = resolve(next(a.version for a in exp.arms if a.name == arm))
    versions = {**state.get("versions", {}), exp.control.name: version}
    new = {**state, "versions": versions, "shares": None, "epoch": exp.epoch + 1}
    return _event(new, "promote", arm=arm, version=version, previous=resolve(exp.control.version))


def rollback(cfg: ExperimentsConfig, state: Mapping[str, Any], resolve: Callable[[str], str]) -> dict:
    """Every user to the control, pinned to the version it serves now; a new epoch."""
    exp = experiment(cfg, state)
    version = resolve(exp.control.version)
    versions = {**state.get("versions", {}), exp.control.name: version}
    shares = {a.name: (1.0 if a is exp.control else 0.0) for a in exp.arms}
    return _event({**state, "versions": versions, "shares": shares, "epoch": exp.epoch + 1}, "rollback", version=version)


def resume(cfg: ExperimentsConfig, state: Mapping[str, Any]) -> dict:
    """Back to the config's shares (after a rollback), keeping pinned versions; a new epoch."""
    exp = experiment(cfg, state)
    return _event({**state, "shares": None, "epoch": exp.epoch + 1}, "resume")


# ---------------------------------------------------------------- decisions

@dataclass(frozen=True)
class Decision:
    arm: str                             # the treatment compared with the control
    verdict: str                         # one of VERDICTS
    test: str
    diff: float                          # CTR treatment - control
    ci: tuple[float, float]              # of diff: always-valid (sequential) or normal (fixed)
    statistic: float                     # Lambda (sequential) or z (fixed)
    p_value: float                       # min(1, 1 / Lambda) (sequential) or two-sided p (fixed)
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def ctr_test(a: Proportion, b: Proportion, cfg: ExperimentsConfig, *, arm: str = "treatment") -> Decision:
    """The CTR decision for treatment B against control A (no guardrails)."""
    diff, nan = b.p - a.p, (math.nan, math.nan)
    if min(a.n, b.n) < cfg.min_exposures:
        why = f"{min(a.n, b.n)} exposures in the smaller arm < min_exposures {cfg.min_exposures}"
        return Decision(arm, "insufficient_data", cfg.test, diff, nan, math.nan, math.nan, (why,))
    if cfg.test == "sequential":
        lam = msprt(a, b, cfg.tau)
        verdict = ("treatment_wins" if diff > 0 else "control_wins") if lam >= 1.0 / cfg.alpha else "continue"
        return Decision(arm, verdict, "sequential", diff, confidence_sequence(a, b, cfg.tau, cfg.alpha), lam,
                        min(1.0, 1.0 / lam), (f"mSPRT Lambda {lam:.3g}, threshold 1/alpha = {1 / cfg.alpha:g}",))
    z, p = z_test(a, b)
    half = norm_ppf(1 - cfg.alpha / 2) * math.sqrt(a.var + b.var)
    if min(a.n, b.n) < cfg.horizon:
        verdict, why = "continue", f"fixed horizon: {min(a.n, b.n)} / {cfg.horizon} exposures per arm"
    else:
        verdict = ("treatment_wins" if z > 0 else "control_wins") if p < cfg.alpha else "no_difference"
        why = f"z = {z:.3f}, p = {p:.4g} at the horizon of {cfg.horizon} exposures per arm"
    return Decision(arm, verdict, "fixed", diff, (diff - half, diff + half), z, p, (why,))


def guardrail_breaches(s: ArmStats, cfg: ExperimentsConfig) -> list[str]:
    g, out = cfg.guardrails, []
    if (s.requests if s.requests is not None else s.exposures) < g.min_requests:
        return out
    p99 = s.latency(0.99)
    if p99 is not None and p99 > g.max_p99_ms:
        out.append(f"p99 latency {p99:.1f} ms > {g.max_p99_ms:g} ms")
    if s.errors is not None and s.requests and s.errors / s.requests > g.max_error_rate:
        out.append(f"error rate {s.errors / s.requests:.4f} > {g.max_error_rate:g}")
    return out


def decide(control: ArmStats, treatment: ArmStats, cfg: ExperimentsConfig, *, arm: str = "treatment") -> Decision:
    """Guardrails first, then the CTR test (see the module docstring)."""
    breaches = tuple(guardrail_breaches(treatment, cfg))
    if breaches:
        diff = treatment.ctr - control.ctr
        return Decision(arm, "guardrail_breach", cfg.test, diff, (math.nan, math.nan), math.nan, math.nan, breaches)
    return ctr_test(control.proportion(), treatment.proportion(), cfg, arm=arm)


def summary(stats: Mapping[str, ArmStats], exp: Experiment, cfg: ExperimentsConfig) -> dict[str, Any]:
    """What `unirec rollout status` prints: per-arm figures with intervals, each treatment's decision."""
    arms = {}
    for a in exp.arms:
        s = stats.get(a.name, ArmStats())
        half = norm_ppf(1 - cfg.alpha / 2) * math.sqrt(s.proportion().var) if s.exposures else math.nan
        arms[a.name] = {"version": a.version, "share": a.share, "exposures": s.exposures, "users": len(s.users),
                        "clicked": s.clicked, "clicks": s.clicks, "ctr": s.ctr, "ctr_ci": [s.ctr - half, s.ctr + half],
                        "ndcg": s.ndcg, "p50_ms": s.latency(0.5), "p99_ms": s.latency(0.99),
                        "requests": s.requests, "errors": s.errors}
    control = stats.get(exp.control.name, ArmStats())
    decisions = [decide(control, stats.get(a.name, ArmStats()), cfg, arm=a.name).to_dict()
                 for a in exp.arms[1:] if a.share > 0]
    return {"experiment": exp.id, "test": cfg.test, "alpha": cfg.alpha, "arms": arms, "decisions": decisions}


class Tracker:
    """What the pipeline calls once per micro-batch: attribution for the current experiment
    epoch (re-read from the state file; a new epoch starts from zero) and the gauges.

        tracker = Tracker(cfg.experiments, prometheus_registry)
        tracker.update(exposure_dicts, click_events)   # ClickEvents; those without request_id are skipped
    """

    def __init__(self, cfg: ExperimentsConfig, registry=None):
        self.cfg, self.metrics = cfg, ExperimentMetrics(registry) if registry is not None else None
        self.attributor: Attributor | None = None

    def update(self, exposures: Iterable[Mapping[str, Any]], clicks: Iterable[Any]) -> dict[str, Any] | None:
        try:
            exp = experiment(self.cfg, load_state(self.cfg.state_path))
        except ValueError:                 # "pinned" not resolved: no server has run this experiment yet
            return None
        if self.attributor is None or self.attributor.experiment_id != exp.id:
            self.attributor = Attributor(exp.id, self.cfg.attribution_window_s)
        for e in exposures:
            self.attributor.add_exposure(e)
        for c in clicks:
            self.attributor.add_click(c)
        out = summary(self.attributor.stats, exp, self.cfg)
        if self.metrics is not None:
            control = self.attributor.arm(exp.control.name)
            self.metrics.export(exp.id, self.attributor.stats,
                                [decide(control, self.attributor.arm(a.name), self.cfg, arm=a.name)
                                 for a in exp.arms[1:] if a.share > 0])
        return out
