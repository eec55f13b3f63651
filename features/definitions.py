"""The Feast repo: entities, push sources and feature views, built from FeaturesConfig.

Objects are built by functions rather than at import time because the item_stats
columns depend on the configured windows, and `feature_store.yaml` is generated
into `repo_dir` at run time (`write_repo_config`) so that no machine path is
committed. `unirec features apply` (or `OnlineStore.apply()`) registers them.

* Entities: `user` (join key `user_id`, string) and `item` (`item_id`, string).
* `user_sequence` (push source `user_sequence_push`): the last N clicks as parallel
  lists (item ids, labels, Int64 epoch-second timestamps, surfaces, the query id of
  each click), the recent queries (ids, texts, timestamps), sequence length, total
  clicks and the last event ts. Timestamps are `Array(Int64)` and the pushes use
  `PushMode.ONLINE`, because Feast 0.67 fails offline pushes of timestamp and string
  lists; the offline store only backs the sources.
* `item_stats` (push source `item_stats_push`): clicks, positives and CTR per window
  (`clicks_1h`, `ctr_7d`, ... and `_all`), plus `last_event_ts`.
* `item_embedding` (push source `item_embedding_push`): each live item's retrieval
  vector in the latest *published* model version (`Array(Float32)`), that version's
  name and its publish time; written by the publisher (ops/publish.py) after the
  registry has the version, so a reader may see a version's vectors only once the
  version itself is durable. Items a newer version no longer holds keep their last
  row; compare `model_version` with the registry's `latest` to tell.

The feature views have no TTL (`ttl=0`): the online value is the latest state,
however old; consumers read `last_event_ts` to judge freshness.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import yaml
from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Float64, Int64, String

from unirec.features import fast_stores, item_stats
from unirec.features.config import FeaturesConfig

USER_VIEW, ITEM_VIEW, EMBEDDING_VIEW = "user_sequence", "item_stats", "item_embedding"
USER_PUSH, ITEM_PUSH, EMBEDDING_PUSH = "user_sequence_push", "item_stats_push", "item_embedding_push"
EMBEDDING_FEATURES = (("embedding", Array(Float32)), ("model_version", String), ("published_at", Int64))
TS_COLUMN = "event_timestamp"

# user_sequence columns: (feature name, Feast type). Order is the push DataFrame's order.
USER_FEATURES = (
    ("item_ids", Array(String)), ("labels", Array(Int64)), ("ts", Array(Int64)),
    ("surfaces", Array(String)), ("click_query_ids", Array(String)),
    ("query_ids", Array(String)), ("query_texts", Array(String)), ("query_ts", Array(Int64)),
    ("sequence_length", Int64), ("total_clicks", Int64), ("last_event_ts", Int64),
)


def item_features(cfg: FeaturesConfig) -> tuple[tuple[str, object], ...]:
    return tuple((n, Float64 if n.startswith("ctr_") else Int64)
                 for n in item_stats.feature_names(cfg.item_windows_s))


def offline_dir(cfg: FeaturesConfig) -> Path:
    return Path(cfg.repo_dir).resolve() / "offline"


def build(cfg: FeaturesConfig) -> list:
    """Every Feast object of the repo, ready for `FeatureStore.apply`."""
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
                  description="A user; ids are strings everywhere.")
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING,
                  description="An item (a MovieLens movie id as a string).")
    off = offline_dir(cfg)
    user_batch = FileSource(name="user_sequence_offline", path=str(off / "user_sequence.parquet"),
                            timestamp_field=TS_COLUMN)
    item_batch = FileSource(name="item_stats_offline", path=str(off / "item_stats.parquet"),
                            timestamp_field=TS_COLUMN)
    emb_batch = FileSource(name="item_embedding_offline", path=str(off / "item_embedding.parquet"),
                           timestamp_field=TS_COLUMN)
    user_push = PushSource(name=USER_PUSH, batch_source=user_batch)
    item_push = PushSource(name=ITEM_PUSH, batch_source=item_batch)
    emb_push = PushSource(name=EMBEDDING_PUSH, batch_source=emb_batch)
    user_view = FeatureView(
        name=USER_VIEW, entities=[user], ttl=timedelta(0), online=True, source=user_push,
        schema=[Field(name=n, dtype=t) for n, t in USER_FEATURES],
        description="Last N clicks and recent queries of a user, in event-time order.")
    item_view = FeatureView(
        name=ITEM_VIEW, entities=[item], ttl=timedelta(0), online=True, source=item_push,
        schema=[Field(name=n, dtype=t) for n, t in item_features(cfg)],
        description="Clicks, positives and CTR of an item over sliding event-time windows.")
    emb_view = FeatureView(
        name=EMBEDDING_VIEW, entities=[item], ttl=timedelta(0), online=True, source=emb_push,
        schema=[Field(name=n, dtype=t) for n, t in EMBEDDING_FEATURES],
        description="Retrieval vector of an item in the latest published model version.")
    return [user, item, user_push, item_push, emb_push, user_view, item_view, emb_view]


def repo_config(cfg: FeaturesConfig) -> dict:
    """The content of feature_store.yaml for this config (absolute paths under repo_dir)."""
    root = Path(cfg.repo_dir).resolve()
    if cfg.online_store == "sqlite":
        # features/fast_stores.py: one packed row per entity, or Feast's tables with batched writes
        kind = {"packed": fast_stores.PACKED_SQLITE_TYPE, "batched": fast_stores.FAST_SQLITE_TYPE,
                "feast": "sqlite"}[cfg.sqlite_store]
        online = {"type": kind, "path": str(root / "online_store.db")}
    else:
        # skip_dedup: the state store orders the writes and every push carries the absolute
        # latest state, so the last write must win even when the event time did not move
        # (a late event inserted, or a second event in the same second); Feast's default
        # would skip such a write as "not newer".
        online = {"type": "redis", "connection_string": cfg.redis_connection_string, "skip_dedup": True}
    return {
        "project": cfg.project,
        "provider": "local",
        "registry": {"registry_type": "file", "path": str(root / "registry.db"), "cache_ttl_seconds": 0},
        "online_store": online,
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }


def write_repo_config(cfg: FeaturesConfig) -> Path:
    """Write `<repo_dir>/feature_store.yaml` (only if its content changed); returns the dir."""
    root = Path(cfg.repo_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    offline_dir(cfg).mkdir(exist_ok=True)
    text = "# Generated by unirec from the `features:` section of pipeline.yaml; do not edit.\n"
    text += yaml.safe_dump(repo_config(cfg), sort_keys=False)
    path = root / "feature_store.yaml"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return root
