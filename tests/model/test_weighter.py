"""Gradient-guided adaptive weighter on constructed examples."""
import pytest
import torch

from unirec.model.weighter import AdaptiveWeighter


def _weighter(**kw):
    return AdaptiveWeighter(("retrieval", "ranking"), **kw)


def test_stalled_task_gets_more_weight():
    w = _weighter(alpha=1.0, log_gradients=False)    # the rate term alone (log mode also reads the losses)
    w.initial = {"retrieval": 4.0, "ranking": 1.0}
    # equal gradient norms; retrieval halved its loss, ranking has not moved
    got = w.target_weights({"retrieval": 2.0, "ranking": 1.0}, {"retrieval": 1.0, "ranking": 1.0})
    assert got["ranking"] > got["retrieval"]
    assert got["ranking"] / got["retrieval"] == pytest.approx(2.0)     # r ratio 1.0 / 0.5, alpha 1
    assert sum(got.values()) == pytest.approx(2.0)


def test_task_with_huge_gradients_gets_less_weight():
    w = _weighter(alpha=0.5, log_gradients=False)
    w.initial = {"retrieval": 1.0, "ranking": 1.0}
    got = w.target_weights({"retrieval": 0.8, "ranking": 0.8}, {"retrieval": 10.0, "ranking": 1.0})
    assert got["retrieval"] < got["ranking"]
    assert got["ranking"] / got["retrieval"] == pytest.approx(10.0)
    assert sum(got.values()) == pytest.approx(2.0)


def test_clamp_bounds_the_weights():
    w = _weighter(alpha=0.5, min_weight=0.5, max_weight=2.0, log_gradients=False)
    w.initial = {"retrieval": 1.0, "ranking": 1.0}
    got = w.target_weights({"retrieval": 1.0, "ranking": 1.0}, {"retrieval": 100.0, "ranking": 1.0})
    assert got["retrieval"] == 0.5 and got["ranking"] == pytest.approx(2 * 100 / 101)


def test_update_measures_gradient_norms_on_shared_params_and_smooths():
    W = torch.nn.Parameter(torch.ones(3))
    w = _weighter(alpha=0.0, ema=0.5, log_gradients=False)
    for _ in range(6):
        losses = {"retrieval": (W * 100.0).sum(), "ranking": (W * 1.0).sum()}
        weights = w.update(losses, [W])
    assert w.grad_norms["retrieval"] == pytest.approx(100.0 * 3 ** 0.5, rel=1e-5)
    assert w.grad_norms["ranking"] == pytest.approx(3 ** 0.5, rel=1e-5)
    # target is (2/101, 200/101); EMA 0.5 from 1.0 for 6 steps approaches it
    assert weights["retrieval"] < 0.1 and weights["ranking"] > 1.9


def test_log_gradients_make_each_pull_proportional_to_its_loss():
    """InfoNCE's loss and trunk gradient are ~10x the ranking loss's; plain GradNorm hands
    ranking 10x the weight, log mode keeps pulls in proportion to the losses."""
    losses, grads = {"retrieval": 6.0, "ranking": 0.6}, {"retrieval": 1.0, "ranking": 0.1}
    plain = _weighter(alpha=0.0, log_gradients=False)
    plain.initial = dict(losses)
    got = plain.target_weights(losses, grads)
    assert got["ranking"] == pytest.approx(10 * got["retrieval"])
    w = _weighter(alpha=0.0)
    w.initial = dict(losses)
    assert w.target_weights(losses, grads) == pytest.approx({"retrieval": 1.0, "ranking": 1.0})
    # ranking's gradient doubles at the same loss: it now pulls twice as hard, so its weight halves
    got = w.target_weights(losses, {"retrieval": 1.0, "ranking": 0.2})
    assert got["ranking"] * 0.2 / (got["retrieval"] * 1.0) == pytest.approx(0.6 / 6.0)
    assert got["retrieval"] / got["ranking"] == pytest.approx(2.0)


def test_update_in_log_mode_reads_the_smoothed_losses():
    W = torch.nn.Parameter(torch.ones(3))
    w = _weighter(alpha=0.0, ema=0.5)
    for _ in range(8):
        # same loss, scaled: equal gradients of log L -> equal weights
        weights = w.update({"retrieval": (W * 100.0).sum(), "ranking": (W * 1.0).sum()}, [W])
    assert weights == pytest.approx({"retrieval": 1.0, "ranking": 1.0})
    for _ in range(40):
        # ranking's loss drops 4x at the same gradient: its pull now outweighs its loss share
        weights = w.update({"retrieval": (W * 100.0).sum(), "ranking": (W * 1.0).sum() - 2.25}, [W])
    assert weights["retrieval"] / weights["ranking"] == pytest.approx(4.0, rel=0.02)


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
