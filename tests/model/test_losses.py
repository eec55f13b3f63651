"""Each loss against a hand-computed case."""
import math

import pytest
import torch

from unirec.model import losses


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def _case():
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    pos_ids = torch.tensor([1, 2])
    neg = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    neg_ids = torch.tensor([3, 1])          # item 1 is row 0's positive: an accidental hit there
    return user, pos, pos_ids, neg, neg_ids


def test_info_nce_in_batch_plus_sampled_with_accidental_hit_masked():
    user, pos, pos_ids, neg, neg_ids = _case()
    got = losses.info_nce(user, pos, pos_ids, neg, neg_ids)
    row0 = lse(2, 0, 1) - 2            # own 2, in-batch item 2: 0, neg item 3: 1, neg item 1 masked
    row1 = lse(1, 0, 1, 3) - 1         # own 1, in-batch item 1: 0, neg 3: 1, neg 1: 3 (a true negative here)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_info_nce_temperature_and_logq():
    user, pos, pos_ids, neg, neg_ids = _case()
    lq = torch.log(torch.tensor([0.5, 2.0]))     # expected in-batch counts of items 1, 2
    c = math.log(0.25)                           # uniform: 2 of 8 items
    got = losses.info_nce(user, pos, pos_ids, neg, neg_ids, temperature=0.5, pos_log_q=lq, neg_log_q=c)
    a, b = math.log(0.5), math.log(2.0)
    row0 = [4 - a, 0 - b, 2 - c]
    row1 = [2 - b, 0 - a, 2 - c, 6 - c]
    want = ((lse(*row0) - row0[0]) + (lse(*row1) - row1[0])) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_info_nce_hard_negatives_and_weights():
    user, pos, pos_ids, neg, neg_ids = _case()
    hard = torch.tensor([[[3.0, 0.0], [9.0, 9.0]], [[1.0, 2.0], [0.0, 0.0]]])
    hard_ids = torch.tensor([[7, -1], [8, 2]])   # row 0 pad; row 1 slot 2 = its own positive -> masked
    w = torch.tensor([1.0, 0.25])
    got = losses.info_nce(user, pos, pos_ids, neg, neg_ids, hard=hard, hard_ids=hard_ids,
                          hard_log_w=math.log(2.0), weight=w)
    row0 = lse(2, 0, 1, 3 + math.log(2)) - 2
    row1 = lse(1, 0, 1, 3, 2 + math.log(2)) - 1
    assert got.item() == pytest.approx((row0 * 1.0 + row1 * 0.25) / 1.25, rel=1e-6)


def test_full_catalogue_equals_info_nce_without_in_batch():
    g = torch.Generator().manual_seed(0)
    items = torch.randn(12, 4, generator=g)
    user = torch.randn(5, 4, generator=g)
    targets = torch.tensor([1, 3, 3, 11, 7])
    hard_ids = torch.tensor([[2, -1], [4, 5], [3, 6], [-1, -1], [1, 9]])
    w = torch.tensor([1.0, 1.0, 0.1, 1.0, 0.5])
    fast = losses.full_catalogue_nce(user, items, targets, temperature=0.3, hard_ids=hard_ids,
                                     hard_log_w=math.log(1.5), weight=w)
    plain = losses.info_nce(user, items[targets], targets, items[1:], torch.arange(1, 12), temperature=0.3,
                            in_batch=False, hard=items[hard_ids.clamp(min=0)], hard_ids=hard_ids,
                            hard_log_w=math.log(1.5), weight=w)
    assert fast.item() == pytest.approx(plain.item(), rel=1e-5)


def test_bce_and_bpr_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [5.0, -1.0, 0.0]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    sig = lambda x: 1 / (1 + math.exp(-x))
    # BPR pairs stay inside a row: (2 vs 0), (2 vs 1) in row 0; (-1 vs 5) in row 1 (entry 2 masked)
    want_bpr = -(math.log(sig(2)) + math.log(sig(1)) + math.log(sig(-6))) / 3
    assert losses.bpr(logits, labels, mask).item() == pytest.approx(want_bpr, rel=1e-6)
    ys = [(2, 1), (0, 0), (1, 0), (5, 0), (-1, 1)]
    want_bce = -sum(y * math.log(sig(x)) + (1 - y) * math.log(1 - sig(x)) for x, y in ys) / 5
    assert losses.bce(logits[mask], labels[mask]).item() == pytest.approx(want_bce, rel=1e-6)
    got = losses.hybrid_rank_loss(logits, labels, mask, alpha=0.3)
    assert got.item() == pytest.approx(0.3 * want_bce + 0.7 * want_bpr, rel=1e-6)


def test_bpr_without_pairs_is_zero_with_gradient():
    logits = torch.tensor([[1.0, 2.0]], requires_grad=True)
    out = losses.bpr(logits, torch.tensor([[1, 1]]), torch.tensor([[True, True]]))
    assert out.item() == 0.0
    out.backward()
    assert logits.grad is not None
