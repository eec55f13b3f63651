"""The publish gate refuses non-finite losses, exploding gradients and NDCG regressions, and nothing else."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unirec.ops.config import PublishConfig
from unirec.ops.gate import REASONS, check, due

CFG = PublishConfig(max_grad_norm=10.0, min_eval_events=100, margin_mode="relative", margin=0.25)


def metrics(ndcg, n=1000):
    return {"ndcg@10": ndcg, "eval_events": n}


def test_healthy_candidate_within_the_margin_is_published():
    d = check(metrics(0.40), metrics(0.5), grad_norm=3.0, loss=1.2, cfg=CFG)
    assert d.ok and d.reasons == () and d.compared
    assert str(d) == "publish"


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_is_refused(loss):
    d = check(metrics(0.5), metrics(0.5), grad_norm=1.0, loss=loss, cfg=CFG)
    assert not d.ok and d.reasons == ("loss_not_finite",)
    assert "loss" in str(d)


@pytest.mark.parametrize("grad", [math.nan, math.inf])
def test_non_finite_gradient_norm_is_refused(grad):
    d = check(metrics(0.5), metrics(0.5), grad_norm=grad, loss=1.0, cfg=CFG)
    assert d.reasons == ("grad_norm_not_finite",)


def test_gradient_norm_above_the_limit_is_exploding_and_the_limit_itself_is_accepted():
    assert check(metrics(0.5), None, grad_norm=10.5, loss=1.0, cfg=CFG).reasons == ("grad_norm_exploding",)
    assert check(metrics(0.5), None, grad_norm=10.0, loss=1.0, cfg=CFG).ok


def test_relative_margin_refuses_a_drop_larger_than_the_margin():
    # current 0.5, 25% relative margin -> floor 0.375 (exact in binary floating point)
    assert check(metrics(0.375), metrics(0.5), 1.0, 1.0, CFG).ok
    d = check(metrics(0.37), metrics(0.5), 1.0, 1.0, CFG)
    assert d.reasons == ("metric_regressed",) and "0.3700" in d.details[0] and "0.3750" in d.details[0]


def test_a_drop_beyond_the_margin_but_within_sampling_noise_is_not_a_regression():
    # NDCG 0.06 -> 0.045 (-25%, past a 20% margin): on 300 events a side that is ~1 standard
    # error of noise (sqrt(0.06 * 0.94 * 2 / 300) = 0.019); on 20,000 a side it is ~8
    cfg = PublishConfig(min_eval_events=100, margin=0.2)
    small = check(metrics(0.045, 300), metrics(0.06, 300), 1.0, 1.0, cfg)
    assert small.ok and small.compared
    large = check(metrics(0.045, 20_000), metrics(0.06, 20_000), 1.0, 1.0, cfg)
    assert large.reasons == ("metric_regressed",)
    assert "on 20000 events" in large.details[0] and "sampling noise" in large.details[0]
    # noise_z 0: the margin alone, as before the guard
    assert check(metrics(0.045, 300), metrics(0.06, 300), 1.0, 1.0,
                 PublishConfig(min_eval_events=100, margin=0.2, noise_z=0.0)).reasons == ("metric_regressed",)


def test_the_noise_floor_follows_both_windows_sizes():
    cfg = PublishConfig(min_eval_events=1, margin=0.0, noise_z=2.0)
    # two standard errors for current 0.5 on 100 + 100 events: 2 * sqrt(0.25 * 0.02) = 0.1414
    assert check(metrics(0.36, 100), metrics(0.5, 100), 1.0, 1.0, cfg).ok
    assert not check(metrics(0.35, 100), metrics(0.5, 100), 1.0, 1.0, cfg).ok
    # one small side is enough to widen it: 2 * sqrt(0.25 * (1/100 + 1/10**6)) = 0.1000
    assert check(metrics(0.401, 100), metrics(0.5, 10**6), 1.0, 1.0, cfg).ok
    assert not check(metrics(0.399, 100), metrics(0.5, 10**6), 1.0, 1.0, cfg).ok


def test_absolute_margin_is_a_fixed_distance_not_a_share():
    absolute = PublishConfig(min_eval_events=100, margin_mode="absolute", margin=0.125)
    relative = PublishConfig(min_eval_events=100, margin_mode="relative", margin=0.125)
    # current 0.8: absolute floor 0.675, relative floor 0.7
    assert check(metrics(0.69), metrics(0.8), 1.0, 1.0, absolute).ok
    assert check(metrics(0.69), metrics(0.8), 1.0, 1.0, relative).reasons == ("metric_regressed",)
    assert check(metrics(0.67), metrics(0.8), 1.0, 1.0, absolute).reasons == ("metric_regressed",)


def test_no_comparison_without_a_current_version():
    d = check(metrics(0.0), None, 1.0, 1.0, CFG)
    assert d.ok and not d.compared


@pytest.mark.parametrize("cand_n, cur_n", [(99, 1000), (1000, 99), (None, 1000)])
def test_no_comparison_on_too_few_evaluated_events(cand_n, cur_n):
    cand = {"ndcg@10": 0.01} if cand_n is None else metrics(0.01, cand_n)
    d = check(cand, metrics(0.5, cur_n), 1.0, 1.0, CFG)
    assert d.ok and not d.compared


@pytest.mark.parametrize("current", [None, math.nan, "n/a"])
def test_no_comparison_when_the_current_version_has_no_usable_metric(current):
    d = check(metrics(0.01), metrics(current), 1.0, 1.0, CFG)
    assert d.ok and not d.compared


def test_candidate_without_a_finite_metric_on_enough_events_is_refused():
    assert check(metrics(math.nan), metrics(0.5), 1.0, 1.0, CFG).reasons == ("metric_not_finite",)
    assert check({"eval_events": 1000}, metrics(0.5), 1.0, 1.0, CFG).reasons == ("metric_not_finite",)


def test_every_reason_is_reported_in_a_stable_order():
    d = check(metrics(0.1), metrics(0.5), grad_norm=1e6, loss=math.nan, cfg=CFG)
    assert d.reasons == ("loss_not_finite", "grad_norm_exploding", "metric_regressed")
    assert len(d.details) == 3 and all(r in REASONS for r in d.reasons)


def test_metric_and_count_keys_are_configurable():
    cfg = PublishConfig(metric="hr@10", count_metric="n", min_eval_events=10, margin=0.1)
    assert check({"hr@10": 0.1, "n": 50}, {"hr@10": 0.5, "n": 50}, 1.0, 1.0, cfg).reasons == ("metric_regressed",)
    assert check({"ndcg@10": 0.0, "hr@10": 0.5, "n": 50}, {"hr@10": 0.5, "n": 50}, 1.0, 1.0, cfg).ok


@given(cur=st.floats(0.0, 1.0), a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0),
       mode=st.sampled_from(["relative", "absolute"]), margin=st.floats(0.0, 1.0),
       noise_z=st.floats(0.0, 5.0), n=st.integers(1, 10**6), n_cur=st.integers(1, 10**6))
def test_accepting_a_candidate_accepts_every_better_one(cur, a, b, mode, margin, noise_z, n, n_cur):
    cfg = PublishConfig(min_eval_events=1, margin_mode=mode, margin=margin, noise_z=noise_z)
    lo, hi = sorted((a, b))
    if check(metrics(lo, n), metrics(cur, n_cur), 1.0, 1.0, cfg).ok:
        assert check(metrics(hi, n), metrics(cur, n_cur), 1.0, 1.0, cfg).ok
    assert check(metrics(cur), metrics(cur), 1.0, 1.0, cfg).ok  # no change never regresses


def test_due_after_n_steps_or_t_seconds_and_never_without_a_new_step():
    cfg = PublishConfig(every_steps=10, every_seconds=5.0)
    assert not due(9, 4.9, cfg)
    assert due(10, 0.0, cfg) and due(1, 5.0, cfg)
    assert not due(0, 100.0, cfg)
    assert not due(1000, 1.0, PublishConfig(every_steps=0, every_seconds=5.0))
    assert not due(1, 1e9, PublishConfig(every_steps=10, every_seconds=0))


@pytest.mark.parametrize("kw, key", [({"max_grad_norm": 0.0}, "max_grad_norm"), ({"margin": -0.1}, "margin"),
                                     ({"margin": 1.5}, "margin"), ({"every_steps": -1}, "every_steps"),
                                     ({"min_eval_events": -1}, "min_eval_events"),
                                     ({"noise_z": -1.0}, "noise_z"), ({"noise_z": math.inf}, "noise_z")])
def test_config_rejects_meaningless_values(kw, key):
    with pytest.raises(ValueError, match=key):
        PublishConfig(**kw)
