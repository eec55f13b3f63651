"""`Trainer`: owns the model, the AdamW optimiser, the adaptive weighter and the
item-frequency estimate, and turns batches of user-history windows into updates.

It keeps all of that state across calls and assumes nothing about the data
beyond the batch it is given, so the same object serves offline training
(`fit`: epochs over sliding windows, early stopping on a validation callback)
and online incremental fine-tuning (`step` on micro-batches from the stream).

One step = one causal pass of the model over the batch, then
  retrieval = InfoNCE(rec states at item tokens -> next item)
            + search_weight * InfoNCE(search states (+ lexical channel) -> clicked item)
            (+ enhancer hard negatives / soft positives on a sample of rec rows)
  ranking   = alpha * BCE + (1 - alpha) * BPR at item tokens
  loss      = w_ret * retrieval + w_rank * ranking   (weights from the weighter)
Negatives: `all` scores every item (1,682 for ML-100k: cheap, exact, nothing to
correct); `sampled` uses in-batch targets + `n_negatives` uniform items with
logQ correction, the in-batch proposal estimated from running target counts
(the lexical search channel and the repeat logit are trained only with `all`;
with `sampled` they stay at their initial values).

Learning rate: linear warm-up over `warmup_steps` (counted across calls, so
online fine-tuning does not re-warm); inside a budgeted `fit` (time_budget_s
or max_steps) it then follows a cosine to `min_lr_ratio * lr` over the budget
(a budget ends before the model has converged, so the annealed end is
worth more than a constant rate: test NDCG@10 0.053 -> 0.062 at 1,200 steps,
retrieval_only, one seed);
embedding tables learn `emb_lr_mult` times faster (each item row is a target a
few dozen times per epoch).

Where a unified step's time goes (process CPU time, 1 thread, ML-100k batch of
16 windows: ~450 rec rows, ~120 search rows, ~47 tokens; measured on the shared
2-core VM, so absolute values are ~1.3x an idle machine's, ratios hold):
retrieval-only step ~35 ms = trunk forward + backward ~21, next-item softmax
over all items + repeat logit ~12, optimiser ~2. A unified step ~56 ms
(1.57x; 66 ms and 1.70x with a query token per search click, measured in the
same way): + the search task ~12 (lexical cosines ~4, late-fusion MLP and
query lookup ~3, softmax rows ~2.5, query pieces on the click tokens ~1.2),
+ enhancer ~3 (its candidate pass costs ~25 ms, run every
`enhancer.every` = 8 steps), + ranking head / hybrid loss ~3, + weighter
(two partial backwards every `weighter.every` = 50 steps) < 1.
What was cut: queries ride on their click's token and the search state is a
late fusion (`model.py`: 46 instead of 57 tokens per window, and no search
position through the trunk); each label rides on the next event's token
(`batching.py`: instead of 108 tokens per window with feedback tokens); the
item-text mean is one sparse matmul (was a gathered (N, P, d) tensor: ~5x
less forward + backward); the optimiser is fused AdamW; the lexical cosines
are a CSR product without a graph; the item vectors are computed once per
step; the windows are tokenised once per `fit`; the enhancer and the
weighter run every few steps. Tried and dropped: training only a sample of
48 search clicks per step (1.43x instead of 1.57x, but at the step count
that buys, test NDCG@10 0.097 vs 0.100 and search Recall@10 0.764 vs 0.781,
one seed each).
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable

import numpy as np
import torch

from unirec.model import enhancer as enh
from unirec.model import losses
from unirec.model.batching import History, train_windows, window_batches
from unirec.model.config import TrainConfig
from unirec.model.model import UnifiedRecommender
from unirec.model.weighter import AdaptiveWeighter


class Trainer:
    def __init__(self, model: UnifiedRecommender, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        named = list(model.named_parameters())
        decay = [p for n, p in named if p.dim() >= 2 and "emb" not in n]     # weight matrices
        tables = [p for n, p in named if p.dim() >= 2 and "emb" in n]        # embedding tables
        rest = [p for n, p in named if p.dim() < 2]                          # biases, norms, scalars
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
                                      {"params": tables, "weight_decay": 0.0, "lr_mult": cfg.emb_lr_mult},
                                      {"params": rest, "weight_decay": 0.0, "lr_mult": 1.0}],
                                     lr=cfg.lr, fused=True)
        self.has_ranking = model.cfg.use_feedback and cfg.weighter.fixed_ranking > 0
        w = cfg.weighter
        self.weighter = AdaptiveWeighter(
            ("retrieval", "ranking"), enabled=w.enabled and self.has_ranking, alpha=w.alpha, ema=w.ema,
            every=w.every, fixed={"retrieval": w.fixed_retrieval, "ranking": w.fixed_ranking},
            min_weight=w.min_weight, max_weight=w.max_weight, log_gradients=w.gradient == "log")
        self.item_counts = torch.ones(model.vocab.n_rows)      # running target counts (+1 smoothing)
        self.steps = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.log: deque[dict] = deque(maxlen=10000)           # recent steps (bounded: online runs forever)
        self.progress: Callable[[], float] | None = None       # share of the lr schedule spent (fit, online learners)
        self.floor: float | None = None     # lr floor outside `fit` (online.min_lr_ratio); None: cfg.min_lr_ratio

    # ---- learning rate -------------------------------------------------------------------
    def lr_scale(self) -> float:
        """Linear warm-up over `warmup_steps` (counted across calls), then, inside a budgeted
        `fit`, cosine decay to `min_lr_ratio` over the budget; constant otherwise, or the
        online learner's cosine over the lineage's first steps down to `floor`."""
        cfg = self.cfg
        warm = min(1.0, (self.steps + 1) / max(1, cfg.warmup_steps))
        p = self.progress() if self.progress is not None else None
        if p is None or cfg.lr_decay == "none":
            return warm
        p = min(max(p, 0.0), 1.0)
        floor = cfg.min_lr_ratio if self.floor is None else self.floor
        return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))

    # ---- one update -----------------------------------------------------------------------
    def _retrieval(self, u, targets, items, hard_ids=None, weight=None, lexical=None, keep=None):
        """InfoNCE of states u (N, d) against target rows (N,), per the negatives setting.
        `keep` (a dict), with `all` negatives: receives the (N, N_rows) logits, detached, as "scores"."""
        if self.cfg.negatives == "all":
            # every item is in the denominator once already: a hard negative adds (w - 1) more
            extra = self.cfg.enhancer.hard_weight - 1.0
            bias = self.model.item_bias()                    # free rows of a growing table never compete
            s = losses.catalogue_logits(u, items, temperature=self.model.cfg.temperature,
                                        bias=bias if lexical is None else lexical + bias)
            if keep is not None:
                keep["scores"] = s.detach()
            return losses.catalogue_nce(s, targets, hard_ids=hard_ids if extra > 0 else None,
                                        hard_log_w=math.log(max(extra, 1e-12)), weight=weight)
        live = self.model.item_live.nonzero().squeeze(1)
        neg_ids = live[torch.randint(0, len(live), (self.cfg.n_negatives,), generator=self.gen)]
        p = self.item_counts / self.item_counts.sum()
        pos_log_q = torch.log(len(targets) * p[targets])
        neg_log_q = math.log(self.cfg.n_negatives / len(live))
        hard = None if hard_ids is None else items[hard_ids.clamp(min=0)]
        return losses.info_nce(u, items[targets], targets, items[neg_ids], neg_ids,
                               temperature=self.model.cfg.temperature, in_batch=True, pos_log_q=pos_log_q,
                               neg_log_q=neg_log_q, hard=hard, hard_ids=hard_ids,
                               hard_log_w=math.log(self.cfg.enhancer.hard_weight), weight=weight)

    def losses(self, batch: dict, inspect: Callable | None = None) -> dict[str, torch.Tensor]:
        """Per-task losses (with graphs) for one batch. `inspect(h, items, scored)`, if given,
        sees this forward's hidden states and item vectors and the loss's own scores (all
        detached, no grad) before any update: online test-then-train scores fresh windows off
        the training pass (model/online.py). `scored`: "rec" / "search" = {"rows": flat
        positions, "scores": (rows, N_rows) logits (`all` negatives only)}, "rank" = (B, T) logits."""
        m = self.model
        vec = m.item_vectors()                                                   # once per step
        h, _ = m(batch, item_vec=vec)                                            # (B, T, d)
        B, T, d = h.shape
        hf = h.reshape(B * T, d)
        items = m.item_embeddings(vec)                                           # (N_rows, d)
        scored = {"rec": {}, "search": {}} if inspect is not None else None
        rec_t = batch["rec_target"].reshape(-1)
        rows = (rec_t > 0).nonzero().squeeze(1)
        hard_ids, soft = None, None
        ecfg = self.cfg.enhancer
        if (ecfg.enabled and self.has_ranking and self.steps >= ecfg.warmup_steps and len(rows)
                and (self.steps - ecfg.warmup_steps) % max(1, ecfg.every) == 0):
            e = enh.mine(m, batch, h.detach(), ecfg, self.gen)
            if e is not None:
                hard_ids = torch.full((len(rows), ecfg.top_k), -1, dtype=torch.int64)
                hard_ids[torch.searchsorted(rows, e.rows)] = e.hard_ids
                soft = e
        u = m.user_vectors(hf[rows])
        rep = m.repeat_scores(batch, rows) if m.cfg.repeat_bias else None
        ret = self._retrieval(u, rec_t[rows], items, hard_ids, lexical=rep,
                              keep=None if scored is None else scored["rec"])
        out = {"rec": ret.detach()}
        if soft is not None and len(soft.soft_rows):
            srep = m.repeat_scores(batch, soft.soft_rows) if m.cfg.repeat_bias else None
            sl = self._retrieval(m.user_vectors(hf[soft.soft_rows]), soft.soft_items, items, lexical=srep)
            n, s = len(rows), len(soft.soft_rows) * ecfg.soft_weight
            ret = (ret * n + sl * s) / (n + s)
            out["soft_positives"] = torch.tensor(float(len(soft.soft_rows)))
        if hard_ids is not None:
            out["hard_negatives"] = torch.tensor(float((hard_ids >= 0).sum()))
        srch_t = batch["search_target"].reshape(-1)
        srows = (srch_t > 0).nonzero().squeeze(1)
        if len(srows):
            lex = None
            if self.cfg.negatives == "all":
                lex = m.batch_query_channel_scores(batch, srows)                    # (S, N_rows) or None
            sl = self._retrieval(m.search_vectors(h, batch, srows), srch_t[srows], items, lexical=lex,
                                 keep=None if scored is None else scored["search"])
            out["search"] = sl.detach()
            ret = ret + self.cfg.search_weight * sl
        out["retrieval"] = ret
        if self.has_ranking:
            mask = batch["rank_label"] >= 0
            logits = m.rank_logits(h)                                            # (B, T)
            out["ranking"] = losses.hybrid_rank_loss(logits, batch["rank_label"].clamp(min=0), mask,
                                                     self.cfg.rank_alpha)
            if scored is not None:
                scored["rank"] = logits.detach()
        if inspect is not None:
            scored["rec"]["rows"], scored["search"]["rows"] = rows, srows
            with torch.no_grad():
                inspect(h.detach(), items.detach(), scored)
        return out

    def step(self, batch: dict, inspect: Callable | None = None, lr_mult: float = 1.0) -> dict[str, float]:
        """One optimiser update on `batch`; returns the logged losses and weights
        (`inspect`: see `losses`). `lr_mult` scales this step's learning rate (the online
        learner's steps short of new windows, model/online.py)."""
        self.model.train()
        t = batch["rec_target"].reshape(-1)
        self.item_counts += torch.bincount(t[t > 0], minlength=len(self.item_counts)).float()
        out = self.losses(batch, inspect)
        if self.has_ranking:
            shared = list(self.model.blocks[-1].parameters())
            w = self.weighter.update({"retrieval": out["retrieval"], "ranking": out["ranking"]}, shared)
            loss = w["retrieval"] * out["retrieval"] + w["ranking"] * out["ranking"]
        else:
            w = {"retrieval": 1.0}
            loss = out["retrieval"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        scale = self.lr_scale() * lr_mult
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * g["lr_mult"] * scale
        # pre-clipping norm (the publish gate watches its maximum); inf = measure, do not clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                              self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.steps += 1
        rec = {k: float(v.detach()) for k, v in out.items()} | {f"w_{k}": float(v) for k, v in w.items()}
        rec |= {"grad_norm": float(norm), "lr": self.cfg.lr * scale, "loss": float(loss.detach())}
        self.log.append(rec)
        return rec

    # ---- state beyond the model's weights (for resuming online learning) ------------------
    def state_arrays(self) -> dict[str, torch.Tensor]:
        """Optimiser moments per named parameter, item counts, step count: flat tensors."""
        out = {"trainer.steps": torch.tensor([self.steps]), "trainer.item_counts": self.item_counts.clone()}
        for name, p in self.model.named_parameters():
            for k, v in self.opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    out[f"opt.{name}.{k}"] = v.detach().clone().reshape(v.shape or (1,))
        return out

    def load_state_arrays(self, arrays: dict) -> None:
        arrays = {k: torch.as_tensor(v) for k, v in arrays.items()}
        self.steps = int(arrays["trainer.steps"][0])
        self.item_counts = arrays["trainer.item_counts"].float().clone()
        for name, p in self.model.named_parameters():
            st = {k.rsplit(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"opt.{name}.")
                  and k.count(".") == name.count(".") + 2}
            if st:
                self.opt.state[p] = {k: (v.reshape(()) if k == "step" else v.clone()) for k, v in st.items()}

    # ---- a growing item table (online) ---------------------------------------------------
    def resize_items(self, n_rows: int) -> None:
        """Grow the model's item table to `n_rows`, carrying the optimiser's moments across."""
        old, new = self.model.resize_items(n_rows)
        if new is old:
            return
        for group in self.opt.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = self.opt.state.pop(old, None)
        if state:
            pad = n_rows - old.shape[0]
            self.opt.state[new] = {k: torch.cat([v, v.new_zeros(pad, *v.shape[1:])]) if torch.is_tensor(v)
                                   and v.dim() == 2 else v for k, v in state.items()}
        self.item_counts = torch.cat([self.item_counts, torch.ones(n_rows - len(self.item_counts))])

    @torch.no_grad()
    def reset_rows(self, rows) -> None:
        """Rows handed to new items: fresh embedding, no optimiser history, no target counts."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        if not len(rows):
            return
        w = self.model.item_emb.weight
        w[rows] = torch.randn(len(rows), w.shape[1], generator=self.gen) * 0.02
        for v in self.opt.state.get(w, {}).values():
            if torch.is_tensor(v) and v.dim() == 2:
                v[rows] = 0.0
        self.item_counts[rows] = 1.0

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
        best, best_state, best_trainer, bad = -1.0, None, {}, 0
        start, first_step = time.perf_counter(), self.steps
        budgets = [f for f in (cfg.time_budget_s and (lambda: (time.perf_counter() - start) / cfg.time_budget_s),
                               cfg.max_steps and (lambda: (self.steps - first_step) / cfg.max_steps)) if f]
        schedule = self.progress, self.floor   # the caller's (an online learner's), put back after the fit
        self.progress = (lambda: max(f() for f in budgets)) if budgets else None
        self.floor = None                      # a budgeted fit decays to train.min_lr_ratio
        token_lists = train_windows(histories, mc.max_len, use_queries=mc.use_queries,   # tokenised once, not per epoch
                                    use_feedback=mc.use_feedback, all_targets=cfg.all_targets,
                                    feedback_tokens=mc.feedback_tokens, use_query_vecs=mc.sentence_encoder)
        epoch = 0
        for epoch in range(1, cfg.epochs + 1):
            t0, logs = time.perf_counter(), []
            for batch in window_batches(token_lists, cfg.batch_size, rng=rng):
                logs.append(self.step(batch))
                if self._over(start, first_step):
                    break
            mean = {k: float(np.mean([r[k] for r in logs if k in r])) for k in logs[0]} if logs else {}
            over = self._over(start, first_step)
            early = self.progress is not None and self.progress() < cfg.eval_after
            if (epoch % cfg.eval_every == 0 and not early) or over or epoch == cfg.epochs:
                score = validate()
                log(f"epoch {epoch} {time.perf_counter() - t0:.1f}s "
                    + " ".join(f"{k}={v:.4f}" for k, v in mean.items()) + f" valid_ndcg@10={score:.4f}")
                if score > best:
                    best, bad = score, 0
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    best_trainer = self.state_arrays()   # its optimiser moments, item counts, step count
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        break
            if over:
                break
        self.progress, self.floor = schedule   # later steps run at the schedule they had before the fit
        steps = self.steps
        if best_state is not None:
            # the best weights with the optimiser state that goes with them: training that resumes
            # from here (online fine-tuning) starts from moments and a step count of these weights
            self.model.load_state_dict(best_state)
            self.load_state_arrays(best_trainer)
        return {"best_valid": best, "epochs": epoch, "seconds": time.perf_counter() - start, "steps": steps,
                "best_steps": self.steps}
