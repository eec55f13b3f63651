"""The `model:` and `train:` sections of pipeline.yaml."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 64


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
