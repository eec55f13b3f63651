"""Summaries of a multi-seed offline bench run (bench/offline_quality.py --seeds)."""
from __future__ import annotations

import math

import pytest

from unirec.offline import mean_over_seeds, paired_difference


def test_means_skip_metrics_a_run_could_not_produce():
    rows = [{"ndcg@10": 0.10, "auc": None, "hr@10": 0.2}, {"ndcg@10": 0.12, "auc": None, "hr@10": 0.3}]
    m = mean_over_seeds(rows)
    assert m["ndcg@10"] == pytest.approx(0.11) and m["hr@10"] == pytest.approx(0.25) and m["auc"] is None
    assert mean_over_seeds([{"auc": None}, {"auc": 0.8}])["auc"] == pytest.approx(0.8)


def test_paired_difference_is_per_seed_with_its_standard_error():
    a = [{"ndcg@10": v} for v in (0.1051, 0.1003, 0.1014, 0.1043)]
    b = [{"ndcg@10": v} for v in (0.1053, 0.1133, 0.1047, 0.1007)]
    d = paired_difference(a, b, "ndcg@10")
    diffs = [-0.0002, -0.0130, -0.0033, 0.0036]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 3)
    assert d["n"] == 4 and d["per_seed"] == pytest.approx(diffs)
    assert d["mean"] == pytest.approx(mean) and d["se"] == pytest.approx(sd / 2)


def test_paired_difference_needs_the_same_seeds_on_both_sides():
    with pytest.raises(ValueError):
        paired_difference([{"x": 1.0}], [{"x": 1.0}, {"x": 2.0}], "x")
    assert math.isnan(paired_difference([{"x": 1.0}], [{"x": 0.5}], "x")["se"])
