"""The `registry:` section of pipeline.yaml: where model versions live, how many are
kept, and when the online learner may publish (`unirec.ops.registry`, `unirec.ops.gate`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class PublishConfig:
    """When a new version is due and what the publish gate (`unirec.ops.gate.check`) refuses."""

    every_steps: int = 200              # publish after this many optimizer steps since the last one (0 = off)
    every_seconds: float = 10.0         # ... or after this many seconds with >= 1 new step (0 = off)
    max_grad_norm: float = 100.0        # largest pre-clipping gradient norm since the last publish; above: exploding
    metric: str = "ndcg@10"             # test-then-train metric compared with the current version's
    count_metric: str = "eval_events"   # metrics key holding how many events that metric was computed on
    min_eval_events: int = 200          # fewer evaluated events (candidate or current): no comparison
    margin_mode: Literal["relative", "absolute"] = "relative"
    margin: float = 0.2                 # relative: refuse if candidate < current * (1 - margin);
                                        # absolute: refuse if candidate < current - margin
    noise_z: float = 2.0                # ... and only if the drop also exceeds this many standard errors
                                        # of sampling noise on the two windows' event counts (0 = margin only)

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.every_seconds < 0:
            raise ValueError("every_steps and every_seconds: must be >= 0 (0 turns that trigger off)")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm: must be a positive finite number, got {self.max_grad_norm}")
        if self.min_eval_events < 0:
            raise ValueError(f"min_eval_events: must be >= 0, got {self.min_eval_events}")
        if not (0.0 <= self.margin and math.isfinite(self.margin)):
            raise ValueError(f"margin: must be a finite number >= 0, got {self.margin}")
        if not (0.0 <= self.noise_z and math.isfinite(self.noise_z)):
            raise ValueError(f"noise_z: must be a finite number >= 0, got {self.noise_z}")
        if self.margin_mode == "relative" and self.margin > 1.0:
            raise ValueError(f"margin: a relative margin must be <= 1, got {self.margin}")


@dataclass(frozen=True)
class RegistryConfig:
    """The model registry: a local directory of immutable versions plus a `latest` pointer."""

    path: str = ".cache/unirec/registry"   # versions/<v>/, latest, pins.json, history.jsonl (relative to the working dir)
    keep_last: int = 10                 # newest complete versions kept; `latest` and pinned ones are never deleted
    publish: PublishConfig = field(default_factory=PublishConfig)

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: must not be empty")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: must be >= 1, got {self.keep_last}")


@dataclass(frozen=True)
class MonitoringConfig:
    """The `monitoring:` section: `/metrics` of the pipeline process, the run log, drift windows
    (`unirec.ops.monitor.Monitor`)."""

    bind: str = "127.0.0.1:9464"        # host:port of /metrics ("" = not served; port 0 = any free port)
    log_path: str = ".cache/unirec/run/metrics.jsonl"   # run log read by `unirec report` ("" = no log)
    input_window_events: int = 5000     # input drift: clicks + queries per window, compared with the previous one
    score_window: int = 2000            # ranking predictions per window (score PSI, calibration)
    psi_bins: int = 10                  # quantile bins of the reference window for the score PSI
    calibration_bins: int = 10          # equal-width bins for the expected calibration error
    neighbours: int = 10                # top-k cosine neighbours compared between published versions
    max_drift_items: int = 5000         # embedding drift on at most this many shared items (exact search is O(n^2))

    def __post_init__(self) -> None:
        if self.bind:
            from unirec.ops.metrics import parse_bind

            parse_bind(self.bind)       # ValueError naming the address
        for name in ("input_window_events", "score_window", "neighbours", "max_drift_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("psi_bins", "calibration_bins"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: must be >= 2, got {getattr(self, name)}")


@dataclass(frozen=True)
class ServingConfig:
    """The `serving:` section: `unirec serve` (`unirec.ops.serving`)."""

    bind: str = "127.0.0.1:8000"        # host:port of the HTTP API (/recommend, /search, /metrics)
    default_k: int = 10                 # items returned when a request gives no k
    max_k: int = 100                    # larger k: 400
    candidates: int = 50                # retrieved by inner product, then re-ranked by the ranking head
    exclude_seen: bool = True           # /recommend default: never return an item the user clicked
    poll_s: float = 1.0                 # the registry (and the experiment state) is re-read this often
    cache_users: int = 20000            # LRU of ranked lists per (version, user, sequence state); 0 = off
    prewarm_users: int = 5000           # a new `latest` first recomputes this many recent users' lists ...
    prewarm_s: float = 10.0             # ... for at most this long, then goes live (0 = no pre-warm)
    max_query_chars: int = 256          # longer q: 400
    max_id_chars: int = 128             # longer user_id: 400
    threads: int = 1                    # torch intra-op threads of the one inference thread
    exposure_queue: int = 10000         # exposures waiting for Kafka; beyond that they are dropped (counted)

    def __post_init__(self) -> None:
        for name in ("default_k", "max_k", "candidates", "max_query_chars", "max_id_chars", "threads",
                     "exposure_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"default_k: must be between 1 and max_k ({self.max_k}), got {self.default_k}")
        if self.poll_s <= 0 or self.cache_users < 0 or self.prewarm_users < 0 or self.prewarm_s < 0:
            raise ValueError("poll_s: must be > 0; cache_users, prewarm_users, prewarm_s: must be >= 0")


@dataclass(frozen=True)
class ArmConfig:
    """One arm: which model version it serves and its share of users."""

    name: str
    version: str = "latest"             # "latest" (follows every publish) | "pinned" (the latest at the time the
                                        # experiment first ran, then fixed) | a version name like "v000012"
    share: float = 0.5                  # share of users; the shares of all arms must add up to 1

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"arm name {self.name!r}: letters, digits, '-' and '_' only")
        if not (0.0 <= self.share <= 1.0):
            raise ValueError(f"arm {self.name}: share must be in [0, 1], got {self.share}")
        if self.version not in ("latest", "pinned") and not (
                self.version.startswith("v") and self.version[1:].isdigit() and len(self.version) >= 7):
            raise ValueError(f"arm {self.name}: version must be 'latest', 'pinned' or like 'v000012', "
                             f"got {self.version!r}")


@dataclass(frozen=True)
class GuardrailConfig:
    """Limits a treatment must keep whatever its CTR (checked once it has `min_requests`)."""

    max_p99_ms: float = 50.0            # server-side p99 latency of the arm's requests
    max_error_rate: float = 0.01        # 5xx responses / requests of the arm
    min_requests: int = 200             # fewer requests: guardrails not judged yet

    def __post_init__(self) -> None:
        if self.max_p99_ms <= 0 or not 0.0 <= self.max_error_rate <= 1.0 or self.min_requests < 0:
            raise ValueError("guardrails: max_p99_ms > 0, max_error_rate in [0, 1], min_requests >= 0")


@dataclass(frozen=True)
class ExperimentsConfig:
    """The `experiments:` section: arms, traffic split, the test behind `unirec rollout status`
    (`unirec.ops.experiments`). The first arm is the control; the others are treatments."""

    name: str = "default"               # experiment id in every exposure (with the epoch: "default/1")
    salt: str = "unirec-ab-1"           # user u goes to the arm whose share range holds sha256(salt, u);
                                        # a new salt reshuffles everyone, a new share moves the fewest users
    arms: tuple[ArmConfig, ...] = (ArmConfig("control", "pinned", 0.5), ArmConfig("treatment", "latest", 0.5))
    state_path: str = ".cache/unirec/experiment.json"   # what promote/rollback changed (versions, shares, epoch)
    test: Literal["sequential", "fixed"] = "sequential"  # sequential: mSPRT, valid at every peek;
                                        # fixed: two-proportion z-test, read once at `horizon`
    alpha: float = 0.05                 # false-positive rate of the test (two-sided)
    tau: float = 0.03                   # sequential: sd of the normal mixture over the CTR difference
    horizon: int = 20000                # fixed: exposures per arm at which the z-test is read
    min_exposures: int = 200            # per arm, before any CTR decision (normal approximation)
    attribution_window_s: float = 3600.0   # a click counts for an exposure up to this long after it
    attribute_in_pipeline: bool = True  # the pipeline attributes clicks to arms and exports per-arm gauges
                                        # (rebuilt at start from the exposures and clicks topics)
    guardrails: GuardrailConfig = field(default_factory=GuardrailConfig)

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if len(names) < 1 or len(set(names)) != len(names):
            raise ValueError(f"arms: at least one, names unique, got {names}")
        if abs(sum(a.share for a in self.arms) - 1.0) > 1e-9:
            raise ValueError(f"arms: shares must add up to 1, got {sum(a.share for a in self.arms):g}")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha: must be in (0, 0.5), got {self.alpha}")
        if self.tau <= 0 or self.horizon < 1 or self.min_exposures < 1 or self.attribution_window_s <= 0:
            raise ValueError("tau, horizon, min_exposures, attribution_window_s: must be > 0")
