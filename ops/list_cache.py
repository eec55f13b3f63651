"""The LRU of ranked lists the server answers repeated requests from: per (version, user,
exclude_seen), valid while the user's sequence state (watermark, length, total clicks,
queries) is unchanged (`unirec.ops.serving` computes that fingerprint and pre-warms a new
version's entries from `recent`)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, NamedTuple


class Entry(NamedTuple):
    fp: tuple                  # the sequence state the list was computed for
    items: list[str]
    scores: list[float]
    complete: bool             # fewer items than asked exist: any larger k gets the same list
    seq: Any                   # the sequence itself (to recompute it with a new version)
    k: int


class ListCache:
    """LRU of ranked lists, (version, user, exclude_seen) -> Entry; one lock (the inference
    thread reads and writes, the poller pre-warms)."""

    def __init__(self, size: int):
        self.size, self.d, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: tuple, fp: tuple, k: int) -> Entry | None:
        with self.lock:
            e = self.d.get(key)
            if e is None or e.fp != fp or (len(e.items) < k and not e.complete):
                return None
            self.d.move_to_end(key)
            return e

    def put(self, key: tuple, e: Entry) -> None:
        with self.lock:
            self.d[key] = e
            self.d.move_to_end(key)
            while len(self.d) > self.size:
                self.d.popitem(last=False)

    def recent(self, version: str, n: int) -> list[tuple[tuple, Entry]]:
        """The `n` most recently used entries of `version`, newest first."""
        with self.lock:
            return [(key, e) for key, e in reversed(self.d.items()) if key[0] == version][:n]
