"""The `data:` section of pipeline.yaml."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    cache_dir: str = ".cache/unirec"   # where the wheel, raw files and the prepared stream go
    path: str | None = None            # a local ml-100k folder (u.data, u.item) instead of the wheel
    query_share: float = 0.25          # share of interactions that get a synthetic query event
    seed: int = 2020
