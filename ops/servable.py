"""One published version ready to answer requests, and the holder that swaps versions.

`Servable` wraps a `unirec.model.snapshot.Snapshot`: the item vectors the model
would recompute on every forward are computed once (the weights of a loaded
version never change), and the published item vectors are the retrieval index.

**Scores are the offline evaluation's** (`unirec.offline`): recommend retrieves
with `model.recommend_scores` (user state . item vectors / temperature plus the
learned repeat logit on the items of the context window), search with
`model.search_scores` (query state + lexical channel, no repeat logit). The top
`candidates` are re-ranked by the ranking head (`model.rank`): final score =
retrieval softmax probability x P(positive), see `unirec.ops.serving`.

**One trunk pass per request, not two.** `model.recommend_scores` and
`model.rank` each run the history through the Transformer; the ranking pass
appends the candidates as tokens that see the history and themselves only, so
its history part is the very computation retrieval already did (causal mask).
`state_and_cache` runs the history once and keeps every layer's rotated keys and
values; `candidate_hidden` then runs only the C candidate tokens, attending to
those keys plus their own (HSTU's M-FALCON with a KV cache). In the last layer
only the state token's output is needed (the candidates read that layer's keys
and values, which come from its input), so its attention and MLP run for one
token. The two functions re-state `Block.forward` and the candidate tokens of
`model.forward` step by step (they belong in model/model.py; the model was being
reworked when they were written). tests/ops/test_serving_model.py checks them
against `model.recommend_scores`, `model.search_scores` and `model.rank` (the
reference), and every loaded version checks itself the same way on a made-up
history (`one_pass_agrees`): if the model changed and they disagree, that
version is served by the model's own two passes (slower, same scores) and an
error is logged. Requests are scored in batches (`recommend_many`,
`search_many`): the server groups the requests that queued while the previous
batch ran.

**Small-tensor overhead.** At d=64 and ~50 tokens a pass is dominated by per-op
cost, not arithmetic, so the pass is written for few ops: block weights are read
once into plain tensors (`_layers`; calling `nn.Module`s cost more than the ops),
rotary positions are x cos + roll(x) sin with the sign folded into sin (4 ops per
call instead of `positions.apply_rotary`'s 9, same floats), one unpadded row skips
the state-token gather and mask, and re-ranking gathers all rows' top-k at once.
Token embeddings come from two tables built once per version (`_inputs`: item
vectors with a zero row for padding, and the 7 possible sums of type + surface +
previous label) plus one embedding bag for query pieces: 3 lookups instead of
`model.embed`'s ~30 ops (same terms, summed in another order: floats differ in the
last bits). The repeat logit is added to the few window items of each row by one
scatter instead of a dense (B, N_rows) seen matrix (same floats).
Measured (min of 25 x 20 calls, thread CPU, ML-100k users, load ~6):
`recommend_many` 2.80 -> 2.44 ms per pass for one request, 5.67 -> 5.17 for four;
then tables, scatter and `model.batching`'s column copy (min of 15 x 100 passes
interleaved with the previous code, load ~5): 2.39 -> 2.10 ms for one request,
4.75 -> 4.48 for four. What is left is mostly compute (19 small matmuls, 4
attentions, 5 GELUs per pass) and ~240 dispatched ops of ~3 us each.

`ModelHolder` loads versions off the request path and `View` is what one request
reads (see "Hot swap" in `unirec.ops.serving`). The cache of their ranked lists is
`unirec.ops.list_cache`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from unirec.model import positions
from unirec.model.batching import ITEM, PAD, History, query_tensor

if TYPE_CHECKING:
    from unirec.ops.experiments import Experiment
    from unirec.ops.metrics import ServingMetrics

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- one pass: history, then candidates

class _Layer(NamedTuple):
    """One `Block`'s weights as plain tensors: calling `nn.Module`s costs more than the small
    ops themselves at serving sizes (the tensors are the module's own, so they stay current)."""
    heads: int
    ln1: tuple                 # (normalized_shape, weight, bias, eps)
    qkv: tuple                 # (weight, bias)
    proj: tuple
    ln2: tuple
    fc1: tuple
    fc2: tuple
    gelu: str                  # the MLP activation's `approximate`


def _ln(m) -> tuple:
    return m.normalized_shape, m.weight, m.bias, m.eps


def _layers(model) -> list[_Layer]:
    """The blocks' weights (built once per model and kept on it)."""
    layers = model.__dict__.get("_serving_layers")
    if layers is None:
        layers = [_Layer(b.attn.n_heads, _ln(b.ln1), (b.attn.qkv.weight, b.attn.qkv.bias),
                         (b.attn.proj.weight, b.attn.proj.bias), _ln(b.ln2), (b.mlp[0].weight, b.mlp[0].bias),
                         (b.mlp[2].weight, b.mlp[2].bias), b.mlp[1].approximate) for b in model.blocks]
        model.__dict__["_serving_layers"] = layers
    return layers


class _Inputs(NamedTuple):
    """Input-token constants of a loaded version in the one-token-per-event layout (`_embed`)."""
    items: torch.Tensor        # (N_rows + 1, d) the model's item vectors, then a zero row for padding tokens
    tokens: torch.Tensor       # (7, d) row 3 s + p + 1: type ITEM + surface s + label p of the previous
                               # event (p = -1: none, or the model has no labels on tokens); row 6: type PAD


def _one_token_layout(model) -> bool:
    return not (model.cfg.use_feedback and model.cfg.feedback_tokens)


def _inputs(model) -> _Inputs:
    """The input tables (built once per model and kept on it: a loaded version's weights
    never change)."""
    t = model.__dict__.get("_serving_inputs")
    if t is None:
        with torch.no_grad():
            iv = model.item_vectors()
            kind, surface, label = model.type_emb.weight, model.surface_emb.weight, model.label_emb.weight
            prev = model.cfg.use_feedback and not model.cfg.feedback_tokens
            rows = [kind[ITEM] + surface[s] + (label[p] if prev and p >= 0 else 0) for s in (0, 1) for p in (-1, 0, 1)]
            t = _Inputs(torch.cat([iv, iv.new_zeros(1, iv.shape[1])]), torch.stack([*rows, kind[PAD]]))
        model.__dict__["_serving_inputs"] = t
    return t


def _embed(model, batch: dict) -> torch.Tensor:
    """`model.embed(batch, model.item_vectors())` (B, T, d) in 3 lookups: item vector (zero for
    padding) + one table row for the token's type, surface and previous label + the mean of its
    query pieces (0 for a token without any). Same terms as the model's, summed in another order."""
    if not _one_token_layout(model):
        return model.embed(batch, model.item_vectors())
    t = _inputs(model)
    pad = batch["type"] == PAD
    x = F.embedding(batch["item"].masked_fill(pad, t.items.shape[0] - 1), t.items) + \
        F.embedding((batch["surface"] * 3 + batch["prev_label"] + 1).masked_fill(pad, 6), t.tokens)
    if model.cfg.use_queries:
        B, T, Lq = batch["query"].shape
        x = x + F.embedding_bag(batch["query"].view(B * T, Lq), model.piece_emb.weight, mode="mean",
                                padding_idx=0).view(B, T, -1)
    return x


def _rotation(angles: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin), each (B, 1, T, D) for float64 angles (B, T, D/2): with them,
    `positions.apply_rotary(x)` is x * cos + roll(x, D/2) * sin (4 ops instead of 9, same
    floats: x1 cos + x2 (-sin) is x1 cos - x2 sin exactly)."""
    cos, sin = positions.cos_sin(angles, dtype)                                      # (B, 1, T, D/2)
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def _qkv(layer: _Layer, x, cos, sin):
    """Rotated queries, keys and values (B, H, T, D) of `layer` for input x (B, T, d) (before
    its layer norm); queries and keys are rotated together."""
    B, T, C = x.shape
    H = layer.heads
    qkv = F.linear(torch.layer_norm(x, *layer.ln1), *layer.qkv).view(B, T, 3 * H, C // H).transpose(1, 2)  # B,3H,T,D
    qk = qkv[:, : 2 * H]
    qk = qk * cos + qk.roll(C // H // 2, -1) * sin
    return qk[:, :H], qk[:, H:], qkv[:, 2 * H:]


def _attend_and_mlp(layer: _Layer, x, y):
    """The rest of `Block.forward` after attention: x (B, T, d) + proj(y), then + mlp."""
    B, _, T, _ = y.shape
    x = x + F.linear(y.transpose(1, 2).reshape(B, T, x.shape[-1]), *layer.proj)
    return x + F.linear(F.gelu(F.linear(torch.layer_norm(x, *layer.ln2), *layer.fc1), approximate=layer.gelu),
                        *layer.fc2)


def state_and_cache(model, batch: dict, pos: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(final hidden state (B, d) at token `pos` (B,) of each row, [(keys, values) (B, H, T, D)
    of every layer]). The state equals `model(batch)[0][arange(B), pos]`."""
    x = _embed(model, batch)                                                         # (B, T, d)
    cos, sin = _rotation(positions.rotary_angles(batch["index"], batch["ts"], model.index_freq,
                                                 model.time_freq), x.dtype)
    B, T, _ = x.shape
    layers, cache = _layers(model), []
    for i, layer in enumerate(layers):
        q, k, v = _qkv(layer, x, cos, sin)
        cache.append((k, v))
        if i < len(layers) - 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)              # (B, H, T, D)
        elif B == 1 and int(pos[0]) == T - 1:   # one unpadded row: its state token sees every token
            y = F.scaled_dot_product_attention(q[:, :, T - 1:], k, v)                # (1, H, 1, D)
            x = x[:, T - 1:]
        else:   # last layer: only the state token goes on
            rows = torch.arange(B)
            sees = (torch.arange(T)[None, :] <= pos[:, None])[:, None, None]         # (B, 1, 1, T)
            y = F.scaled_dot_product_attention(q[rows, :, pos][:, :, None], k, v, attn_mask=sees)  # (B, H, 1, D)
            x = x[rows, pos][:, None]                                                # (B, 1, d)
        x = _attend_and_mlp(layer, x, y)
    return torch.layer_norm(x[:, 0], *_ln(model.ln_f)), cache


def _candidate_tokens(model, batch: dict, prefix: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Input embeddings (B, C, d) of candidate item tokens, as `model.forward` builds them: item
    vector + item type + rec surface (+ the label of the prefix's last event when labels ride
    on the next event's token instead of a feedback token of their own)."""
    if _one_token_layout(model):        # the `_inputs` row of surface rec and that label
        t = _inputs(model)
        last = batch["label"].gather(1, (prefix - 1).clamp(min=0)[:, None])           # (B, 1)
        return F.embedding(items, t.items) + F.embedding(torch.where(prefix[:, None] > 0, last + 1, 0), t.tokens)
    return model.item_vectors()[items] + (model.type_emb.weight[ITEM] + model.surface_emb.weight[0])


def candidate_hidden(model, cache: list, batch: dict, prefix: torch.Tensor, items: torch.Tensor,
                     ts: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, C, d) of candidate rows `items` (B, C), each an item token (surface rec)
    at token index `prefix[b]` and time `ts[b]` that sees the first `prefix[b]` tokens of row b
    and itself: `model(batch, items, prefix, ts)[1]`, reading the history from `cache`."""
    B, C = items.shape
    T = cache[0][0].shape[2]
    x = _candidate_tokens(model, batch, prefix, items)                               # (B, C, d)
    angles = positions.rotary_angles(prefix[:, None], ts[:, None], model.index_freq, model.time_freq,
                                     ts_ref=batch["ts"][:, 0])                       # (B, 1, P): one per row
    cos, sin = _rotation(angles, x.dtype)
    history = torch.arange(T)[None, None, :] < prefix[:, None, None]                  # (B, 1, T)
    sees = torch.cat([history.expand(B, C, T), torch.eye(C, dtype=torch.bool).expand(B, C, C)], -1)[:, None]
    for layer, (kh, vh) in zip(_layers(model), cache):
        q, k, v = _qkv(layer, x, cos, sin)
        y = F.scaled_dot_product_attention(q, torch.cat([kh, k], 2), torch.cat([vh, v], 2), attn_mask=sees)
        x = _attend_and_mlp(layer, x, y)
    return torch.layer_norm(x, *_ln(model.ln_f))


def _rank_logits(model, h: torch.Tensor) -> torch.Tensor:
    """`model.rank_logits(h)` on the head's weights as plain tensors (see `_Layer`)."""
    first, act, second = model.rank_head
    return F.linear(F.gelu(F.linear(h, first.weight, first.bias), approximate=act.approximate),
                    second.weight, second.bias).squeeze(-1)


# ---------------------------------------------------------------- the servable version

class Servable:
    """A model snapshot prepared for serving (item vectors frozen, id maps built)."""

    def __init__(self, snap, candidates: int, query_vectors: Callable[[list], list] | None = None):
        """`query_vectors` (query texts -> sentence vectors, `model.sentence.QueryVectors`) is
        needed by a version trained with `sentence_encoder`: its searches read the query's."""
        self.snap, self.version, self.candidates = snap, snap.version, candidates
        m = self.model = snap.model
        if m.cfg.sentence_encoder and query_vectors is None:
            raise ValueError(f"version {snap.version} uses model.sentence_encoder: the server needs the "
                             "encoder's files to embed queries (data.cache_dir or model.sentence_encoder_path)")
        # texts -> vectors; a version without the encoder reads none
        self.query_vectors = query_vectors if m.cfg.sentence_encoder else lambda texts: None
        with torch.no_grad():
            frozen = m.item_vectors().detach()
        m.item_vectors = lambda: frozen          # weights never change in a loaded version
        self.ids: list[str] = list(snap.item_ids)
        self.pos = {iid: j for j, iid in enumerate(self.ids)}
        self.emb = torch.as_tensor(np.asarray(snap.item_embeddings), dtype=torch.float32)   # (N, d)
        self.rows = torch.as_tensor(snap.table.rows(self.ids), dtype=torch.int64)           # (N,) model rows
        # model row -> published column (-1: none; row 0, the unknown item, never has one)
        rows = self.rows.numpy()
        self.col_of_row = np.full(max(m.item_emb.num_embeddings, rows.max(initial=0) + 1), -1)
        self.col_of_row[rows] = np.arange(len(rows))
        self.col_of_row[0] = -1
        with torch.no_grad():
            self.repeat_w = (m.repeat_logit / m.cfg.temperature).detach()   # as `model.repeat_scores` weighs it
        self.popularity: np.ndarray | None = None    # (N,), filled lazily by the service
        self.one_pass = True
        self.one_pass = self.one_pass_agrees()       # else: the model's own two passes (slower, same answers)

    def history(self, seq) -> History:
        """The model History of the sequence's last `max_len` events: the context window every
        model call reads (the store keeps more, for exclude_seen)."""
        n = len(seq.item_ids)
        w = slice(max(0, n - self.model.cfg.max_len), n)
        return self.snap.history(seq.item_ids[w], seq.labels[w], seq.ts[w], seq.surfaces[w],
                                 [seq.query_text_of(i) for i in range(w.start, n)])

    # -- scores: (B, N) retrieval logits of the published items, and P(positive) of candidates
    def _recommend_scores(self, hs: list[History]):
        """(logits (B, N), probs: model rows (B, C) -> (B, C) P(positive))."""
        m = self.model
        if not self.one_pass:
            return m.recommend_scores(hs)[:, self.rows], lambda rows: m.rank(hs, rows)
        batch = m._context(hs)                                   # the batch its public calls build
        last = batch["length"] - 1
        state, cache = state_and_cache(m, batch, last)
        logits = m.user_vectors(state) @ self.emb.T / m.cfg.temperature
        if m.cfg.repeat_bias:
            self._add_repeat(logits, hs)
        return logits, self._probs(batch, cache, batch["length"])

    def _add_repeat(self, logits: torch.Tensor, hs: list[History]) -> None:
        """`logits += model.repeat_scores(...)[:, self.rows]` in place: the repeat weight added once
        to each published item of a row's context window (a scatter of a few columns instead of
        a dense (B, N_rows) seen matrix; the same floats: logit + w)."""
        L = self.model.cfg.max_len
        cols = [np.unique(self.col_of_row[h.items[-L:]]) for h in hs]
        b, c = np.repeat(np.arange(len(hs)), [len(x) for x in cols]), np.concatenate(cols)
        keep = c >= 0
        b, c = torch.from_numpy(b[keep]), torch.from_numpy(c[keep])
        logits.index_put_((b, c), logits[b, c] + self.repeat_w)

    def _search_scores(self, hs: list[History], pieces: list[list[int]], query_ts: list[int], texts: list[str]):
        m = self.model
        vecs = self.query_vectors(texts)
        if not self.one_pass:
            return m.search_scores(hs, pieces, query_ts, vecs)[:, self.rows], lambda rows: m.rank(hs, rows)
        # late fusion (model/model.py): the rec state after the history, fused with the query;
        # a model without queries answers with its rec state. Candidates see the history only.
        batch = m._context(hs)
        state, cache = state_and_cache(m, batch, batch["length"] - 1)
        if m.cfg.use_queries:
            p, sent = query_tensor(pieces), m.query_sentences(vecs, pieces)
            u = m.search_vectors_from(state, batch["length"] > 0, p, sent)
        else:
            u = m.user_vectors(state)
        logits = u @ self.emb.T / m.cfg.temperature
        if m.cfg.use_queries and (extra := m.query_channel_scores(p, sent)) is not None:
            logits = logits + extra[:, self.rows]
        return logits, self._probs(batch, cache, batch["length"])

    def _probs(self, batch, cache, prefix):
        """P(positive) of candidates after the first `prefix` tokens, at the last event's time."""
        ts = batch["ts"][torch.arange(len(prefix)), (prefix - 1).clamp(min=0)]
        return lambda rows: torch.sigmoid(_rank_logits(self.model, candidate_hidden(self.model, cache, batch,
                                                                                   prefix, rows, ts)))

    @torch.inference_mode()
    def one_pass_agrees(self, tol: float = 1e-4) -> bool:
        """Does the one-pass scoring reproduce the model's own calls on a made-up history? (It
        re-states the model's block; a model changed without it must not serve other scores.)"""
        n = min(6, len(self.ids))
        if n == 0:
            return False
        rows = self.rows[:n].numpy()
        h = History(rows, np.arange(n) % 2, 1_000_000 + 3600 * np.arange(n), np.arange(n) % 2,
                    [[1, 2, 3] if j % 2 else None for j in range(n)])
        cand = self.rows[None, :n]
        try:
            self.one_pass = True
            q = ([[4, 5]], [int(h.ts[-1])], ["agreement check"])
            fast = [self._recommend_scores([h]), self._search_scores([h], *q)]
            self.one_pass = False
            ref = [self._recommend_scores([h]), self._search_scores([h], *q)]
            ok = all(torch.allclose(f[0], r[0], atol=tol * 10) and torch.allclose(f[1](cand), r[1](cand), atol=tol)
                     for f, r in zip(fast, ref))
        except Exception as e:  # noqa: BLE001 - the model's own calls still work
            log.error("serving: one-pass scoring fails for %s (%s); using the model's two passes", self.version, e)
            return False
        if not ok:
            log.error("serving: one-pass scoring disagrees with the model for %s; using the model's two passes",
                      self.version)
        return ok

    def _rerank(self, logits: torch.Tensor, probs, ks: list[int], excluded: list[int]) -> list[tuple[list, list]]:
        """Per row: the top `max(candidates, k)` logits (B, N) that are not among the row's
        `excluded` (set to -inf), re-ranked by log P(choose) + log P(positive); the first k as
        (item ids, scores)."""
        N = logits.shape[1]
        want = [min(max(self.candidates, k), N - e) for k, e in zip(ks, excluded)]
        C = max(want)
        if C <= 0:
            return [([], [])] * len(ks)
        top = logits.topk(C, dim=1)                                                  # (B, C)
        logp = torch.log_softmax(logits, dim=1).gather(1, top.indices)
        final = logp + torch.log(probs(self.rows[top.indices]).clamp(min=1e-12))     # (B, C)
        if min(want) < C:
            final = final.masked_fill(torch.arange(C)[None, :] >= torch.tensor(want)[:, None], -math.inf)
        shown = [min(k, w) for k, w in zip(ks, want)]
        order = final.argsort(dim=1, descending=True)[:, : max(shown)]              # (B, K)
        items, scores = top.indices.gather(1, order).tolist(), final.gather(1, order).exp().tolist()
        return [([self.ids[j] for j in items[b][:n]], scores[b][:n]) for b, n in enumerate(shown)]

    @torch.inference_mode()
    def recommend_many(self, seqs: list, ks: list[int], exclude_seen: list[bool]) -> list[tuple[list, list]]:
        """(items, scores) per non-empty sequence: `recommend_scores`, re-ranked."""
        logits, probs = self._recommend_scores([self.history(s) for s in seqs])
        rows, cols, excluded = [], [], []
        for b, (s, excl) in enumerate(zip(seqs, exclude_seen)):
            seen = set(map(self.pos.get, s.item_ids)) if excl else set()
            seen.discard(None)                   # items this version does not know
            rows += [b] * len(seen)
            cols += seen
            excluded.append(len(seen))
        if cols:
            logits.index_put_((torch.tensor(rows), torch.tensor(cols)), torch.tensor(-math.inf))
        return self._rerank(logits, probs, ks, excluded)

    def recommend(self, seq, k: int, exclude_seen: bool) -> tuple[list[str], list[float]]:
        return self.recommend_many([seq], [k], [exclude_seen])[0]

    @torch.inference_mode()
    def search_many(self, seqs: list, pieces: list[list[int]], ks: list[int], texts: list[str]
                    ) -> list[tuple[list, list]]:
        """(items, scores) per non-empty sequence: `search_scores` at the last event's time, re-ranked
        (`pieces`: each query's hashed pieces, `texts`: the queries themselves)."""
        logits, probs = self._search_scores([self.history(s) for s in seqs], pieces, [int(s.ts[-1]) for s in seqs],
                                            texts)
        return self._rerank(logits, probs, ks, [0] * len(seqs))

    @torch.inference_mode()
    def search_cold(self, pieces: list[int], k: int, text: str) -> tuple[list[str], list[float]]:
        """Query-only search (no history, so nothing to re-rank with)."""
        empty = np.zeros(0, dtype=np.int64)
        vecs = self.query_vectors([text])
        s = self.model.search_scores([History(empty, empty, empty, empty, [])], [pieces], [0], vecs)[0][self.rows]
        top = s.topk(min(k, len(self.ids)))
        return [self.ids[j] for j in top.indices.tolist()], torch.softmax(s, 0)[top.indices].tolist()

    def search(self, seq, pieces: list[int], k: int, text: str) -> tuple[list[str], list[float], bool]:
        """(items, scores, cold): query-only when there is no sequence."""
        if seq is None or not seq.item_ids:
            return *self.search_cold(pieces, k, text), True
        return *self.search_many([seq], [pieces], [k], [text])[0], False

    def popular(self, k: int) -> tuple[list[str], list[float]]:
        pop = self.popularity if self.popularity is not None else np.zeros(len(self.ids))
        order = np.argsort(-pop, kind="stable")[:k]
        total = float(pop.sum()) or 1.0
        return [self.ids[j] for j in order], [float(pop[j]) / total for j in order]


# ---------------------------------------------------------------- versions and hot swap

class View(NamedTuple):
    """What one request reads, once: the experiment and the versions its arms serve."""
    exp: Experiment | None
    latest: str | None
    loaded: Mapping[str, Servable]

    def get(self, spec: str) -> Servable | None:
        return self.loaded.get(self.latest if spec == "latest" else spec)


class ModelHolder:
    """Loads versions off the request path and keeps `(latest, {version: Servable})`."""

    def __init__(self, registry, loader: Callable[[str], Any], candidates: int, metrics: ServingMetrics,
                 query_vectors: Callable[[Any], Any] = lambda mc: None):
        """`query_vectors(model config)`: the query encoder a version needs (None: none)."""
        self.registry, self.loader, self.candidates, self.metrics = registry, loader, candidates, metrics
        self.query_vectors = query_vectors
        self.view: tuple[str | None, Mapping[str, Servable]] = (None, {})
        self.failed: set[str] = set()

    def refresh(self, specs: set[str], prepare: Callable[[Servable, str | None], None] | None = None
                ) -> tuple[str | None, dict[str, Servable]]:
        """Load what `specs` ("latest" or names) need and is not loaded; publish a new view.
        `prepare(servable, previous latest)` runs on a new latest before it becomes visible."""
        latest = self.registry.latest()
        wanted = {latest if s == "latest" else s for s in specs} - {None}
        _, loaded = self.view
        new = {v: s for v, s in loaded.items() if v in wanted}
        for name in sorted(wanted - set(new) - self.failed):
            try:
                snap = self.loader(name)
                new[name] = Servable(snap, self.candidates, self.query_vectors(snap.model.cfg))
                self.metrics.loads.labels("ok").inc()
                log.info("serving: loaded model version %s", name)
            except Exception as e:  # noqa: BLE001 - keep serving what we have
                self.failed.add(name)
                self.metrics.loads.labels("failed").inc()
                log.error("serving: cannot load version %s: %s", name, e)
        if latest not in new:   # a new latest that failed: keep the last good one as latest
            latest = self.view[0] if self.view[0] in new else None
        if prepare is not None and latest is not None and latest not in loaded:
            prepare(new[latest], self.view[0])
        self.view = (latest, new)
        return self.view
