"""One published version ready to answer requests, and the cache of its ranked lists.

`Servable` wraps a `unirec.model.snapshot.Snapshot`: the item vectors the model
would recompute on every forward are computed once (the weights of a loaded
version never change), and the published item vectors are the retrieval index.
Scoring is described in `unirec.ops.serving`. `ListCache` is the LRU of ranked
lists per (version, user, exclude_seen), valid while the user's sequence state
(watermark, length, total clicks, queries) is unchanged.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import torch


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

    def history(self, seq):
        return self.snap.history(seq.item_ids, seq.labels, seq.ts, seq.surfaces,
                                 [seq.query_text_of(i) for i in range(len(seq.item_ids))])

    def _rerank(self, h, logits: torch.Tensor, k: int) -> tuple[list[str], list[float]]:
        """logits (N,) over published items -> top candidates re-ranked by P(choose) x P(positive)."""
        c = min(max(self.candidates, k), int(torch.isfinite(logits).sum()))
        if c <= 0:
            return [], []
        top = logits.topk(c)
        logp = torch.log_softmax(logits, dim=0)[top.indices]
        prob = self.model.rank([h], self.rows[top.indices][None])[0]                 # (c,)
        final = logp + torch.log(prob.clamp(min=1e-12))
        order = final.argsort(descending=True)[:k]
        return [self.ids[j] for j in top.indices[order].tolist()], final[order].exp().tolist()

    @torch.inference_mode()
    def recommend(self, seq, k: int, exclude_seen: bool) -> tuple[list[str], list[float]]:
        h = self.history(seq)
        u = self.model.user_state([h])[0]                                              # (d,)
        logits = self.emb @ u / self.model.cfg.temperature                              # (N,)
        if exclude_seen:
            seen = [self.pos[i] for i in set(seq.item_ids) if i in self.pos]
            logits[seen] = -math.inf
        return self._rerank(h, logits, k)

    @torch.inference_mode()
    def search(self, seq, pieces: list[int], k: int) -> tuple[list[str], list[float], bool]:
        """(items, scores, cold): query-only when there is no sequence."""
        from unirec.model.batching import History

        if seq is None or not seq.item_ids:
            empty = np.zeros(0, dtype=np.int64)
            h = History(empty, empty, empty, empty, [])
            s = self.model.search_scores([h], [pieces], [0])[0][self.rows]
            top = s.topk(min(k, len(self.ids)))
            return [self.ids[j] for j in top.indices.tolist()], torch.softmax(s, 0)[top.indices].tolist(), True
        h = self.history(seq)
        s = self.model.search_scores([h], [pieces], [int(seq.ts[-1])])[0][self.rows]
        items, scores = self._rerank(h, s, k)
        return items, scores, False

    def popular(self, k: int) -> tuple[list[str], list[float]]:
        pop = self.popularity if self.popularity is not None else np.zeros(len(self.ids))
        order = np.argsort(-pop, kind="stable")[:k]
        total = float(pop.sum()) or 1.0
        return [self.ids[j] for j in order], [float(pop[j]) / total for j in order]


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
