"""Drift statistics on constructed cases whose answers can be checked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from unirec.ops import drift


def _circle(degrees) -> np.ndarray:
    r = np.radians(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


# ---- embedding drift -------------------------------------------------------------------------
def test_identical_versions_have_no_drift():
    ids = [str(i) for i in range(30)]
    emb = np.random.default_rng(0).normal(size=(30, 8))
    d = drift.embedding_drift(ids, emb, ids, emb.copy())
    assert d.mean_cosine_distance == pytest.approx(0.0, abs=1e-12)
    assert d.neighbour_overlap == 1.0
    assert (d.shared, d.k) == (30, 10)


def test_rows_are_matched_by_id_not_position_and_unshared_ids_ignored():
    # x: [1,0] -> [0,1] (orthogonal, distance 1); y: [0,1] -> [0,2] (same direction, 0)
    d = drift.embedding_drift(["x", "y", "only_a"], [[1, 0], [0, 1], [5, 5]],
                              ["y", "x", "only_b"], [[0, 2], [0, 1], [-1, 3]])
    assert d.mean_cosine_distance == pytest.approx(0.5)
    assert d.shared == 2


def test_cosine_distance_ignores_scale_and_reaches_two_for_opposite_vectors():
    ids = list("abcdefghijkl")
    emb = np.random.default_rng(1).normal(size=(12, 4))
    scaled = drift.embedding_drift(ids, emb, ids, 3.0 * emb)
    assert scaled.mean_cosine_distance == pytest.approx(0.0, abs=1e-12)
    flipped = drift.embedding_drift(ids, emb, ids, -emb)
    assert flipped.mean_cosine_distance == pytest.approx(2.0)
    assert flipped.neighbour_overlap == 1.0   # negation keeps every neighbourhood


def test_zero_vector_counts_as_distance_one():
    d = drift.embedding_drift(["a", "b"], [[1, 0], [0, 1]], ["a", "b"], [[0, 0], [0, 1]])
    assert d.mean_cosine_distance == pytest.approx(0.5)   # (1 + 0) / 2


def test_neighbour_overlap_hand_case():
    # k=1 on a circle. Version a at 0, 10, 90, 100 degrees: 0<->1 and 2<->3.
    # Version b at 0, 10, 90, 40: 0->1 (10 deg), 1->0 (10 vs 30), 2->3 (50 vs 80),
    # 3->1 (30 vs 50; was 2). Overlap = 3/4.
    ids = ["i0", "i1", "i2", "i3"]
    d = drift.embedding_drift(ids, _circle([0, 10, 90, 100]), ids, _circle([0, 10, 90, 40]), k=1)
    assert d.neighbour_overlap == pytest.approx(0.75)
    assert d.k == 1


def test_neighbour_overlap_zero_when_every_neighbourhood_changes():
    ids = ["i0", "i1", "i2", "i3"]
    d = drift.embedding_drift(ids, _circle([0, 10, 90, 100]), ids, _circle([0, 90, 10, 100]), k=1)
    assert d.neighbour_overlap == 0.0


def test_fewer_than_k_plus_one_items_uses_every_other_item():
    # 3 shared items, k=10 -> k_eff=2: each item's neighbours are the 2 others in any version
    rng = np.random.default_rng(2)
    ids = ["a", "b", "c"]
    d = drift.embedding_drift(ids, rng.normal(size=(3, 5)), ids, rng.normal(size=(3, 5)))
    assert (d.k, d.neighbour_overlap) == (2, 1.0)


def test_too_few_shared_ids_give_documented_nan():
    one = drift.embedding_drift(["a", "b"], [[1, 0], [0, 1]], ["a", "c"], [[1, 1], [0, 1]])
    assert one.shared == 1 and math.isnan(one.neighbour_overlap)
    assert one.mean_cosine_distance == pytest.approx(1 - math.sqrt(0.5))
    none = drift.embedding_drift(["a"], [[1, 0]], ["b"], [[1, 0]])
    assert none.shared == 0
    assert math.isnan(none.mean_cosine_distance) and math.isnan(none.neighbour_overlap)


def test_chunking_does_not_change_the_result():
    rng = np.random.default_rng(3)
    ids = [str(i) for i in range(50)]
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
    whole = drift.embedding_drift(ids, a, ids, a + 0.3 * b)
    chunked = drift.embedding_drift(ids, a, ids, a + 0.3 * b, chunk=7)
    assert whole == chunked
    assert 0.0 < whole.neighbour_overlap < 1.0


@pytest.mark.parametrize("args, match", [
    (([], np.zeros((0, 2)), ["a"], [[1, 0]]), "ids_a: empty"),
    ((["a", "b"], [[1, 0]], ["a"], [[1, 0]]), "ids_a: 2 ids for 1"),
    ((["a", "a"], [[1, 0], [0, 1]], ["a"], [[1, 0]]), "ids_a: duplicate"),
    ((["a"], [[1, 0]], ["a"], [[math.nan, 0]]), "emb_b: contains NaN"),
    ((["a"], [[1, 0]], ["a"], [[1, 0, 0]]), "dimensions differ"),
    ((["a"], [1, 0], ["a"], [[1, 0]]), "emb_a: expected a 2-d"),
])
def test_embedding_drift_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        drift.embedding_drift(*args)


# ---- PSI -------------------------------------------------------------------------------------
REF = np.arange(100.0)   # 4 quantile bins: edges 24.75, 49.5, 74.25 -> 25 values each


def test_psi_of_a_sample_against_itself_is_zero():
    assert drift.psi(REF, REF, bins=4) == 0.0


def test_psi_hand_case():
    # current shares per reference bin: 0.50, 0.25, 0.15, 0.10 (reference: 0.25 each)
    cur = [0.0] * 50 + [30.0] * 25 + [60.0] * 15 + [90.0] * 10
    expected = (0.25 * math.log(2)) + 0.0 + (-0.10 * math.log(0.6)) + (-0.15 * math.log(0.4))
    assert drift.psi(REF, cur, bins=4, eps=1e-12) == pytest.approx(expected, rel=1e-9)


def test_psi_values_outside_the_reference_range_fall_in_the_end_bin_with_smoothing():
    eps = 1e-3
    got = drift.psi(REF, [1000.0] * 10, bins=4, eps=eps)
    z = 1 + 4 * eps
    p, q_empty, q_full = (0.25 + eps) / z, eps / z, (1 + eps) / z
    expected = 3 * (q_empty - p) * math.log(q_empty / p) + (q_full - p) * math.log(q_full / p)
    assert got == pytest.approx(expected, rel=1e-12)


def test_psi_grows_with_the_shift():
    rng = np.random.default_rng(4)
    ref, noise = rng.normal(size=5000), rng.normal(size=5000)
    small, large = drift.psi(ref, noise + 0.2), drift.psi(ref, noise + 1.0)
    assert 0.0 < small < 0.1 < 0.25 < large


def test_psi_constant_reference_merges_tied_edges():
    assert drift.psi([3.0] * 20, [3.0] * 5) == 0.0
    assert drift.psi([3.0] * 20, [1.0] * 5) > 1.0


@pytest.mark.parametrize("ref, cur, kw, match", [
    ([], [1.0], {}, "reference: empty"),
    ([1.0], [], {}, "current: empty"),
    ([1.0, math.nan], [1.0], {}, "reference: contains NaN"),
    ([1.0], [math.inf], {}, "current: contains NaN or infinite"),
    ([1.0], [1.0], {"bins": 1}, "bins: must be >= 2"),
    ([1.0], [1.0], {"eps": 0.0}, "eps: must be > 0"),
])
def test_psi_rejects_bad_input(ref, cur, kw, match):
    with pytest.raises(ValueError, match=match):
        drift.psi(ref, cur, **kw)


# ---- Jensen-Shannon, new ids, query terms ----------------------------------------------------
def test_js_bounds_and_symmetry():
    assert drift.js_divergence({"a": 2, "b": 6}, {"a": 1, "b": 3}) == pytest.approx(0.0, abs=1e-15)
    assert drift.js_divergence({"a": 5}, {"b": 1}) == 1.0
    p, q = {"a": 3, "b": 1, "c": 0}, {"b": 2, "d": 7}
    assert drift.js_divergence(p, q) == pytest.approx(drift.js_divergence(q, p))


def test_js_hand_case():
    # P = (1, 0), Q = (1/2, 1/2), M = (3/4, 1/4)
    kl_p = math.log2(1 / 0.75)
    kl_q = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    assert drift.js_divergence({"a": 1}, {"a": 1, "b": 1}) == pytest.approx(0.5 * (kl_p + kl_q))


@pytest.mark.parametrize("p, q, match", [
    ({}, {"a": 1}, "counts_p: empty"),
    ({"a": 1}, {"a": 0}, "counts_q: empty"),
    ({"a": 1, "b": -1}, {"a": 1}, "counts_p: counts must be finite and >= 0"),
])
def test_js_rejects_bad_counts(p, q, match):
    with pytest.raises(ValueError, match=match):
        drift.js_divergence(p, q)


def test_new_id_share_by_ids_and_by_events():
    window = ["a", "a", "b", "c"]
    assert drift.new_id_share(window, {"a"}) == pytest.approx(2 / 3)
    assert drift.new_id_share(window, ["a"], by_events=True) == pytest.approx(0.5)
    assert drift.new_id_share(iter(window), {"a", "b", "c"}) == 0.0
    with pytest.raises(ValueError, match="window: empty"):
        drift.new_id_share([], {"a"})


def test_query_terms_are_lowercased_word_runs():
    assert drift.term_counts(["Star Wars", "star-wars sci-fi"]) == {"star": 2, "wars": 2, "sci": 1, "fi": 1}
    assert drift.query_term_divergence(["Star Wars"], ["wars STAR"]) == 0.0
    assert drift.query_term_divergence(["star wars"], ["toy story"]) == 1.0
    with pytest.raises(ValueError, match="current_texts: no terms"):
        drift.query_term_divergence(["star"], ["!!", ""])


# ---- calibration -----------------------------------------------------------------------------
def test_calibration_hand_case():
    # bin of 0.1: predicted 0.1, observed 0.5; bin of 0.9: predicted 0.9, observed 1.0
    c = drift.calibration([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1])
    assert c.mean_predicted == pytest.approx(0.5)
    assert c.observed_rate == pytest.approx(0.75)
    assert c.gap == pytest.approx(-0.25)
    assert c.ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)


def test_calibrated_predictions_have_zero_gap_and_ece():
    c = drift.calibration([0.25] * 4 + [1.0] * 2, [1, 0, 0, 0, 1, 1])
    assert c.gap == pytest.approx(0.0, abs=1e-12)
    assert c.ece == pytest.approx(0.0, abs=1e-12)   # 1.0 lands in the last bin


def test_ece_sees_miscalibration_that_cancels_in_the_mean():
    c = drift.calibration([0.0, 1.0], [1, 0])
    assert c.gap == 0.0 and c.ece == 1.0


@pytest.mark.parametrize("pred, labels, match", [
    ([], [], "predicted: empty"),
    ([0.5], [1, 0], "lengths differ"),
    ([1.5], [1], "probabilities must lie in"),
    ([0.5], [2], "labels: must be 0 or 1"),
    ([math.nan], [1], "predicted: contains NaN"),
])
def test_calibration_rejects_bad_input(pred, labels, match):
    with pytest.raises(ValueError, match=match):
        drift.calibration(pred, labels)


# ---- embedding drift on a subset -------------------------------------------------------------
def test_max_items_subsets_deterministically_and_changes_nothing_when_large_enough():
    ids = [f"i{k:03d}" for k in range(120)]
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(120, 6)), rng.normal(size=(120, 6))
    full = drift.embedding_drift(ids, a, ids, b)
    assert drift.embedding_drift(ids, a, ids, b, max_items=120) == full
    sub = drift.embedding_drift(ids, a, ids, b, max_items=30)
    assert sub == drift.embedding_drift(ids[::-1], a[::-1], ids, b, max_items=30)   # row order does not matter
    assert sub.shared == 120 and sub.k == 10
    # the subset is every ~4th sorted id: the same figures as computing on exactly those ids
    keep = np.linspace(0, 119, 30).round().astype(int)
    on_subset = drift.embedding_drift([ids[i] for i in keep], a[keep], [ids[i] for i in keep], b[keep])
    assert sub.mean_cosine_distance == pytest.approx(on_subset.mean_cosine_distance)
    assert sub.neighbour_overlap == pytest.approx(on_subset.neighbour_overlap)


# ---- input drift of a window -----------------------------------------------------------------
def test_the_first_window_has_no_reference():
    d = drift.input_drift({"a": 3}, ["u"], {"star": 1}, previous_items=None, previous_terms=None,
                          seen_items=set(), seen_users=set())
    assert all(math.isnan(x) for x in d)


def test_input_drift_hand_case():
    d = drift.input_drift({"a": 1, "b": 1}, ["u1", "u2", "u2"], {"war": 2},
                          previous_items={"a": 1, "c": 1}, previous_terms={"war": 1, "star": 1},
                          seen_items={"a", "c"}, seen_users={"u1"})
    assert d.new_item_share == 0.5 and d.new_user_share == 0.5       # b of {a, b}; u2 of {u1, u2}
    assert d.item_popularity_js == pytest.approx(0.5)                # half the mass moved to a disjoint id
    assert d.query_terms_js == pytest.approx(drift.js_divergence({"war": 2}, {"war": 1, "star": 1}))


def test_input_drift_without_clicks_or_queries_is_nan_for_those_parts():
    d = drift.input_drift({}, ["u1"], {}, previous_items={"a": 1}, previous_terms={"x": 1},
                          seen_items={"a"}, seen_users={"u1"})
    assert math.isnan(d.item_popularity_js) and math.isnan(d.new_item_share) and math.isnan(d.query_terms_js)
    assert d.new_user_share == 0.0
