"""Event streams for tests and benchmarks, and the check of an online store against one.

* `generated_stream(n_events, n_users, ...)`: a synthetic stream in the wire format
  of the prepared MovieLens stream (click/v1 and query/v1 JSON lines, event-time
  order, each search click preceded by its query with the same `ts`), users and
  items drawn from Zipf-like popularity. Deterministic for a seed.
* `source_stream(path, limit)`: the first `limit` lines of `events.jsonl` if it
  exists (`unirec data prepare`), else a generated stream of that size.
* `expected(lines, features_cfg)`: every user's sequence and every item's feature
  row computed directly from the source events (`features.sequence.reference`,
  `features.item_stats.reference`), independent of the pipeline.
* `compare(online, expected)`: what the online store lost or applied twice.
"""
from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from unirec.features import item_stats, sequence
from unirec.features.config import FeaturesConfig
from unirec.streaming.events import ClickEvent, decode

_WORDS = ("star", "wars", "comedy", "drama", "love", "night", "city", "action", "space", "war", "story", "dark")


def generated_stream(n_events: int, n_users: int, *, n_items: int = 5000, query_share: float = 0.25,
                     events_per_s: float = 50.0, start_ts: int = 880_000_000, seed: int = 0) -> list[bytes]:
    """`n_events` JSON lines (clicks and queries; a query counts as an event)."""
    rng = random.Random(seed)
    user_w = [1.0 / (i + 1) ** 0.6 for i in range(n_users)]
    item_w = [1.0 / (i + 1) ** 0.9 for i in range(n_items)]
    users = rng.choices(range(n_users), user_w, k=n_events)
    items = rng.choices(range(n_items), item_w, k=n_events)
    lines: list[bytes] = []
    n_click = n_query = 0
    for i in range(n_events):
        if len(lines) >= n_events:
            break
        ts = start_ts + int(i / events_per_s)
        user, item = str(users[i]), str(items[i])
        query_id = None
        if rng.random() < query_share and len(lines) + 2 <= n_events:
            n_query += 1
            query_id = f"q-{n_query}"
            text = " ".join(rng.sample(_WORDS, 2))
            lines.append(_dumps({"schema": "query/v1", "event_id": query_id, "user_id": user,
                                 "query_id": query_id, "text": text, "ts": ts}))
        n_click += 1
        rating = rng.randint(1, 5)
        lines.append(_dumps({"schema": "click/v1", "event_id": f"c-{n_click}", "user_id": user, "item_id": item,
                             "ts": ts, "label": int(rating >= 4), "rating": rating,
                             "surface": "search" if query_id else "rec", "query_id": query_id, "position": None}))
    return lines


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def source_stream(path: str | Path | None, limit: int) -> list[bytes]:
    """The first `limit` lines of a prepared stream, or a generated stream if there is none."""
    if path is not None and Path(path).exists():
        with open(path, "rb") as f:
            return [line.strip() for line in itertools.islice(f, limit) if line.strip()]
    return generated_stream(limit, max(10, limit // 20))


@dataclass
class Expected:
    users: dict = field(default_factory=dict)   # user_id -> UserSequence (for serving)
    items: dict = field(default_factory=dict)   # item_id -> feature row


def expected(lines: Iterable[bytes], cfg: FeaturesConfig, *, now_s: float | None = None) -> Expected:
    """Features computed directly from the valid source events (the same merge rules)."""
    now = time.time() if now_s is None else now_s
    events = []
    for line in lines:
        try:
            events.append(decode(line, now_s=now))
        except ValueError:
            continue  # a bad record: it must be a dead letter, not a feature
    users = sequence.reference(events, max_len=cfg.max_sequence_length, allowed_lateness_s=cfg.allowed_lateness_s,
                               max_queries=cfg.max_queries)
    clicks = _applied_clicks(events, cfg)
    items = item_stats.reference(clicks, bucket_s=cfg.item_bucket_s, windows_s=cfg.item_windows_s)
    return Expected({u: s.for_serving() for u, s in users.items()}, items)


def _applied_clicks(events: list, cfg: FeaturesConfig) -> list:
    """Clicks the reference accepts: first of each event id per user, not late (same rule as merge)."""
    seen: dict[str, set] = {}
    wm: dict[str, int] = {}
    out = []
    for e in events:
        ids = seen.setdefault(e.user_id, set())
        w = wm.get(e.user_id)
        if (w is not None and e.ts < w - cfg.allowed_lateness_s) or e.event_id in ids:
            continue
        ids.add(e.event_id)
        wm[e.user_id] = e.ts if w is None else max(w, e.ts)
        if isinstance(e, ClickEvent):
            out.append(e)
    return out


@dataclass
class Comparison:
    users: int
    items: int
    lost: int            # expected applied clicks missing online (per-user click totals)
    duplicated: int      # applied clicks online beyond the expected ones
    mismatched_users: list
    mismatched_items: list

    @property
    def identical(self) -> bool:
        return not (self.lost or self.duplicated or self.mismatched_users or self.mismatched_items)


def compare(online, exp: Expected) -> Comparison:
    """Read every expected user and item back from the online store and compare."""
    got_users = online.read_users(list(exp.users))
    got_items = online.read_items(list(exp.items))
    lost = dup = 0
    bad_users = []
    for user_id, want in exp.users.items():
        got = got_users.get(user_id)
        n = got.total_clicks if got is not None else 0
        lost += max(0, want.total_clicks - n)
        dup += max(0, n - want.total_clicks)
        if got != want:
            bad_users.append(user_id)
    bad_items = [item_id for item_id, want in exp.items.items()
                 if not _same_row(got_items.get(item_id), want)]
    return Comparison(len(exp.users), len(exp.items), lost, dup, bad_users, bad_items)


def _same_row(got: dict | None, want: dict) -> bool:
    if got is None:
        return False
    for k, v in want.items():
        g = got.get(k)
        if isinstance(v, float):  # CTRs may be stored as float32
            if g is None or abs(g - v) > 1e-6:
                return False
        elif g != v:
            return False
    return True
