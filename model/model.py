"""The unified generative recommender: one causal Transformer, read top to bottom.

Attention with time-aware rotary positions -> pre-LN block -> the recommender.

Tokens (see `batching.py` for the interleaving  [q?] i b [q?] i b ...):
  item token      = item_vec(i) + surface(rec|search) + type(item)
  feedback token  = item_vec(i) + label(neg|pos)      + type(feedback)
  query token     = mean(piece_emb(query pieces)) + surface(search) + type(query)
  item_vec(i)     = item_id_emb(i) + mean(piece_emb(title/genre pieces of i))
The word-piece table is shared by item texts and queries, so a query and the
title it was typed for meet in the same buckets.

Heads, all read off the one causal pass:
  retrieval  u_t = W h_t at feedback tokens (next item, recommendation) and at
             query tokens (the clicked item, search); score(u, i) = <u, item_vec(i)>
             / temperature, cosine when `normalize` (the item table is tied with
             the input tokens);
  search     the query state's dense score plus a learned-weight lexical channel:
             score(q, i) = <u_q, item_vec(i)> / temperature + lex_scale * lex(q, i),
             lex = cosine of idf-weighted bags of the same hashed word pieces
             (query vs item title/genres). Dense vectors of 64 dims learnt from
             ~25k search clicks cannot memorise which of 1,682 titles holds a
             rare word; the lexical channel can, and the dense part adds the
             user's history (which comedy, for the query "comedy"). A hybrid
             sparse + dense retriever, in one model, over one tokenisation;
  ranking    logit_t = MLP(h_t) at item tokens: the candidate *is* the token, so the
             ranker is target-aware through the whole trunk.
`rank()` scores K candidates in one pass by appending K item tokens that attend
to the history and to themselves only (HSTU's M-FALCON trick), all at the
next token index and the request timestamp.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from unirec.model import positions
from unirec.model.batching import FEEDBACK, ITEM, PAD, QUERY, History, context_batch
from unirec.model.config import ModelConfig
from unirec.model.vocab import Vocab


def lexical_index(item_pieces: torch.Tensor, n_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed idf per piece bucket and the sparse (N_rows, n_buckets) matrix of
    L2-normalised idf-weighted piece counts of each item (row 0 empty)."""
    rows = torch.arange(item_pieces.shape[0])[:, None].expand_as(item_pieces)
    keep = item_pieces > 0
    counts = torch.zeros(item_pieces.shape[0], n_buckets)
    counts.index_put_((rows[keep], item_pieces[keep]), torch.ones(int(keep.sum())), accumulate=True)
    df = (counts > 0).sum(0).float()
    n_docs = float((counts.sum(1) > 0).sum())
    idf = torch.log((1 + n_docs) / (1 + df)) + 1.0
    w = counts * idf
    w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return idf, w.to_sparse()


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


class UnifiedRecommender(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocab):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        d = cfg.d_model
        if d % cfg.n_heads:
            raise ValueError(f"d_model {d} is not divisible by n_heads {cfg.n_heads}")
        self.item_emb = nn.Embedding(vocab.n_rows, d)
        self.piece_emb = nn.Embedding(cfg.n_buckets, d, padding_idx=0)
        self.label_emb, self.surface_emb, self.type_emb = nn.Embedding(2, d), nn.Embedding(2, d), nn.Embedding(4, d)
        self.register_buffer("item_pieces", vocab.pieces.clone(), persistent=False)   # (N, P)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.retrieval_proj = nn.Linear(d, d)
        self.rank_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.lex_scale = nn.Parameter(torch.tensor(cfg.lexical_init if cfg.use_lexical else 0.0),
                                      requires_grad=cfg.use_lexical)
        idf, lex = lexical_index(vocab.pieces, cfg.n_buckets)
        self.register_buffer("piece_idf", idf, persistent=False)                   # (n_buckets,)
        self.register_buffer("lex_items", lex, persistent=False)                   # sparse (N_rows, n_buckets)
        idx_pairs, time_pairs = positions.split_pairs(d // cfg.n_heads, cfg.time_fraction)
        self.register_buffer("index_freq", positions.index_frequencies(idx_pairs, cfg.rope_base), persistent=False)
        self.register_buffer("time_freq", positions.time_frequencies(
            time_pairs, cfg.time_period_min_s, cfg.time_period_max_s), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])

    # ---- embeddings -------------------------------------------------------------------
    def _mean_pieces(self, pieces):                          # (N, P) -> (N, d)
        mask = (pieces > 0).unsqueeze(-1).float()
        return (self.piece_emb(pieces) * mask).sum(1) / mask.sum(1).clamp(min=1)

    def item_vectors(self) -> torch.Tensor:
        """(N_rows, d) item representation shared by input tokens and the retrieval head."""
        v = self.item_emb.weight
        return v + self._mean_pieces(self.item_pieces) if self.cfg.use_item_text else v

    def embed(self, batch, item_vec):
        """Token embeddings (B, T, d) from a collated batch."""
        kind, item = batch["type"], batch["item"]                              # (B, T)
        x = item_vec[item] * ((kind == ITEM) | (kind == FEEDBACK)).unsqueeze(-1)
        x = x + self.type_emb(kind)
        x = x + self.surface_emb(batch["surface"]) * (kind != FEEDBACK).unsqueeze(-1) * (kind != PAD).unsqueeze(-1)
        x = x + self.label_emb(batch["label"]) * (kind == FEEDBACK).unsqueeze(-1)
        is_q = kind == QUERY
        if is_q.any():   # only query positions pay for the piece lookup
            x = x.index_put((is_q,), x[is_q] + self._mean_pieces(batch["query"][is_q]))
        return x

    # ---- trunk --------------------------------------------------------------------------
    def trunk(self, x, index, ts, mask=None):
        """Run the blocks: x (B, T, d), index/ts (B, T) -> hidden (B, T, d)."""
        angles = positions.rotary_angles(index, ts, self.index_freq, self.time_freq)  # (B, T, D/2) float64
        cos, sin = positions.cos_sin(angles, x.dtype)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.ln_f(x)

    def forward(self, batch, cand_items=None, cand_prefix=None, cand_ts=None):
        """Hidden states (B, T, d) of the batch's tokens, and (B, C, d) of candidates if given.

        Candidate c of row b is an item token (surface rec) that sees the first
        `cand_prefix[b, c]` tokens of row b and itself, at token index
        `cand_prefix[b, c]` and timestamp `cand_ts[b, c]`.
        """
        item_vec = self.item_vectors()
        x = self.embed(batch, item_vec)                                         # (B, T, d)
        if cand_items is None:
            return self.trunk(x, batch["index"], batch["ts"]), None
        B, T = batch["type"].shape
        C = cand_items.shape[1]
        cx = item_vec[cand_items] + self.type_emb.weight[ITEM] + self.surface_emb.weight[0]  # (B, C, d)
        x = torch.cat([x, cx], dim=1)                                           # (B, T + C, d)
        index = torch.cat([batch["index"], cand_prefix], dim=1)
        ts = torch.cat([batch["ts"], cand_ts], dim=1)
        mask = torch.zeros(B, T + C, T + C, dtype=torch.bool)
        mask[:, :T, :T] = torch.ones(T, T, dtype=torch.bool).tril()
        mask[:, T:, :T] = torch.arange(T)[None, None, :] < cand_prefix[:, :, None]  # history prefix
        mask[:, T:, T:] = torch.eye(C, dtype=torch.bool)                        # and itself only
        h = self.trunk(x, index, ts, mask[:, None])
        return h[:, :T], h[:, T:]

    # ---- heads --------------------------------------------------------------------------
    def user_vectors(self, h):                               # (..., d) -> (..., d)
        u = self.retrieval_proj(h)
        return F.normalize(u, dim=-1) if self.cfg.normalize else u

    def item_embeddings(self) -> torch.Tensor:
        """(N_rows, d) retrieval-side item vectors (row 0 = padding/unknown, never a candidate)."""
        v = self.item_vectors()
        return F.normalize(v, dim=-1) if self.cfg.normalize else v

    def retrieval_scores(self, u, items=None):               # u (N, d) -> (N, N_rows) logits
        items = self.item_embeddings() if items is None else items
        s = u @ items.T / self.cfg.temperature
        s[..., 0] = float("-inf")
        return s

    def lexical_scores(self, pieces):                        # (N, Lq) query pieces -> (N, N_rows)
        """lex_scale * cosine(idf-weighted query pieces, idf-weighted item pieces)."""
        N = pieces.shape[0]
        q = torch.zeros(N, self.cfg.n_buckets)
        q.scatter_add_(1, pieces, (pieces > 0).float())                        # piece counts
        q = q * self.piece_idf
        q = q / q.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return self.lex_scale * torch.sparse.mm(self.lex_items, q.T).T          # (N, N_rows)

    def rank_logits(self, h):                                # (..., d) -> (...)
        return self.rank_head(h).squeeze(-1)

    # ---- public calls ---------------------------------------------------------------------
    def _context(self, histories, queries=None, query_ts=None):
        return context_batch(histories, self.cfg.max_len, use_queries=self.cfg.use_queries,
                             use_feedback=self.cfg.use_feedback, queries=queries, query_ts=query_ts)

    @torch.no_grad()
    def user_state(self, histories: list[History], queries=None, query_ts=None) -> torch.Tensor:
        """(B, d) retrieval query vectors: the state after each history (after the query, if given).

        A model built without query tokens ignores `queries`: it answers a
        search with its recommendation state."""
        if not self.cfg.use_queries:
            queries = None
        batch = self._context(histories, queries, query_ts)
        h, _ = self(batch)
        last = h[torch.arange(len(histories)), batch["length"] - 1]            # (B, d)
        return self.user_vectors(last)

    @torch.no_grad()
    def recommend(self, histories: list[History], k: int = 10):
        """Top-k (scores, item rows), each (B, k), for the next item of each history."""
        return self.retrieval_scores(self.user_state(histories)).topk(k, dim=-1)

    @torch.no_grad()
    def search(self, histories: list[History], queries: list[list[int]], k: int = 10, query_ts=None):
        """Top-k (scores, item rows) for each user's query (hashed pieces), personalised by history."""
        return self.search_scores(histories, queries, query_ts).topk(k, dim=-1)

    @torch.no_grad()
    def search_scores(self, histories: list[History], queries: list[list[int]], query_ts=None) -> torch.Tensor:
        """(B, N_rows) search scores: dense query state + lexical channel (rec state if no queries)."""
        s = self.retrieval_scores(self.user_state(histories, queries, query_ts))
        if self.cfg.use_queries and self.cfg.use_lexical:
            width = max(1, max(len(q) for q in queries))
            pieces = torch.zeros(len(queries), width, dtype=torch.int64)
            for b, q in enumerate(queries):
                pieces[b, : len(q)] = torch.as_tensor(q, dtype=torch.int64)
            s = s + self.lexical_scores(pieces)
        return s

    @torch.no_grad()
    def rank(self, histories: list[History], candidates: torch.Tensor, ts: torch.Tensor | None = None):
        """Click probabilities (B, K) of candidate rows (B, K), in one pass per batch.

        `ts` (B,) is the request time (default: each history's last timestamp).
        """
        batch = self._context(histories)
        length = batch["length"]
        if ts is None:
            ts = batch["ts"][torch.arange(len(histories)), (length - 1).clamp(min=0)]
        K = candidates.shape[1]
        if K == 1:   # one candidate = the next token of the sequence: the plain causal pass suffices
            return torch.sigmoid(self.rank_logits(self._append_and_run(batch, candidates[:, 0], ts)))[:, None]
        _, hc = self(batch, candidates, length[:, None].expand(-1, K), ts[:, None].expand(-1, K))
        return torch.sigmoid(self.rank_logits(hc))

    def _append_and_run(self, batch, items, ts):
        """Hidden state (B, d) of one item token written right after each row's last token."""
        B, n = len(items), batch["length"]
        grown = {k: torch.cat([v, v[:, -1:]], 1) if v.dim() >= 2 else v for k, v in batch.items()}
        grown["index"] = torch.arange(grown["type"].shape[1]).expand(B, -1)
        rows = torch.arange(B)
        for k, v in (("type", ITEM), ("item", items), ("label", 0), ("surface", 0), ("ts", ts)):
            grown[k][rows, n] = v if isinstance(v, torch.Tensor) else torch.full((B,), v)
        h, _ = self(grown)
        return h[rows, n]                                                       # (B, d)
