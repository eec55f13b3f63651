"""Ranking-driven enhancer (UniGRF): the ranker teaches retrieval.

For a sample of `positions` retrieval positions per batch (tokens with a
next-item target):

1. retrieval's top-K items for that state, the target excluded;
2. the ranking head scores them (no gradient, dropout off) through the
   candidate-token mechanism: each is an item token (carrying the position's
   event label) that sees the history up to that position and itself, at the
   next token index and the target event's timestamp (the request time);
3. `select`: items retrieval ranks high but the ranker scores below
   `hard_threshold` become *hard negatives* of that row - they are made sure to
   be in the InfoNCE denominator (with sampled negatives they might not be) and
   weighted by `hard_weight`; items the ranker scores above `soft_threshold`
   and that are not in the user's window (neither seen before nor the user's
   own later items) become *soft positives*: extra InfoNCE rows with weight
   `soft_weight` (the true target has weight 1).

The enhancer waits `warmup_steps` so that an untrained ranker does not inject
noise, then mines on every `every`-th step only (its candidate pass re-runs the
batch's history: ~40% of a unified step when run on every step). Retrieval's
top-K is taken with the model's repeat logit, as the trainer scores items, so
the hard negatives are the unseen items retrieval wrongly puts first. The selection is a pure function, tested on a constructed example.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from unirec.model.config import EnhancerConfig


@dataclass
class Enhancement:
    rows: torch.Tensor        # (N,) flat indices (b * T + t) of the selected retrieval positions
    hard_ids: torch.Tensor    # (N, K) hard-negative item rows, -1 = none
    soft_rows: torch.Tensor   # (S,) flat position indices of soft positives
    soft_items: torch.Tensor  # (S,) their item rows


def select(top_items: torch.Tensor, probs: torch.Tensor, seen: torch.Tensor,
           cfg: EnhancerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives (N, K) (-1 = none) and a soft-positive mask (N, K).

    top_items (N, K) retrieval's top-K (target already excluded), probs (N, K)
    ranker probabilities, seen (N, K) True where the item is in the user's window.
    """
    hard = torch.where(probs < cfg.hard_threshold, top_items, torch.full_like(top_items, -1))
    soft = (probs > cfg.soft_threshold) & ~seen
    return hard, soft


@torch.no_grad()
def mine(model, batch: dict, h: torch.Tensor, cfg: EnhancerConfig, generator: torch.Generator | None = None
         ) -> Enhancement | None:
    """Sample retrieval positions of `batch` (hidden states h (B, T, d)) and mine them."""
    target = batch["rec_target"]                                               # (B, T)
    flat = (target.reshape(-1) > 0).nonzero().squeeze(1)
    if flat.numel() == 0:
        return None
    flat = flat[torch.randperm(flat.numel(), generator=generator)[: cfg.positions]].sort().values
    B, T = target.shape
    b, t = flat // T, flat % T
    u = model.user_vectors(h.reshape(B * T, -1)[flat])                         # (N, d)
    scores = model.retrieval_scores(u)                                         # (N, N_rows)
    if model.cfg.repeat_bias:
        scores = scores + model.repeat_scores(batch, flat)                     # as the trainer scores them
    scores[torch.arange(len(flat)), target.reshape(-1)[flat]] = float("-inf")
    top_scores, top = scores.topk(cfg.top_k, dim=-1)                           # (N, K)
    real = torch.isfinite(top_scores)      # fewer than K live items: -inf rows (padding, free) are not items

    # candidates per batch row: the K items of each selected position of that row
    per_row = torch.bincount(b, minlength=B)
    C = int(per_row.max()) * cfg.top_k
    cand = torch.zeros(B, C, dtype=torch.int64)
    prefix = torch.ones(B, C, dtype=torch.int64)
    cts = batch["ts"][:, :1].expand(B, C).clone()
    slot = torch.zeros(len(flat), dtype=torch.int64)
    fill = torch.zeros(B, dtype=torch.int64)
    for n in range(len(flat)):
        r = int(b[n])
        s = int(fill[r]) * cfg.top_k
        cand[r, s:s + cfg.top_k] = top[n]
        prefix[r, s:s + cfg.top_k] = t[n] + 1                                  # sees tokens 0..t
        cts[r, s:s + cfg.top_k] = batch["ts"][r, t[n] + 1]                     # the next event's time
        slot[n], fill[r] = s, fill[r] + 1
    was_training = model.training
    model.eval()
    try:
        _, hc = model(batch, cand, prefix, cts)                                # (B, C, d)
        logits = model.rank_logits(hc)                                         # (B, C), no dropout
    finally:
        model.train(was_training)
    gather = slot[:, None] + torch.arange(cfg.top_k)[None, :]                  # (N, K)
    probs = torch.sigmoid(logits[b[:, None], gather])                          # (N, K)
    window_items = batch["item"][b]                                            # (N, T)
    seen = (top[:, :, None] == window_items[:, None, :]).any(-1)               # (N, K)
    hard, soft = select(top, probs, seen, cfg)
    hard, soft = hard.masked_fill(~real, -1), soft & real
    nz = soft.nonzero()
    return Enhancement(flat, hard, flat[nz[:, 0]], top[nz[:, 0], nz[:, 1]])
