"""Event schemas: every bad record gives the right reason and field; valid ones round-trip."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unirec.streaming.config import EventLimits
from unirec.streaming.deadletter import DeadLetter
from unirec.streaming.events import (
    REASONS,
    ClickEvent,
    DecodeError,
    QueryEvent,
    decode,
    encode,
    to_dict,
)

NOW = 900_000_000  # the consumer's clock in these tests (events are from 1997-98)
# Lines exactly as `unirec data prepare` writes them (json.dumps default separators).
CLICK_LINE = (b'{"schema": "click/v1", "event_id": "c-1", "user_id": "196", "item_id": "242", "ts": 881250949, '
              b'"label": 1, "rating": 3, "surface": "rec", "query_id": null, "position": null}')  # fmt: skip
SEARCH_LINE = (b'{"schema": "click/v1", "event_id": "c-2", "user_id": "196", "item_id": "50", "ts": 881250950, '
               b'"label": 0, "rating": 2, "surface": "search", "query_id": "q-1", "position": null}')  # fmt: skip
QUERY_LINE = (b'{"schema": "query/v1", "event_id": "q-1", "user_id": "196", "query_id": "q-1", '
              b'"text": "star wars sci-fi", "ts": 881250950}')  # fmt: skip


def click(**changes) -> bytes:
    obj = {**json.loads(CLICK_LINE), **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def query(**changes) -> bytes:
    obj = {**json.loads(QUERY_LINE), **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def rejected(raw: bytes, kind=None, limits: EventLimits = EventLimits()) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(raw, kind, now_s=NOW, limits=limits)
    return info.value


def test_prepared_stream_lines_are_valid_payloads():
    assert decode(CLICK_LINE, "click", now_s=NOW) == ClickEvent("c-1", "196", "242", 881250949, 1, "rec", rating=3)
    assert decode(SEARCH_LINE, "click", now_s=NOW).query_id == "q-1"
    assert decode(QUERY_LINE, "query", now_s=NOW) == QueryEvent("q-1", "196", "q-1", "star wars sci-fi", 881250950)


@pytest.mark.parametrize("line", [CLICK_LINE, SEARCH_LINE, QUERY_LINE])
def test_encode_round_trips_and_keeps_the_wire_keys(line):
    event = decode(line, now_s=NOW)
    assert decode(encode(event), now_s=NOW) == event
    assert json.loads(encode(event)) == json.loads(line)  # same keys and values as the source line


BAD = [
    (b"\xff\xfe{}", "invalid_utf8", None),
    (b'{"schema": "click/v1", "user_id": "\xc3\x28"}', "invalid_utf8", None),
    (click(user_id="\ud800"), "invalid_utf8", "user_id"),  # lone surrogate: cannot be re-encoded
    (b'{"schema": "click/v1",', "malformed_json", None),
    (b"", "malformed_json", None),
    (CLICK_LINE.replace(b'"label": 1', b'"label": NaN'), "malformed_json", None),
    (CLICK_LINE.replace(b'"rating": 3', b'"rating": 3, "label": 0'), "malformed_json", "label"),  # duplicate key
    (b'{"\\ud800": 1, "\\ud800": 2}', "malformed_json", "\ud800"),  # ... even an unencodable one
    (b"[" * 20_000 + b"]" * 20_000, "malformed_json", None),
    (b"[1, 2]", "wrong_type", None),
    (click(schema=...), "missing_field", "schema"),
    (click(schema="click/v2"), "unknown_schema", "schema"),
    (click(schema=1), "wrong_type", "schema"),
    (click(event_id=...), "missing_field", "event_id"),
    (click(item_id=...), "missing_field", "item_id"),
    (click(ts=...), "missing_field", "ts"),
    (click(label=...), "missing_field", "label"),
    (click(surface=...), "missing_field", "surface"),
    (query(text=...), "missing_field", "text"),
    (query(query_id=...), "missing_field", "query_id"),
    (click(user_id=196), "wrong_type", "user_id"),
    (click(ts="881250949"), "wrong_type", "ts"),
    (click(ts=881250949.0), "wrong_type", "ts"),
    (click(label=True), "wrong_type", "label"),  # bool is not int
    (click(position=False), "wrong_type", "position"),
    (click(rating=[3]), "wrong_type", "rating"),
    (click(surface=None), "wrong_type", "surface"),
    (query(text=None), "wrong_type", "text"),
    (click(surface="email"), "unknown_surface", "surface"),
    (click(surface="REC"), "unknown_surface", "surface"),
    (click(label=2), "bad_value", "label"),
    (click(label=-1), "bad_value", "label"),
    (click(rating=6), "bad_value", "rating"),
    (click(position=-1), "bad_value", "position"),
    (click(position=2**63), "bad_value", "position"),
    (click(user_id=""), "bad_value", "user_id"),
    (click(event_id="   "), "bad_value", "event_id"),
    (query(text=""), "bad_value", "text"),
    (click(surface="search", query_id=None), "bad_value", "query_id"),
    (click(surface="search", query_id=...), "bad_value", "query_id"),
    (click(surface="rec", query_id="q-9"), "bad_value", "query_id"),
    (click(ts=-1), "bad_timestamp", "ts"),
    (query(ts=-5), "bad_timestamp", "ts"),
    (click(ts=NOW + 301), "bad_timestamp", "ts"),
    (click(ts=10**30), "bad_value", "ts"),  # not even an int64
]


@pytest.mark.parametrize(("raw", "reason", "field"), BAD, ids=[f"{r}-{f}-{i}" for i, (_, r, f) in enumerate(BAD)])
def test_bad_records_name_reason_and_field(raw, reason, field):
    err = rejected(raw)
    assert (err.reason, err.field) == (reason, field), err
    assert err.detail


def test_oversize_limit_is_configurable_and_checked_before_parsing():
    limits = EventLimits(max_bytes=len(CLICK_LINE))
    assert decode(CLICK_LINE, now_s=NOW, limits=limits).event_id == "c-1"
    err = rejected(CLICK_LINE + b" ", limits=limits)
    assert (err.reason, err.field) == ("oversize", None)
    assert rejected(b"\xff" * 100, limits=EventLimits(max_bytes=10)).reason == "oversize"


def test_future_skew_limit_is_configurable():
    at_edge = click(ts=NOW + 60)
    assert decode(at_edge, now_s=NOW, limits=EventLimits(max_future_skew_s=60)).ts == NOW + 60
    assert rejected(at_edge, limits=EventLimits(max_future_skew_s=59)).reason == "bad_timestamp"


def test_id_and_text_length_limits():
    limits = EventLimits(max_id_chars=4, max_text_chars=5)
    assert decode(click(user_id="1234"), now_s=NOW, limits=limits).user_id == "1234"
    assert (rejected(click(user_id="12345"), limits=limits).field) == "user_id"
    assert (rejected(query(text="abcdef"), limits=limits).field) == "text"


def test_kind_must_match_the_topic():
    assert rejected(QUERY_LINE, "click").reason == "unknown_schema"
    assert rejected(CLICK_LINE, "query").reason == "unknown_schema"


def test_unknown_keys_are_ignored_so_optional_fields_can_be_added():
    assert decode(click(session_id="s-1"), now_s=NOW) == decode(CLICK_LINE, now_s=NOW)


def test_first_bad_field_in_schema_order_is_named():
    err = rejected(click(user_id=1, label="x", surface="tv"))
    assert err.field == "user_id"


# ----------------------------------------------------------------------------- properties

CLICK_FIELDS = json.loads(CLICK_LINE)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _mutated(obj: dict, key: str, value, delete: bool) -> bytes:
    obj = dict(obj)
    if delete:
        obj.pop(key, None)
    else:
        obj[key] = value
    return json.dumps(obj).encode()


records = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(_mutated, st.sampled_from([CLICK_FIELDS, json.loads(QUERY_LINE), json.loads(SEARCH_LINE)]),
              st.sampled_from(sorted(CLICK_FIELDS) + ["text", "extra"]), json_values, st.booleans()),
    st.builds(lambda raw, i, b: raw[:i] + bytes([b]) + raw[i + 1:], st.sampled_from([CLICK_LINE, QUERY_LINE]),
              st.integers(0, len(QUERY_LINE) - 1), st.integers(0, 255)),
)  # fmt: skip


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=records, kind=st.sampled_from([None, "click", "query"]))
def test_any_record_decodes_or_raises_decode_error_with_a_known_reason(raw, kind):
    try:
        event = decode(raw, kind, now_s=NOW)
    except DecodeError as e:
        assert e.reason in REASONS
        assert e.field is None or isinstance(e.field, str)
        letter = DeadLetter.from_error(e, topic="clicks", partition=0, offset=1, value=raw)
        assert DeadLetter.from_bytes(letter.to_bytes()) == letter  # every rejection can be dead-lettered
        return
    assert decode(encode(event), kind, now_s=NOW) == event  # anything accepted survives a round trip


WRONG_TYPE = {  # for each click field, values of a JSON type it never takes
    "event_id": [1, True, [], {}], "user_id": [196, 1.5, ["196"]], "item_id": [False, {}],
    "ts": ["881250949", 8.8e8, True, None], "label": [True, "1", 1.0, None], "surface": [0, ["rec"], None],
    "query_id": [1, ["q"]], "position": ["1", 1.5, True], "rating": ["3", 3.0, False],
}  # fmt: skip


@pytest.mark.parametrize("field", sorted(WRONG_TYPE))
def test_a_wrong_json_type_names_its_field(field):
    for value in WRONG_TYPE[field]:
        err = rejected(click(**{field: value}))
        assert (err.reason, err.field) == ("wrong_type", field), (value, err)


ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)


@settings(max_examples=200, deadline=None)
@given(
    e=st.one_of(
        st.builds(ClickEvent, ids, ids, ids, st.integers(0, NOW), st.sampled_from([0, 1]), st.just("rec"),
                  st.none(), st.none() | st.integers(0, 1000), st.none() | st.integers(1, 5), st.none() | ids),
        st.builds(ClickEvent, ids, ids, ids, st.integers(0, NOW), st.sampled_from([0, 1]), st.just("search"), ids,
                  st.none(), st.none(), st.none()),
        st.builds(QueryEvent, ids, ids, ids, ids, st.integers(0, NOW)),
    )
)  # fmt: skip
def test_valid_events_round_trip(e):
    raw = encode(e)
    assert decode(raw, now_s=NOW) == e
    assert json.loads(raw) == to_dict(e)


def _outcome(raw: bytes, kind):
    try:
        return decode(raw, kind, now_s=NOW)
    except DecodeError as e:
        return (e.reason, e.field, e.detail)


dup_records = st.builds(  # duplicate keys written with and without commas in strings
    lambda key, value, text: CLICK_LINE[:-1] + b', "text": ' + json.dumps(text).encode()
    + b", " + json.dumps(key).encode() + b": " + json.dumps(value).encode() + b"}",
    st.sampled_from(sorted(CLICK_FIELDS)), json_values, st.text(max_size=10))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(records, dup_records), kind=st.sampled_from([None, "click", "query"]))
def test_the_orjson_fast_path_decides_exactly_as_the_strict_parser(raw, kind):
    from unirec.streaming import events

    assert events._orjson_loads is not None  # orjson is a dependency
    fast = _outcome(raw, kind)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(events, "_orjson_loads", None)
        strict = _outcome(raw, kind)
    assert fast == strict


def test_a_click_may_carry_the_request_id_of_the_list_it_came_from():
    """Optional `request_id` (A/B attribution): decoded, re-encoded, and still strictly typed."""
    e = decode(click(request_id="r-42", position=3), "click", now_s=NOW)
    assert (e.request_id, e.position) == ("r-42", 3)
    assert decode(encode(e), now_s=NOW) == e and json.loads(encode(e))["request_id"] == "r-42"
    assert decode(CLICK_LINE, "click", now_s=NOW).request_id is None
    assert "request_id" not in json.loads(encode(decode(CLICK_LINE, now_s=NOW)))  # old clicks: same wire form
    assert (rejected(click(request_id=7)).reason, rejected(click(request_id=7)).field) == ("wrong_type", "request_id")
    assert rejected(click(request_id=" ")).reason == "bad_value"


BOUNDARY_VALUES = [None, True, False, -2**63 - 1, -1, 0, 1, 2, 5, 6, 2**63, NOW, NOW + 300, NOW + 301, 1.0, [], {},
                   "", " ", "\x1f", "rec", "search", "x" * 128, "x" * 129, "x" * 1024, "x" * 1025, "é", "q-1",
                   "\ud800"]
field_values = st.one_of(st.sampled_from(BOUNDARY_VALUES), st.integers(), st.text(max_size=12),
                         st.floats(allow_nan=False))
CHANGED_KEYS = sorted(set(CLICK_FIELDS) - {"schema"}) + ["text", "request_id"]
BASES = [json.loads(CLICK_LINE), json.loads(SEARCH_LINE), json.loads(QUERY_LINE)]


def _fast_agrees_with_strict(obj: dict) -> None:
    from unirec.streaming import events

    limits = EventLimits()
    try:
        strict = events._DECODERS[obj["schema"]](obj, NOW, limits)
    except DecodeError:
        strict = None
    fast = events._FAST[obj["schema"]](obj, NOW, limits)
    assert fast is None or fast == strict, obj
    if strict is not None and all(v.isascii() for v in obj.values() if isinstance(v, str)):
        assert fast == strict, obj       # the common case does take the fast path


def test_the_inline_field_checks_agree_with_the_strict_checks_at_every_boundary():
    """`decode_object`'s fast path returns an event only where the field-by-field path
    returns the same one; where that path rejects, the fast path defers to it."""
    for base in BASES:
        for key in CHANGED_KEYS:
            _fast_agrees_with_strict({k: v for k, v in base.items() if k != key})
            for value in BOUNDARY_VALUES:
                _fast_agrees_with_strict({**base, key: value})


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(BASES),
       changes=st.dictionaries(st.sampled_from(CHANGED_KEYS), st.one_of(field_values, st.just(...)), max_size=4))
def test_the_inline_field_checks_agree_with_the_strict_checks_on_combinations(base, changes):
    _fast_agrees_with_strict({k: v for k, v in {**base, **changes}.items() if v is not ...})
