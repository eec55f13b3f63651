"""The unified generative recommender: one causal Transformer, read top to bottom.

Attention with time-aware rotary positions -> pre-LN block (`blocks.py`) -> the recommender.

Tokens (see `batching.py` for the sequence  i i i ..., one per event):
  item token      = item_vec(i) + surface(rec|search) + type(item) + label(prev event)
                    (+ q(query) on a search click: the query as context for later events)
  (with `feedback_tokens`: no label on those, and after each item token a
  feedback token = item_vec(i) + label(neg|pos) + type(feedback))
  item_vec(i)     = item_id_emb(i) + mean(piece_emb(title/genre pieces of i))
                    (+ W_s MiniLM(title/genres) with `sentence_encoder`: a frozen
                    pretrained vector, a learned projection from 0; sentence.py)
  q(query)        = mean(piece_emb(query pieces))
                    (+ W_s MiniLM(query text) with `sentence_encoder`, in the search
                    state only: the click's token carries the pieces, so passes
                    without a search never touch a 384-dim vector)
The word-piece table is shared by item texts and queries, so a query and the
title it was typed for meet in the same buckets.

Search by late fusion. The search state for a query typed after events
0..t-1 is  s = f(h_{t-1}, q) = LN(h_{t-1} + MLP([h_{t-1}; q]))  with h_{t-1} the
trunk's output at the previous event's token (the recommendation state, which
has seen only earlier events) and q the query's mean piece vector; a search
at the start of a history uses a learned start state instead of h_{t-1}. The
query never enters the trunk as a token of its own: a search costs one small
MLP on top of a state the trunk computes anyway, and the query reaches later
events through the click's own token (riding on the next token instead, as
labels do, changed nothing measurable: NDCG@10 0.108, AUC 0.794). The
search loss does not flow back into h_{t-1}: the search task reads the
recommendation state and trains the fusion, the start state, the tables and
the lexical weight. With that gradient the search loss (on ~25% of positions)
pulled the shared state toward query-conditional features: at the 100 s budget
test NDCG@10 0.093 vs 0.110 detached (retrieval-only: 0.101 in the same
session), search Recall@10 0.783 vs 0.779 (idle machine, one seed each). The first design put a query token before
each search click (its output was the search state: early fusion through both
layers); that made 57 instead of 46 tokens per ML-100k window, and a unified
step cost ~1.7x a retrieval-only step (CPU time; 1.57x now, breakdown in
`trainer.py`), so at the bench's equal time budget the unified model trained on
~35% fewer windows and lost NDCG@10 to the retrieval-only model (0.100 vs
0.106, while at equal steps the two are within noise). Late fusion costs
little search quality: search Recall@10 0.78-0.79 at 1,000 steps vs 0.80 with
query tokens (one seed each; text match alone: 0.71).

Heads, all read off the one causal pass:
  retrieval  u_t = W h_t at item tokens (next item, recommendation) and
             W f(h_{t-1}, q) for a search (the clicked item); score(u, i) = <u, item_vec(i)>
             / temperature, cosine when `normalize` (the item table is tied with
             the input tokens), plus (`repeat_bias`) one learned logit r / temperature
             on every item already in the context window: whether users come back
             to what they just consumed is learnt from the data (r starts at 0). A
             64-dim inner product cannot push down 50 specific items without
             pushing down their neighbours - the likely next items - too; without
             r a third of the top-10 slots went to items of the window (ML-100k,
             where nobody rates a film twice);
  search     the query state's dense score plus a learned-weight lexical channel:
             score(q, i) = <u_q, item_vec(i)> / temperature + lex_scale * lex(q, i),
             lex = cosine of idf-weighted bags of the same hashed word pieces
             (query vs item title/genres). Dense vectors of 64 dims learnt from
             ~25k search clicks cannot memorise which of 1,682 titles holds a
             rare word; the lexical channel can, and the dense part adds the
             user's history (which comedy, for the query "comedy"). A hybrid
             sparse + dense retriever, in one model, over one tokenisation.
             With `sentence_encoder`, a third, semantic channel:
             + semantic_scale * cos(MiniLM(q), MiniLM(text of i)), the pretrained
             bi-encoder's own query-title similarity (frozen vectors; the scale
             learns and starts at lexical_init, as lex_scale does), so a query
             meets the titles it means without sharing a word piece;
  ranking    logit_t = MLP(h_t) at item tokens: the candidate *is* the token, so the
             ranker is target-aware through the whole trunk. Two explicit inputs were
             tried on ML-100k (unified, 1,900 steps, seeds 1 and 2; held-out AUC moves
             +-0.01 between seeds on its ~1,900 ratings): a learned per-item logit
             (validation AUC 0.803 vs 0.803, seed 1) and a wide part w . f over the
             log-odds of the user's last 5 / 20 / all labels before the token (mean
             validation AUC 0.794 vs 0.792; test NDCG@10 lower). Neither was adopted. A
             post-hoc logistic fit on validation of [logit, last-10 label log-odds]
             gains +0.016 test AUC over the model alone (0.809 -> 0.825). The
             transformer under-uses the user's recent feedback, but training the
             same feature in does not recover that gain. What does is against
             memorisation: without dropout, over 2,400 steps (~11 epochs) the AUC on each user's
             last training click rose 0.80 -> 0.90 while validation AUC fell from
             0.80 (step 1,125) to 0.75; the checkpoint that validation NDCG picks
             (step 1,575) had validation/test AUC 0.789/0.795. Hence dropout on the
             ranking head's input (`rank_dropout`, 0.5): bench AUC (validation +
             test clicks) 0.808 and 0.806 on 2 seeds at 1,800 steps, test NDCG@10
             0.105 and 0.104. Trunk dropout 0.2 as well held train AUC at ~0.83 and
             gave AUC 0.802-0.804, but cost the unified model NDCG under the bench's
             time budget (0.0995 / 0.0968 vs the retrieval-only model's 0.108 / 0.109
             with the same dropout): not adopted. Fine-tuning online trains on each
             event about once and turns dropout off (`online.dropout`).
`rank()` scores K candidates in one pass by appending K item tokens that attend
to the history and to themselves only (HSTU's M-FALCON trick), all at the
next token index and the request timestamp.
`recommend()` returns retrieval's order, not a retrieve-then-rank cascade. Re-scoring
retrieval's top 50 by log p_retrieval + beta * log p_click (unified, 1,800 steps,
seed 2020; beta picked on validation) gave validation NDCG@10 0.1065 -> 0.1088 at
beta 0.25 but test 0.1035 -> 0.1004, and larger beta lost on both (beta 1: 0.0999 /
0.0890): the ranker predicts whether a consumed item is liked (rating >= 4), not which
item is consumed next. The cascade belongs to a caller ranking its own slate (`rank`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from unirec.model import positions
from unirec.model.batching import FEEDBACK, ITEM, PAD, History, context_batch, query_tensor, query_vec_tensor
from unirec.model.blocks import Block
from unirec.model.config import ModelConfig
from unirec.model.sparse import SparseMatmul, lexical_cosines, lexical_index, piece_counts, piece_mean_matrix
from unirec.model.vocab import Vocab, live_mask


def seen_matrix(items: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(R, n_rows) 1.0 where row r's item list `items` (R, L) holds that item (0 = none)."""
    seen = torch.zeros(items.shape[0], n_rows).scatter_(1, items, 1.0)
    seen[:, 0] = 0.0
    return seen


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
        self.register_buffer("item_live", live_mask(vocab), persistent=False)           # (N,) bool
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.retrieval_proj = nn.Linear(d, d)
        self.rank_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.rank_drop = nn.Dropout(cfg.rank_dropout)          # on the ranking head's input (no weights)
        self.repeat_logit = nn.Parameter(torch.tensor(0.0), requires_grad=cfg.repeat_bias)
        if cfg.use_queries:   # late fusion of the state before a search with its query (module doc)
            self.query_fuse = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))
            self.query_ln = nn.LayerNorm(d)                   # keeps s on the scale of the trunk's output
            self.start_state = nn.Parameter(torch.zeros(d))   # the "state" of an empty history
        self.lex_scale = nn.Parameter(torch.tensor(cfg.lexical_init if cfg.use_lexical else 0.0),
                                      requires_grad=cfg.use_lexical)
        self.register_buffer("piece_idf", torch.zeros(cfg.n_buckets), persistent=False)   # (n_buckets,)
        if cfg.sentence_encoder:   # frozen MiniLM vectors of the item texts, a learned projection (sentence.py)
            sent = getattr(vocab, "sentence", None)
            if sent is None:
                raise ValueError("model.sentence_encoder is on, but the item vocabulary has no sentence vectors "
                                 "(build it with Vocab.build(..., encode=...) or ItemTable(..., sentence_dim=...))")
            self.register_buffer("item_sentence", sent.clone(), persistent=False)        # (N_rows, 384)
            self.sentence_proj = nn.Linear(sent.shape[1], d, bias=False)
            # the search's semantic channel: cosine of the query's and the items' MiniLM vectors
            self.semantic_scale = nn.Parameter(torch.tensor(cfg.lexical_init if cfg.use_queries else 0.0),
                                               requires_grad=cfg.use_queries)
        self._index_texts(vocab.pieces)
        idx_pairs, time_pairs = positions.split_pairs(d // cfg.n_heads, cfg.time_fraction)
        self.register_buffer("index_freq", positions.index_frequencies(idx_pairs, cfg.rope_base), persistent=False)
        self.register_buffer("time_freq", positions.time_frequencies(
            time_pairs, cfg.time_period_min_s, cfg.time_period_max_s), persistent=False)
        self.apply(self._init)
        if cfg.sentence_encoder:
            nn.init.zeros_(self.sentence_proj.weight)   # starts as the hashed-text model (sentence.py)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])

    def disable_dropout(self) -> None:
        """Train without any dropout from here on (online fine-tuning, see `model/online.py`)."""
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        for block in self.blocks:
            block.attn.dropout = 0.0

    @property
    def has_dropout(self) -> bool:
        """True when a training forward differs from an eval forward (some dropout is on)."""
        return (any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())
                or any(block.attn.dropout > 0 for block in self.blocks))

    # ---- the item table (fixed for offline training, growing online) ---------------------
    def refresh_items(self) -> None:
        """Re-read the vocabulary after rows were added, expired or the table grown
        (`resize_items` first if it outgrew the embedding): pieces, lexical index, live mask
        (and sentence vectors)."""
        v = self.vocab
        if v.n_rows > self.item_emb.num_embeddings:
            raise ValueError(f"vocabulary has {v.n_rows} rows, the item table {self.item_emb.num_embeddings}: "
                             "call resize_items first")
        n = self.item_emb.num_embeddings
        pieces = torch.zeros(n, v.pieces.shape[1], dtype=torch.int64)
        pieces[: v.n_rows] = v.pieces
        self.item_pieces = pieces
        self._index_texts(pieces)
        if self.cfg.sentence_encoder:
            sentence = torch.zeros(n, self.item_sentence.shape[1])
            sentence[: v.n_rows] = v.sentence[: v.n_rows]
            self.item_sentence = sentence
        live = torch.zeros(n, dtype=torch.bool)
        live[: v.n_rows] = live_mask(v)
        self.item_live = live

    def _index_texts(self, pieces: torch.Tensor) -> None:
        """The item texts as mean-piece matrix (`item_vectors`) and lexical index (`lexical_scores`),
        both from one count of the (N_rows, P) pieces."""
        counts = piece_counts(pieces)
        self._text_matrix = piece_mean_matrix(pieces, self.cfg.n_buckets, counts)   # (N_rows, n_buckets) + transpose
        self.piece_idf, self._lex_items = lexical_index(pieces, self.cfg.n_buckets, counts)   # (n_buckets,), CSR parts

    def resize_items(self, n_rows: int) -> tuple[nn.Parameter, nn.Parameter]:
        """Grow the item-ID table to `n_rows` rows (new rows initialised like the others);
        returns (old, new) parameters so an optimiser can move its state across."""
        old = self.item_emb.weight
        if n_rows <= old.shape[0]:
            return old, old
        extra = torch.randn(n_rows - old.shape[0], old.shape[1]) * 0.02
        new = nn.Parameter(torch.cat([old.detach(), extra]))
        self.item_emb.weight, self.item_emb.num_embeddings = new, n_rows
        return old, new

    def item_bias(self) -> torch.Tensor:
        """(N_rows,) 0 for candidate rows, -inf for padding and free rows (added to logits)."""
        return torch.zeros(self.item_live.shape[0]).masked_fill(~self.item_live, float("-inf"))

    # ---- embeddings -------------------------------------------------------------------
    def _mean_pieces(self, pieces):                          # (N, P) -> (N, d)
        """Mean of the non-padding piece vectors (0 for a row without pieces)."""
        return F.embedding_bag(pieces, self.piece_emb.weight, mode="mean", padding_idx=0)

    def item_vectors(self) -> torch.Tensor:
        """(N_rows, d) item representation shared by input tokens and the retrieval head."""
        v = self.item_emb.weight
        if self.cfg.use_item_text:
            v = v + SparseMatmul.apply(*self._text_matrix, self.piece_emb.weight)   # = _mean_pieces(item_pieces)
        if self.cfg.sentence_encoder:
            v = v + self.sentence_proj(self.item_sentence)
        return v

    def embed(self, batch, item_vec):
        """Token embeddings (B, T, d) from a collated batch."""
        kind, item = batch["type"], batch["item"]                              # (B, T)
        x = item_vec[item] * ((kind == ITEM) | (kind == FEEDBACK)).unsqueeze(-1)
        x = x + self.type_emb(kind)
        x = x + self.surface_emb(batch["surface"]) * (kind != FEEDBACK).unsqueeze(-1) * (kind != PAD).unsqueeze(-1)
        x = x + self.label_emb(batch["label"]) * (kind == FEEDBACK).unsqueeze(-1)
        if self.cfg.use_feedback and not self.cfg.feedback_tokens:   # previous event's label on this token
            prev = batch["prev_label"]
            x = x + self.label_emb(prev.clamp(min=0)) * (prev >= 0).unsqueeze(-1)
        has_q = batch["query"][..., 0] > 0                                      # search clicks' tokens
        if self.cfg.use_queries and has_q.any():   # only they pay for the piece lookup
            x = x.index_put((has_q,), x[has_q] + self._mean_pieces(batch["query"][has_q]))
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

    def forward(self, batch, cand_items=None, cand_prefix=None, cand_ts=None, item_vec=None):
        """Hidden states (B, T, d) of the batch's tokens, and (B, C, d) of candidates if given.

        Candidate c of row b is an item token (surface rec) that sees the first
        `cand_prefix[b, c]` tokens of row b and itself, at token index
        `cand_prefix[b, c]` and timestamp `cand_ts[b, c]`, carrying the label of the
        prefix's last event as the real next item token would. `item_vec`: this step's
        `item_vectors()` if the caller already has them (training reuses them for the loss).
        """
        item_vec = self.item_vectors() if item_vec is None else item_vec
        x = self.embed(batch, item_vec)                                         # (B, T, d)
        if cand_items is None:
            return self.trunk(x, batch["index"], batch["ts"]), None
        B, T = batch["type"].shape
        C = cand_items.shape[1]
        cx = item_vec[cand_items] + self.type_emb.weight[ITEM] + self.surface_emb.weight[0]  # (B, C, d)
        if self.cfg.use_feedback and not self.cfg.feedback_tokens:   # + the label of the prefix's last event
            last = batch["label"].gather(1, (cand_prefix - 1).clamp(min=0))          # (B, C)
            cx = cx + self.label_emb(last) * (cand_prefix > 0).unsqueeze(-1)
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

    def item_embeddings(self, item_vec=None) -> torch.Tensor:
        """(N_rows, d) retrieval-side item vectors (row 0 = padding/unknown, never a candidate),
        from `item_vec` (this step's `item_vectors()`) when given."""
        v = self.item_vectors() if item_vec is None else item_vec
        return F.normalize(v, dim=-1) if self.cfg.normalize else v

    def retrieval_scores(self, u, items=None):               # u (N, d) -> (N, N_rows) logits
        items = self.item_embeddings() if items is None else items
        return u @ items.T / self.cfg.temperature + self.item_bias()

    def search_vectors_from(self, prev, has_prev, pieces, sent=None):
        """(N, d) search query vectors: the state before each search `prev` (N, d) (the
        learned start state where `has_prev` (N,) is False) fused with the query: its pieces
        (N, Lq), plus W_s times its sentence vector `sent` (N, 384) with `sentence_encoder`."""
        prev = torch.where(has_prev[:, None], prev.detach(), self.start_state)   # search reads the rec state
        q = self._mean_pieces(pieces)                                           # (N, d)
        if self.cfg.sentence_encoder:
            q = q + self.sentence_proj(self._need_sentences(sent, len(q)))
        return self.user_vectors(self.query_ln(prev + self.query_fuse(torch.cat([prev, q], -1))))

    def _need_sentences(self, sent, n: int) -> torch.Tensor:
        if sent is None or sent.shape[0] != n:
            raise ValueError("model.sentence_encoder is on: every search needs its query's sentence vector "
                             "(History.query_vecs, or query_vecs= on search calls; model/sentence.py)")
        return sent

    def batch_query_sentences(self, batch, flat):
        """(S, 384) sentence vectors of the queries on the tokens at flat positions `flat`, or
        None without the sentence encoder (zeros for a token that has none)."""
        if not self.cfg.sentence_encoder:
            return None
        sent = batch["query_vec"][batch["query_vec_row"].reshape(-1)[flat]] if "query_vec" in batch else None
        return self._need_sentences(sent, len(flat))

    def search_vectors(self, h, batch, flat):
        """(S, d) search query vectors for the search clicks at flat positions `flat` (b * T + t,
        where `search_target` > 0): the state at the token before each click (the previous
        event's), fused with the query on the click's token. Never reads the click's token."""
        B, T, d = h.shape
        before = h.reshape(B * T, d)[(flat - 1).clamp(min=0)]
        return self.search_vectors_from(before, flat % T > 0, batch["query"].reshape(B * T, -1)[flat],
                                        self.batch_query_sentences(batch, flat))

    def query_channel_scores(self, pieces, sent=None):      # (N, Lq), (N, 384) -> (N, N_rows) or None
        """The search's score terms that read the query text directly, not the user state:
        the lexical channel (`use_lexical`) plus, with `sentence_encoder`, the semantic one,
        semantic_scale * cosine(MiniLM(query), MiniLM(item text)) (the vectors are unit
        length; an item without text has 0). None when neither is on."""
        out = self.lexical_scores(pieces) if self.cfg.use_lexical else None
        if self.cfg.sentence_encoder:
            with torch.no_grad():                                               # only the scale learns
                cos = self._need_sentences(sent, len(pieces)) @ self.item_sentence.T
            sem = self.semantic_scale * cos
            out = sem if out is None else out + sem
        return out

    def batch_query_channel_scores(self, batch, flat):
        """`query_channel_scores` of the search clicks at flat positions `flat` of a batch."""
        B, T = batch["type"].shape
        return self.query_channel_scores(batch["query"].reshape(B * T, -1)[flat],
                                         self.batch_query_sentences(batch, flat))

    @staticmethod
    def _window_items(batch, flat: torch.Tensor) -> torch.Tensor:
        """(R, T) the items the state at flat positions `flat` (b * T + t) has seen, the item
        tokens 0..t of its row (its context window); 0 elsewhere."""
        B, T = batch["type"].shape
        b, t = flat // T, flat % T
        visible = (torch.arange(T)[None, :] <= t[:, None]) & (batch["type"][b] == ITEM)
        return batch["item"][b] * visible

    def repeat_scores(self, batch, flat: torch.Tensor) -> torch.Tensor:
        """(R, N_rows) repeat logit on the items of each state's context window (`_window_items`)."""
        w = self.repeat_logit / self.cfg.temperature       # in the units of <u, v> (learns as fast)
        return w * seen_matrix(self._window_items(batch, flat), self.item_live.shape[0])

    @torch.no_grad()
    def add_repeat_scores_(self, scores: torch.Tensor, batch, flat: torch.Tensor) -> torch.Tensor:
        """`scores + repeat_scores(batch, flat)`, bit for bit, written into `scores` (R, N_rows)
        and returned (no graph): the repeat logit added once to each item a state's context
        window holds, through an (R, T) gather/scatter instead of a dense (R, N_rows) seen
        matrix (~13x cheaper; the dense one cost as much as the scores themselves). Column 0
        (padding) is left alone."""
        idx = self._window_items(batch, flat)                                           # 0 = not seen
        w = self.repeat_logit / self.cfg.temperature
        old = scores.gather(1, idx)
        return scores.scatter_(1, idx, torch.where(idx > 0, old + w * 1.0, old))   # duplicates write one value

    def lexical_scores(self, pieces):                        # (N, Lq) query pieces -> (N, N_rows)
        """lex_scale * cosine(idf-weighted query pieces, idf-weighted item pieces); only
        lex_scale learns (`sparse.lexical_cosines`: no graph)."""
        return self.lex_scale * lexical_cosines(pieces, self.piece_idf, self._lex_items)

    def rank_logits(self, h):                                # (..., d) -> (...)
        return self.rank_head(self.rank_drop(h)).squeeze(-1)

    # ---- public calls ---------------------------------------------------------------------
    def _context(self, histories):
        return context_batch(histories, self.cfg.max_len, use_queries=self.cfg.use_queries,
                             use_feedback=self.cfg.use_feedback, feedback_tokens=self.cfg.feedback_tokens)

    @torch.no_grad()
    def user_state(self, histories: list[History], queries=None, query_ts=None, query_vecs=None) -> torch.Tensor:
        """(B, d) retrieval query vectors: the state after each history, fused with the query
        (hashed pieces, and with `sentence_encoder` its sentence vectors `query_vecs`: B arrays)
        when `queries` are given (a search; late fusion, see the module doc).

        A model built without queries ignores `queries`: it answers a search
        with its recommendation state. `query_ts` is accepted for callers of the
        query-token layout and unused: the search state is the state after the
        last event, whenever the query comes."""
        batch = self._context(histories)
        h, _ = self(batch)
        n = batch["length"]
        last = h[torch.arange(len(histories)), (n - 1).clamp(min=0)]            # (B, d)
        if queries is None or not self.cfg.use_queries:
            return self.user_vectors(last)
        return self.search_vectors_from(last, n > 0, query_tensor(queries), self.query_sentences(query_vecs, queries))

    def query_sentences(self, query_vecs, queries) -> torch.Tensor | None:
        """(B, 384) sentence vectors of a call's B queries (`query_vecs`: arrays or None), or
        None for a model without the sentence encoder."""
        if not self.cfg.sentence_encoder:
            return None
        return query_vec_tensor(query_vecs, len(queries), self.item_sentence.shape[1])

    @torch.no_grad()
    def recommend_scores(self, histories: list[History]) -> torch.Tensor:
        """(B, N_rows) next-item scores: the user state against every item, plus the repeat
        logit on the items of the context window."""
        batch = self._context(histories)
        h, _ = self(batch)
        last = batch["length"] - 1
        s = self.retrieval_scores(self.user_vectors(h[torch.arange(len(histories)), last]))
        if self.cfg.repeat_bias:
            s = s + self.repeat_scores(batch, torch.arange(len(histories)) * batch["type"].shape[1] + last)
        return s

    @torch.no_grad()
    def recommend(self, histories: list[History], k: int = 10):
        """Top-k (scores, item rows), each (B, k), for the next item of each history."""
        return self.recommend_scores(histories).topk(k, dim=-1)

    @torch.no_grad()
    def search(self, histories: list[History], queries: list[list[int]], k: int = 10, query_ts=None,
               query_vecs=None):
        """Top-k (scores, item rows) for each user's query (hashed pieces; with `sentence_encoder`
        also its sentence vector, `query_vecs`), personalised by history."""
        return self.search_scores(histories, queries, query_ts, query_vecs).topk(k, dim=-1)

    @torch.no_grad()
    def search_scores(self, histories: list[History], queries: list[list[int]], query_ts=None,
                      query_vecs=None) -> torch.Tensor:
        """(B, N_rows) search scores: dense query state + the query channels (lexical, semantic)
        (rec state if the model has no queries)."""
        s = self.retrieval_scores(self.user_state(histories, queries, query_vecs=query_vecs))
        if self.cfg.use_queries:
            extra = self.query_channel_scores(query_tensor(queries), self.query_sentences(query_vecs, queries))
            if extra is not None:
                s = s + extra
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
        grown = {k: torch.cat([v, v[:, -1:]], 1) if v.dim() >= 2 and k != "query_vec" else v
                 for k, v in batch.items()}
        grown["index"] = torch.arange(grown["type"].shape[1]).expand(B, -1)
        rows = torch.arange(B)
        prev = torch.where(n > 0, batch["label"][rows, (n - 1).clamp(min=0)], -1)   # last event's label
        for k, v in (("type", ITEM), ("item", items), ("label", 0), ("prev_label", prev), ("surface", 0), ("ts", ts)):
            grown[k][rows, n] = v if isinstance(v, torch.Tensor) else torch.full((B,), v)
        grown["query"][rows, n] = 0                                             # a candidate carries no query
        h, _ = self(grown)
        return h[rows, n]                                                       # (B, d)
