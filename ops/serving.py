"""`unirec serve`: recommend and search from published model versions, one A/B arm per user.

    GET /recommend?user_id=&k=&exclude_seen=    GET /search?user_id=&q=&k=
    GET /healthz   GET /metrics (Prometheus)

A request is assigned to an arm (`unirec.ops.experiments`: sticky hash of the
user id), reads the user's sequence from the Feast online store, and is answered
by the arm's model version:

* **recommend**: retrieval scores are the offline evaluation's
  (`model.recommend_scores`: the user state after the last `max_len` events
  against every published item vector, plus the learned repeat logit on the
  items of that window); seen items are excluded (default); the top
  `candidates` are re-ranked by the ranking head. Final score = retrieval
  softmax probability x ranking probability, i.e. P(next item = i) x
  P(positive | i): the ranker alone knows nothing of how likely an item is to be
  chosen, retrieval nothing of how it will be liked. The ranking pass uses the
  last event's timestamp (as offline evaluation does).
* **search**: the offline evaluation's search scores (`model.search_scores`:
  history + query token, plus the lexical channel; no repeat logit) over the
  published items, top `candidates` re-ranked the same way.
  (How: `unirec.ops.servable`, one trunk pass per batch.)
* **cold start**: a user without a sequence gets the most popular items
  (all-time positive clicks from the Feast item_stats view, read once per loaded
  version, lazily) for recommend, and the query-only search state (no ranking:
  there is no history to rank with) for search. If the feature store fails, the
  request is served the cold-start way and flagged `"degraded": true` (counted).

Every response carries items, scores, model version, arm, experiment id and a
request id, and writes an `exposure/v1` record to Kafka (`ExposureLog`:
a bounded queue and one sender thread, so a slow or absent broker never
delays or fails a request; drops and send errors are counted).

**Hot swap.** A poller thread re-reads the registry's `latest` and the rollout
state every `poll_s`, loads a new version (checksums verified by the registry)
off the request path, then replaces one immutable `View` (experiment, latest,
{version: Servable}) with a single reference assignment. A request reads that view once,
so it finishes on the version it started with; nothing is ever mutated under
it. Versions no arm needs any more are dropped from the next view (freed once
the last request holding them ends). A version that fails to load is counted
and skipped; the previous one keeps serving.

**Threads, batches and latency.** All model and feature-store work runs on one
inference thread (`torch` ops on small tensors are cheapest single-threaded; it
also serialises SQLite reads); the event loop only parses and validates. Requests
that arrive while the inference thread is busy queue up, and the next pass takes
all of them (up to `MAX_BATCH`): one feature-store read for their users and one
batched model pass per version (`unirec.ops.servable`). An idle server answers a
request alone at once; a loaded one answers several per pass (at 8, about half
the cost per request), so throughput grows with load instead of the queue.
Item vectors are computed once per version. Ranked lists are cached per
(version, user, exclude_seen) and reused while the user's sequence is unchanged
(its watermark, length, total clicks and queries), so a repeated request costs a
feature read, not a model pass; a new event misses. So that a new
`latest` does not turn every request into a miss at once, the poller first
recomputes the lists of the most recently served users of the old `latest` with
the new version (up to `prewarm_users`, within `prewarm_s`, from the sequences
kept in the cache) and only then swaps: a publish delays its own visibility by
at most `prewarm_s` instead of stalling requests. Metrics are declared in
`unirec.ops.metrics.ServingMetrics`.

**Where an uncached request's CPU goes** (`bench/serving.py --no-cache --profile`, 200
requests/s, 2026-11-29, after the input tables of `unirec.ops.servable`), as shares of the
inference thread: model pass ~73% (history pass 22% incl. token embeddings 5%,
candidate pass 23%, `model._context` 5%, `Snapshot.history` 6%, repeat logit 4%), Feast
read ~17% (its SQLite query releases the GIL, so part of that is waiting for it back).
Per request the inference thread used ~2.2-2.6 ms of CPU at mean batch 1.4-1.9, the
event loop ~0.25-0.35 ms, the exposure thread ~0.14 ms (thread CPU from /proc, load
5-8). Dropped after trying: the model on the event-loop thread (no hand-off, ~10% less
CPU, but at load 6 one runnable thread got less CPU than two: p50 65 vs 12 ms);
TorchScript for a block (only 11% faster than eager); a direct SQL read of the user
rows instead of Feast's `online_read` (0.155 -> 0.09 ms per user, but it would bypass
the store abstraction the verification also reads through). GC is not a source of
tail latency here (after `gc.freeze` at start: 2 young collections per 400 requests,
<0.1 ms each).
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from unirec.model.text import hash_pieces
from unirec.ops import experiments as ex
from unirec.ops.config import ExperimentsConfig, ServingConfig
from unirec.ops.exposures import ExposureLog, KafkaSender
from unirec.ops.metrics import ServingMetrics
from unirec.ops.list_cache import Entry, ListCache
from unirec.ops.servable import ModelHolder, Servable, View

log = logging.getLogger(__name__)
# Requests answered together at most: enough to amortise the per-operation overhead of the
# small Transformer passes (cost per request about halves from 1 to 8), small enough that one
# batch stays within a few milliseconds.
MAX_BATCH = 16


class Request(NamedTuple):
    endpoint: str              # recommend | search
    user_id: str
    k: int
    exclude_seen: bool         # recommend only
    q: str | None              # search only
    t0: float                  # arrival (perf_counter): latency is measured from here


# ---------------------------------------------------------------- the service

class Service:
    """Request handling, independent of the HTTP framework (see `unirec.ops.http_api`)."""

    def __init__(self, cfg: ServingConfig, exp_cfg: ExperimentsConfig, registry, *, store_factory: Callable[[], Any],
                 exposure_sender: Callable[[dict], None] | None = None, kafka_cfg=None, metrics_registry=None,
                 loader=None, query_vectors: Callable[[Any], Any] | None = None):
        """Exposures go to `exposure_sender`, or to Kafka (`kafka_cfg.topics.exposures`) if it is None.
        `query_vectors(model config)`: the query encoder of versions trained with
        `sentence_encoder` (`model.sentence.query_vectors`); without it they are not served."""
        from prometheus_client import CollectorRegistry

        self.cfg, self.exp_cfg, self.registry = cfg, exp_cfg, registry
        self.metrics_registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
        self.metrics = ServingMetrics(self.metrics_registry)
        if loader is None:
            from unirec.model.snapshot import load_snapshot
            loader = lambda name: load_snapshot(registry, name)  # noqa: E731
        self.holder = ModelHolder(registry, loader, cfg.candidates, self.metrics,
                                  query_vectors or (lambda mc: None))
        if exposure_sender is None:
            exposure_sender = KafkaSender(kafka_cfg, kafka_cfg.topics.exposures, self.metrics)
        self.exposures = ExposureLog(exposure_sender, self.metrics, cfg.exposure_queue)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="infer",
                                           initializer=lambda: torch.set_num_threads(cfg.threads))
        self._store_factory, self._store, self._store_retry_at = store_factory, None, 0.0
        self.cache = ListCache(cfg.cache_users)
        self.view = View(None, None, {})   # replaced whole by the poller, read once per request
        # request ids: random per process + a counter (uuid4 costs a urandom call per request)
        self._rid_prefix, self._rid_counter = uuid.uuid4().hex[:16] + "-", itertools.count(1)
        self._served: set[tuple[str, str]] = set()
        self._pending: list[tuple[Request, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._pending_lock, self._draining = threading.Lock(), False
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- background refresh
    def refresh(self) -> None:
        """Re-read the rollout state and the registry; resolve "pinned" arms; load versions."""
        state = ex.load_state(self.exp_cfg.state_path)
        latest = self.registry.latest()
        if latest is not None:
            pinned = ex.pin_unresolved(self.exp_cfg, state, latest)
            if pinned is not None:
                self.registry.pin(latest)            # retention must never delete a control version
                ex.save_state(self.exp_cfg.state_path, pinned)
                state = pinned
        try:
            exp = ex.experiment(self.exp_cfg, state)
        except ValueError:                           # "pinned" with nothing published yet
            return
        latest, loaded = self.holder.refresh({a.version for a in exp.arms if a.share > 0 or a is exp.control},
                                             self._prewarm)
        self.view = view = View(exp, latest, loaded)
        served = {(a.name, s.version) for a in exp.arms if (s := view.get(a.version)) is not None}
        for labels in self._served - served:      # set to 0, not removed: works in multiprocess mode too
            self.metrics.version.labels(*labels).set(0)
        for labels in served:
            self.metrics.version.labels(*labels).set(1)
        self._served = served

    def start(self) -> None:
        """Load the versions and open the feature store (on the inference thread, where it
        is used: importing Feast takes seconds) before the first request is accepted."""
        self._safe_refresh()
        try:
            self.executor.submit(self._store_or_none).result()
        except Exception as e:  # noqa: BLE001 - requests will retry and serve cold-start meanwhile
            log.error("serving: feature store not available yet: %s", e)
        gc.collect()
        gc.freeze()       # model, Feast, imports: never traversed by later collections (shorter GC pauses)
        # The event loop and the inference thread share the GIL; a thread that wants it waits
        # up to the switch interval (5 ms by default) for the other's Python code: 1 ms keeps
        # parsing and answering from queueing behind a batch's Python glue, and vice versa.
        sys.setswitchinterval(0.001)
        self._poller = threading.Thread(target=self._poll, name="model-poller", daemon=True)
        self._poller.start()

    def _safe_refresh(self) -> None:
        try:
            self.refresh()
        except Exception as e:  # noqa: BLE001 - the poller must survive a bad state file or registry hiccup
            log.error("serving: refresh failed: %s", e)

    def _poll(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            self._safe_refresh()

    def close(self) -> None:
        self._stop.set()
        if self._poller:
            self._poller.join(5)
        self.executor.shutdown(wait=True)
        self.exposures.close()

    # -- the request path (inference thread)
    def _store_or_none(self):
        """The feature store, opened on first use; a failed open is retried at most every 5 s."""
        if self._store is None:
            if time.monotonic() < self._store_retry_at:
                raise RuntimeError("feature store unavailable (retrying)")
            try:
                self._store = self._store_factory()
            except Exception:
                self._store_retry_at = time.monotonic() + 5.0
                raise
        return self._store

    def _sequences(self, user_ids: list[str]) -> tuple[dict, bool]:
        """({user: sequence} of those that have one, degraded): one store read for a whole batch."""
        try:
            return self._store_or_none().read_users(user_ids, fast=True), False
        except Exception as e:  # noqa: BLE001 - serve cold-start rather than fail
            self.metrics.degraded.inc()
            log.warning("serving: feature read failed for %d users: %s", len(user_ids), e)
            return {}, True

    def _popularity(self, s: Servable) -> None:
        if s.popularity is None:
            try:
                rows = self._store_or_none().read_items(s.ids, fast=True)
            except Exception as e:  # noqa: BLE001
                log.warning("serving: item popularity unavailable: %s", e)
                rows = {}
            s.popularity = np.array([float((rows.get(i) or {}).get("positives_all") or 0) for i in s.ids])

    @staticmethod
    def _fingerprint(seq) -> tuple:
        return seq.watermark, len(seq.item_ids), seq.total_clicks, len(seq.query_ids)

    def _cached(self, s: Servable, r: Request, seq) -> tuple[list, list] | None:
        if not self.cfg.cache_users:
            return None
        hit = self.cache.get((s.version, r.user_id, r.exclude_seen), self._fingerprint(seq), r.k)
        self.metrics.cache.labels("miss" if hit is None else "hit").inc()
        return None if hit is None else (hit.items[: r.k], hit.scores[: r.k])

    def _recommend_misses(self, s: Servable, group: list[tuple[int, Request, Any]], answers: dict) -> None:
        """One batched pass of `s` for the requests whose list was not cached."""
        for start in range(0, len(group), MAX_BATCH):
            part = group[start: start + MAX_BATCH]
            lists = s.recommend_many([seq for _, _, seq in part], [r.k for _, r, _ in part],
                                     [r.exclude_seen for _, r, _ in part])
            for (i, r, seq), (items, scores) in zip(part, lists):
                if self.cfg.cache_users:
                    self.cache.put((s.version, r.user_id, r.exclude_seen),
                                   Entry(self._fingerprint(seq), items, scores, len(items) < r.k, seq, r.k))
                answers[i] = (items, scores, False)

    def _prewarm(self, new: Servable, previous: str | None) -> None:
        """Recompute the recent users' lists of the previous latest with `new` (poller thread;
        `new` is not visible to requests yet, so nothing else touches its model)."""
        if previous is None or not self.cfg.cache_users or self.cfg.prewarm_s <= 0:
            return
        deadline, n = time.monotonic() + self.cfg.prewarm_s, 0
        recent = self.cache.recent(previous, self.cfg.prewarm_users)
        for start in range(0, len(recent), MAX_BATCH):
            if time.monotonic() > deadline:
                break
            part = recent[start: start + MAX_BATCH]
            lists = new.recommend_many([e.seq for _, e in part], [e.k for _, e in part], [key[2] for key, _ in part])
            for ((_, user, excl), e), (items, scores) in zip(part, lists):
                self.cache.put((new.version, user, excl), e._replace(items=items, scores=scores,
                                                                     complete=len(items) < e.k))
            n += len(part)
        self.metrics.prewarmed.inc(n)
        log.info("serving: %s pre-warmed for %d users", new.version, n)

    def handle(self, endpoint: str, user_id: str, k: int, *, exclude_seen: bool = True, q: str | None = None,
               t0: float | None = None) -> tuple[int, dict, str]:
        """(HTTP status, body, arm) of one request; never raises."""
        t0 = time.perf_counter() if t0 is None else t0
        return self.handle_many([Request(endpoint, user_id, k, exclude_seen, q, t0)])[0]

    def handle_many(self, reqs: list[Request]) -> list[tuple[int, dict, str]]:
        """(HTTP status, body, arm) of each request, answered together (one feature read, one
        model pass per version); never raises. If the batch fails, each request is retried
        alone, so that only the one that fails gets its 500."""
        view = self.view
        try:
            out = self._answer(view, reqs)
        except Exception as e:  # noqa: BLE001 - a 500 with a message, counted, never a dropped connection
            if len(reqs) > 1:
                return [self.handle_many([r])[0] for r in reqs]
            log.exception("serving: %s failed for user %r", reqs[0].endpoint, reqs[0].user_id)
            arm = view.exp.assign(reqs[0].user_id).name if view.exp is not None else "-"
            out = [(500, {"error": f"internal error: {type(e).__name__}: {e}"}, arm)]
        now = time.perf_counter()
        for r, (_, _, arm) in zip(reqs, out):
            self.metrics.latency.labels(r.endpoint, arm).observe(now - r.t0)
        return out

    def _answer(self, view: View, reqs: list[Request]) -> list[tuple[int, dict, str]]:
        exp = view.exp
        if exp is None or not view.loaded:
            return [(503, {"error": f"no model version published yet in {self.registry.root}"}, "-")] * len(reqs)
        out: list = [None] * len(reqs)
        live = []                                              # (index, request, arm, servable)
        for i, r in enumerate(reqs):
            arm = exp.assign(r.user_id)
            s = view.get(arm.version)
            if s is None:
                out[i] = (503, {"error": f"arm {arm.name}: version {arm.version} is not loaded (see the server "
                                         "log)"}, arm.name)
            else:
                live.append((i, r, arm, s))
        seqs, degraded = self._sequences(list(dict.fromkeys(r.user_id for _, r, _, _ in live))) if live else ({}, False)
        answers: dict[int, tuple] = {}                         # index -> (items, scores, cold)
        misses: dict[Servable, list] = {}
        searches: dict[Servable, list] = {}
        for i, r, arm, s in live:
            seq = seqs.get(r.user_id)
            cold = seq is None or not seq.item_ids
            if r.endpoint == "search":
                mc = s.model.cfg
                pieces = hash_pieces(r.q, mc.n_buckets, ngram=mc.ngram, max_pieces=mc.max_query_pieces)
                if not pieces:
                    out[i] = (400, {"error": f"q: {r.q!r} has no searchable word"}, arm.name)
                elif cold:
                    answers[i] = (*s.search_cold(pieces, r.k, r.q), True)
                else:
                    searches.setdefault(s, []).append((i, r, seq, pieces))
            elif cold:
                self._popularity(s)
                answers[i] = (*s.popular(r.k), True)
            elif (hit := self._cached(s, r, seq)) is not None:
                answers[i] = (*hit, False)
            else:
                misses.setdefault(s, []).append((i, r, seq))
        for s, group in misses.items():
            self._recommend_misses(s, group, answers)
        for s, group in searches.items():
            for start in range(0, len(group), MAX_BATCH):
                part = group[start: start + MAX_BATCH]
                found = s.search_many([g[2] for g in part], [g[3] for g in part], [g[1].k for g in part],
                                           [g[1].q for g in part])
                for (i, _, _, _), (items, scores) in zip(part, found):
                    answers[i] = (items, scores, False)
        for i, r, arm, s in live:
            if out[i] is None:
                out[i] = (200, self._respond(exp, arm, s, r, *answers[i], degraded), arm.name)
        return out

    def _respond(self, exp, arm, s: Servable, r: Request, items: list, scores: list, cold: bool,
                 degraded: bool) -> dict:
        """The response body; the exposure record goes to the exposure log's queue."""
        if cold:
            self.metrics.cold_start.labels(r.endpoint).inc()
        rid = f"{self._rid_prefix}{next(self._rid_counter):x}"
        body = {"request_id": rid, "user_id": r.user_id, "items": items, "scores": scores, "version": s.version,
                "arm": arm.name, "experiment": exp.id, "cold_start": cold}
        if degraded:
            body["degraded"] = True
        self.exposures.send({"schema": ex.EXPOSURE_SCHEMA, "request_id": rid, "experiment": exp.id,
                             "arm": arm.name, "version": s.version, "user_id": r.user_id, "endpoint": r.endpoint,
                             "items": items, "ts": time.time(),
                             "latency_ms": round((time.perf_counter() - r.t0) * 1000.0, 3),
                             "cold_start": cold, **({"query": r.q} if r.q is not None else {})})
        return body

    # -- the event loop side: requests queue while a batch runs, the next batch takes them all
    async def submit(self, endpoint: str, user_id: str, k: int, *, exclude_seen: bool = True,
                     q: str | None = None) -> tuple[int, dict]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._pending_lock:
            self._pending.append((Request(endpoint, user_id, k, exclude_seen, q, time.perf_counter()), fut, loop))
            idle, self._draining = not self._draining, True
        if idle:
            self.executor.submit(self._drain)
        status, body, arm = await fut
        self.metrics.requests.labels(endpoint, arm, str(status)).inc()
        return status, body

    def _drain(self) -> None:
        """Inference thread: answer what has queued, `MAX_BATCH` at a time, until nothing waits."""
        while True:
            with self._pending_lock:
                todo, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                if not todo:
                    self._draining = False
                    return
            self.metrics.batch_size.observe(len(todo))
            try:
                results = self.handle_many([r for r, _, _ in todo])
            except BaseException as e:  # noqa: BLE001 - handle_many never raises; no future may hang
                results = [(500, {"error": f"internal error: {type(e).__name__}: {e}"}, "-")] * len(todo)
            by_loop: dict[Any, list] = {}
            for (_, fut, loop), res in zip(todo, results):
                by_loop.setdefault(loop, []).append((fut, res))
            for loop, done in by_loop.items():
                loop.call_soon_threadsafe(_resolve, done)


def _resolve(done: list) -> None:
    for fut, res in done:
        if not fut.done():              # a client that went away cancelled its future
            fut.set_result(res)
