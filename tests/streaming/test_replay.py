"""Replay: the right topic, keyed by user, in order, at the asked pace, nothing lost."""
from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
from kafka import KafkaConsumer, TopicPartition

from unirec.cli import main
from unirec.streaming.broker import client_kwargs
from unirec.streaming.config import KafkaTopics
from unirec.streaming.events import decode
from unirec.streaming.replay import PACE_SLACK_S, Pacer, ReplayError, read_lines, replay


def make_stream(n_clicks: int, n_users: int = 7, seed: int = 0) -> list[dict]:
    """A small prepared-style stream: clicks in ts order, some led by a query (same ts)."""
    rng = random.Random(seed)
    out, ts = [], 880_000_000
    for i in range(1, n_clicks + 1):
        ts += rng.choice([0, 1, 5, 60])
        user = str(rng.randrange(n_users))
        click = {"schema": "click/v1", "event_id": f"c-{i}", "user_id": user, "item_id": str(rng.randrange(50)),
                 "ts": ts, "label": rng.randrange(2), "rating": 3, "surface": "rec", "query_id": None,
                 "position": None}  # fmt: skip
        if rng.random() < 0.3:
            q = f"q-{i}"
            out.append({"schema": "query/v1", "event_id": q, "user_id": user, "query_id": q, "text": "toy story",
                        "ts": ts})  # fmt: skip
            click.update(surface="search", query_id=q)
        out.append(click)
    return out


class FakeFuture:
    def add_errback(self, fn):
        return self


class FailingFuture:
    def add_errback(self, fn):
        fn(RuntimeError("not leader"))
        return self


class FakeProducer:
    def __init__(self, future=FakeFuture):
        self.sent, self.flushes, self.future = [], 0, future

    def send(self, topic, key=None, value=None):
        self.sent.append((topic, key, value))
        return self.future()

    def flush(self):
        self.flushes += 1


class FakeClock:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_routes_by_schema_keys_by_user_and_keeps_order():
    events = make_stream(40)
    producer = FakeProducer()
    stats = replay(events, producer, topics=KafkaTopics(clicks="C", queries="Q"))
    assert producer.flushes == 1
    assert stats.events == len(events) == stats.clicks + stats.queries
    assert [(t, k, json.loads(v)) for t, k, v in producer.sent] == [
        ("C" if e["schema"] == "click/v1" else "Q", e["user_id"].encode(), e) for e in events
    ]


def test_lines_are_published_as_they_are(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in make_stream(10)) + "\n")
    producer = FakeProducer()
    replay(read_lines(path), producer)
    assert [v for _, _, v in producer.sent] == path.read_bytes().split(b"\n")[:-2]


def test_limit_and_start_select_a_slice():
    events = make_stream(30)
    producer = FakeProducer()
    stats = replay(events, producer, start=5, limit=7)
    assert stats.events == 7
    assert [json.loads(v)["event_id"] for _, _, v in producer.sent] == [e["event_id"] for e in events[5:12]]


def test_rate_spaces_sends_evenly():
    clock, producer = FakeClock(), FakeProducer()
    replay(make_stream(50)[:40], producer, rate=10.0, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(3.9)  # event i goes out at i / rate
    assert len(producer.sent) == 40


def test_fast_rates_sleep_in_ticks_and_send_no_event_more_than_the_slack_early():
    clock = FakeClock()
    sent_at = []

    class TimedProducer(FakeProducer):
        def send(self, topic, key=None, value=None):
            sent_at.append(clock.now)
            return super().send(topic, key, value)

    replay(make_stream(300)[:200], TimedProducer(), rate=1000.0, clock=clock, sleep=clock.sleep)
    assert len(sent_at) == 200
    assert all(t >= i / 1000.0 - PACE_SLACK_S - 1e-9 for i, t in enumerate(sent_at))  # never early by more
    assert len(clock.slept) <= 200 * 0.001 / PACE_SLACK_S + 1   # one sleep per slack's worth of events
    assert clock.now == pytest.approx(0.199, abs=PACE_SLACK_S)


def test_speedup_divides_event_time_gaps():
    events = [{"schema": "query/v1", "event_id": f"q{i}", "user_id": "u", "query_id": f"q{i}", "text": "x", "ts": t}
              for i, t in enumerate([100, 100, 160, 130, 400])]  # fmt: skip
    pacer = Pacer(rate=None, speedup=60.0)
    assert [pacer.due(i, e["ts"]) for i, e in enumerate(events)] == [0.0, 0.0, 1.0, 1.0, 5.0]  # never goes back
    both = Pacer(rate=1.0, speedup=60.0)
    assert [both.due(i, e["ts"]) for i, e in enumerate(events)] == [0.0, 1.0, 2.0, 3.0, 5.0]  # the later deadline
    clock = FakeClock()
    replay(events, FakeProducer(), speedup=60.0, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(5.0)


@pytest.mark.parametrize("bad", [{"schema": "click/v9", "user_id": "1", "ts": 1}, {"schema": "click/v1", "ts": 1},
                                 b"not json", [1, 2]])  # fmt: skip
def test_unroutable_events_raise(bad):
    with pytest.raises(ReplayError, match="cannot route"):
        replay([bad], FakeProducer())


def test_a_failed_send_fails_the_replay():
    with pytest.raises(ReplayError, match="3 of 3 sends failed"):
        replay(make_stream(3)[:3], FakeProducer(future=FailingFuture))


def read_all(cfg, topic: str, expected: int) -> list:
    consumer = KafkaConsumer(**client_kwargs(cfg), enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    records = []
    for _ in range(100):
        for batch in consumer.poll(timeout_ms=200).values():
            records += batch
        if len(records) >= expected:
            break
    consumer.close()
    return records


@pytest.mark.integration
def test_replay_into_the_real_broker_loses_nothing_and_keeps_per_user_order(kafka_cfg):
    events = make_stream(300, n_users=11)
    stats = replay(events, kafka_cfg)
    assert (stats.events, stats.clicks + stats.queries) == (len(events), len(events))
    by_topic = {"click": kafka_cfg.topics.clicks, "query": kafka_cfg.topics.queries}
    for kind, topic in by_topic.items():
        sent = [e for e in events if e["schema"] == f"{kind}/v1"]
        records = read_all(kafka_cfg, topic, len(sent))
        assert len(records) == len(sent)
        got = defaultdict(list)
        for r in records:
            event = decode(r.value, kind, now_s=2e9)  # each record is a valid event of its topic's kind
            assert r.key.decode() == event.user_id
            got[event.user_id].append(event.event_id)
        want = defaultdict(list)
        for e in sent:
            want[e["user_id"]].append(e["event_id"])
        assert got == want  # same events, and each user's in source order


@pytest.mark.integration
def test_cli_replay_publishes_a_file(kafka_cfg, tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    events = make_stream(25)
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    t = kafka_cfg.topics
    (tmp_path / "p.yaml").write_text(
        f"kafka:\n  bootstrap_servers: {kafka_cfg.bootstrap_servers}\n"
        f"  topics: {{clicks: {t.clicks}, queries: {t.queries}, dead_letter: {t.dead_letter}}}\n"
    )
    argv = ["-c", str(tmp_path / "p.yaml"), "replay", "--events", str(path), "--from", "3", "--limit", "12"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "replayed 12 events" in captured.out and "events/s" in captured.out
    assert "replay" in captured.err  # the progress bar
    want = events[3:15]
    n_clicks = sum(e["schema"] == "click/v1" for e in want)
    assert len(read_all(kafka_cfg, t.clicks, n_clicks)) == n_clicks
    assert len(read_all(kafka_cfg, t.queries, 12 - n_clicks)) == 12 - n_clicks


def test_cli_replay_without_a_stream_says_what_to_do(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(f"data:\n  cache_dir: {tmp_path / 'nothing'}\n")
    assert main(["-c", str(tmp_path / "p.yaml"), "replay"]) == 2
    assert "unirec data prepare" in capsys.readouterr().err
