"""Bad input never crashes the pipeline and is never silently dropped: every bad record
lands in the dead-letter topic with its reason; the valid events around it are applied."""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from unirec.features.config import FeaturesConfig
from unirec.streaming.broker import client_kwargs
from unirec.streaming.config import StreamingConfig
from unirec.streaming.driver import Driver
from unirec.streaming.events import DecodeError, decode
from unirec.streaming.synthetic import compare, expected, source_stream

pytestmark = pytest.mark.integration
EVENTS = Path(__file__).resolve().parents[2] / ".cache/unirec/ml-100k/events.jsonl"
CLICK = {"schema": "click/v1", "event_id": "c-x", "user_id": "u-bad", "item_id": "i-1", "ts": 880000000,
         "label": 1, "rating": 4, "surface": "rec", "query_id": None, "position": None}
REQUIRED = {"event_id": str, "user_id": str, "item_id": str, "ts": int, "label": int, "surface": str}


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()


def hand_made(valid: list[bytes]) -> list[tuple[str, bytes, str]]:
    """(kind, payload, expected reason) for each kind of bad input named in the issue."""
    now = int(time.time())
    first = json.loads(valid[0])
    return [
        ("click", b'{"schema": "click/v1", "event_id": ', "malformed_json"),
        ("click", dumps({**CLICK, "ts": "880000000"}), "wrong_type"),
        ("click", dumps({**CLICK, "label": True}), "wrong_type"),
        ("click", dumps({k: v for k, v in CLICK.items() if k != "item_id"}), "missing_field"),
        ("query", dumps({"schema": "query/v1", "event_id": "q-x", "user_id": "u", "query_id": "q-x", "ts": 1}),
         "missing_field"),
        ("click", dumps({**CLICK, "surface": "email"}), "unknown_surface"),
        ("click", dumps({**CLICK, "ts": -5}), "bad_timestamp"),
        ("click", dumps({**CLICK, "ts": now + 10 * 86400}), "bad_timestamp"),
        ("click", dumps({**CLICK, "query_id": "q" * 70000}), "oversize"),
        ("click", b'{"schema": "click/v1", "event_id": "\xff\xfe"}', "invalid_utf8"),
        ("click", b"\xc3\x28 not utf-8", "invalid_utf8"),
        ("click", dumps({**CLICK, "schema": "click/v9"}), "unknown_schema"),
        ("query", dumps(CLICK), "unknown_schema"),  # a click on the queries topic
        # the same event again, and another event reusing its id: duplicates
        ("click" if first["schema"] == "click/v1" else "query", valid[0], "duplicate"),
        ("click", dumps({**CLICK, "event_id": first["event_id"], "user_id": first["user_id"],
                         "ts": first["ts"]}), "duplicate"),
        # far older than the user's watermark: late
        ("click", dumps({**CLICK, "event_id": "c-late", "user_id": first["user_id"], "ts": first["ts"] - 10**7}),
         "late"),
    ]


_json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=5)


def _wrong_type(tp):
    other = st.booleans() | st.floats(allow_nan=False) | st.lists(st.integers(), max_size=2) | st.dictionaries(
        st.text(), st.integers(), max_size=2)
    return other | (st.integers() if tp is str else st.text())


def _mutated_click():
    broken_field = st.sampled_from(sorted(REQUIRED)).flatmap(
        lambda f: st.tuples(st.just(f), _wrong_type(REQUIRED[f]) | st.just("<drop>")))
    return broken_field.map(lambda fv: dumps(
        {k: v for k, v in {**CLICK, fv[0]: fv[1]}.items() if v != "<drop>"}))


bad_records = st.one_of(
    st.binary(max_size=300).map(lambda b: b"\xff" + b),                  # not UTF-8
    st.text(max_size=200).filter(lambda t: not t.lstrip().startswith("{")).map(str.encode),  # not an object
    st.dictionaries(st.text(max_size=10), _json_value, max_size=6).map(dumps),  # no known schema
    _mutated_click(),
    st.text(min_size=1, max_size=20).filter(lambda s: s not in ("rec", "search")).map(
        lambda s: dumps({**CLICK, "surface": s})),
    st.integers(max_value=-1).map(lambda ts: dumps({**CLICK, "ts": ts})),
)


def generated_bad_records(n_batches: int = 25, size: int = 50) -> list[bytes]:
    out: list[bytes] = []

    @settings(max_examples=n_batches, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(bad_records, min_size=size, max_size=size))
    def collect(records):
        out.extend(records)

    collect()
    return out


def stream_item(raw: bytes) -> tuple[str, bytes]:
    return json.loads(raw)["schema"].split("/")[0], raw


def key_of(raw: bytes) -> bytes:
    """Kafka key: the user id when there is one (as a producer would), else a fixed key."""
    try:
        return str(json.loads(raw)["user_id"]).encode()
    except (ValueError, KeyError, TypeError):
        return b"unknown"


def oracle(kind: str, raw: bytes) -> str | None:
    try:
        decode(raw, kind, now_s=time.time())
    except DecodeError as e:
        return e.reason
    return None


def test_bad_records_become_dead_letters_and_valid_events_around_them_are_applied(kafka_cfg, tmp_path,
                                                                                  read_dead_letters):
    valid = source_stream(EVENTS, 2000)
    made = hand_made(valid)
    generated = [("click" if i % 3 else "query", raw) for i, raw in enumerate(generated_bad_records())]
    assert len(generated) >= 1000
    want = Counter((raw, reason) for _, raw, reason in made)
    for kind, raw in generated:
        reason = oracle(kind, raw)
        assert reason is not None, raw  # the strategy only makes bad records
        want[(raw, reason)] += 1

    # Valid events in order; the bad ones scattered between them; the duplicates right
    # after the event they repeat (within the allowed lateness), the late one at the end.
    rng = random.Random(3)
    stream = [stream_item(v) for v in valid]
    for kind, raw in [(k, r) for k, r, _ in made[:-3]] + generated:
        stream.insert(rng.randrange(len(stream) + 1), (kind, raw))
    at = stream.index(stream_item(valid[0])) + 1
    stream[at:at] = [(k, r) for k, r, _ in made[-3:-1]]
    stream.append(made[-1][:2])
    producer = KafkaProducer(**client_kwargs(kafka_cfg), linger_ms=5, max_request_size=1 << 20)
    topic = {"click": kafka_cfg.topics.clicks, "query": kafka_cfg.topics.queries}
    half = len(stream) // 2
    for kind, raw in stream[:half]:
        producer.send(topic[kind], key=key_of(raw), value=raw)
    producer.flush()

    features_cfg = FeaturesConfig(repo_dir=str(tmp_path / "feast"), state_path=str(tmp_path / "state.sqlite"))
    streaming_cfg = StreamingConfig(group_id=f"bad-{tmp_path.name}", max_batch_events=1500,
                                    work_dir=str(tmp_path / "work"))
    with Driver(kafka_cfg, streaming_cfg, features_cfg) as d:
        d.run(once=True)  # returns normally: bad input does not stop the pipeline
        for kind, raw in stream[half:]:
            producer.send(topic[kind], key=key_of(raw), value=raw)
        producer.flush()
        d.run(once=True)
        totals = dict(d.totals)
        keep = set(valid) | {raw for _, raw, reason in made if reason in ("duplicate", "late")}
        result = compare(d.online, expected([raw for _, raw in stream if raw in keep], features_cfg))
    producer.close()

    letters = read_dead_letters(kafka_cfg)
    got = Counter((d.original, d.reason) for d in letters)
    assert sum(got.values()) == sum(want.values()) == len(made) + len(generated)
    assert got == want
    assert all(d.source_topic in topic.values() and d.offset >= 0 for d in letters)
    per_reason = Counter(d.reason for d in letters)
    assert {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("dead_letter.")} == per_reason
    assert totals["records"] == len(stream)
    assert result.users >= 10 and result.items >= 100 and result.identical, (result.mismatched_users[:3], result.mismatched_items[:3])
