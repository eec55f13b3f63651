"""A Feast SQLite online store with a batched write; same tables, same bytes, same reads.

Feast's `SqliteOnlineStore.online_write_batch` runs one `INSERT ... ON CONFLICT`
per (entity, feature): 11 statements per user row, ~25 us each, which caps the
embedded store at ~3k user rows/s (bench/features_online.py). `FastSqliteOnlineStore`
is a subclass plugged in through Feast's own extension point (feature_store.yaml
`online_store.type: unirec.features.fast_stores.FastSqliteOnlineStore`) whose
`online_write_batch` builds the very same parameter rows (same entity-key
serialization, value bytes, `value_text`, timestamps) and sends them with one
`executemany` of multi-row INSERTs (`_ROWS_PER_INSERT` rows each) per batch, entities
in key order. `write_encoded` takes the same rows with the value bytes already built
(features/proto_bytes.py; `OnlineStore.push_users` / `push_items` use it). Everything
else (table creation on `apply`, `online_read`, `get_online_features`, teardown) is
inherited unchanged; tests compare the stored rows of both stores byte for byte.
Configurations this does not cover (vector search) fall back to Feast's own write.

`RedisEncodedWriter` is the same idea for Feast's Redis store, which needs no
subclass: Feast's `skip_dedup` write (what definitions.repo_config configures: the
pipeline writes absolute states, so the newest write must win) is one pipelined
`HSET key {"_ts:<view>": Timestamp, mmh3("<view>:<feature>"): Value bytes, ...}` per
entity, key = serialized entity key + project. The writer sends that very command
from the pre-built Value bytes instead of building 11-13 Value messages per entity
and serializing them again; `online_read` and everything else stay Feast's. A test
compares every stored hash with Feast's own write, byte for byte.

The connection runs in WAL journal mode (a write appends to the log instead of
copying every touched page to a rollback journal first: ~25% less write time for
the large list values of user_sequence, measured), with a 256 MiB page cache instead of
SQLite's 2 MiB (the B-trees a row touches outgrow 2 MiB at ~10k users; with the
key-ordered writes, 15-30% less write CPU in an A/B on the shared dev machine). `synchronous` stays at its
default FULL, so a confirmed push survives a power loss, which the state store's
outbox relies on. Readers in other processes see the same data.

One index less (`FastSqliteOnlineStore.update`): Feast indexes entity_key a second time
beside the primary key that starts with it; here that index is an empty partial one, so
a new (entity, feature) row is written to two B-trees instead of three. Push CPU per row,
measured with new users only (100k users, 2,000-event batches): 87-91 -> 82-83 us; on
bench/ingest.py's generated stream, where most pushes update rows that exist (an update
touches no index), 76.1 / 77.3 -> 75.8 / 73.3 us in two interleaved A/B rounds: within noise.
"""
from __future__ import annotations

import functools
from typing import Literal

from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import extract_text_and_num
from feast.infra.online_stores.sqlite import (
    SqliteOnlineStore, SqliteOnlineStoreConfig, _quote_id, _table_id, adapt_datetime_epoch,
)
from feast.utils import to_naive_utc

# Rows per INSERT statement: one multi-row statement costs ~40% less SQLite CPU per row
# than executemany of single-row ones (fewer statement steps); 6 parameters a row, so
# 960 per statement, under the 999 that SQLite builds before 3.32 allow.
_ROWS_PER_INSERT = 160
_CACHE_KIB = 256 << 10  # page cache per connection (SQLite's default is 2 MiB)
FAST_SQLITE_TYPE = "unirec.features.fast_stores.FastSqliteOnlineStore"
_EMPTY_INDEX = "WHERE 0"  # a partial index that holds no row (see FastSqliteOnlineStore.update)


_NUMERIC = frozenset({"int64_val", "int32_val", "double_val", "float_val"})


def _value_text(val) -> str | None:
    """`extract_text_and_num(val, False)[0]` (Feast's value_text column) without its
    per-value call and tuple: lists, most of user_sequence's values, give None at once."""
    kind = val.WhichOneof("val")
    if kind is None or kind.endswith("_list_val"):
        return None
    if kind == "string_val":
        return val.string_val
    if kind in _NUMERIC:
        return str(getattr(val, kind))
    return extract_text_and_num(val, False)[0]


class FastSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    type: Literal["unirec.features.fast_stores.FastSqliteOnlineStore"] = FAST_SQLITE_TYPE  # type: ignore[assignment]


class FastSqliteOnlineStore(SqliteOnlineStore):
    def _get_conn(self, config):
        fresh = not self._conn
        conn = super()._get_conn(config)
        if fresh:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        return conn

    def update(self, config, tables_to_delete, tables_to_keep, entities_to_delete, entities_to_keep,
               partial) -> None:
        """Feast's tables, then its `<table>_ek` index on entity_key swapped for an empty one.

        The table's primary key (entity_key, feature_name) already serves every lookup by
        entity_key (Feast's `online_read` is `WHERE entity_key IN (...) ORDER BY entity_key`:
        SQLite searches the primary-key index either way), so the second index only costs
        writes: every new (entity, feature) row lands in three B-trees instead of two. A
        partial index `WHERE 0` under the same name holds no rows and keeps Feast's
        `CREATE INDEX IF NOT EXISTS` on later applies a no-op; a store created before
        (or by Feast itself) loses its full index once, here."""
        super().update(config, tables_to_delete, tables_to_keep, entities_to_delete, entities_to_keep, partial)
        if not self.batched(config):
            return
        conn = self._get_conn(config)
        versioning = config.registry.enable_online_feature_view_versioning
        for table in tables_to_keep:
            tbl = _table_id(config.project, table, versioning)
            ek = tbl + "_ek"
            row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (ek,)).fetchone()
            if row is not None and row[0].rstrip().endswith(_EMPTY_INDEX):
                continue
            with conn:
                conn.execute(f"DROP INDEX IF EXISTS {_quote_id(ek)}")
                conn.execute(f"CREATE INDEX {_quote_id(ek)} ON {_quote_id(tbl)} (entity_key) {_EMPTY_INDEX}")

    def batched(self, config) -> bool:
        """False for configurations this store leaves to Feast's own write."""
        cfg = config.online_store
        return not (cfg.vector_enabled or getattr(cfg, "enable_openai_compatible_store", False))

    def online_write_batch(self, config, table, data, progress) -> None:
        if not self.batched(config):
            return super().online_write_batch(config, table, data, progress)
        version = config.entity_key_serialization_version
        encoded = []
        for entity_key, values, timestamp, created_ts in data:
            key = serialize_entity_key(entity_key, entity_key_serialization_version=version)
            encoded.append((key, [(n, v.SerializeToString(), _value_text(v)) for n, v in values.items()],
                            timestamp, created_ts))
        self.write_encoded(config, table, encoded)
        if progress:
            progress(len(data))

    def write_encoded(self, config, table, data) -> None:
        """Upsert rows given as (serialized entity key, [(feature, value bytes, value_text)],
        event_ts, created_ts): what `online_write_batch` stores for the same Values, for
        callers that build the bytes themselves (features/proto_bytes.py). Entities are
        written in key order, so consecutive rows touch neighbouring index pages."""
        name = _table_id(config.project, table, config.registry.enable_online_feature_view_versioning)
        rows = []
        for key, values, timestamp, created_ts in sorted(data, key=lambda d: d[0]):  # stable: the last write wins
            # Adapted once per entity with the adapter Feast registers for datetime (sqlite3
            # would call it once per feature row): same stored integer, fewer Python calls.
            timestamp = adapt_datetime_epoch(to_naive_utc(timestamp))
            created_ts = adapt_datetime_epoch(to_naive_utc(created_ts)) if created_ts is not None else None
            for feature_name, value, text in values:
                rows.append((key, feature_name, value, text, timestamp, created_ts))
        conn = self._get_conn(config)
        full = len(rows) - len(rows) % _ROWS_PER_INSERT
        with conn:
            if full:
                conn.executemany(_upsert(name, _ROWS_PER_INSERT),
                                 [[x for r in rows[i:i + _ROWS_PER_INSERT] for x in r]
                                  for i in range(0, full, _ROWS_PER_INSERT)])
            if full < len(rows):
                conn.executemany(_upsert(name, 1), rows[full:])


def _upsert(table: str, n_rows: int) -> str:
    """One INSERT of `n_rows` rows, each updating the (entity_key, feature_name) row it meets.
    Rows of one statement are applied in order, as separate statements would be."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * n_rows)
    return (f"INSERT INTO {_quote_id(table)} (entity_key, feature_name, value, value_text, event_ts, created_ts) "
            f"VALUES {values} ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
            "value = excluded.value, value_text = excluded.value_text, "
            "event_ts = excluded.event_ts, created_ts = excluded.created_ts;")


@functools.lru_cache(maxsize=4096)
def _field_key(view: str, feature: str) -> bytes:
    from feast.infra.online_stores.helpers import _mmh3

    return _mmh3(f"{view}:{feature}")


class RedisEncodedWriter:
    """`write_encoded` for Feast's Redis online store (see the module docstring).
    `for_store` returns None for configurations it does not cover (Feast writes those)."""

    def __init__(self, store):
        self.store = store

    @classmethod
    def for_store(cls, store, config) -> RedisEncodedWriter | None:
        from feast.infra.online_stores.redis import RedisOnlineStore

        cfg = config.online_store
        if not isinstance(store, RedisOnlineStore) or not getattr(cfg, "skip_dedup", False):
            return None      # Feast's read-then-write dedup path: leave it to Feast
        return cls(store)

    def write_encoded(self, config, table, data) -> None:
        """Upsert rows given as (serialized entity key, [(feature, value bytes, value_text)],
        event_ts, created_ts), as FastSqliteOnlineStore.write_encoded takes them."""
        from feast import utils
        from feast.infra.online_stores.redis import _versioned_fv_name
        from google.protobuf.timestamp_pb2 import Timestamp

        cfg = config.online_store
        client = self.store._get_client(cfg)
        view = _versioned_fv_name(table, config)
        ts_key, project = f"_ts:{view}", config.project.encode("utf-8")
        ttl = cfg.key_ttl_seconds
        with client.pipeline(transaction=False) as pipe:
            for key, values, timestamp, _created in data:
                ts = Timestamp()
                ts.FromDatetime(utils.make_tzaware(timestamp))
                mapping = {ts_key: ts.SerializeToString()}
                for feature_name, value, _text in values:
                    mapping[_field_key(view, feature_name)] = value
                redis_key = key + project
                pipe.hset(redis_key, mapping=mapping)
                if ttl:
                    pipe.expire(name=redis_key, time=ttl)
            pipe.execute()
