"""The micro-batch driver against the real embedded broker and a real Feast (SQLite) store."""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from unirec.features.config import FeaturesConfig
from unirec.features.state import StateStore
from unirec.streaming.broker import client_kwargs
from unirec.streaming.config import StreamingConfig
from unirec.streaming.driver import Driver
from unirec.streaming.kafka_source import (POOL, PartitionReader, ReadRange, new_reader, read_pooled, read_range,
                                          reader_config, tail_timestamps)
from unirec.streaming.microbatch import run_beam, run_in_process
from unirec.streaming.replay import replay
from unirec.streaming.synthetic import compare, expected, source_stream

pytestmark = pytest.mark.integration
EVENTS = Path(__file__).resolve().parents[2] / ".cache/unirec/ml-100k/events.jsonl"


@pytest.fixture
def features_cfg(tmp_path) -> FeaturesConfig:
    return FeaturesConfig(repo_dir=str(tmp_path / "feast"), state_path=str(tmp_path / "state.sqlite"))


@pytest.fixture
def streaming_cfg(tmp_path) -> StreamingConfig:
    return StreamingConfig(group_id=f"g-{tmp_path.name}", max_batch_events=800, work_dir=str(tmp_path / "work"),
                           recheck_s=0.5)


def end_offsets(kafka_cfg) -> dict:
    c = KafkaConsumer(**client_kwargs(kafka_cfg))
    try:
        tps = [TopicPartition(t, p) for t in (kafka_cfg.topics.clicks, kafka_cfg.topics.queries)
               for p in c.partitions_for_topic(t)]
        return {(tp.topic, tp.partition): o for tp, o in c.end_offsets(tps).items()}
    finally:
        c.close()


def test_driver_applies_the_stream_in_batches_and_commits_offsets(kafka_cfg, features_cfg, streaming_cfg):
    lines = source_stream(EVENTS, 3000)
    replay(lines, kafka_cfg)
    reports = []
    readers = reader_config(client_kwargs(kafka_cfg), streaming_cfg.idle_poll_ms)
    with Driver(kafka_cfg, streaming_cfg, features_cfg, on_batch=reports.append) as d:
        d.run(once=True)
        result = compare(d.online, expected(lines, features_cfg))
        committed = {tp: d.consumer.committed(TopicPartition(*tp)) for tp in d.positions}
        pooled = POOL.idle_count(readers)
    # the Beam runs' reader consumers wait in the pool between batches, and close with the driver
    assert pooled >= 1 and POOL.idle_count(readers) == 0
    assert len(reports) >= 3 and sum(r.records for r in reports) == len(lines)
    assert all(r.path == "beam" for r in reports)
    assert result.identical, result
    ends = end_offsets(kafka_cfg)
    with StateStore(features_cfg.state_path) as store:
        assert store.offsets() == ends
        assert store.counts()["outbox"] == 0
    assert committed == ends


def test_kafka_offsets_are_committed_at_most_every_interval_and_on_exit(kafka_cfg, features_cfg, streaming_cfg):
    lines = source_stream(EVENTS, 3000)
    replay(lines, kafka_cfg)
    cfg = dataclasses.replace(streaming_cfg, kafka_commit_interval_s=3600.0)
    seen = []   # the group's committed offsets as each batch is reported
    probe = KafkaConsumer(**client_kwargs(kafka_cfg), group_id=cfg.group_id, enable_auto_commit=False)
    try:
        def on_batch(report):
            seen.append({tp: probe.committed(TopicPartition(*tp)) for tp in d.positions})
        with Driver(kafka_cfg, cfg, features_cfg, on_batch=on_batch) as d:
            d.run(once=True)
            commits = d.totals["kafka_commits"]
        final = {tp: probe.committed(TopicPartition(*tp)) for tp in seen[0]}
    finally:
        probe.close()
    assert len(seen) >= 3
    assert all(s == seen[0] for s in seen) and seen[0] != final   # the first batch's, until the exit
    assert commits == 2 and final == end_offsets(kafka_cfg)


def test_an_idle_driver_commits_what_it_pushed_once_the_interval_passes(kafka_cfg, features_cfg, streaming_cfg):
    lines = source_stream(EVENTS, 1500)
    replay(lines, kafka_cfg)
    cfg = dataclasses.replace(streaming_cfg, kafka_commit_interval_s=1.0)
    probe = KafkaConsumer(**client_kwargs(kafka_cfg), group_id=cfg.group_id, enable_auto_commit=False)
    ends = end_offsets(kafka_cfg)
    with Driver(kafka_cfg, cfg, features_cfg) as d:
        runner = threading.Thread(target=d.run, daemon=True)
        runner.start()
        try:
            deadline = time.monotonic() + 60
            committed = {}
            while time.monotonic() < deadline:   # still running, nothing new to read
                committed = {tp: probe.committed(TopicPartition(*tp)) for tp in ends}
                if committed == ends:
                    break
                time.sleep(0.5)
            records = d.totals["records"]
        finally:
            d.stop()
            runner.join()
            probe.close()
    assert records == len(lines)
    assert committed == ends


def test_a_restarted_driver_resumes_where_the_store_stands(kafka_cfg, features_cfg, streaming_cfg):
    lines = source_stream(EVENTS, 2400)
    replay(lines[:1500], kafka_cfg)
    with Driver(kafka_cfg, streaming_cfg, features_cfg) as d:
        assert d.run(max_batches=1) == 1
        first = d.totals["records"]
    replay(lines[1500:], kafka_cfg)
    with Driver(kafka_cfg, streaming_cfg, features_cfg) as d:
        d.run(once=True)
        second = d.totals["records"]
        result = compare(d.online, expected(lines, features_cfg))
    assert 0 < first < len(lines) and first + second == len(lines)  # nothing read twice, nothing skipped
    assert result.identical, result


class FailingPush:
    """The real online store, except that push_users raises from the n-th call on (it went away)."""

    def __init__(self, real, fail_on: int):
        self.real, self.fail_on, self.calls = real, fail_on, 0

    def push_users(self, states):
        self.calls += 1
        if self.calls >= self.fail_on:
            raise ConnectionError("online store went away")
        return self.real.push_users(states)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_crash_between_state_commit_and_push_is_repaired_on_restart(kafka_cfg, features_cfg, streaming_cfg):
    from unirec.features.online import OnlineStore

    lines = source_stream(EVENTS, 2000)
    replay(lines, kafka_cfg)
    real = OnlineStore(features_cfg)
    real.apply()
    with pytest.raises(ConnectionError):
        with Driver(kafka_cfg, streaming_cfg, features_cfg, online=FailingPush(real, 2)) as d:
            d.run(once=True)
    with StateStore(features_cfg.state_path) as store:
        assert store.counts()["outbox"] > 0  # committed, not pushed
    with Driver(kafka_cfg, streaming_cfg, features_cfg) as d:
        d.run(once=True)
        result = compare(d.online, expected(lines, features_cfg))
    assert result.identical, result


def test_beam_and_in_process_runs_give_the_same_outputs(kafka_cfg, features_cfg, streaming_cfg):
    lines = source_stream(EVENTS, 1200)
    replay(lines, kafka_cfg)
    with Driver(kafka_cfg, streaming_cfg, features_cfg, online=object()) as d:
        ranges = [r._replace(max_records=400) for r in d.plan(full=True)]
        beam_out = run_beam(ranges, d.spec, work_dir=streaming_cfg.work_dir)
        local_out = run_in_process(ranges, d.spec, d.store)
    assert beam_out.records == local_out.records > 0
    assert beam_out.offsets == local_out.offsets
    key = lambda s: s.user_id  # noqa: E731
    assert sorted(beam_out.users, key=key) == sorted(local_out.users, key=key)
    assert sorted(beam_out.items, key=lambda s: s.item_id) == sorted(local_out.items, key=lambda s: s.item_id)


@pytest.mark.parametrize("mode", ["one_shot", "partition_reader"])
def test_read_range_stops_at_each_bound_and_resumes_without_gap(own_kafka_cfg, mode):
    """The same reads give the same records whether each one assigns and seeks afresh
    (`read_range`) or one `PartitionReader` continues from where the last stopped,
    holding the record that showed a bound for the next read."""
    kafka_cfg = own_kafka_cfg   # its reads are timed (10 s at most): not on the shared broker (conftest)
    producer = KafkaProducer(**client_kwargs(kafka_cfg))
    topic = kafka_cfg.topics.clicks
    for i in range(30):
        producer.send(topic, key=b"k", value=b"x" * 10, partition=0, timestamp_ms=1_000_000 + i)
    producer.flush()
    producer.close()
    consumer = new_reader(reader_config(client_kwargs(kafka_cfg), 50))
    reader = PartitionReader(consumer, topic, 0)
    read = (lambda rng: read_range(consumer, rng)) if mode == "one_shot" else reader.read
    try:
        base = ReadRange(topic, 0, 0, 12, 1 << 20, 10.0, 50, 30)
        first = read(base)
        assert (len(first.records), first.next_offset, first.stop) == (12, 12, "max_records")
        by_bytes = read(base._replace(start=12, max_records=100, max_bytes=5 * 11))
        assert (by_bytes.next_offset, by_bytes.stop) == (17, "max_bytes")
        cut = read(base._replace(start=17, max_records=100, until_ms=1_000_000 + 24))
        assert (cut.next_offset, cut.stop) == (25, "time_cut")
        rest = read(base._replace(start=25, max_records=100))
        assert (rest.next_offset, rest.stop) == (30, "idle")
        offsets = [r[2] for part in (first, by_bytes, cut, rest) for r in part.records]
        assert offsets == list(range(30))
        # an over-reported end offset costs at most max_wait_s, never a record
        t0 = time.monotonic()
        empty = read(base._replace(start=30, end_hint=40, max_wait_s=0.5))
        assert (empty.records, empty.next_offset, empty.stop) == ([], 30, "max_wait")
        assert time.monotonic() - t0 < 5
        if mode == "partition_reader":
            assert reader.seeks == 1       # every read after the first continued where the last stopped
            # a read elsewhere (a retried batch, a restart) seeks and drops what was held
            again = reader.read(base._replace(start=20, max_records=3, until_ms=1_000_000 + 21))
            assert ([r[2] for r in again.records], again.stop, reader.seeks) == ([20, 21], "time_cut", 2)
            back = reader.read(base._replace(start=5, max_records=4))
            assert ([r[2] for r in back.records], reader.seeks) == ([5, 6, 7, 8], 3)
            assert [r[2] for r in reader.read(base._replace(start=9, max_records=2)).records] == [9, 10]
            assert reader.seeks == 3
    finally:
        consumer.close()


def test_pooled_readers_are_one_per_partition_and_kept_between_reads(own_kafka_cfg):
    kafka_cfg = own_kafka_cfg
    producer = KafkaProducer(**client_kwargs(kafka_cfg))
    topic = kafka_cfg.topics.clicks
    for i in range(20):
        producer.send(topic, value=b"%d" % i, partition=i % 2, timestamp_ms=1_000_000 + i)
    producer.flush()
    producer.close()
    config = reader_config(client_kwargs(kafka_cfg), 50)
    try:
        got: dict[int, list[int]] = {0: [], 1: []}
        for start in (0, 4):
            for p in (0, 1):
                res = read_pooled(config, ReadRange(topic, p, start, 4, 1 << 20, 10.0, 50, 10))
                got[p] += [r[2] for r in res.records]
        assert got == {0: list(range(8)), 1: list(range(8))}
        assert POOL.idle_count(config) == 2
        # the second round continued each partition's reader: no seek beyond the first
        kept = [POOL.acquire(config, topic, p) for p in (0, 1)]
        assert [r.seeks for r in kept] == [1, 1]
        for r in kept:
            POOL.release(config, r)
    finally:
        assert POOL.close_idle(config) == 2
    assert POOL.idle_count(config) == 0


def test_batches_stay_within_budget_and_cover_the_same_arrival_time(kafka_cfg, features_cfg, streaming_cfg):
    """Under backlog every batch reads each partition exactly up to one arrival-time cut:
    no partition stops short of it (that would let the other topic's events of the same
    users run ahead and turn these late), and the batches stay near the budget."""
    lines = source_stream(EVENTS, 6000)
    replay(lines[:3000], kafka_cfg, rate=3000)  # a backlog spread over ~1 s of arrival time
    cfg = dataclasses.replace(streaming_cfg, max_batch_events=500)
    runs = []
    with Driver(kafka_cfg, cfg, features_cfg, online=_NullOnline()) as d:
        execute = d.execute
        d.execute = lambda ranges: runs.append((ranges, execute(ranges))) or runs[-1][1]
        reports = []
        d.on_batch = reports.append
        d.run(once=True)
        assert sum(r.records for r in reports) == 3000
        assert len(reports) >= 6 and max(r.records for r in reports) <= 500 * 1.2
        live = threading.Thread(target=replay, args=(lines[3000:], kafka_cfg), kwargs={"rate": 1500})
        live.start()   # records arriving while the driver reads: the cut must wait for them
        while live.is_alive():
            d.run(once=True)
        d.run(once=True)
    assert sum(r.records for r in reports) == len(lines)
    stamps = record_timestamps(kafka_cfg)
    for ranges, out in runs:
        assert len({r.until_ms for r in ranges}) == 1
        cut = ranges[0].until_ms
        for topic, partition, _start, nxt, *_ in out.progress:
            # the first record left unread on every partition lies after the cut (or there is none)
            assert stamps[(topic, partition)].get(nxt, cut + 1) > cut


def test_a_pause_in_the_backlog_costs_at_most_one_empty_batch(kafka_cfg, features_cfg, streaming_cfg):
    """Under backlog the cut is interpolated as if records were spread evenly in time; a
    long pause of the producers breaks that guess. The batch that lands in the pause
    reads nothing, and the next one searches the broker's time index instead of
    creeping through the pause one empty batch at a time."""
    cfg = dataclasses.replace(streaming_cfg, max_batch_events=300)
    t0 = int(time.time() * 1000) - 200_000
    with Driver(kafka_cfg, cfg, features_cfg, online=_NullOnline()) as d:
        bursts = [t0 + i for i in range(150)] + [t0 + 150_000 + i for i in range(150)]   # a 150 s pause
        send_stamped(kafka_cfg, {tp: bursts for tp in sorted(d.positions)})
        sizes = []
        execute = d.execute
        d.execute = lambda ranges: sizes.append(execute(ranges)) or sizes[-1]
        d.run(once=True)
    assert sum(out.records for out in sizes) == 300 * len(d.positions)
    # (the last batch of a `once` run finds nothing new: that is how it knows it is done)
    assert sum(out.records == 0 for out in sizes[:-1]) <= 1


def record_timestamps(kafka_cfg) -> dict:
    """{(topic, partition): {offset: Kafka timestamp}} of every record in both topics."""
    ends = end_offsets(kafka_cfg)
    c = KafkaConsumer(**reader_config(client_kwargs(kafka_cfg), 50))
    out: dict = {tp: {} for tp in ends}
    try:
        c.assign([TopicPartition(*tp) for tp in ends])
        c.seek_to_beginning()
        while sum(len(v) for v in out.values()) < sum(ends.values()):
            for tp, records in c.poll(timeout_ms=1000).items():
                out[(tp.topic, tp.partition)].update((r.offset, r.timestamp) for r in records)
    finally:
        c.close()
    return out


def send_stamped(kafka_cfg, stamps: dict) -> None:
    """Records with the given Kafka timestamps: {(topic, partition): [ts_ms, ...]}."""
    p = KafkaProducer(**client_kwargs(kafka_cfg))
    for (topic, partition), ts in stamps.items():
        for t in ts:
            p.send(topic, value=b"{}", partition=partition, timestamp_ms=t)
    p.flush()
    p.close()


def test_tail_timestamps_are_the_newest_record_of_each_partition(own_kafka_cfg):
    kafka_cfg = own_kafka_cfg   # tail_timestamps waits 200 ms: not on the shared broker (conftest)
    now = int(time.time() * 1000)
    clicks = kafka_cfg.topics.clicks
    # partition 2 gets its records out of timestamp order: the tail is the last record, not the max
    send_stamped(kafka_cfg, {(clicks, 0): [now - 9000, now - 8000], (clicks, 1): [now - 7000],
                             (clicks, 2): [now - 1000, now - 6000]})
    ends = end_offsets(kafka_cfg)
    c = KafkaConsumer(**reader_config(client_kwargs(kafka_cfg), 20))
    try:
        tails = tail_timestamps(c, ends)
    finally:
        c.close()
    # the queries topic is empty: no tail; every clicks partition: its last record's stamp
    assert tails == {(clicks, 0): now - 8000, (clicks, 1): now - 7000, (clicks, 2): now - 6000}


def test_the_batch_cut_follows_the_oldest_partition_tail_unless_a_partition_is_quiet(
        kafka_cfg, features_cfg, streaming_cfg):
    """Every partition has unread records: nothing stamped before its newest record can still
    be in flight to it, so the cut is the oldest tail, far newer than now - grace. A partition
    with nothing unread may have a record in flight: the cut falls back to now - grace."""
    cfg = dataclasses.replace(streaming_cfg, arrival_grace_ms=60_000)
    with Driver(kafka_cfg, cfg, features_cfg, online=_NullOnline()) as d:
        now = int(time.time() * 1000)
        stamps = {tp: [now - 5000 + 100 * i, now - 4000 + 100 * i] for i, tp in enumerate(sorted(d.positions))}
        send_stamped(kafka_cfg, stamps)
        ends = end_offsets(kafka_cfg)
        lags = {tp: ends[tp] - pos for tp, pos in d.positions.items()}
        assert all(lag == 2 for lag in lags.values())
        assert d.planner.arrival_cut(ends, lags) == now - 4000          # the oldest tail
        quiet = {**lags, sorted(lags)[-1]: 0}
        before = int(time.time() * 1000)
        assert before - 60_000 <= d.planner.arrival_cut(ends, quiet) <= int(time.time() * 1000) - 60_000
        ranges = d.plan(full=False)
        assert {r.until_ms for r in ranges} == {now - 4000}    # the plan reads every partition up to that cut


class _NullOnline:
    def push_users(self, states):
        return len(states)

    def push_items(self, stats):
        return len(stats)


def test_records_younger_than_the_arrival_grace_wait_for_a_later_batch(kafka_cfg, features_cfg, streaming_cfg):
    """A record may reach the broker after later-stamped records of another partition; the
    batch cut lags by `arrival_grace_ms` so such a record is not overtaken, and `once`
    still waits for it instead of stopping with it unread."""
    lines = source_stream(EVENTS, 200)
    cfg = dataclasses.replace(streaming_cfg, arrival_grace_ms=3000)
    with Driver(kafka_cfg, cfg, features_cfg) as d:
        replay(lines, kafka_cfg)   # after opening: opening alone may take longer than the grace
        assert d.plan(full=True) and d.run_batch(full=True) == 0       # everything is younger than 3 s
        d.run(once=True)
        assert d.totals["records"] == len(lines)
        assert compare(d.online, expected(lines, features_cfg)).identical
