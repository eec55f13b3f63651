"""Dead letters keep the original bytes and where they came from, through Kafka and back."""
from __future__ import annotations

import json

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from unirec.streaming.broker import client_kwargs
from unirec.streaming.deadletter import DeadLetter, send_dead_letters
from unirec.streaming.events import DecodeError, decode


def letter(**kw) -> DeadLetter:
    base = dict(reason="wrong_type", field="ts", detail="expected integer, got string", source_topic="clicks",
                partition=2, offset=41, original=b'{"ts": "x"}', key=b"196")  # fmt: skip
    return DeadLetter(**{**base, **kw})


@pytest.mark.parametrize(
    "d",
    [letter(), letter(original=b"\xff\xfe\x00 not utf-8", key=None, field=None), letter(reason="late", original=b"")],
)
def test_round_trip_keeps_original_bytes_exactly(d):
    back = DeadLetter.from_bytes(d.to_bytes())
    assert back == d
    wire = json.loads(d.to_bytes())
    assert wire["schema"] == "dead-letter/v1" and wire["source_topic"] == "clicks" and wire["offset"] == 41


def test_from_error_carries_the_decode_error():
    raw = b'{"schema": "click/v1", "label": true}'
    with pytest.raises(DecodeError) as info:
        decode(raw, "click", now_s=0)
    d = DeadLetter.from_error(info.value, topic="clicks", partition=0, offset=7, value=raw, key=b"u1")
    assert (d.reason, d.field, d.original, d.offset, d.key) == ("missing_field", "event_id", raw, 7, b"u1")
    assert d.ts_ms > 0


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [(b"\xff", "not JSON"), (b"[]", "dead-letter/v1"), (b'{"schema": "dead-letter/v1"}', "lacks key"),
     (letter().to_bytes().replace(b'"original_b64":"', b'"original_b64":"!!'), "bad value")],
)  # fmt: skip
def test_from_bytes_rejects_other_records_with_a_clear_error(raw, complaint):
    with pytest.raises(ValueError, match=complaint):
        DeadLetter.from_bytes(raw)


class FakeFuture:
    def __init__(self, error=None):
        self.error = error

    def get(self, timeout=None):
        if self.error:
            raise self.error
        return None


class FakeProducer:
    def __init__(self, fail_at=None):
        self.sent, self.flushes, self.fail_at = [], 0, fail_at

    def send(self, topic, key=None, value=None):
        self.sent.append((topic, key, value))
        return FakeFuture(RuntimeError("broker said no") if len(self.sent) == self.fail_at else None)

    def flush(self):
        self.flushes += 1


def test_send_counts_per_reason_flushes_and_keys_by_source_partition():
    producer = FakeProducer()
    letters = [letter(), letter(reason="late"), letter(partition=0, reason="late")]
    counts = send_dead_letters(producer, "dl", letters)
    assert counts == {"wrong_type": 1, "late": 2}
    assert producer.flushes == 1
    assert [k for _, k, _ in producer.sent] == [b"clicks/2", b"clicks/2", b"clicks/0"]
    assert [DeadLetter.from_bytes(v) for _, _, v in producer.sent] == letters


def test_a_failed_send_is_raised_not_swallowed():
    with pytest.raises(RuntimeError, match="broker said no"):
        send_dead_letters(FakeProducer(fail_at=2), "dl", [letter(), letter(), letter()])


@pytest.mark.integration
def test_dead_letters_through_the_real_broker(kafka_cfg):
    letters = [letter(offset=i, original=bytes([i, 255, i])) for i in range(20)]
    producer = KafkaProducer(**client_kwargs(kafka_cfg))
    try:
        assert send_dead_letters(producer, kafka_cfg.topics.dead_letter, letters) == {"wrong_type": 20}
    finally:
        producer.close()
    consumer = KafkaConsumer(**client_kwargs(kafka_cfg), enable_auto_commit=False)
    tps = [TopicPartition(kafka_cfg.topics.dead_letter, p) for p in range(kafka_cfg.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    got = []
    for _ in range(50):
        for records in consumer.poll(timeout_ms=200).values():
            got += [DeadLetter.from_bytes(r.value) for r in records]
        if len(got) >= len(letters):
            break
    consumer.close()
    assert got == letters  # one source partition -> one dead-letter partition, in order


def test_text_that_cannot_be_utf8_encoded_still_makes_a_dead_letter():
    d = letter(field="\ud800", detail="duplicate key '\\ud800'")
    assert DeadLetter.from_bytes(d.to_bytes()) == d
