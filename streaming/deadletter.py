"""Dead letters: every record the pipeline rejects, with enough to find and replay it.

A dead letter keeps the original record bytes exactly (base64 in JSON, because
the reason may be that they are not UTF-8), the record key, where the record
came from (topic, partition, offset) and why it was rejected (reason, field,
detail). The wire format is one JSON object, schema `dead-letter/v1`:

    {"schema": "dead-letter/v1", "reason": "wrong_type", "field": "ts",
     "detail": "expected integer, got string", "source_topic": "clicks",
     "partition": 0, "offset": 42, "original_b64": "eyJzY2hl...",
     "key_b64": "MTk2" | null, "ts_ms": 1795310702425}

`reason` is one of `unirec.streaming.events.REASONS` or a pipeline reason
(`duplicate`, `late`); it is not restricted here so a later stage can add its
own. Dead letters are keyed by `<source_topic>/<partition>` so that the letters
of one source partition stay in offset order in the dead-letter topic.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from unirec.streaming.events import DecodeError

SCHEMA = "dead-letter/v1"
PIPELINE_REASONS = ("duplicate", "late")  # added by the pipeline after decoding


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    field: str | None
    detail: str
    source_topic: str
    partition: int
    offset: int
    original: bytes
    key: bytes | None = None
    ts_ms: int = field(default_factory=_now_ms)  # when the record was rejected

    @classmethod
    def from_error(
        cls, err: DecodeError, *, topic: str, partition: int, offset: int, value: bytes, key: bytes | None = None
    ) -> DeadLetter:
        """The dead letter for a record that `decode` rejected."""
        return cls(err.reason, err.field, err.detail, topic, partition, offset, bytes(value), key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "reason": self.reason, "field": self.field, "detail": self.detail,
            "source_topic": self.source_topic, "partition": self.partition, "offset": self.offset,
            "original_b64": base64.b64encode(self.original).decode("ascii"),
            "key_b64": None if self.key is None else base64.b64encode(self.key).decode("ascii"),
            "ts_ms": self.ts_ms,
        }  # fmt: skip

    def to_bytes(self) -> bytes:
        # ASCII-escaped: `field`/`detail` may quote a rejected record's text, lone surrogates included
        return json.dumps(self.to_dict(), separators=(",", ":")).encode("ascii")

    @classmethod
    def from_bytes(cls, raw: bytes) -> DeadLetter:
        """Inverse of `to_bytes`; raises ValueError naming the bad key."""
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"dead letter is not JSON: {e}") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} record")
        try:
            key = d["key_b64"]
            return cls(
                reason=d["reason"], field=d["field"], detail=d["detail"], source_topic=d["source_topic"],
                partition=int(d["partition"]), offset=int(d["offset"]),
                original=base64.b64decode(d["original_b64"], validate=True),
                key=None if key is None else base64.b64decode(key, validate=True), ts_ms=int(d["ts_ms"]),
            )  # fmt: skip
        except KeyError as e:
            raise ValueError(f"dead letter lacks key {e.args[0]!r}") from None
        except (binascii.Error, TypeError) as e:
            raise ValueError(f"dead letter has a bad value: {e}") from None

    @property
    def kafka_key(self) -> bytes:
        return f"{self.source_topic}/{self.partition}".encode()


def send_dead_letters(producer: Any, topic: str, letters: Iterable[DeadLetter], *, flush: bool = True) -> Counter:
    """Send `letters` to `topic` with a kafka-python style producer; return counts per reason.

    With `flush` (the default) this returns only once the broker has acknowledged
    every letter, and raises if one failed: the caller commits the source offsets
    after this, so a rejected record is never acknowledged before its dead letter is.
    """
    counts: Counter = Counter()
    futures = []
    for letter in letters:
        futures.append(producer.send(topic, key=letter.kafka_key, value=letter.to_bytes()))
        counts[letter.reason] += 1
    if flush and futures:
        producer.flush()
        for f in futures:
            f.get(timeout=0)  # re-raises a failed send (flush() itself does not)
    return counts
