"""Wire bytes of the Feast `ValueProto`s this repo writes, built without protobuf objects.

The embedded SQLite online store keeps every feature value as the bytes of its
`feast.types.Value` message. Building a Value per feature (11 per user row) and then
serializing it costs ~4-5 us each through upb, most of the push process's Python
time; the few message shapes user_sequence uses are simple enough to write directly:

    Value { string_list_val = 12: StringList { repeated string val = 1 } }   tag 0x62
    Value { int64_list_val  = 14: Int64List  { repeated int64  val = 1 } }   tag 0x72 (packed)
    Value { int64_val       = 4 }                                            tag 0x20
    Value { double_val      = 5 }                                            tag 0x29 (8 bytes LE)

Proto3 writes a set oneof member even when it is empty or zero, so an empty list is
`tag, 0` and `int64_val = 0` is `0x20, 0`; a packed repeated field with no elements
is left out; negative int64s are 10-byte two's-complement varints. tests/features/
test_proto_bytes.py checks every function against `Value(...).SerializeToString()`.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable

_SMALL = [bytes((i,)) for i in range(128)]


def varint(x: int) -> bytes:
    """Protobuf varint of an int64 (negative values as their 64-bit two's complement)."""
    if 0 <= x < 128:
        return _SMALL[x]
    if 1 << 28 <= x < 1 << 35:  # epoch seconds: one bytes() call instead of a loop
        return bytes(((x & 127) | 128, (x >> 7 & 127) | 128, (x >> 14 & 127) | 128, (x >> 21 & 127) | 128, x >> 28))
    if x < 0:
        x += 1 << 64
    out = bytearray()
    while x >= 128:
        out.append((x & 127) | 128)
        x >>= 7
    out.append(x)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else varint(n)) + payload


# Element bytes of strings seen before: user_sequence's lists repeat a small vocabulary
# (item ids, the two surfaces, "" for a click without a query), so most elements are a
# dict hit instead of encode + length prefix + concatenation (push process: string_list
# was ~17% of its CPU; a 50-item list 15.7 -> 6.3 us). Bounded, and full means no more
# entries rather than cleared: query ids are mostly unique, and clearing on every 200k
# of them made a list of item ids and query ids slower than no cache (15.0 -> 16.0 us).
_ELEMENTS: dict[str, bytes] = {}
_ELEMENTS_MAX = 200_000


def _element(s: str) -> bytes:
    b = s.encode("utf-8")
    n = len(b)
    e = b"\n" + (_SMALL[n] if n < 128 else varint(n)) + b
    if len(_ELEMENTS) < _ELEMENTS_MAX:
        _ELEMENTS[s] = e
    return e


def string_list(values: Iterable[str]) -> bytes:
    """`Value(string_list_val=StringList(val=values)).SerializeToString()`."""
    get = _ELEMENTS.get
    return _field(b"b", b"".join([get(s) or _element(s) for s in values]))


def int64_list(values: Iterable[int]) -> bytes:
    """`Value(int64_list_val=Int64List(val=values)).SerializeToString()`."""
    small = _SMALL
    packed = b"".join([small[x] if 0 <= x < 128 else varint(x) for x in values])
    return _field(b"r", _field(b"\n", packed) if packed else b"")


def int64(x: int) -> bytes:
    """`Value(int64_val=x).SerializeToString()`."""
    return b" " + varint(x)


_DOUBLE = struct.Struct("<d").pack


def double(x: float) -> bytes:
    """`Value(double_val=x).SerializeToString()`."""
    return b")" + _DOUBLE(x)
