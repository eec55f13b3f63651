"""The `kafka:` and `streaming:` sections of pipeline.yaml."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:19092"


@dataclass(frozen=True)
class StreamingConfig:
    max_batch_events: int = 20000
