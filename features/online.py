"""The Feast online store: push absolute user/item states, read them back.

`OnlineStore(cfg)` generates `<repo_dir>/feature_store.yaml` from FeaturesConfig
and wraps a `feast.FeatureStore`. Writes are batches of absolute states
(`push_batch_rows` rows per call), so pushing the same state twice writes the same
value: together with the state store's outbox this makes the online store
exactly-once in effect.

Write paths (all end in the configured Feast online store's `online_write_batch`,
so the stored bytes are the same; tests/features/test_online.py checks that):

* `"push"`: `FeatureStore.push(source, df, to=PushMode.ONLINE)`, the public push API;
* `"direct"`: `FeatureStore.write_to_online_store(view, df)`, the same minus the
  push-source lookup and the post-push feature-service scan;
* `"batch"` (default): the rows Feast would build from the DataFrame
  (`(EntityKey, {feature: Value}, event_ts, None)`) are built straight from the
  dataclasses and handed to the provider's `online_write_batch`. Profiling the
  DataFrame paths showed the time going to pandas -> Arrow -> numpy -> per-element
  `python_values_to_proto_values` (type sniffing and sanitising of every list), which
  this path skips; bench/features_online.py has the numbers.

On the SQLite stores of features/fast_stores.py, `push_users` / `push_items` go one step further:
`user_encoded` / `item_encoded` write the Value bytes directly (features/proto_bytes.py,
tested against protobuf) and hand them to `FastSqliteOnlineStore.write_encoded`, which
stores exactly what `online_write_batch` stores for `user_rows` / `item_rows` (building
11 Values per user was most of the push process's Python time; tests compare the stored
rows with Feast's own store byte for byte, and read them back through Feast).

On Redis the same bytes go out through `fast_stores.RedisEncodedWriter`: one pipelined
HSET per entity, as Feast's own `skip_dedup` write sends it.

The store behind `online_write_batch` is Feast's Redis store, or for SQLite (`sqlite_store`)
`fast_stores.PackedSqliteOnlineStore` (default: one row per entity holding its Values),
`fast_stores.FastSqliteOnlineStore` (Feast's tables, the per-(entity, feature) INSERT loop
replaced by one executemany) or Feast's own store.

Reads: `read_users`/`read_items` use `FeatureStore.get_online_features` in batches
of `read_batch_rows` (or, with `fast=True`, the provider's `online_read`, which is
the store lookup without the response assembly; used by bulk verification).

Event timestamp of a row = the entity's watermark. The Redis store is configured
with `skip_dedup` (see definitions.repo_config) so a new state always overwrites.
"""
from __future__ import annotations

import functools
import struct
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import pandas as pd

from unirec.features import definitions, item_stats, proto_bytes
from unirec.features.config import FeaturesConfig
from unirec.features.item_stats import ItemStats
from unirec.features.sequence import UserSequence

_USER_LISTS = ("item_ids", "labels", "ts", "surfaces", "click_query_ids", "query_ids", "query_texts", "query_ts")
_STRING_LISTS = frozenset({"item_ids", "surfaces", "click_query_ids", "query_ids", "query_texts"})
WritePath = Literal["batch", "direct", "push"]
_U32 = struct.Struct("<I").pack   # the length prefix of a string entity value


def _to_datetime(ts: int | None) -> datetime:
    return datetime.fromtimestamp(ts or 0, tz=timezone.utc)


def _naive_utc(ts: int | None) -> datetime:
    """The event time as Feast's own DataFrame conversion hands it to the store."""
    return _to_datetime(ts).replace(tzinfo=None)


def _chunks(rows: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(rows), n):
        yield rows[i:i + n]


def user_values(s: UserSequence) -> dict[str, Any]:
    """The user_sequence feature values of one state (plain Python)."""
    row: dict[str, Any] = {n: list(getattr(s, n)) for n in _USER_LISTS}
    row["sequence_length"] = len(s.item_ids)
    row["total_clicks"] = s.total_clicks
    row["last_event_ts"] = s.watermark if s.watermark is not None else 0
    return row


def user_frame(states: Sequence[UserSequence]) -> pd.DataFrame:
    """The push DataFrame for user_sequence (one row per user, absolute state)."""
    rows = [user_values(s) for s in states]
    data: dict[str, list] = {"user_id": [s.user_id for s in states],
                             definitions.TS_COLUMN: [_to_datetime(s.watermark) for s in states]}
    for name, _ in definitions.USER_FEATURES:
        data[name] = [r[name] for r in rows]
    return pd.DataFrame(data)


def item_frame(stats: Sequence[ItemStats], cfg: FeaturesConfig) -> pd.DataFrame:
    rows = [item_stats.feature_row(s, bucket_s=cfg.item_bucket_s, windows_s=cfg.item_windows_s) for s in stats]
    data: dict[str, list] = {"item_id": [s.item_id for s in stats],
                             definitions.TS_COLUMN: [_to_datetime(s.watermark) for s in stats]}
    for name, _ in definitions.item_features(cfg):
        data[name] = [r[name] for r in rows]
    return pd.DataFrame(data)


def user_rows(states: Sequence[UserSequence]) -> list[tuple]:
    """`online_write_batch` rows for user_sequence, as Feast builds them from user_frame."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    out = []
    for s in states:
        f = {}
        for n in _USER_LISTS:  # extend() on the sub-message: ~1.7x faster than List(val=...)
            f[n] = v = Value()
            (v.string_list_val if n in _STRING_LISTS else v.int64_list_val).val.extend(getattr(s, n))
        f["sequence_length"] = Value(int64_val=len(s.item_ids))
        f["total_clicks"] = Value(int64_val=s.total_clicks)
        f["last_event_ts"] = Value(int64_val=s.watermark if s.watermark is not None else 0)
        key = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=s.user_id)])
        out.append((key, f, _naive_utc(s.watermark), None))
    return out


@functools.lru_cache(maxsize=None)
def string_key_head(join_key: str, version: int) -> bytes:
    """Feast's serialized entity key of (`join_key`, string value v) is this head, then
    len(v) as <I, then v's UTF-8 bytes: the head is taken from Feast's own serialization
    of an empty value, whose last 4 bytes are that length, 0."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    empty = serialize_entity_key(EntityKey(join_keys=[join_key], entity_values=[Value(string_val="")]),
                                 entity_key_serialization_version=version)
    assert empty.endswith(b"\0\0\0\0"), empty
    return empty[:-4]


def string_key(head: bytes, value: str) -> bytes:
    """The serialized entity key of `value` after `string_key_head`."""
    b = value.encode("utf-8")
    return head + _U32(len(b)) + b


def user_encoded(states: Sequence[UserSequence], key_version: int) -> list[tuple]:
    """`FastSqliteOnlineStore.write_encoded` rows for user_sequence: the bytes `user_rows`'
    Values serialize to (features/proto_bytes.py), without building the Values."""
    strings, ints, one = proto_bytes.string_list, proto_bytes.int64_list, proto_bytes.int64
    head = string_key_head("user_id", key_version)
    out = []
    for s in states:
        key = string_key(head, s.user_id)
        n, total, last = len(s.item_ids), s.total_clicks, s.watermark if s.watermark is not None else 0
        values = [("item_ids", strings(s.item_ids), None), ("labels", ints(s.labels), None),
                  ("ts", ints(s.ts), None), ("surfaces", strings(s.surfaces), None),
                  ("click_query_ids", strings(s.click_query_ids), None), ("query_ids", strings(s.query_ids), None),
                  ("query_texts", strings(s.query_texts), None), ("query_ts", ints(s.query_ts), None),
                  ("sequence_length", one(n), str(n)), ("total_clicks", one(total), str(total)),
                  ("last_event_ts", one(last), str(last))]
        out.append((key, values, _naive_utc(s.watermark), None))
    return out


def item_encoded(stats: Sequence[ItemStats], cfg: FeaturesConfig, key_version: int) -> list[tuple]:
    """`FastSqliteOnlineStore.write_encoded` rows for item_stats (see `user_encoded`)."""
    head = string_key_head("item_id", key_version)
    double, one, values_of = proto_bytes.double, proto_bytes.int64, item_stats.feature_values
    names = item_stats.feature_names(cfg.item_windows_s)
    encoders = [double if n.startswith("ctr_") else one for n in names]
    out = []
    for s in stats:
        v = values_of(s, bucket_s=cfg.item_bucket_s, windows_s=cfg.item_windows_s)
        values = [(n, enc(x), str(x)) for n, enc, x in zip(names, encoders, v)]
        out.append((string_key(head, s.item_id), values, _naive_utc(s.watermark), None))
    return out


def item_rows(stats: Sequence[ItemStats], cfg: FeaturesConfig) -> list[tuple]:
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    out = []
    for s in stats:
        row = item_stats.feature_row(s, bucket_s=cfg.item_bucket_s, windows_s=cfg.item_windows_s)
        f = {n: Value(double_val=v) if n.startswith("ctr_") else Value(int64_val=v) for n, v in row.items()}
        key = EntityKey(join_keys=["item_id"], entity_values=[Value(string_val=s.item_id)])
        out.append((key, f, _naive_utc(s.watermark), None))
    return out


def _value(v) -> Any:
    """A Feast Value proto back to Python (the kinds this repo writes)."""
    kind = v.WhichOneof("val")
    if kind is None:
        return None
    x = getattr(v, kind)
    return list(x.val) if kind.endswith("_list_val") else x


class OnlineStore:
    """Feast-backed online features for users and items."""

    def __init__(self, cfg: FeaturesConfig, *, write_path: WritePath = "batch"):
        from feast import FeatureStore  # heavy import, only when a store is opened

        self.cfg = cfg
        self.write_path = write_path
        self.repo_path = definitions.write_repo_config(cfg)
        self.store = FeatureStore(repo_path=str(self.repo_path))
        self._user_names = [n for n, _ in definitions.USER_FEATURES]
        self._item_names = [n for n, _ in definitions.item_features(cfg)]
        self._views: dict[str, Any] = {}

    def apply(self) -> None:
        """Register the entities, sources and views (idempotent: same objects, no change)."""
        self.store.apply(definitions.build(self.cfg))
        self.store.refresh_registry()
        self._views.clear()

    def _view(self, name: str):
        if name not in self._views:
            self._views[name] = self.store.get_feature_view(name)
        return self._views[name]

    def _write(self, view: str, push_source: str, frame, rows, encoded) -> None:
        """One chunk through the configured path: `frame()` for push / write_to_online_store,
        `rows()` (Feast Values) for the batch path, or `encoded(key_version)` (value bytes,
        see `user_encoded`) when the batch path's store takes them directly."""
        if self.write_path == "batch":
            config = self.store.config
            if self._encoded_store is not None:
                self._encoded_store.write_encoded(config, self._view(view),
                                                  encoded(config.entity_key_serialization_version))
            else:
                self.store._get_provider().online_write_batch(config, self._view(view), rows(), None)
            return
        from feast.data_source import PushMode

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Feast warns on every call about experimental APIs
            if self.write_path == "push":
                self.store.push(push_source, frame(), to=PushMode.ONLINE)
            else:
                self.store.write_to_online_store(view, frame())

    def push_users(self, states: Sequence[UserSequence]) -> int:
        """Write the users' absolute states; returns the number of rows written."""
        states = list(states)
        for c in _chunks(states, self.cfg.push_batch_rows):
            self._write(definitions.USER_VIEW, definitions.USER_PUSH, lambda: user_frame(c), lambda: user_rows(c),
                        lambda version: user_encoded(c, version))
        return len(states)

    @functools.cached_property
    def _encoded_store(self):
        """What takes rows without the Value objects on the "batch" write path: the batched
        SQLite store (`fast_stores.FastSqliteOnlineStore`) or, on Redis, a
        `fast_stores.RedisEncodedWriter`; else None."""
        if self.write_path != "batch":
            return None
        from unirec.features.fast_stores import FastSqliteOnlineStore, RedisEncodedWriter

        store = getattr(self.store._get_provider(), "online_store", None)
        if isinstance(store, FastSqliteOnlineStore):
            return store if store.batched(self.store.config) else None
        return RedisEncodedWriter.for_store(store, self.store.config)

    def push_items(self, stats: Sequence[ItemStats]) -> int:
        stats = list(stats)
        cfg = self.cfg
        for c in _chunks(stats, cfg.push_batch_rows):
            self._write(definitions.ITEM_VIEW, definitions.ITEM_PUSH, lambda: item_frame(c, cfg),
                        lambda: item_rows(c, cfg), lambda version: item_encoded(c, cfg, version))
        return len(stats)

    def push_item_embeddings(self, item_ids: Sequence[str], vectors, version: str, published_at: int) -> int:
        """Write each item's vector of a published version (vectors: (N, d) array-like)."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        when = _naive_utc(published_at)
        rows = []
        for iid, vec in zip(item_ids, vectors):
            emb = Value()
            emb.float_list_val.val.extend(float(x) for x in vec)
            f = {"embedding": emb, "model_version": Value(string_val=version),
                 "published_at": Value(int64_val=int(published_at))}
            rows.append((EntityKey(join_keys=["item_id"], entity_values=[Value(string_val=str(iid))]), f, when, None))
        view = self._view(definitions.EMBEDDING_VIEW)
        for c in _chunks(rows, self.cfg.push_batch_rows):
            self.store._get_provider().online_write_batch(self.store.config, view, c, None)
        return len(rows)

    def read_item_embeddings(self, item_ids: Sequence[str]) -> dict[str, dict]:
        """{item_id: {"embedding": [...], "model_version": str, "published_at": int}} of items that have one."""
        names = [n for n, _ in definitions.EMBEDDING_FEATURES]
        return {r["item_id"]: {n: r[n] for n in names}
                for r in self._read(definitions.EMBEDDING_VIEW, names, "item_id", item_ids, False)}

    def _read(self, view: str, names: list[str], key: str, ids: Sequence[str], fast: bool) -> Iterable[dict]:
        ids = list(dict.fromkeys(ids))
        for chunk in _chunks(ids, self.cfg.read_batch_rows):
            if fast:
                yield from self._read_fast(view, key, chunk)
                continue
            refs = [f"{view}:{n}" for n in names]
            cols = self.store.get_online_features(features=refs, entity_rows=[{key: i} for i in chunk]).to_dict()
            for j, entity in enumerate(cols[key]):
                row = {n: cols[n][j] for n in names}
                if any(v is not None for v in row.values()):  # all None: not in the online store
                    yield {key: entity, **row}

    def _read_fast(self, view: str, key: str, chunk: Sequence[str]) -> Iterable[dict]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        keys = [EntityKey(join_keys=[key], entity_values=[Value(string_val=i)]) for i in chunk]
        found = self.store._get_provider().online_read(self.store.config, self._view(view), keys)
        for entity, (_, values) in zip(chunk, found):
            row = {n: _value(v) for n, v in (values or {}).items()}
            if any(v is not None for v in row.values()):  # Redis answers a missing key with empty Values
                yield {key: entity, **row}

    def read_users(self, user_ids: Sequence[str], *, fast: bool = False) -> dict[str, UserSequence]:
        """Online states of the users that have one (without the dedup ids)."""
        out = {}
        for r in self._read(definitions.USER_VIEW, self._user_names, "user_id", user_ids, fast):
            lists = {n: tuple(r.get(n) or ()) for n in _USER_LISTS}
            wm = r.get("last_event_ts")
            out[r["user_id"]] = UserSequence(
                r["user_id"], **lists, watermark=wm if (wm or lists["ts"] or lists["query_ts"]) else None,
                total_clicks=r.get("total_clicks") or 0)
        return out

    def read_items(self, item_ids: Sequence[str], *, fast: bool = False) -> dict[str, dict]:
        """Online feature rows of the items that have one: {item_id: {feature: value}}, the
        values of `item_stats.feature_row` (buckets stay in the state store)."""
        out = {}
        for r in self._read(definitions.ITEM_VIEW, self._item_names, "item_id", item_ids, fast):
            item_id = r.pop("item_id")
            out[item_id] = {n: r.get(n) for n in self._item_names}
        return out
