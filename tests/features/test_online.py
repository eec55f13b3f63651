"""Feast online store: the repo applies, pushed states read back identical (SQLite, Redis)."""
from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest

from unirec.features import definitions, fast_stores, item_stats, online, redis_local
from unirec.features.config import FeaturesConfig
from unirec.features.sequence import merge

WINDOWS = dict(bucket_s=3600, windows_s=(3600, 86400))


def click(eid, user, item, ts, label=1, surface="rec", query_id=None):
    return SimpleNamespace(event_id=eid, user_id=user, item_id=item, ts=ts, label=label,
                           surface=surface, query_id=query_id)


def query(eid, user, text, ts):
    return SimpleNamespace(event_id=eid, user_id=user, query_id=eid, text=text, ts=ts)


def states():
    """Users with clicks and queries, one with clicks only (empty query lists)."""
    evs = {
        "u1": [query("q1", "u1", "star wars", 100), click("c1", "u1", "i1", 100, 1, "search", "q1"),
               click("c2", "u1", "i2", 50, 0), click("c3", "u1", "i3", 200, 1)],
        "u2": [click("c4", "u2", "i1", 300, 0)],
        "ü3": [query("q2", "ü3", "ünïcode ☃", 7), click("c5", "ü3", "i9", 8)],
    }
    out = [merge(None, u, e, max_len=5, allowed_lateness_s=100, max_queries=3) for u, e in evs.items()]
    clicks = [c for r in out for c in r.applied_clicks]
    return [r.state for r in out], list(item_stats.apply({}, clicks, **WINDOWS).values())


def cfg_for(tmp_path, **kw) -> FeaturesConfig:
    return FeaturesConfig(repo_dir=str(tmp_path / "feast"), item_windows_s=WINDOWS["windows_s"],
                          item_bucket_s=WINDOWS["bucket_s"], **kw)


def test_fast_rows_are_the_rows_feast_builds_from_the_push_dataframe(tmp_path):
    from feast.utils import _convert_arrow_to_proto
    from feast.value_type import ValueType

    cfg = cfg_for(tmp_path)
    objs = {o.name: o for o in definitions.build(cfg)}
    users, items = states()
    cases = [(objs[definitions.USER_VIEW], online.user_frame(users), online.user_rows(users), "user_id"),
             (objs[definitions.ITEM_VIEW], online.item_frame(items, cfg), online.item_rows(items, cfg), "item_id")]
    for fv, frame, ours, key in cases:
        theirs = _convert_arrow_to_proto(pa.Table.from_pandas(frame), fv, {key: ValueType.STRING})
        assert len(ours) == len(theirs)
        for (k1, f1, t1, c1), (k2, f2, t2, c2) in zip(ours, theirs):
            assert k1.SerializeToString() == k2.SerializeToString()
            assert {n: v.SerializeToString() for n, v in f1.items()} == \
                   {n: v.SerializeToString() for n, v in f2.items()}
            assert t1 == t2 and c1 is c2 is None


def test_repo_config_is_generated_without_committed_paths(tmp_path):
    cfg = cfg_for(tmp_path, online_store="redis", redis_connection_string="h:1,db=2")
    root = definitions.write_repo_config(cfg)
    text = (root / "feature_store.yaml").read_text()
    assert "h:1,db=2" in text and "skip_dedup: true" in text and str(root) in text


@pytest.fixture(params=["sqlite", "sqlite_batched", "redis"])
def store_cfg(request, tmp_path):
    if request.param.startswith("sqlite"):
        yield cfg_for(tmp_path, sqlite_store="batched" if request.param == "sqlite_batched" else "packed")
        return
    server = redis_local.start(tmp_path / "redis")
    try:
        yield cfg_for(tmp_path, online_store="redis", redis_connection_string=server.connection_string)
    finally:
        server.stop()


@pytest.mark.integration
@pytest.mark.parametrize("write_path", ["batch", "direct", "push"])
def test_pushed_states_read_back_identical(store_cfg, write_path):
    store = online.OnlineStore(store_cfg, write_path=write_path)
    store.apply()
    store.apply()  # idempotent
    users, items = states()
    assert store.push_users(users) == 3 and store.push_items(items) == len(items)
    for fast in (False, True):
        got = store.read_users([s.user_id for s in users] + ["nobody"], fast=fast)
        assert got == {s.user_id: s.for_serving() for s in users}
        got_items = store.read_items([s.item_id for s in items] + ["nothing"], fast=fast)
        assert got_items == {s.item_id: item_stats.feature_row(s, **WINDOWS) for s in items}


@pytest.mark.integration
def test_a_new_state_overwrites_even_when_its_event_time_did_not_move(store_cfg):
    store = online.OnlineStore(store_cfg)
    store.apply()
    first = merge(None, "u", [click("a", "u", "i1", 100)], max_len=5, allowed_lateness_s=50, max_queries=2).state
    store.push_users([first])
    late = merge(first, "u", [click("b", "u", "i0", 90)], max_len=5, allowed_lateness_s=50, max_queries=2).state
    assert late.watermark == first.watermark
    store.push_users([late])
    store.push_users([late])  # re-push after a crash: same value
    assert store.read_users(["u"])["u"] == late.for_serving()
    assert store.read_users(["u"])["u"].item_ids == ("i0", "i1")


@pytest.mark.integration
def test_pushes_are_split_into_batches(tmp_path):
    cfg = cfg_for(tmp_path, push_batch_rows=2, read_batch_rows=2)
    store = online.OnlineStore(cfg)
    store.apply()
    users, _ = states()
    store.push_users(users)
    assert set(store.read_users([s.user_id for s in users])) == {s.user_id for s in users}


@pytest.mark.integration
def test_batched_sqlite_store_writes_the_same_rows_as_feasts_store(tmp_path):
    import sqlite3

    users, items = states()
    dumps = []
    for batched in (False, True):
        cfg = cfg_for(tmp_path / str(batched), sqlite_store="batched" if batched else "feast")
        store = online.OnlineStore(cfg)
        store.apply()
        assert type(store.store._get_provider().online_store).__name__ == (
            "FastSqliteOnlineStore" if batched else "SqliteOnlineStore")
        store.push_users(users)
        store.push_items(items)
        store.push_users(users[:1])  # an update in place
        db = sqlite3.connect(store.repo_path / "online_store.db")
        tables = sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        dumps.append({t: sorted(db.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables})
        db.close()
    assert dumps[0] == dumps[1] and sum(len(rows) for rows in dumps[0].values()) > 0


def test_batched_store_drops_the_redundant_entity_key_index_and_reads_stay_indexed(tmp_path):
    """A store Feast created (full `<table>_ek` index) opened by the batched store: the
    index becomes an empty partial one, the rows still read back, by the primary key."""
    import sqlite3

    users, items = states()
    feast_made = online.OnlineStore(cfg_for(tmp_path, sqlite_store="feast"))
    feast_made.apply()
    feast_made.push_users(users)
    path = feast_made.repo_path / "online_store.db"

    def ek_indexes():
        with sqlite3.connect(path) as db:
            return {name: sql for name, sql in db.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name LIKE '%_ek'")}

    assert ek_indexes() and not any(sql.endswith("WHERE 0") for sql in ek_indexes().values())
    for _ in range(2):                                 # a second apply changes nothing
        store = online.OnlineStore(cfg_for(tmp_path, sqlite_store="batched"))
        store.apply()
        assert ek_indexes() and all(sql.endswith("WHERE 0") for sql in ek_indexes().values())
    assert store.read_users([s.user_id for s in users]) == {s.user_id: s.for_serving() for s in users}
    store.push_items(items)
    assert set(store.read_items([s.item_id for s in items])) == {s.item_id for s in items}
    with sqlite3.connect(path) as db:
        table = next(iter(ek_indexes()))[:-3]
        plan = db.execute(f'EXPLAIN QUERY PLAN SELECT entity_key, feature_name, value, event_ts FROM "{table}" '
                          "WHERE entity_key IN (?, ?) ORDER BY entity_key", (b"a", b"b")).fetchall()
    assert "USING INDEX sqlite_autoindex" in plan[0][-1]


def _online_read_all(store, users, items, item_ids):
    """What the provider's online_read returns for every view (missing keys included), as bytes."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    provider, config = store.store._get_provider(), store.store.config
    out = {}
    for view, key, ids in ((definitions.USER_VIEW, "user_id", [s.user_id for s in users] + ["nobody"]),
                           (definitions.ITEM_VIEW, "item_id", [s.item_id for s in items] + ["nothing"]),
                           (definitions.EMBEDDING_VIEW, "item_id", item_ids + ["nothing"])):
        keys = [EntityKey(join_keys=[key], entity_values=[Value(string_val=i)]) for i in ids]
        out[view] = [(ts, None if values is None else {n: v.SerializeToString() for n, v in values.items()})
                     for ts, values in provider.online_read(config, store._view(view), keys)]
    return out


@pytest.mark.integration
def test_packed_store_answers_feast_reads_exactly_as_feasts_own_sqlite_store(tmp_path):
    """Same pushes (users, items, item embeddings; an update in place) into Feast's built-in
    SQLite store and into the packed one: online_read gives the same timestamps and Value
    bytes for every key, and get_online_features the same rows."""
    users, items = states()
    item_ids = [s.item_id for s in items]
    reads, served = [], []
    for kind in ("feast", "packed"):
        store = online.OnlineStore(cfg_for(tmp_path / kind, sqlite_store=kind))
        store.apply()
        assert type(store.store._get_provider().online_store).__name__ == (
            "PackedSqliteOnlineStore" if kind == "packed" else "SqliteOnlineStore")
        store.push_users(users)
        store.push_items(items)
        store.push_item_embeddings(item_ids, [[k / 4, -k] for k in range(len(item_ids))], "v1", 1_000)
        later = merge(users[0], users[0].user_id, [click("c9", users[0].user_id, "i7", 900)], max_len=5,
                      allowed_lateness_s=100, max_queries=3).state
        store.push_users([later])                     # an update in place, newer event time
        reads.append(_online_read_all(store, [later, *users[1:]], items, item_ids))
        served.append((store.read_users([s.user_id for s in users]), store.read_items(item_ids),
                       store.read_item_embeddings(item_ids)))
    assert reads[0] == reads[1]
    assert served[0] == served[1] and served[1][0][users[0].user_id] == later.for_serving()
    assert all(v is not None for rows in reads[1].values() for v in rows[:-1])   # every pushed key found


def test_packed_store_keeps_one_row_per_entity_and_drops_a_deleted_views_table(tmp_path):
    import sqlite3

    users, items = states()
    store = online.OnlineStore(cfg_for(tmp_path, sqlite_store="packed"))
    store.apply()
    store.push_users(users)
    store.push_users(users)                            # a re-push after a crash: same rows
    path = store.repo_path / "online_store.db"
    with sqlite3.connect(path) as db:
        table = f"{store.cfg.project}_{definitions.USER_VIEW}_packed"
        first = db.execute(f'SELECT entity_key, packed FROM "{table}" ORDER BY entity_key').fetchall()
    assert len(first) == len(users)
    for _key, packed in first:
        assert set(fast_stores.unpack_values(packed)) == {n for n, _ in definitions.USER_FEATURES}
    feast_store = store.store._get_provider().online_store
    feast_store.update(store.store.config, [store._view(definitions.USER_VIEW)], [], [], [], False)
    with sqlite3.connect(path) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert table not in names and f"{store.cfg.project}_{definitions.ITEM_VIEW}_packed" in names


def test_packed_rows_refuse_an_unknown_format_or_a_truncated_row():
    from feast.protos.feast.types.Value_pb2 import Value

    packed = fast_stores.pack_values([("n", Value(int64_val=7).SerializeToString(), None),
                                      ("s", Value(string_val="ü").SerializeToString(), None)])
    assert fast_stores.unpack_values(packed) == {"n": Value(int64_val=7), "s": Value(string_val="ü")}
    with pytest.raises(ValueError, match="format"):
        fast_stores.unpack_values(b"\x02" + packed[1:])
    with pytest.raises(ValueError, match="truncated"):
        fast_stores.unpack_values(packed[:-1])


@pytest.mark.integration
def test_redis_encoded_writes_store_the_hashes_feasts_own_write_stores(tmp_path):
    import redis

    from unirec.features.fast_stores import RedisEncodedWriter

    users, items = states()
    server = redis_local.start(tmp_path / "redis")
    try:
        dumps = []
        for db, encoded in ((0, False), (1, True)):
            cfg = cfg_for(tmp_path / str(db), online_store="redis",
                          redis_connection_string=f"{server.connection_string},db={db}")
            store = online.OnlineStore(cfg)
            store.apply()
            if not encoded:
                store.__dict__["_encoded_store"] = None      # Feast's own online_write_batch
            else:
                assert isinstance(store._encoded_store, RedisEncodedWriter)
            store.push_users(users)
            store.push_items(items)
            store.push_users(users[:1])  # an update in place
            client = redis.Redis(host="127.0.0.1", port=server.port, db=db)
            dumps.append({k: client.hgetall(k) for k in client.keys("*")})
        assert dumps[0] == dumps[1]
        assert len(dumps[0]) == len(users) + len(items)
    finally:
        server.stop()
