"""Per-item click counts and CTR over sliding event-time windows: pure functions.

Design choices (tested in tests/features/test_item_stats.py):

* **Only applied clicks count.** `apply` takes the clicks that the per-user merge
  actually applied (`MergeResult.applied_clicks`), so a duplicate or late event never
  reaches it and is never counted twice; the user merge is the single dedup point.
* **Buckets.** Clicks and positives (label == 1) are counted per event-time bucket
  of `bucket_s` seconds (bucket start = ts - ts % bucket_s), plus all-time totals.
* **Windows are whole buckets.** A window of w seconds (a multiple of `bucket_s`)
  ending at time t covers the w / bucket_s buckets up to and including t's bucket.
  t is the item's watermark (largest ts of an applied click) by default, so the value
  pushed with an item is a function of the item's events only, whatever the order or
  batching they arrived in; `window_counts(..., now_s=...)` evaluates at another time.
* **Bounded memory.** Buckets older than the longest window before the watermark are
  dropped; a click that lands in such a bucket only counts towards the all-time totals
  (it could never be inside a window again, since the watermark only grows).
* **CTR** = positives / clicks of the same window, 0.0 for a window without clicks.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ItemStats:
    item_id: str
    clicks: int = 0                      # all time
    positives: int = 0                   # all time, label == 1
    watermark: int | None = None         # max ts of an applied click; also `last_event_ts`
    # bucket start -> (clicks, positives), only buckets inside the longest window. Read-only.
    buckets: Mapping[int, tuple[int, int]] = field(default_factory=dict)


def window_name(seconds: int) -> str:
    """3600 -> "1h", 86400 -> "1d", 604800 -> "7d", 90 -> "90s"."""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def _oldest_bucket(wm: int, bucket_s: int, span_s: int) -> int:
    """Start of the oldest bucket in a window of span_s ending in wm's bucket."""
    return wm - wm % bucket_s - span_s + bucket_s


def apply(stats: Mapping[str, ItemStats], applied_clicks: Iterable[Any], *, bucket_s: int,
          windows_s: tuple[int, ...]) -> dict[str, ItemStats]:
    """Add clicks to the items' stats; returns the new stats of every item they touch.

    `stats` holds the current stats of (at least) the touched items; missing items
    start empty. Inputs are never mutated.
    """
    grouped: dict[str, list] = {}
    for e in applied_clicks:
        grouped.setdefault(e.item_id, []).append(e)
    span = max(windows_s)
    out = {}
    for item_id, clicks in grouped.items():
        old = stats.get(item_id) or ItemStats(item_id)
        wm = max([e.ts for e in clicks] + ([old.watermark] if old.watermark is not None else []))
        oldest = _oldest_bucket(wm, bucket_s, span)
        buckets = {b: cp for b, cp in old.buckets.items() if b >= oldest}
        n_pos = 0
        for e in clicks:
            pos = 1 if int(e.label) == 1 else 0
            n_pos += pos
            b = e.ts - e.ts % bucket_s
            if b >= oldest:
                c, p = buckets.get(b, (0, 0))
                buckets[b] = (c + 1, p + pos)
        out[item_id] = ItemStats(item_id, old.clicks + len(clicks), old.positives + n_pos, wm,
                                 dict(sorted(buckets.items())))
    return out


def window_counts(s: ItemStats, *, bucket_s: int, windows_s: tuple[int, ...],
                  now_s: int | None = None) -> dict[int, tuple[int, int]]:
    """window seconds -> (clicks, positives), ending at now_s (default: the watermark)."""
    t = s.watermark if now_s is None else now_s
    if t is None:
        return {w: (0, 0) for w in windows_s}
    out = {}
    for w in windows_s:
        oldest, newest = _oldest_bucket(t, bucket_s, w), t - t % bucket_s
        c = p = 0
        for b, (bc, bp) in s.buckets.items():
            if oldest <= b <= newest:
                c, p = c + bc, p + bp
        out[w] = (c, p)
    return out


def feature_names(windows_s: tuple[int, ...]) -> list[str]:
    """Feature columns of the item_stats view, in order (the entity key excluded)."""
    return list(_feature_names(tuple(windows_s)))


@functools.lru_cache(maxsize=16)
def _feature_names(windows_s: tuple[int, ...]) -> tuple[str, ...]:
    names = []
    for suffix in [window_name(w) for w in windows_s] + ["all"]:
        names += [f"clicks_{suffix}", f"positives_{suffix}", f"ctr_{suffix}"]
    return tuple(names + ["last_event_ts"])


def feature_row(s: ItemStats, *, bucket_s: int, windows_s: tuple[int, ...]) -> dict[str, Any]:
    """The values pushed to the online store for one item, by feature name."""
    return dict(zip(_feature_names(tuple(windows_s)), feature_values(s, bucket_s=bucket_s, windows_s=windows_s)))


def feature_values(s: ItemStats, *, bucket_s: int, windows_s: tuple[int, ...]) -> list:
    """`feature_row`'s values in `feature_names` order: the windows' counts in one pass over
    the buckets (the push process encodes these for every changed item of every batch;
    `window_counts` is the same count, one window at a time)."""
    n = len(windows_s)
    clicks, positives = [0] * n, [0] * n
    t = s.watermark
    if t is not None:
        newest = t - t % bucket_s
        oldest = [_oldest_bucket(t, bucket_s, w) for w in windows_s]
        for b, (bc, bp) in s.buckets.items():
            if b <= newest:
                for k in range(n):
                    if b >= oldest[k]:
                        clicks[k] += bc
                        positives[k] += bp
    out: list = []
    for c, p in zip(clicks + [s.clicks], positives + [s.positives]):
        out += (c, p, p / c if c else 0.0)
    out.append(t if t is not None else 0)
    return out


def reference(clicks: Iterable[Any], *, bucket_s: int, windows_s: tuple[int, ...]) -> dict[str, dict]:
    """Every item's feature row computed directly from a list of applied clicks."""
    per_item: dict[str, list] = {}
    for e in clicks:
        per_item.setdefault(e.item_id, []).append(e)
    out = {}
    for item_id, evs in per_item.items():
        wm = max(e.ts for e in evs)
        row: dict[str, Any] = {}
        for w in windows_s:
            oldest = _oldest_bucket(wm, bucket_s, w)
            inside = [e for e in evs if e.ts - e.ts % bucket_s >= oldest]
            c, p = len(inside), sum(1 for e in inside if int(e.label) == 1)
            name = window_name(w)
            row[f"clicks_{name}"], row[f"positives_{name}"] = c, p
            row[f"ctr_{name}"] = p / c if c else 0.0
        c, p = len(evs), sum(1 for e in evs if int(e.label) == 1)
        row["clicks_all"], row["positives_all"], row["ctr_all"] = c, p, (p / c if c else 0.0)
        row["last_event_ts"] = wm
        out[item_id] = row
    return out


# -- compact serialization for the state store ---------------------------------------------

def to_record(s: ItemStats) -> list:
    return [s.clicks, s.positives, s.watermark, [[b, c, p] for b, (c, p) in s.buckets.items()]]


def from_record(item_id: str, r: list) -> ItemStats:
    return ItemStats(item_id, r[0], r[1], r[2], {b: (c, p) for b, c, p in r[3]})
