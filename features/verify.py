"""Compare the online store with values computed directly from the source events.

The end-to-end check behind "nothing lost, nothing applied twice": from the whole
source stream (in each user's arrival order, as replayed into Kafka) compute what a
correct pipeline must hold (`sequence.accepted` / `sequence.reference` /
`item_stats.reference`, which do not use `merge` or `apply`), read every user and item
back from the online store, and count differences.

* `lost` / `duplicated`: clicks missing online / online beyond the expected count,
  summed per user (`total_clicks`; a missing user counts all its clicks) and per item
  (`clicks_all`); the report takes the larger of the two sums for each;
* `users_mismatched` / `items_mismatched`: entities whose online value differs at all
  (sequence order, labels, windows, CTR, ...), with up to 5 examples for the report.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from unirec.features import item_stats, sequence
from unirec.features.config import FeaturesConfig


@dataclass
class Report:
    users: int = 0
    items: int = 0
    lost: int = 0
    duplicated: int = 0
    users_mismatched: int = 0
    items_mismatched: int = 0
    examples: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.users_mismatched or self.items_mismatched)


def expected(events: Iterable[Any], cfg: FeaturesConfig) -> tuple[dict, dict]:
    """(user_id -> UserSequence for serving, item_id -> item feature row) from source events."""
    events = list(events)
    acc = sequence.accepted(events, allowed_lateness_s=cfg.allowed_lateness_s)
    users = sequence.reference(acc, max_len=cfg.max_sequence_length,
                               allowed_lateness_s=cfg.allowed_lateness_s, max_queries=cfg.max_queries)
    items = item_stats.reference([e for e in acc if sequence.is_click(e)],
                                 bucket_s=cfg.item_bucket_s, windows_s=cfg.item_windows_s)
    return {u: s.for_serving() for u, s in users.items()}, items


def compare(online, events: Iterable[Any], cfg: FeaturesConfig) -> Report:
    """Read all expected users and items from `online` (an OnlineStore) and compare."""
    want_users, want_items = expected(events, cfg)
    got_users = online.read_users(list(want_users), fast=True)
    got_items = online.read_items(list(want_items), fast=True)
    r = Report(users=len(want_users), items=len(want_items))
    lost_u = dup_u = lost_i = dup_i = 0
    for u, want in want_users.items():
        got = got_users.get(u)
        n_got = got.total_clicks if got else 0
        lost_u += max(0, want.total_clicks - n_got)
        dup_u += max(0, n_got - want.total_clicks)
        if got != want:
            r.users_mismatched += 1
            if len(r.examples) < 5:
                r.examples.append({"user": u, "want": _short(want), "got": _short(got)})
    for i, want in want_items.items():
        got = got_items.get(i)
        n_got = got["clicks_all"] if got else 0
        lost_i += max(0, want["clicks_all"] - n_got)
        dup_i += max(0, n_got - want["clicks_all"])
        if got != want:
            r.items_mismatched += 1
            if len(r.examples) < 5:
                r.examples.append({"item": i, "want": want, "got": got})
    r.lost, r.duplicated = max(lost_u, lost_i), max(dup_u, dup_i)
    return r


def _short(s) -> dict | None:
    if s is None:
        return None
    return {"total_clicks": s.total_clicks, "last_items": s.item_ids[-5:], "last_ts": s.ts[-5:],
            "queries": len(s.query_ids), "watermark": s.watermark}
