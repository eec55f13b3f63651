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
    dropout: float = 0.2                # residual/embedding dropout
    attn_dropout: float = 0.0           # > 0 forces the slow math attention kernel on CPU
    max_len: int = 50                   # events per training window / serving context (2-3 tokens each);
                                        # SASRec's 50: ~3x cheaper steps than 200, better NDCG per second
    # text: hashed word pieces of item titles/genres and of queries share one table
    n_buckets: int = 20000              # hash buckets for word pieces (0 = padding)
    ngram: int = 3                      # character n-grams per word (0 = whole words only)
    max_item_pieces: int = 48           # pieces kept per item text
    max_query_pieces: int = 32          # pieces kept per query
    use_item_text: bool = True          # add the item-text embedding to the item-ID embedding
    use_queries: bool = True            # query tokens before search clicks (off: no search task)
    use_feedback: bool = True           # feedback tokens after each item (off: SASRec-like sequence)
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


@dataclass(frozen=True)
class WeighterConfig:
    enabled: bool = True
    alpha: float = 0.5                  # GradNorm restoring force: weight ~ descent-rate ratio^alpha
    ema: float = 0.9                    # smoothing of losses and of the weights
    every: int = 10                     # re-estimate gradient norms every N steps (costs a backward)
    min_weight: float = 0.5             # clamp of each weight (keeps retrieval from being starved)
    max_weight: float = 2.0
    fixed_retrieval: float = 1.0        # weights used when disabled
    fixed_ranking: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-3                    # with warm-up; 4e-3 oscillated (valid NDCG +-0.015 between epochs)
    warmup_steps: int = 30              # linear learning-rate warm-up (the bench affords only ~300 steps)
    weight_decay: float = 0.01          # AdamW; embeddings, norms and biases excluded
    batch_size: int = 16                # windows (sequences) per step, grouped by length
    epochs: int = 200                   # upper bound; early stopping usually ends sooner
    patience: int = 5                   # evaluations without validation NDCG@10 improvement
    eval_every: int = 1                 # epochs between validation evaluations
    time_budget_s: float = 0.0          # stop training after this many seconds (0 = no limit)
    max_steps: int = 0                  # stop after this many optimiser steps (0 = no limit)
    grad_clip: float = 1.0
    negatives: Literal["all", "sampled"] = "all"   # all items, or in-batch + uniform sample
    n_negatives: int = 256              # uniform negatives per batch when negatives == "sampled"
    rank_alpha: float = 0.5             # ranking loss = alpha * BCE + (1 - alpha) * BPR
    search_weight: float = 1.0          # search InfoNCE added to the retrieval loss with this weight
    seed: int = 2020
    threads: int = 2                    # torch intra-op threads (1 is faster on a contended CPU)
    checkpoint: str = ".cache/unirec/model.pt"   # where `unirec train --offline` saves the model
    enhancer: EnhancerConfig = field(default_factory=EnhancerConfig)
    weighter: WeighterConfig = field(default_factory=WeighterConfig)
