"""The real MovieLens-100k from the RecBole 1.2.1 wheel (network on the first run; reuses .cache/unirec)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unirec.data import load_events, load_items, prepare
from unirec.data.config import DataConfig
from unirec.data.split import eval_case, leave_one_out, train_targets

pytestmark = pytest.mark.integration
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "unirec"


@pytest.fixture(scope="module")
def prepared():
    return prepare(DataConfig(cache_dir=str(CACHE)))


def test_counts_match_recbole(prepared):
    events, items = load_events(prepared), load_items(prepared)
    clicks = [e for e in events if e["schema"] == "click/v1"]
    assert (len({e["user_id"] for e in clicks}), len(items), len(clicks)) == (943, 1682, 100000)
    hist = leave_one_out(events)
    assert sum(len(train_targets(h)) for h in hist.values()) == 97171  # RecBole's training sequences
    assert sum(e["schema"] == "query/v1" for e in events) == round(0.25 * sum(e["item_id"] != "267" for e in clicks))


def test_per_user_order_is_recbole_stable_sort(prepared):
    lines = (CACHE / "ml-100k" / "raw" / "ml-100k.inter").read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines]
    order = np.argsort(np.array([float(r[3]) for r in rows]), kind="stable")  # Interaction.sort
    expected: dict[str, list[str]] = {}
    for i in order:
        expected.setdefault(rows[i][0], []).append(rows[i][1])
    hist = leave_one_out(load_events(prepared))
    assert {u: list(h.item_ids) for u, h in hist.items()} == expected
    assert eval_case(hist["1"], "test").item_id == expected["1"][-1]
