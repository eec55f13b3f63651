"""Time-aware rotary positions: invariances a user of the model relies on."""
import math

import numpy as np
import torch

from unirec.model import positions
from unirec.model.batching import History, context_batch
from unirec.model.config import ModelConfig
from unirec.model.blocks import Attention
from unirec.model.model import UnifiedRecommender
from unirec.model.vocab import Vocab

HEAD = 16


def _scores(q, k, ts, index_freq, time_freq):
    """Rotated q.k scores (B, T, T) for one head: q, k (B, T, D)."""
    idx = torch.arange(q.shape[1])[None].expand(q.shape[0], -1)
    cos, sin = positions.cos_sin(positions.rotary_angles(idx, ts, index_freq, time_freq))
    qr = positions.apply_rotary(q[:, None], cos, sin)[:, 0]
    kr = positions.apply_rotary(k[:, None], cos, sin)[:, 0]
    return qr @ kr.transpose(-1, -2)


def _setup(T=6):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, T, HEAD, generator=g), torch.randn(1, T, HEAD, generator=g)
    ts = torch.tensor([[881250949, 881250949, 881254000, 881300000, 885000000, 885000100]])[:, :T]
    p_idx, p_time = positions.split_pairs(HEAD, 0.5)
    return q, k, ts, positions.index_frequencies(p_idx), positions.time_frequencies(p_time, 3600.0, 6.3e7)


def test_scores_unchanged_when_all_timestamps_shift():
    q, k, ts, fi, ft = _setup()
    base = _scores(q, k, ts, fi, ft)
    for shift in (1, 12345, -800_000_000, 10**9):
        assert torch.equal(_scores(q, k, ts + shift, fi, ft), base)


def test_shift_invariance_needs_float64_reference():
    # the naive float32 angle ts * omega loses the relative phase at epoch-second scale
    _, _, ts, _, ft = _setup()
    naive = ts.float()[..., None] * ft.float()
    exact = (ts - ts[:, :1]).double()[..., None] * ft
    assert (naive - naive[:, :1] - exact).abs().max() > 0.1


def test_scores_change_when_one_gap_changes():
    q, k, ts, fi, ft = _setup()
    base = _scores(q, k, ts, fi, ft)
    moved = ts.clone()
    moved[0, 3:] += 7200          # two hours later from event 3 on
    changed = _scores(q, k, moved, fi, ft)
    assert not torch.allclose(changed[0, 3:, :3], base[0, 3:, :3])
    # pairs that keep their gap keep their score
    assert torch.allclose(changed[0, :3, :3], base[0, :3, :3])
    assert torch.allclose(changed[0, 3:, 3:], base[0, 3:, 3:], atol=1e-5)


def _plain_rope(x, n_pairs_idx, base=10000.0):
    """Textbook RoPE on the first n index pairs (dims k, k + D/2), other dims untouched."""
    T, D = x.shape[-2], x.shape[-1]
    half = D // 2
    out = x.clone()
    for t in range(T):
        for kk in range(n_pairs_idx):
            a = t * base ** (-2 * kk / (2 * n_pairs_idx))
            x1, x2 = x[..., t, kk], x[..., t, kk + half]
            out[..., t, kk] = x1 * math.cos(a) - x2 * math.sin(a)
            out[..., t, kk + half] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def test_equals_plain_rope_when_time_bands_zeroed():
    q, k, ts, fi, ft = _setup()
    got = _scores(q, k, ts, fi, torch.zeros_like(ft))
    p_idx = len(fi)
    want = _plain_rope(q, p_idx) @ _plain_rope(k, p_idx).transpose(-1, -2)
    assert torch.allclose(got, want, atol=1e-5)
    # and the time dims really are unrotated: only index dims depend on position
    assert not torch.allclose(got, q @ k.transpose(-1, -2))


def test_attention_module_scores_shift_invariant():
    cfg = ModelConfig(d_model=32, n_heads=2)
    att = Attention(cfg).eval()
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1))
    _, _, ts, _, _ = _setup()
    p_idx, p_time = positions.split_pairs(16, cfg.time_fraction)
    fi, ft = positions.index_frequencies(p_idx), positions.time_frequencies(p_time, 3600.0, 6.3e7)
    idx = torch.arange(6)[None]
    def scores(t):
        cos, sin = positions.cos_sin(positions.rotary_angles(idx, t, fi, ft))
        return att(x, cos, sin, return_scores=True)
    assert torch.equal(scores(ts), scores(ts + 86400 * 365))


def _tiny_model():
    items = {str(i): {"title": f"film {i}", "genres": ["Drama"]} for i in range(1, 21)}
    cfg = ModelConfig(d_model=32, n_heads=2, n_buckets=200, max_len=50, dropout=0.0)
    return UnifiedRecommender(cfg, Vocab.build(items, n_buckets=200, ngram=3, max_pieces=8)).eval()


def _history(items, labels, ts, queries):
    return History(np.array(items), np.array(labels), np.array(ts), np.array([q is not None for q in queries], dtype=np.int64), queries)


def test_causality_later_events_do_not_change_earlier_outputs():
    torch.manual_seed(0)
    m = _tiny_model()
    base = _history([1, 2, 3, 4, 5], [1, 0, 1, 1, 0], [100, 200, 300, 400, 500], [None, [5, 6], None, None, None])
    later = _history([1, 2, 3, 9, 7], [1, 0, 1, 0, 1], [100, 200, 300, 9999, 99999], [None, [5, 6], None, [7], None])
    with torch.no_grad():
        h1, _ = m(context_batch([base], 50))
        h2, _ = m(context_batch([later], 50))
    n_prefix = 3   # events 0..2, one token each (the query of event 1 rides on its token)
    assert torch.allclose(h1[0, :n_prefix], h2[0, :n_prefix], atol=1e-6)
    assert not torch.allclose(h1[0, n_prefix:n_prefix + 2], h2[0, n_prefix:n_prefix + 2])
