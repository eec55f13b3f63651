"""Ranking-driven enhancer: selection on a constructed example, mining on a tiny model."""
import numpy as np
import pytest
import torch

from unirec.model import enhancer
from unirec.model.batching import History, train_batches
from unirec.model.config import EnhancerConfig, ModelConfig
from unirec.model.model import UnifiedRecommender
from unirec.model.vocab import Vocab

CFG = EnhancerConfig(positions=4, top_k=3, hard_threshold=0.3, soft_threshold=0.8)


def test_select_hard_negatives_and_soft_positives():
    top = torch.tensor([[5, 6, 7], [8, 9, 10]])           # retrieval's top-3 per position
    probs = torch.tensor([[0.1, 0.5, 0.9], [0.95, 0.2, 0.85]])
    seen = torch.tensor([[False, False, False], [True, False, False]])
    hard, soft = enhancer.select(top, probs, seen, CFG)
    # ranked high by retrieval, low by the ranker -> hard negative
    assert hard.tolist() == [[5, -1, -1], [-1, 9, -1]]
    # high ranker score and not already in the user's window -> soft positive (item 8 is seen)
    assert soft.tolist() == [[False, False, True], [False, False, True]]


def _model_and_batch(**kw):
    torch.manual_seed(0)
    items = {str(i): {"title": f"film {i}", "genres": ["Drama"]} for i in range(1, 31)}
    cfg = ModelConfig(d_model=16, n_heads=2, n_buckets=100, max_len=20, dropout=0.0, **kw)
    m = UnifiedRecommender(cfg, Vocab.build(items, n_buckets=100, ngram=0, max_pieces=4))
    rng = np.random.default_rng(0)
    hs = [History(rng.integers(1, 31, 8), rng.integers(0, 2, 8), np.arange(8) * 100 + 10**9,
                  np.zeros(8, dtype=np.int64), [None] * 8) for _ in range(3)]
    return m, next(train_batches(hs, 20, 3))


def test_mine_excludes_target_and_uses_the_ranker():
    m, batch = _model_and_batch()
    h, _ = m(batch)
    # a ranker that scores everything low: every mined item becomes a hard negative, none soft
    with torch.no_grad():
        m.rank_head[-1].bias.fill_(-10.0)
    e = enhancer.mine(m, batch, h.detach(), CFG, torch.Generator().manual_seed(0))
    targets = batch["rec_target"].reshape(-1)[e.rows]
    assert len(e.rows) == CFG.positions and (targets > 0).all()
    assert (e.hard_ids >= 1).all() and (e.hard_ids != targets[:, None]).all()
    assert len(e.soft_items) == 0
    # a ranker that scores everything high: no hard negatives; soft positives are unseen items only
    with torch.no_grad():
        m.rank_head[-1].bias.fill_(10.0)
    e = enhancer.mine(m, batch, h.detach(), CFG, torch.Generator().manual_seed(0))
    assert (e.hard_ids == -1).all() and len(e.soft_items) > 0
    B, T = batch["item"].shape
    for row, item in zip(e.soft_rows.tolist(), e.soft_items.tolist()):
        assert item not in batch["item"][row // T].tolist()


def test_mining_reads_the_ranker_without_its_dropout(monkeypatch):
    m, batch = _model_and_batch(rank_dropout=0.9)
    m.train()                                        # mining runs inside a training step
    h, _ = m(batch)
    seen = []
    select = enhancer.select
    monkeypatch.setattr(enhancer, "select", lambda top, probs, *a: seen.append(probs) or select(top, probs, *a))
    for _ in range(2):
        enhancer.mine(m, batch, h.detach(), CFG, torch.Generator().manual_seed(0))
    assert m.training and torch.equal(seen[0], seen[1])   # the same candidates, the same eval-mode scores


@pytest.mark.parametrize("feedback_tokens", [False, True])
def test_candidate_tokens_match_a_real_next_item_token(feedback_tokens):
    """Scoring a candidate via the appended-token path equals putting it in the sequence."""
    m, _ = _model_and_batch(feedback_tokens=feedback_tokens)
    m.eval()
    h = History(np.array([3, 4, 5]), np.array([1, 0, 1]), np.array([100, 200, 300]) + 10**9,
                np.zeros(3, dtype=np.int64), [None] * 3)
    longer = History(np.array([3, 4, 5, 9]), np.array([1, 0, 1, 0]), np.array([100, 200, 300, 400]) + 10**9,
                     np.zeros(4, dtype=np.int64), [None] * 4)
    from unirec.model.batching import context_batch
    with torch.no_grad():
        p = m.rank([h], torch.tensor([[9, 2, 9]]), torch.tensor([400 + 10**9]))[0]
        hl, _ = m(context_batch([longer], 20, feedback_tokens=feedback_tokens))
        direct = torch.sigmoid(m.rank_logits(hl[0, 6 if feedback_tokens else 3]))   # the item token of event 3
        single = m.rank([h], torch.tensor([[9]]), torch.tensor([400 + 10**9]))[0, 0]   # the one-candidate path
    assert torch.allclose(p[0], direct, atol=1e-5) and torch.allclose(p[2], direct, atol=1e-5)
    assert torch.allclose(single, direct, atol=1e-5)
