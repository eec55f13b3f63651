"""Training losses as pure functions (no state), each checked by hand in tests.

Retrieval: sampled-softmax InfoNCE.  Row r (a user state u_r with target item
p_r) is scored against its candidate set

    [its own target p_r] + [the other rows' targets (in-batch)] + [M shared
    negatives (uniform sample, or the whole catalogue)] + [H row-specific hard
    negatives (from the enhancer)]

with logit s_rc = <u_r, v_c> / tau - log Q_c and loss -log softmax_r(own column).
* logQ correction (Yi et al. 2019, mixed negatives: Yang et al. 2020): a
  candidate's logit is lowered by the log of its expected count in the
  candidate set, so popular items are not over-penalised just for being sampled
  more: in-batch columns use log(batch size * target frequency), uniform ones
  log(M / |I|). The own column carries its in-batch correction too (it is one
  of the in-batch draws). With the whole catalogue as negatives nothing is
  sampled: pass log_q = None and no in-batch columns.
* accidental hits: any column other than the own one whose item equals p_r is
  masked (-inf): it is the positive, not a negative.
* hard negatives are not sampled from a proposal, so they get no logQ; their
  weight w enters as exp(s) * w = exp(s + log w). Hard-negative ids < 0 are padding.
* row weights (e.g. 1 for true targets, small for the enhancer's soft
  positives) give a weighted mean.

Ranking: hybrid = alpha * BCE(logit, label) + (1 - alpha) * BPR, with BPR =
mean over (positive, negative) pairs *of the same sequence* of
-log sigmoid(s_pos - s_neg). BCE calibrates the click probability, BPR orders
each user's own items (what GAUC measures).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def info_nce(
    user: torch.Tensor,            # (N, d) user states
    pos: torch.Tensor,             # (N, d) target item vectors
    pos_ids: torch.Tensor,         # (N,) target item ids
    neg: torch.Tensor | None = None,      # (M, d) shared negatives
    neg_ids: torch.Tensor | None = None,  # (M,)
    *,
    temperature: float = 1.0,
    in_batch: bool = True,
    pos_log_q: torch.Tensor | None = None,  # (N,) log expected count of each target among in-batch draws
    neg_log_q: torch.Tensor | float | None = None,  # (M,) or scalar, log expected count of shared negatives
    hard: torch.Tensor | None = None,       # (N, H, d) row-specific hard negatives
    hard_ids: torch.Tensor | None = None,   # (N, H), < 0 = padding
    hard_log_w: float = 0.0,                # log weight of a hard negative in the denominator
    weight: torch.Tensor | None = None,     # (N,) row weights
) -> torch.Tensor:
    N = user.shape[0]
    if N == 0:
        return user.sum() * 0.0
    logits = [(user * pos).sum(-1, keepdim=True) / temperature]               # (N, 1)
    ids = [pos_ids[:, None]]
    corr = [pos_log_q[:, None] if pos_log_q is not None else torch.zeros(N, 1)]
    if in_batch:
        inb = user @ pos.T / temperature                                       # (N, N)
        inb = inb.masked_fill(torch.eye(N, dtype=torch.bool), NEG_INF)         # own slot is column 0
        logits.append(inb)
        ids.append(pos_ids[None, :].expand(N, N))
        corr.append(pos_log_q[None, :].expand(N, N) if pos_log_q is not None else torch.zeros(N, N))
    if neg is not None:
        M = neg.shape[0]
        logits.append(user @ neg.T / temperature)                              # (N, M)
        ids.append(neg_ids[None, :].expand(N, M))
        q = torch.zeros(M) if neg_log_q is None else torch.as_tensor(neg_log_q, dtype=user.dtype).expand(M)
        corr.append(q[None, :].expand(N, M))
    if hard is not None:
        H = hard.shape[1]
        hl = torch.einsum("nd,nhd->nh", user, hard) / temperature              # (N, H)
        logits.append(hl.masked_fill(hard_ids < 0, NEG_INF))
        ids.append(hard_ids)
        corr.append(torch.full((N, H), -hard_log_w))
    s = torch.cat(logits, 1) - torch.cat(corr, 1)                              # (N, 1 + ...)
    all_ids = torch.cat(ids, 1)
    hit = all_ids == pos_ids[:, None]
    hit[:, 0] = False                                                          # the own column stays
    s = s.masked_fill(hit, NEG_INF)
    loss = torch.logsumexp(s, dim=1) - s[:, 0]                                 # (N,)
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp(min=1e-12)


def catalogue_logits(
    user: torch.Tensor,            # (N, d)
    items: torch.Tensor,           # (N_rows, d) every item; row 0 = padding, never a candidate
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,       # (N, N_rows) or (N_rows,) extra logit per candidate
) -> torch.Tensor:
    """(N, N_rows) logits of every state against every item, column 0 = -inf: the scores
    `full_catalogue_nce` trains, which are also the scores a full-ranking evaluation ranks
    (online test-then-train reads them off the training step)."""
    s = user @ items.T / temperature                                           # (N, N_rows)
    if bias is not None:
        s = s + bias
    s[:, 0] = NEG_INF
    return s


def catalogue_nce(
    s: torch.Tensor,               # (N, N_rows) `catalogue_logits`
    targets: torch.Tensor,         # (N,) target rows
    *,
    hard_ids: torch.Tensor | None = None,   # (N, H) extra copies of hard negatives, < 0 = padding
    hard_log_w: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of full-catalogue logits (`s` is not modified). Each hard id adds one
    more copy of that item to the denominator with weight exp(hard_log_w)."""
    if hard_ids is not None:
        extra = s.gather(1, hard_ids.clamp(min=0)) + hard_log_w                # (N, H)
        s = torch.cat([s, extra.masked_fill((hard_ids < 0) | (hard_ids == targets[:, None]), NEG_INF)], 1)
    loss = torch.nn.functional.cross_entropy(s, targets, reduction="none")    # (N,)
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp(min=1e-12)


def full_catalogue_nce(
    user: torch.Tensor,            # (N, d)
    items: torch.Tensor,           # (N_rows, d) every item; row 0 = padding, never a candidate
    targets: torch.Tensor,         # (N,) target rows
    *,
    temperature: float = 1.0,
    hard_ids: torch.Tensor | None = None,   # (N, H) extra copies of hard negatives, < 0 = padding
    hard_log_w: float = 0.0,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,       # (N, N_rows) extra logit per candidate (e.g. lexical match)
) -> torch.Tensor:
    """`info_nce` with the whole catalogue as negatives and no in-batch columns, as one
    dense cross-entropy (the fast path; tested equal to `info_nce`):
    `catalogue_nce(catalogue_logits(...))`."""
    return catalogue_nce(catalogue_logits(user, items, temperature=temperature, bias=bias), targets,
                         hard_ids=hard_ids, hard_log_w=hard_log_w, weight=weight)


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pointwise binary cross-entropy on click logits (labels 0/1), mean over entries."""
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def bpr(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(s_pos - s_neg) over each row's (pos, neg) pairs; (B, T) inputs.

    Returns 0 (with a graph) when no row has both a positive and a negative.
    """
    pos = mask & (labels == 1)
    neg = mask & (labels == 0)
    pairs = pos[:, :, None] & neg[:, None, :]                                  # (B, T, T) pos i, neg j
    if not pairs.any():
        return logits.sum() * 0.0
    diff = logits[:, :, None] - logits[:, None, :]                             # (B, T, T)
    return -F.logsigmoid(diff[pairs]).mean()


def hybrid_rank_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     alpha: float = 0.5) -> torch.Tensor:
    """alpha * BCE over masked entries + (1 - alpha) * per-row BPR; (B, T) inputs."""
    if not mask.any():
        return logits.sum() * 0.0
    point = bce(logits[mask], labels[mask])
    if alpha >= 1.0:
        return point
    return alpha * point + (1 - alpha) * bpr(logits, labels, mask)
