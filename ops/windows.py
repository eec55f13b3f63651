"""Count-based windows over the stream, and the drift of each closed window against the one
before it (the statistics are the pure functions of `unirec.ops.drift`).

Windows are counted in events, not in wall or event time: a full-speed replay and live
traffic then give windows of the same statistical weight, so the noise floor of the JS
divergence and the PSI (which grows as windows shrink) does not depend on replay speed.
The first window only becomes the reference. New-id shares are against every id seen
in an earlier window (memory: O(distinct ids)).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from unirec.ops import drift


class InputWindows:
    """Count-based windows of input events; `add` returns the drift of a window when it closes."""

    def __init__(self, size: int):
        self.size, self.index = size, 0
        self._prev_items: Counter | None = None
        self._prev_terms: Counter | None = None
        self._seen_items: set = set()
        self._seen_users: set = set()
        self._reset()

    def _reset(self) -> None:
        self.items, self.users, self.terms, self.events = Counter(), set(), Counter(), 0

    def add(self, item_ids: list[str], user_ids: list[str], texts: list[str]) -> drift.InputDrift | None:
        self.items.update(item_ids)
        self.users.update(user_ids)
        self.terms.update(drift.term_counts(texts))
        self.events += len(item_ids) + len(texts)
        if self.events < self.size:
            return None
        d = drift.input_drift(self.items, self.users, self.terms, previous_items=self._prev_items,
                              previous_terms=self._prev_terms, seen_items=self._seen_items,
                              seen_users=self._seen_users)
        self._seen_items.update(self.items)
        self._seen_users.update(self.users)
        self._prev_items, self._prev_terms = self.items, self.terms
        self.index += 1
        self._reset()
        return d


class ScoreWindows:
    """Count-based windows of ranking predictions: PSI against the previous window and calibration."""

    def __init__(self, size: int, psi_bins: int, calibration_bins: int):
        self.size, self.psi_bins, self.calibration_bins = size, psi_bins, calibration_bins
        self._prev: np.ndarray | None = None
        self._p: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self.n = 0

    def add(self, probs: Any, labels: Any) -> tuple[int, tuple[float, drift.Calibration] | None]:
        """(predictions dropped as invalid, (psi, calibration) if a window closed)."""
        p = np.asarray(probs, dtype=np.float64).ravel()
        y = np.asarray(labels, dtype=np.float64).ravel()
        if p.size != y.size:
            raise ValueError(f"rank_probs, rank_labels: lengths differ ({p.size} vs {y.size})")
        keep = np.isfinite(p) & (p >= 0) & (p <= 1) & np.isin(y, (0.0, 1.0))
        self._p.append(p[keep])
        self._y.append(y[keep])
        self.n += int(keep.sum())
        dropped = int(p.size - keep.sum())
        if self.n < self.size:
            return dropped, None
        cur_p, cur_y = np.concatenate(self._p), np.concatenate(self._y)
        self._p, self._y, self.n = [], [], 0
        cal = drift.calibration(cur_p, cur_y, bins=self.calibration_bins)
        psi = math.nan if self._prev is None else drift.psi(self._prev, cur_p, bins=self.psi_bins)
        self._prev = cur_p
        return dropped, (psi, cal)
