"""features/proto_bytes.py: the Value bytes it writes are the ones protobuf serializes."""
from __future__ import annotations

import pytest
from feast.protos.feast.types.Value_pb2 import Value  # at import: the first import of Feast takes seconds
from hypothesis import given
from hypothesis import strategies as st

from unirec.features import proto_bytes

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def value(**kw) -> bytes:
    return Value(**kw).SerializeToString()


@given(st.lists(st.text(max_size=300), max_size=40))
def test_string_list_matches_protobuf(values):
    assert proto_bytes.string_list(values) == value(string_list_val={"val": values})


@given(st.lists(INT64, max_size=60))
def test_int64_list_matches_protobuf(values):
    assert proto_bytes.int64_list(values) == value(int64_list_val={"val": values})


@given(INT64)
def test_int64_matches_protobuf(x):
    assert proto_bytes.int64(x) == value(int64_val=x)


@given(st.floats(allow_nan=False))
def test_double_matches_protobuf(x):
    assert proto_bytes.double(x) == value(double_val=x)


@pytest.mark.parametrize("x", [127, 128, 2**28 - 1, 2**28, 1_700_000_000, 2**35 - 1, 2**35, -1, -(2**63)])
def test_varint_boundaries_match_protobuf(x):
    assert proto_bytes.int64(x) == value(int64_val=x)
    assert proto_bytes.int64_list([x, 0, x]) == value(int64_list_val={"val": [x, 0, x]})


def test_empty_and_zero_values_are_still_set():
    # a set oneof member is written even when empty / zero: Feast reads it back as [] / 0, not None
    assert proto_bytes.string_list([]) == value(string_list_val={}) == b"b\x00"
    assert proto_bytes.int64_list([]) == value(int64_list_val={}) == b"r\x00"
    assert proto_bytes.int64(0) == value(int64_val=0) == b" \x00"


@given(st.text(min_size=1, max_size=200))
def test_string_entity_key_matches_feasts_serialization(user_id):
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from unirec.features.online import string_key, string_key_head

    want = serialize_entity_key(EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=user_id)]),
                                entity_key_serialization_version=3)
    assert string_key(string_key_head("user_id", 3), user_id) == want
