"""The `features:` section of pipeline.yaml."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeaturesConfig:
    max_sequence_length: int = 200
