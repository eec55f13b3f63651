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

`PackedSqliteOnlineStore` (the embedded default, `features.sqlite_store: packed`) keeps
one row per entity instead of one per (entity, feature), as Feast's DynamoDB and
Bigtable stores do: table `<Feast's table name>_packed` (entity_key BLOB PRIMARY KEY,
packed BLOB, event_ts timestamp, created_ts timestamp), where `packed` is a format
byte (1) followed, per feature, by `<HI` (name length, value length), the UTF-8 name
and the serialized Feast Value: the same Value bytes as above, framed. Why: a user row
of user_sequence is 11 Feast rows, each an upsert into two B-trees that repeat the
entity key; the SQLite work is per row, not per byte (short sequences dominate a live
stream). Measured on 37k-event batches of the generated stream over 100k users
(scratch A/B, same Values): 44.8 us of CPU per user written in Feast's layout vs
6.4 us for the packed row + 5.3 us to frame it. Reads go through Feast as before
(`get_online_features` -> this store's `online_read`, which unframes the Values);
tests read every view back through Feast and compare with Feast's own SQLite store.
What it gives up: the table is not Feast's SQLite layout, so Feast's built-in
`sqlite` type cannot read it (this class must be importable wherever the store is
opened, as for any custom online store), and vector search is refused (use
`sqlite_store: batched` or `feast`). `feast apply` from the CLI also creates
Feast's own (empty, unused) tables beside the packed ones; they stay empty. A store
switched to (or from) this layout starts empty: `unirec features repush` writes every
state the state store holds.
"""
from __future__ import annotations

import functools
import struct
from datetime import timezone
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
PACKED_SQLITE_TYPE = "unirec.features.fast_stores.PackedSqliteOnlineStore"
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
        _write_rows(self._get_conn(config), rows, _ROWS_PER_INSERT, functools.partial(_upsert, name))


_PACKED_FORMAT = b"\x01"
_ENTRY = struct.Struct("<HI")   # name length, value length
_PACKED_ROWS_PER_INSERT = 200   # 4 parameters a row: 800 per statement


@functools.lru_cache(maxsize=4096)
def _name_bytes(name: str) -> bytes:
    return name.encode("utf-8")


def pack_values(values) -> bytes:
    """[(feature, Value bytes, _)] -> the packed column (format in the module docstring)."""
    entry, name = _ENTRY.pack, _name_bytes
    parts = [_PACKED_FORMAT]
    for feature, value, _text in values:
        n = name(feature)
        parts += (entry(len(n), len(value)), n, value)
    return b"".join(parts)


def unpack_values(packed: bytes) -> dict:
    """The packed column -> {feature: Value} (raises ValueError on anything else)."""
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    if packed[:1] != _PACKED_FORMAT:
        raise ValueError(f"unknown packed-row format {packed[:1]!r}")
    out, i, end, size = {}, 1, len(packed), _ENTRY.size
    while i < end:
        n, v = _ENTRY.unpack_from(packed, i)
        i += size
        if i + n + v > end:
            raise ValueError("truncated packed row")
        value = ValueProto()
        value.ParseFromString(packed[i + n:i + n + v])
        out[packed[i:i + n].decode("utf-8")] = value
        i += n + v
    return out


class PackedSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    type: Literal["unirec.features.fast_stores.PackedSqliteOnlineStore"] = PACKED_SQLITE_TYPE  # type: ignore[assignment]


class PackedSqliteOnlineStore(FastSqliteOnlineStore):
    """One row per entity: see the module docstring."""

    @staticmethod
    def _table(config, table) -> str:
        return _table_id(config.project, table, config.registry.enable_online_feature_view_versioning) + "_packed"

    def _refuse_unsupported(self, config) -> None:
        if not self.batched(config):
            raise ValueError("the packed SQLite online store does not support vector search: "
                             "set features.sqlite_store to batched or feast")

    def update(self, config, tables_to_delete, tables_to_keep, entities_to_delete, entities_to_keep,
               partial) -> None:
        self._refuse_unsupported(config)
        conn = self._get_conn(config)
        with conn:
            for table in tables_to_keep:
                conn.execute(f"CREATE TABLE IF NOT EXISTS {_quote_id(self._table(config, table))} "
                             "(entity_key BLOB PRIMARY KEY, packed BLOB NOT NULL, event_ts timestamp, "
                             "created_ts timestamp)")
            for table in tables_to_delete:
                conn.execute(f"DROP TABLE IF EXISTS {_quote_id(self._table(config, table))}")

    def online_write_batch(self, config, table, data, progress) -> None:
        """The batched store's: Values serialized, then `write_encoded` (this class's)."""
        self._refuse_unsupported(config)
        super().online_write_batch(config, table, data, progress)

    def write_encoded(self, config, table, data) -> None:
        """Upsert (serialized entity key, [(feature, Value bytes, _)], event_ts, created_ts)
        rows, one packed row per entity, in key order (the last write of a key wins)."""
        rows = []
        for key, values, timestamp, created_ts in sorted(data, key=lambda d: d[0]):
            rows.append((key, pack_values(values), adapt_datetime_epoch(to_naive_utc(timestamp)),
                         adapt_datetime_epoch(to_naive_utc(created_ts)) if created_ts is not None else None))
        _write_rows(self._get_conn(config), rows, _PACKED_ROWS_PER_INSERT,
                    functools.partial(_packed_upsert, _quote_id(self._table(config, table))))

    def online_read(self, config, table, entity_keys, requested_features=None):
        """What Feast's SQLite `online_read` returns for the same writes: per key, (event
        time as aware UTC, {feature: Value}) or (None, None)."""
        version = config.entity_key_serialization_version
        keys = [serialize_entity_key(k, entity_key_serialization_version=version) for k in entity_keys]
        found = {}
        conn = self._get_conn(config)
        name = _quote_id(self._table(config, table))
        for i in range(0, len(keys), 900):        # under SQLite's bound-parameter limit
            chunk = keys[i:i + 900]
            found.update((k, (ts, packed)) for k, packed, ts in conn.execute(
                f"SELECT entity_key, packed, event_ts FROM {name} WHERE entity_key IN ({','.join('?' * len(chunk))})",
                chunk))
        out = []
        for key in keys:
            hit = found.get(key)
            if hit is None:
                out.append((None, None))
                continue
            ts, packed = hit
            ts = ts.astimezone(timezone.utc) if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)
            out.append((ts, unpack_values(packed)))
        return out


def _packed_upsert(table: str, n_rows: int) -> str:
    values = ", ".join(["(?, ?, ?, ?)"] * n_rows)
    return (f"INSERT INTO {table} (entity_key, packed, event_ts, created_ts) VALUES {values} "
            "ON CONFLICT(entity_key) DO UPDATE SET packed = excluded.packed, event_ts = excluded.event_ts, "
            "created_ts = excluded.created_ts;")


def _write_rows(conn, rows: list[tuple], per_statement: int, statement) -> None:
    """`rows` in one transaction: multi-row statements (`statement(n)` takes n rows) of
    `per_statement` rows each, then the remainder one row at a time."""
    full = len(rows) - len(rows) % per_statement
    with conn:
        if full:
            conn.executemany(statement(per_statement), [[x for r in rows[i:i + per_statement] for x in r]
                                                        for i in range(0, full, per_statement)])
        if full < len(rows):
            conn.executemany(statement(1), rows[full:])


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
