"""The trunk's layer: a pre-LN Transformer block whose attention rotates queries and keys by
the time-aware rotary angles (`positions.py`). `model.py` stacks `n_layers` of them."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from unirec.model import positions
from unirec.model.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x, cos, sin, mask=None, return_scores=False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)                                   # (B, T, C) each
        q, k, v = (z.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        q, k = positions.apply_rotary(q, cos, sin), positions.apply_rotary(k, cos, sin)
        if return_scores:   # pre-softmax scores, for tests of the rotary positions
            return q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)               # (B, H, T, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LN: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.drop(self.attn(self.ln1(x), cos, sin, mask))
        return x + self.drop(self.mlp(self.ln2(x)))
