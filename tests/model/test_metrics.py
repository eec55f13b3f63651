"""`unirec.model.metrics` against hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unirec.model.metrics import auc, full_ranking, gauc, metrics_from_ranks, ndcg_at_k, recall_at_k, target_ranks

# column 0 is padding and scores highest, so it would push every rank down by one if counted
SCORES = np.array([
    [9.0, 0.1, 0.5, 0.3, 0.5, 0.2],   # target 2 (0.5): item 4 ties at 0.5 -> rank 1 (pessimistic)
    [9.0, 0.9, 0.1, 0.2, 0.3, 0.4],   # target 1 (0.9): best -> rank 0
    [9.0, 0.7, 0.7, 0.7, 0.7, 0.7],   # target 5: all tied -> rank 4 (worst)
])
TARGETS = [2, 1, 5]


def test_ranks_are_pessimistic_and_skip_padding():
    assert target_ranks(SCORES, TARGETS).tolist() == [1, 0, 4]
    assert target_ranks(SCORES, TARGETS, pad_index=None).tolist() == [2, 1, 5]


def test_hand_computed_metrics():
    m = full_ranking(SCORES, TARGETS, ks=(1, 2))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1.0 + 0.0) / 3)
    assert m["mrr@2"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    m10 = full_ranking(SCORES, TARGETS)
    assert set(m10) == {f"{name}@{k}" for name in ("hr", "ndcg", "mrr") for k in (10, 20)}
    assert m10["hr@10"] == 1.0 and m10["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 + 1 / math.log2(6)) / 3)


def test_masking_seen_items_is_optional_and_never_hides_the_target():
    seen = [[4], [1, 2], [1, 2, 5]]  # the last case lists its own target: it must stay a candidate
    assert target_ranks(SCORES, TARGETS, exclude=seen).tolist() == [0, 0, 2]
    mask = np.zeros_like(SCORES, dtype=bool)
    mask[0, 4] = mask[1, [1, 2]] = mask[2, [1, 2, 5]] = True
    assert target_ranks(SCORES, TARGETS, exclude=mask).tolist() == [0, 0, 2]


def test_torch_input_and_nan_scores():
    s = torch.tensor([[0.0, float("nan"), 1.0, 0.5]])
    assert target_ranks(s, torch.tensor([3])).tolist() == [1]  # NaN counts as -inf
    assert target_ranks(torch.tensor([[0.0, float("nan"), 1.0]]), [1]).tolist() == [1]  # a NaN target is last


def test_bad_targets_are_rejected():
    with pytest.raises(ValueError):
        target_ranks(SCORES, [0, 1, 2])  # the padding index is never a target
    with pytest.raises(ValueError):
        target_ranks(SCORES, [1, 2])


def test_metrics_from_ranks_at_boundary():
    m = metrics_from_ranks([9, 10], ks=(10,))
    assert m["hr@10"] == 0.5 and m["ndcg@10"] == pytest.approx(0.5 / math.log2(11))


def test_auc_hand_computed_with_ties():
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4) (0.8>0.1) (0.4=0.4 -> 1/2) (0.4>0.1) = 3.5/4
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert auc([1, 0], [0.2, 0.9]) == 0.0 and auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1], [0.1, 0.2]))


def test_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 200), rng.integers(0, 5, 200).astype(float)
    pos, neg = s[y == 1], s[y == 0]
    expected = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc(y, s) == pytest.approx(expected)


def test_gauc_weights_by_group_size_and_skips_single_class_groups():
    groups = ["a", "a", "a", "a", "b", "b", "c", "c", "c"]
    labels = [1, 1, 0, 0, 1, 0, 1, 1, 1]
    scores = [0.8, 0.4, 0.4, 0.1, 0.1, 0.9, 0.5, 0.6, 0.7]
    assert gauc(groups, labels, scores) == pytest.approx((0.875 * 4 + 0.0 * 2) / 6)  # "c" is all positive
    assert math.isnan(gauc(["x", "x"], [1, 1], [0.1, 0.2]))


def test_list_metrics_for_search():
    ranked = [["a", "b", "c"], ["x", "y", "z"], ["p", "q"]]
    relevant = [["b"], ["q1"], ["p", "q"]]
    assert recall_at_k(ranked, relevant, 1) == pytest.approx((0 + 0 + 0.5) / 3)
    assert recall_at_k(ranked, relevant, 2) == pytest.approx((1 + 0 + 1) / 3)
    assert ndcg_at_k(ranked, relevant, 2) == pytest.approx((1 / math.log2(3) + 0 + 1) / 3)
    assert recall_at_k([["a"]], [[]], 1) != recall_at_k([["a"]], [[]], 1)  # NaN: nothing to recall
