"""`Trainer`: owns the model, the AdamW optimiser, the adaptive weighter and the
item-frequency estimate, and turns batches of user-history windows into updates.

It keeps all of that state across calls and assumes nothing about the data
beyond the batch it is given, so the same object serves offline training
(`fit`: epochs over sliding windows, early stopping on a validation callback)
and online incremental fine-tuning (`step` on micro-batches from the stream).

One step = one causal pass of the model over the batch, then
  retrieval = InfoNCE(rec states at feedback tokens -> next item)
            + search_weight * InfoNCE(query states (+ lexical channel) -> clicked item)
            (+ enhancer hard negatives / soft positives on a sample of rec rows)
  ranking   = alpha * BCE + (1 - alpha) * BPR at item tokens
  loss      = w_ret * retrieval + w_rank * ranking   (weights from the weighter)
Negatives: `all` scores every item (1,682 for ML-100k: cheap, exact, nothing to
correct); `sampled` uses in-batch targets + `n_negatives` uniform items with
logQ correction, the in-batch proposal estimated from running target counts
(the lexical search channel is trained only with `all`; with `sampled` its
weight stays at `lexical_init`). The learning rate warms up linearly over
`warmup_steps` (counted across calls, so online fine-tuning does not re-warm).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from unirec.model import enhancer as enh
from unirec.model import losses
from unirec.model.batching import History, train_batches
from unirec.model.config import TrainConfig
from unirec.model.model import UnifiedRecommender
from unirec.model.weighter import AdaptiveWeighter


class Trainer:
    def __init__(self, model: UnifiedRecommender, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
        self.has_ranking = model.cfg.use_feedback and cfg.weighter.fixed_ranking > 0
        w = cfg.weighter
        self.weighter = AdaptiveWeighter(
            ("retrieval", "ranking"), enabled=w.enabled and self.has_ranking, alpha=w.alpha, ema=w.ema,
            every=w.every, fixed={"retrieval": w.fixed_retrieval, "ranking": w.fixed_ranking},
            min_weight=w.min_weight, max_weight=w.max_weight)
        self.item_counts = torch.ones(model.vocab.n_rows)      # running target counts (+1 smoothing)
        self.steps = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.log: list[dict] = []

    # ---- one update -----------------------------------------------------------------------
    def _retrieval(self, u, targets, items, hard_ids=None, weight=None, lexical=None):
        """InfoNCE of states u (N, d) against target rows (N,), per the negatives setting."""
        if self.cfg.negatives == "all":
            # every item is in the denominator once already: a hard negative adds (w - 1) more
            extra = self.cfg.enhancer.hard_weight - 1.0
            return losses.full_catalogue_nce(u, items, targets, temperature=self.model.cfg.temperature,
                                             hard_ids=hard_ids if extra > 0 else None,
                                             hard_log_w=math.log(max(extra, 1e-12)), weight=weight,
                                             bias=lexical)
        neg_ids = torch.randint(1, items.shape[0], (self.cfg.n_negatives,), generator=self.gen)
        p = self.item_counts / self.item_counts.sum()
        pos_log_q = torch.log(len(targets) * p[targets])
        neg_log_q = math.log(self.cfg.n_negatives / (items.shape[0] - 1))
        hard = None if hard_ids is None else items[hard_ids.clamp(min=0)]
        return losses.info_nce(u, items[targets], targets, items[neg_ids], neg_ids,
                               temperature=self.model.cfg.temperature, in_batch=True, pos_log_q=pos_log_q,
                               neg_log_q=neg_log_q, hard=hard, hard_ids=hard_ids,
                               hard_log_w=math.log(self.cfg.enhancer.hard_weight), weight=weight)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-task losses (with graphs) for one batch."""
        m = self.model
        h, _ = m(batch)                                                          # (B, T, d)
        B, T, d = h.shape
        hf = h.reshape(B * T, d)
        items = m.item_embeddings()                                              # (N_rows, d)
        rec_t = batch["rec_target"].reshape(-1)
        rows = (rec_t > 0).nonzero().squeeze(1)
        hard_ids, soft = None, None
        ecfg = self.cfg.enhancer
        if ecfg.enabled and self.has_ranking and self.steps >= ecfg.warmup_steps and len(rows):
            e = enh.mine(m, batch, h.detach(), ecfg, self.gen)
            if e is not None:
                hard_ids = torch.full((len(rows), ecfg.top_k), -1, dtype=torch.int64)
                hard_ids[torch.searchsorted(rows, e.rows)] = e.hard_ids
                soft = e
        u = m.user_vectors(hf[rows])
        ret = self._retrieval(u, rec_t[rows], items, hard_ids)
        out = {"rec": ret.detach()}
        if soft is not None and len(soft.soft_rows):
            sl = self._retrieval(m.user_vectors(hf[soft.soft_rows]), soft.soft_items, items)
            n, s = len(rows), len(soft.soft_rows) * ecfg.soft_weight
            ret = (ret * n + sl * s) / (n + s)
            out["soft_positives"] = torch.tensor(float(len(soft.soft_rows)))
        if hard_ids is not None:
            out["hard_negatives"] = torch.tensor(float((hard_ids >= 0).sum()))
        srch_t = batch["search_target"].reshape(-1)
        srows = (srch_t > 0).nonzero().squeeze(1)
        if len(srows):
            lex = None
            if m.cfg.use_lexical and self.cfg.negatives == "all":
                lex = m.lexical_scores(batch["query"].reshape(B * T, -1)[srows])        # (S, N_rows)
            sl = self._retrieval(m.user_vectors(hf[srows]), srch_t[srows], items, lexical=lex)
            out["search"] = sl.detach()
            ret = ret + self.cfg.search_weight * sl
        out["retrieval"] = ret
        if self.has_ranking:
            mask = batch["rank_label"] >= 0
            out["ranking"] = losses.hybrid_rank_loss(m.rank_logits(h), batch["rank_label"].clamp(min=0), mask,
                                                     self.cfg.rank_alpha)
        return out

    def step(self, batch: dict) -> dict[str, float]:
        """One optimiser update on `batch`; returns the logged losses and weights."""
        self.model.train()
        t = batch["rec_target"].reshape(-1)
        self.item_counts += torch.bincount(t[t > 0], minlength=len(self.item_counts)).float()
        out = self.losses(batch)
        if self.has_ranking:
            shared = list(self.model.blocks[-1].parameters())
            w = self.weighter.update({"retrieval": out["retrieval"], "ranking": out["ranking"]}, shared)
            loss = w["retrieval"] * out["retrieval"] + w["ranking"] * out["ranking"]
        else:
            w = {"retrieval": 1.0}
            loss = out["retrieval"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        scale = min(1.0, (self.steps + 1) / max(1, self.cfg.warmup_steps))
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * scale
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.steps += 1
        rec = {k: float(v.detach()) for k, v in out.items()} | {f"w_{k}": float(v) for k, v in w.items()}
        self.log.append(rec)
        return rec

    def _over(self, start: float, first_step: int) -> bool:
        cfg = self.cfg
        return bool((cfg.time_budget_s and time.perf_counter() - start > cfg.time_budget_s)
                    or (cfg.max_steps and self.steps - first_step >= cfg.max_steps))

    # ---- offline loop -----------------------------------------------------------------------
    def fit(self, histories: list[History], validate: Callable[[], float], *, log: Callable[[str], None] = print
            ) -> dict:
        """Epochs over sliding windows with early stopping on `validate()` (higher is better).

        Keeps the best model's weights; stops at `epochs`, after `patience`
        evaluations without improvement, or when `time_budget_s` or `max_steps`
        (steps of this call) is spent.
        """
        cfg, mc = self.cfg, self.model.cfg
        rng = np.random.default_rng(cfg.seed)
        best, best_state, bad, start, first_step = -1.0, None, 0, time.perf_counter(), self.steps
        epoch = 0
        for epoch in range(1, cfg.epochs + 1):
            t0, logs = time.perf_counter(), []
            for batch in train_batches(histories, mc.max_len, cfg.batch_size, use_queries=mc.use_queries,
                                       use_feedback=mc.use_feedback, rng=rng):
                logs.append(self.step(batch))
                if self._over(start, first_step):
                    break
            mean = {k: float(np.mean([r[k] for r in logs if k in r])) for k in logs[0]} if logs else {}
            over = self._over(start, first_step)
            if epoch % cfg.eval_every == 0 or over or epoch == cfg.epochs:
                score = validate()
                log(f"epoch {epoch} {time.perf_counter() - t0:.1f}s "
                    + " ".join(f"{k}={v:.4f}" for k, v in mean.items()) + f" valid_ndcg@10={score:.4f}")
                if score > best:
                    best, bad = score, 0
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        break
            if over:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return {"best_valid": best, "epochs": epoch, "seconds": time.perf_counter() - start, "steps": self.steps}
