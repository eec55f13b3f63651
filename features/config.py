"""The `features:` section of pipeline.yaml."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class FeaturesConfig:
    # Where the Feast repo lives at run time: `feature_store.yaml` is generated here from
    # this section, next to the registry, the SQLite online store and the file offline store.
    repo_dir: str = ".cache/unirec/feast"
    project: str = "unirec"
    online_store: Literal["sqlite", "redis"] = "sqlite"
    # Feast's Redis format "host:port[,db=0][,password=...]"; use ${REDIS_URL} for secrets.
    redis_connection_string: str = "127.0.0.1:6379"
    # Local keyed state (user sequences, item stats, source offsets, push outbox).
    state_path: str = ".cache/unirec/state.sqlite"

    # user_sequence view
    max_sequence_length: int = 200   # clicks kept per user (the most recent in event time)
    max_queries: int = 20            # recent queries kept per user
    allowed_lateness_s: int = 3600   # events older than the user's max ts minus this are `late`

    # item_stats view: counts and CTR over sliding event-time windows, plus all time
    item_bucket_s: int = 3600                                  # count granularity
    item_windows_s: tuple[int, ...] = (3600, 86400, 604800)    # 1h, 1d, 7d; multiples of the bucket

    # SQLite online store (features/fast_stores.py): "packed", one row per entity holding its
    # Feast Values (Feast's write API and reads, ~4x less write CPU); "batched", Feast's own
    # tables and bytes (one row per entity and feature) written with one executemany per
    # batch; "feast", Feast's built-in store and its one INSERT per entity and feature.
    sqlite_store: Literal["packed", "batched", "feast"] = "packed"
    # Feast I/O batching
    push_batch_rows: int = 5000      # rows per online write call
    read_batch_rows: int = 1000      # entities per get_online_features call

    def __post_init__(self) -> None:
        for name in ("max_sequence_length", "max_queries", "item_bucket_s",
                     "push_batch_rows", "read_batch_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.allowed_lateness_s < 0:
            raise ValueError(f"allowed_lateness_s: must be >= 0, got {self.allowed_lateness_s}")
        if not self.item_windows_s:
            raise ValueError("item_windows_s: at least one window is required")
        for w in self.item_windows_s:
            if w <= 0 or w % self.item_bucket_s:
                raise ValueError(
                    f"item_windows_s: {w} must be a positive multiple of item_bucket_s={self.item_bucket_s}")
        if len(set(self.item_windows_s)) != len(self.item_windows_s):
            raise ValueError(f"item_windows_s: duplicate windows in {list(self.item_windows_s)}")
