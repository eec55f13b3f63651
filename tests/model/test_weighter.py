"""Gradient-guided adaptive weighter on constructed examples."""
import pytest
import torch

from unirec.model.weighter import AdaptiveWeighter


def _weighter(**kw):
    return AdaptiveWeighter(("retrieval", "ranking"), **kw)


def test_stalled_task_gets_more_weight():
    w = _weighter(alpha=1.0)
    w.initial = {"retrieval": 4.0, "ranking": 1.0}
    # equal gradient norms; retrieval halved its loss, ranking has not moved
    got = w.target_weights({"retrieval": 2.0, "ranking": 1.0}, {"retrieval": 1.0, "ranking": 1.0})
    assert got["ranking"] > got["retrieval"]
    assert got["ranking"] / got["retrieval"] == pytest.approx(2.0)     # r ratio 1.0 / 0.5, alpha 1
    assert sum(got.values()) == pytest.approx(2.0)


def test_task_with_huge_gradients_gets_less_weight():
    w = _weighter(alpha=0.5)
    w.initial = {"retrieval": 1.0, "ranking": 1.0}
    got = w.target_weights({"retrieval": 0.8, "ranking": 0.8}, {"retrieval": 10.0, "ranking": 1.0})
    assert got["retrieval"] < got["ranking"]
    assert got["ranking"] / got["retrieval"] == pytest.approx(10.0)
    assert sum(got.values()) == pytest.approx(2.0)


def test_clamp_bounds_the_weights():
    w = _weighter(alpha=0.5, min_weight=0.5, max_weight=2.0)
    w.initial = {"retrieval": 1.0, "ranking": 1.0}
    got = w.target_weights({"retrieval": 1.0, "ranking": 1.0}, {"retrieval": 100.0, "ranking": 1.0})
    assert got["retrieval"] == 0.5 and got["ranking"] == pytest.approx(2 * 100 / 101)


def test_update_measures_gradient_norms_on_shared_params_and_smooths():
    W = torch.nn.Parameter(torch.ones(3))
    w = _weighter(alpha=0.0, ema=0.5)
    for _ in range(6):
        losses = {"retrieval": (W * 100.0).sum(), "ranking": (W * 1.0).sum()}
        weights = w.update(losses, [W])
    assert w.grad_norms["retrieval"] == pytest.approx(100.0 * 3 ** 0.5, rel=1e-5)
    assert w.grad_norms["ranking"] == pytest.approx(3 ** 0.5, rel=1e-5)
    # target is (2/101, 200/101); EMA 0.5 from 1.0 for 6 steps approaches it
    assert weights["retrieval"] < 0.1 and weights["ranking"] > 1.9


def test_disabled_returns_fixed_weights_and_takes_no_gradients():
    W = torch.nn.Parameter(torch.ones(2))
    w = _weighter(enabled=False, fixed={"retrieval": 1.0, "ranking": 0.3})
    got = w.update({"retrieval": (W * 5).sum(), "ranking": W.sum()}, [W])
    assert got == {"retrieval": 1.0, "ranking": 0.3}
    assert w.grad_norms == {}


def test_state_round_trip():
    W = torch.nn.Parameter(torch.ones(2))
    a = _weighter()
    a.update({"retrieval": (W * 5).sum(), "ranking": W.sum()}, [W])
    b = _weighter()
    b.load_state_dict(a.state_dict())
    assert b.weights == a.weights and b.step == a.step and b.initial == a.initial
