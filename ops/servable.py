"""One published version ready to answer requests, and the cache of its ranked lists.

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

`ModelHolder` loads versions off the request path and `View` is what one request
reads (see "Hot swap" in `unirec.ops.serving`). `ListCache` is the LRU of ranked lists per (version, user, exclude_seen), valid
while the user's sequence state (watermark, length, total clicks, queries) is unchanged.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from unirec.model import positions
from unirec.model.batching import ITEM, History

if TYPE_CHECKING:
    from unirec.ops.experiments import Experiment
    from unirec.ops.metrics import ServingMetrics

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- one pass: history, then candidates

def _qkv(attn, x, cos, sin):
    """Rotated queries, keys and values (B, H, T, D) of `attn` for normalised input x (B, T, d);
    queries and keys are rotated in one call (fewer small ops: they dominate at serving sizes)."""
    B, T, C = x.shape
    H = attn.n_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, T, 3 * H, C // H).transpose(1, 2)  # (B, 3H, T, D)
    qk = positions.apply_rotary(qkv[:, : 2 * H], cos, sin)
    return qk[:, :H], qk[:, H:], qkv[:, 2 * H:]


def _attend_and_mlp(block, x, y):
    """The rest of `Block.forward` after attention: x (B, T, d) + proj(y), then + mlp."""
    B, _, T, _ = y.shape
    proj = block.attn.proj
    x = x + F.linear(y.transpose(1, 2).reshape(B, T, x.shape[-1]), proj.weight, proj.bias)
    return x + block.mlp(block.ln2(x))


def state_and_cache(model, batch: dict, pos: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(final hidden state (B, d) at token `pos` (B,) of each row, [(keys, values) (B, H, T, D)
    of every layer]). The state equals `model(batch)[0][arange(B), pos]`."""
    x = model.embed(batch, model.item_vectors())                                     # (B, T, d)
    cos, sin = positions.cos_sin(positions.rotary_angles(batch["index"], batch["ts"], model.index_freq,
                                                         model.time_freq), x.dtype)
    B, T, _ = x.shape
    rows, cache = torch.arange(B), []
    for i, block in enumerate(model.blocks):
        q, k, v = _qkv(block.attn, block.ln1(x), cos, sin)
        cache.append((k, v))
        if i < len(model.blocks) - 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)              # (B, H, T, D)
        else:   # last layer: only the state token goes on
            sees = (torch.arange(T)[None, :] <= pos[:, None])[:, None, None]         # (B, 1, 1, T)
            y = F.scaled_dot_product_attention(q[rows, :, pos][:, :, None], k, v, attn_mask=sees)  # (B, H, 1, D)
            x = x[rows, pos][:, None]                                                # (B, 1, d)
        x = _attend_and_mlp(block, x, y)
    return model.ln_f(x[:, 0]), cache


def _candidate_tokens(model, batch: dict, prefix: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Input embeddings (B, C, d) of candidate item tokens, as `model.forward` builds them: item
    vector + item type + rec surface (+ the label of the prefix's last event when labels ride
    on the next event's token instead of a feedback token of their own)."""
    x = model.item_vectors()[items] + model.type_emb.weight[ITEM] + model.surface_emb.weight[0]
    if model.cfg.use_feedback and not getattr(model.cfg, "feedback_tokens", True):
        last = batch["label"].gather(1, (prefix - 1).clamp(min=0)[:, None])           # (B, 1)
        x = x + model.label_emb(last) * (prefix > 0)[:, None, None]
    return x


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
    cos, sin = positions.cos_sin(angles, x.dtype)
    history = torch.arange(T)[None, None, :] < prefix[:, None, None]                  # (B, 1, T)
    sees = torch.cat([history.expand(B, C, T), torch.eye(C, dtype=torch.bool).expand(B, C, C)], -1)[:, None]
    for block, (kh, vh) in zip(model.blocks, cache):
        q, k, v = _qkv(block.attn, block.ln1(x), cos, sin)
        y = F.scaled_dot_product_attention(q, torch.cat([kh, k], 2), torch.cat([vh, v], 2), attn_mask=sees)
        x = _attend_and_mlp(block, x, y)
    return model.ln_f(x)


# ---------------------------------------------------------------- the servable version

class Servable:
    """A model snapshot prepared for serving (item vectors frozen, id maps built)."""

    def __init__(self, snap, candidates: int):
        self.snap, self.version, self.candidates = snap, snap.version, candidates
        m = self.model = snap.model
        with torch.no_grad():
            frozen = m.item_vectors().detach()
        m.item_vectors = lambda: frozen          # weights never change in a loaded version
        self.ids: list[str] = list(snap.item_ids)
        self.pos = {iid: j for j, iid in enumerate(self.ids)}
        self.emb = torch.as_tensor(np.asarray(snap.item_embeddings), dtype=torch.float32)   # (N, d)
        self.rows = torch.as_tensor(snap.table.rows(self.ids), dtype=torch.int64)           # (N,) model rows
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
            logits = logits + m.repeat_scores(batch, torch.arange(len(hs)) * batch["type"].shape[1] + last)[:, self.rows]
        return logits, self._probs(batch, cache, batch["length"])

    def _search_scores(self, hs: list[History], pieces: list[list[int]], query_ts: list[int]):
        m = self.model
        if not self.one_pass:
            return m.search_scores(hs, pieces, query_ts)[:, self.rows], lambda rows: m.rank(hs, rows)
        with_q = m.cfg.use_queries          # a model without query tokens answers with its rec state
        batch = m._context(hs, pieces if with_q else None, query_ts if with_q else None)
        state, cache = state_and_cache(m, batch, batch["length"] - 1)
        logits = m.user_vectors(state) @ self.emb.T / m.cfg.temperature
        if with_q and m.cfg.use_lexical:
            p = torch.zeros(len(pieces), max(1, max(len(q) for q in pieces)), dtype=torch.int64)
            for b, q in enumerate(pieces):
                p[b, : len(q)] = torch.as_tensor(q, dtype=torch.int64)
            logits = logits + m.lexical_scores(p)[:, self.rows]
        return logits, self._probs(batch, cache, batch["length"] - 1 if with_q else batch["length"])

    def _probs(self, batch, cache, prefix):
        """P(positive) of candidates after the first `prefix` tokens, at the last event's time."""
        ts = batch["ts"][torch.arange(len(prefix)), (prefix - 1).clamp(min=0)]
        return lambda rows: torch.sigmoid(self.model.rank_logits(
            candidate_hidden(self.model, cache, batch, prefix, rows, ts)))

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
            fast = [self._recommend_scores([h]), self._search_scores([h], [[4, 5]], [int(h.ts[-1])])]
            self.one_pass = False
            ref = [self._recommend_scores([h]), self._search_scores([h], [[4, 5]], [int(h.ts[-1])])]
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
        final = final.masked_fill(torch.arange(C)[None, :] >= torch.tensor(want)[:, None], -math.inf)
        order = final.argsort(dim=1, descending=True)
        out = []
        for b, k in enumerate(ks):
            o = order[b, : min(k, want[b])]
            out.append(([self.ids[j] for j in top.indices[b, o].tolist()], final[b, o].exp().tolist()))
        return out

    @torch.inference_mode()
    def recommend_many(self, seqs: list, ks: list[int], exclude_seen: list[bool]) -> list[tuple[list, list]]:
        """(items, scores) per non-empty sequence: `recommend_scores`, re-ranked."""
        logits, probs = self._recommend_scores([self.history(s) for s in seqs])
        seen = [[self.pos[i] for i in set(s.item_ids) if i in self.pos] if excl else []
                for s, excl in zip(seqs, exclude_seen)]
        if any(seen):
            b = torch.tensor([b for b, cols in enumerate(seen) for _ in cols])
            logits.index_put_((b, torch.tensor([j for cols in seen for j in cols])), torch.tensor(-math.inf))
        return self._rerank(logits, probs, ks, [len(cols) for cols in seen])

    def recommend(self, seq, k: int, exclude_seen: bool) -> tuple[list[str], list[float]]:
        return self.recommend_many([seq], [k], [exclude_seen])[0]

    @torch.inference_mode()
    def search_many(self, seqs: list, pieces: list[list[int]], ks: list[int]) -> list[tuple[list, list]]:
        """(items, scores) per non-empty sequence: `search_scores` at the last event's time, re-ranked."""
        logits, probs = self._search_scores([self.history(s) for s in seqs], pieces, [int(s.ts[-1]) for s in seqs])
        return self._rerank(logits, probs, ks, [0] * len(seqs))

    @torch.inference_mode()
    def search_cold(self, pieces: list[int], k: int) -> tuple[list[str], list[float]]:
        """Query-only search (no history, so nothing to re-rank with)."""
        empty = np.zeros(0, dtype=np.int64)
        s = self.model.search_scores([History(empty, empty, empty, empty, [])], [pieces], [0])[0][self.rows]
        top = s.topk(min(k, len(self.ids)))
        return [self.ids[j] for j in top.indices.tolist()], torch.softmax(s, 0)[top.indices].tolist()

    def search(self, seq, pieces: list[int], k: int) -> tuple[list[str], list[float], bool]:
        """(items, scores, cold): query-only when there is no sequence."""
        if seq is None or not seq.item_ids:
            return *self.search_cold(pieces, k), True
        return *self.search_many([seq], [pieces], [k])[0], False

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

    def __init__(self, registry, loader: Callable[[str], Any], candidates: int, metrics: ServingMetrics):
        self.registry, self.loader, self.candidates, self.metrics = registry, loader, candidates, metrics
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
                new[name] = Servable(self.loader(name), self.candidates)
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


# ---------------------------------------------------------------- ranked-list cache

class Entry(NamedTuple):
    fp: tuple                  # the sequence state the list was computed for
    items: list[str]
    scores: list[float]
    complete: bool             # fewer items than asked exist: any larger k gets the same list
    seq: Any                   # the sequence itself (to recompute it with a new version)
    k: int


class ListCache:
    """LRU of ranked lists, (version, user, exclude_seen) -> Entry; one lock (the inference
    thread reads and writes, the poller pre-warms)."""

    def __init__(self, size: int):
        self.size, self.d, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: tuple, fp: tuple, k: int) -> Entry | None:
        with self.lock:
            e = self.d.get(key)
            if e is None or e.fp != fp or (len(e.items) < k and not e.complete):
                return None
            self.d.move_to_end(key)
            return e

    def put(self, key: tuple, e: Entry) -> None:
        with self.lock:
            self.d[key] = e
            self.d.move_to_end(key)
            while len(self.d) > self.size:
                self.d.popitem(last=False)

    def recent(self, version: str, n: int) -> list[tuple[tuple, Entry]]:
        """The `n` most recently used entries of `version`, newest first."""
        with self.lock:
            return [(key, e) for key, e in reversed(self.d.items()) if key[0] == version][:n]
