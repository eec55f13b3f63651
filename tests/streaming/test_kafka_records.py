"""The fast v2 record decode gives exactly kafka-python's ConsumerRecords (no broker needed)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
from kafka.record.util import calc_crc32c

from unirec.streaming import kafka_records
from unirec.streaming.kafka_records import install, parse_records

TP = TopicPartition("clicks", 2)
_ATTRS = 21   # byte offset of a v2 batch's attributes (the CRC covers everything from here)

maybe_bytes = st.one_of(st.none(), st.binary(max_size=300))
record = st.tuples(st.integers(-2**40, 2**40),            # timestamp delta from the batch base
                   maybe_bytes, maybe_bytes,
                   st.lists(st.tuples(st.text(max_size=8), maybe_bytes), max_size=2),
                   st.integers(0, 3))                    # offsets skipped before it (compaction gaps)
batch = st.tuples(st.lists(record, min_size=1, max_size=30),
                  st.sampled_from([0, 1]),               # compression: none, gzip
                  st.sampled_from([0, 0x08, 0x20]))      # attributes: CreateTime, LogAppendTime, control


def _set_attributes(buf: bytearray, bits: int) -> None:
    attrs = struct.unpack_from(">h", buf, _ATTRS)[0] | bits
    struct.pack_into(">h", buf, _ATTRS, attrs)
    struct.pack_into(">I", buf, 17, calc_crc32c(memoryview(buf)[_ATTRS:]))


def build(batches, base_ts: int = 1_700_000_000_000, start: int = 0) -> bytes:
    out, offset = b"", start
    for records, codec, bits in batches:
        b = MemoryRecordsBuilder(magic=2, compression_type=codec, batch_size=1 << 30, offset=offset)
        for delta, key, value, headers, gap in records:
            b.skip(gap)
            assert b.append(base_ts + delta, key, value, headers) is not None
        b.close()
        buf = bytearray(b.buffer())
        if bits:
            _set_attributes(buf, bits)
        out += bytes(buf)
        offset = b.next_offset()
    return out


def consume(cls, data: bytes, fetch_offset: int = 0):
    pr = cls(fetch_offset, TP, MemoryRecords(data), check_crcs=True)
    return pr.take(), pr.next_fetch_offset


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batch, min_size=1, max_size=4), st.integers(0, 40))
def test_fast_decode_yields_kafka_pythons_records(batches, fetch_offset):
    data = build(batches)
    fast = kafka_records._fast_class()
    assert consume(fast, data, fetch_offset) == consume(Fetcher.PartitionRecords, data, fetch_offset)


def test_typical_records_decode_to_offsets_timestamps_keys_and_values():
    data = build([([(5, b"u1", b'{"a":1}', [], 0), (300, None, b"x" * 200, [("h", b"v")], 2)], 0, 0)], start=10)
    records, next_offset = consume(kafka_records._fast_class(), data)
    assert [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in records] == [
        (10, 1_700_000_000_005, b"u1", b'{"a":1}', []), (13, 1_700_000_000_300, None, b"x" * 200, [("h", b"v")])]
    assert next_offset == 14


def test_a_record_whose_fields_overrun_its_length_is_corrupt():
    data = bytearray(build([([(0, b"k", b"value", [], 0)], 0, 0)]))
    first = _ATTRS + 40   # the record section: its first byte is the record's length varint
    data[first] += 2      # claims one byte more (zigzag)
    with pytest.raises(CorruptRecordError):
        parse_records(bytes(data), first, 1, 0, 0, None)


def test_install_only_where_the_decode_is_exactly_equivalent():
    kw = {"bootstrap_servers": "127.0.0.1:1", "api_version": (2, 8)}
    plain = KafkaConsumer(**kw)
    typed = KafkaConsumer(**kw, value_deserializer=bytes.decode)
    committed = KafkaConsumer(**kw, isolation_level="read_committed")
    try:
        assert install(plain) and plain._fetcher.PartitionRecords is kafka_records._fast_class()
        assert not install(typed) and typed._fetcher.PartitionRecords is Fetcher.PartitionRecords
        assert not install(committed)
    finally:
        for c in (plain, typed, committed):
            c.close()
