"""Time-aware rotary positions (SynerGen), as pure functions.

Each attention head of width D is rotated as D/2 pairs (the "rotate half"
layout: pair k is dims (k, k + D/2)). The pairs are split into two bands:

* index bands, k = 0 .. P_idx-1 (P_idx = D/2 - P_time), plain RoPE on the token
  index n:            theta_k(n)  = n * base^(-2k / D_idx),      D_idx = 2 * P_idx
* time bands, k = 0 .. P_time-1, driven by the event timestamp ts (seconds):
                      phi_k(ts)   = (ts - ts_ref) * omega_k,     omega_k = 2*pi / period_k
  with periods geometric from `period_min` to `period_max`
  (period_k = period_min * (period_max / period_min)^(k / (P_time - 1))).

A pair (x1, x2) at angle a becomes (x1 cos a - x2 sin a, x2 cos a + x1 sin a),
so the query-key score of tokens m, n depends only on theta(m) - theta(n) =
(m - n) * freq and phi(m) - phi(n) = (ts_m - ts_n) * omega: relative index and
relative time. Tokens of one event share its timestamp.

Precision: epoch seconds (~1e9) times omega (up to ~2e-3 rad/s) is ~1e6 rad, and
float32 (24-bit mantissa) cannot resolve that to the radian. The angles are
therefore computed in float64 after subtracting a per-sequence reference
timestamp `ts_ref` (the first valid timestamp of the sequence), and only cos/sin
are cast down. Adding a constant to every timestamp of a sequence therefore
leaves the angles - and so the attention scores - bit-for-bit unchanged.
With `time_pairs = 0` (or all omega = 0) the time dims are not rotated and the
function is plain RoPE on the index dims.
"""
from __future__ import annotations

import math

import torch


def split_pairs(head_dim: int, time_fraction: float) -> tuple[int, int]:
    """(index pairs, time pairs) for a head of width `head_dim`."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary positions, got {head_dim}")
    pairs = head_dim // 2
    time_pairs = int(round(pairs * time_fraction))
    return pairs - time_pairs, time_pairs


def index_frequencies(index_pairs: int, base: float = 10000.0) -> torch.Tensor:
    """base^(-2k/D_idx) for k < index_pairs, float64 (index_pairs,)."""
    k = torch.arange(index_pairs, dtype=torch.float64)
    return base ** (-2.0 * k / max(2 * index_pairs, 1))


def time_frequencies(time_pairs: int, period_min: float, period_max: float) -> torch.Tensor:
    """omega_k = 2*pi / period_k, periods geometric in [period_min, period_max], float64."""
    if time_pairs == 0:
        return torch.zeros(0, dtype=torch.float64)
    if time_pairs == 1:
        periods = torch.tensor([period_min], dtype=torch.float64)
    else:
        k = torch.arange(time_pairs, dtype=torch.float64) / (time_pairs - 1)
        periods = period_min * (period_max / period_min) ** k
    return 2 * math.pi / periods


def rotary_angles(
    index: torch.Tensor,      # (B, T) token index (int)
    ts: torch.Tensor,         # (B, T) event timestamp in seconds (int64 or float64)
    index_freq: torch.Tensor,  # (P_idx,) float64
    time_freq: torch.Tensor,   # (P_time,) float64
    ts_ref: torch.Tensor | None = None,  # (B,) reference timestamp; default ts[:, 0]
) -> torch.Tensor:
    """Angles (B, T, P_idx + P_time) in float64: index bands then time bands."""
    if ts_ref is None:
        ts_ref = ts[:, 0]
    dt = (ts.to(torch.float64) - ts_ref.to(torch.float64)[:, None])  # exact for int seconds < 2^53
    a_idx = index.to(torch.float64)[..., None] * index_freq.to(index.device)  # (B, T, P_idx)
    a_time = dt[..., None] * time_freq.to(index.device)                      # (B, T, P_time)
    return torch.cat([a_idx, a_time], dim=-1)


def cos_sin(angles: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of float64 angles, cast to `dtype`, shaped (B, 1, T, P) for (B, H, T, D) heads."""
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by per-pair angles; cos/sin are (B, 1, T, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
