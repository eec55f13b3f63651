"""Trainer: learns a simple pattern, keeps state across calls, early-stops on validation."""

import numpy as np
import pytest
import torch

from unirec.model.batching import History, train_batches
from unirec.model.config import EnhancerConfig, ModelConfig, TrainConfig, WeighterConfig
from unirec.model.model import UnifiedRecommender
from unirec.model.trainer import Trainer
from unirec.model.vocab import Vocab

N_ITEMS = 12


def _setup(**train_kw):
    torch.manual_seed(0)
    items = {str(i): {"title": f"film {i}", "genres": ["Drama"]} for i in range(1, N_ITEMS + 1)}
    mc = ModelConfig(d_model=16, n_heads=2, n_buckets=100, max_len=12, dropout=0.0)
    model = UnifiedRecommender(mc, Vocab.build(items, n_buckets=100, ngram=0, max_pieces=4))
    tc = TrainConfig(**{"lr": 1e-2, "batch_size": 8, "threads": 1,
                        "enhancer": EnhancerConfig(warmup_steps=5, positions=8, top_k=3, every=1),
                        "weighter": WeighterConfig(every=2)} | train_kw)
    return model, Trainer(model, tc)


def _cyclic_histories(n_users=8, length=10):
    """Item i is always followed by i + 1 (mod N); odd items are liked."""
    hs = []
    for u in range(n_users):
        items = (np.arange(length) + u) % N_ITEMS + 1
        q = [[3, 4] if k % 3 == 0 else None for k in range(length)]
        hs.append(History(items, items % 2, 10**9 + 3600 * np.arange(length),
                          np.array([x is not None for x in q], dtype=np.int64), q))
    return hs


@pytest.mark.parametrize("negatives", ["all", "sampled"])
def test_steps_learn_the_next_item(negatives):
    model, tr = _setup(negatives=negatives, n_negatives=6, enhancer=EnhancerConfig(enabled=False))
    hs = _cyclic_histories()
    batch = next(train_batches(hs, 12, 8))
    first = tr.losses(batch)
    for _ in range(40):
        log = tr.step(batch)
    assert np.isfinite(log["retrieval"]) and log["rec"] < float(first["rec"]) * 0.5
    assert log["ranking"] < float(first["ranking"].detach())
    model.eval()
    _, rows = model.recommend([hs[0]], 1)
    assert rows[0, 0].item() == hs[0].items[-1] % N_ITEMS + 1


def test_state_is_kept_across_calls_for_online_fine_tuning():
    model, tr = _setup()
    b1, b2 = list(train_batches(_cyclic_histories(16), 12, 8))[:2]
    tr.step(b1)
    counts = tr.item_counts.clone()
    tr.step(b2)
    assert tr.steps == 2 and tr.weighter.step == 2
    assert (tr.item_counts >= counts).all() and tr.item_counts.sum() > counts.sum()
    assert all("exp_avg" in s for s in tr.opt.state.values())
    assert "w_ranking" in tr.log[-1]


def test_enhancer_runs_after_warmup_and_logs_mined_items():
    model, tr = _setup()
    batch = next(train_batches(_cyclic_histories(), 12, 8))
    for _ in range(7):
        log = tr.step(batch)
    assert "hard_negatives" in log


def test_fit_early_stops_and_restores_the_best_weights_with_their_optimiser_state():
    model, tr = _setup(epochs=20, patience=2)
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.9])
    snapshots, states = [], []

    def validate():
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        states.append(tr.state_arrays())
        return next(scores)

    info = tr.fit(_cyclic_histories(), validate, log=lambda s: None)
    assert info["epochs"] == 4 and info["best_valid"] == 0.3
    best = snapshots[1]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    # what fine-tuning resumes with: the moments, counts and step count of those weights
    now = tr.state_arrays()
    assert now.keys() == states[1].keys() and all(torch.equal(v, states[1][k]) for k, v in now.items())
    assert tr.steps == info["best_steps"] < info["steps"]


def test_fit_stops_at_max_steps():
    model, tr = _setup(epochs=50, patience=50, max_steps=3, enhancer=EnhancerConfig(enabled=False))
    info = tr.fit(_cyclic_histories(32), lambda: 0.0, log=lambda s: None)
    assert info["steps"] == 3 and info["epochs"] == 1


def test_enhancer_mines_on_every_nth_step_after_warmup():
    model, tr = _setup(enhancer=EnhancerConfig(warmup_steps=2, positions=8, top_k=3, every=3))
    batch = next(train_batches(_cyclic_histories(), 12, 8))
    mined = ["hard_negatives" in tr.step(batch) for _ in range(9)]
    assert mined == [False, False, True, False, False, True, False, False, True]


def test_learning_rate_warms_up_decays_over_a_budgeted_fit_then_stays_constant_online():
    model, tr = _setup(warmup_steps=3, max_steps=12, epochs=50, patience=50, min_lr_ratio=0.1,
                       enhancer=EnhancerConfig(enabled=False))
    tr.fit(_cyclic_histories(64), lambda: 0.0, log=lambda s: None)
    lrs = [r["lr"] for r in tr.log]
    assert len(lrs) == 12 and lrs[0] < lrs[1] < lrs[2]                   # warm-up
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.3 * 1e-2   # cosine decay
    assert lrs[-1] >= 0.1 * 1e-2                                         # floor at min_lr_ratio * lr
    batch = next(train_batches(_cyclic_histories(), 12, 8))
    assert tr.step(batch)["lr"] == tr.step(batch)["lr"] == 1e-2          # after fit: constant (online)


def test_repeat_logit_learns_that_users_do_not_come_back_when_they_never_do():
    model, tr = _setup(enhancer=EnhancerConfig(enabled=False))
    batch = next(train_batches(_cyclic_histories(), 12, 8))   # next item is never in the window
    for _ in range(30):
        tr.step(batch)
    assert model.repeat_logit.item() < -0.05


def test_budgeted_fit_validates_only_after_eval_after_share_of_the_budget():
    model, tr = _setup(max_steps=40, epochs=50, patience=50, batch_size=4, eval_after=0.5,
                       enhancer=EnhancerConfig(enabled=False))
    seen = []
    tr.fit(_cyclic_histories(8), lambda: seen.append(tr.steps) or 0.0, log=lambda s: None)
    assert seen and min(seen) >= 20 and seen[-1] == 40
