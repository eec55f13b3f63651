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
    every_seconds: float = 30.0         # ... or after this many seconds with >= 1 new step (0 = off)
    max_grad_norm: float = 100.0        # largest pre-clipping gradient norm since the last publish; above: exploding
    metric: str = "ndcg@10"             # test-then-train metric compared with the current version's
    count_metric: str = "eval_events"   # metrics key holding how many events that metric was computed on
    min_eval_events: int = 200          # fewer evaluated events (candidate or current): no comparison
    margin_mode: Literal["relative", "absolute"] = "relative"
    margin: float = 0.2                 # relative: refuse if candidate < current * (1 - margin);
                                        # absolute: refuse if candidate < current - margin

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.every_seconds < 0:
            raise ValueError("every_steps and every_seconds: must be >= 0 (0 turns that trigger off)")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm: must be a positive finite number, got {self.max_grad_norm}")
        if self.min_eval_events < 0:
            raise ValueError(f"min_eval_events: must be >= 0, got {self.min_eval_events}")
        if not (0.0 <= self.margin and math.isfinite(self.margin)):
            raise ValueError(f"margin: must be a finite number >= 0, got {self.margin}")
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
