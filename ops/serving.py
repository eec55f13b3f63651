"""`unirec serve`: recommend and search from published model versions, one A/B arm per user.

    GET /recommend?user_id=&k=&exclude_seen=    GET /search?user_id=&q=&k=
    GET /healthz   GET /metrics (Prometheus)

A request is assigned to an arm (`unirec.ops.experiments`: sticky hash of the
user id), reads the user's sequence from the Feast online store, and is answered
by the arm's model version:

* **recommend**: the user state (one causal pass over the last `max_len`
  events) scores every published item vector by inner product; seen items are
  excluded (default); the top `candidates` are re-ranked by the ranking head.
  Final score = retrieval softmax probability x ranking probability, i.e.
  P(next item = i) x P(positive | i): the ranker alone knows nothing of how
  likely an item is to be chosen, retrieval nothing of how it will be liked.
  The ranking pass uses the last event's timestamp (as offline evaluation does).
* **search**: the model's search scores (history + query token, plus its
  lexical channel) over the published items, top `candidates` re-ranked the same way.
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

**Threads and latency.** All model and feature-store work runs on one
inference thread (`torch` ops on small tensors are cheapest single-threaded; it
also serialises SQLite reads); the event loop only parses and validates. The
model's item vectors are computed once per version (the model would recompute
them on every forward: ~30 ms for ML-100k). Ranked lists are cached per
(version, user, exclude_seen) and reused while the user's sequence is unchanged
(its watermark, length, total clicks and queries), so a repeated request costs a
feature read, not two Transformer passes; a new event misses. So that a new
`latest` does not turn every request into a miss at once, the poller first
recomputes the lists of the most recently served users of the old `latest` with
the new version (up to `prewarm_users`, within `prewarm_s`, from the sequences
kept in the cache) and only then swaps: a publish delays its own visibility by
at most `prewarm_s` instead of stalling requests.
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import orjson
import torch

from unirec.ops import experiments as ex
from unirec.ops.config import ExperimentsConfig, ServingConfig
from unirec.ops.exposures import ExposureLog, KafkaSender
from unirec.ops.servable import Entry, ListCache, Servable

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServingMetrics:
    """Serving metrics (to move into unirec.ops.metrics with the rest)."""

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        self.requests = Counter("unirec_serving_requests_total", "Requests by endpoint, arm and HTTP status.",
                                ("endpoint", "arm", "status"), registry=registry)
        self.latency = Histogram("unirec_serving_request_duration_seconds",
                                 "Server-side time of a request, arrival to response (endpoint, arm).",
                                 ("endpoint", "arm"), registry=registry, buckets=LATENCY_BUCKETS)
        self.cold_start = Counter("unirec_serving_cold_start_total", "Requests answered without a user sequence.",
                                  ("endpoint",), registry=registry)
        self.degraded = Counter("unirec_serving_feature_errors_total",
                                "Feature-store reads that failed (request served cold-start).", registry=registry)
        self.cache = Counter("unirec_serving_cache_total", "Ranked-list cache lookups (result: hit | miss).",
                             ("result",), registry=registry)
        self.exposures = Counter("unirec_serving_exposures_total",
                                 "Exposure records (result: sent | dropped | failed).", ("result",), registry=registry)
        self.prewarmed = Counter("unirec_serving_prewarmed_total",
                                 "Ranked lists recomputed with a new version before it went live.", registry=registry)
        self.loads = Counter("unirec_serving_model_loads_total", "Model version loads (result: ok | failed).",
                             ("result",), registry=registry)
        self.version = Gauge("unirec_serving_model_version", "1 for the version each arm serves (arm, version).",
                             ("arm", "version"), registry=registry, multiprocess_mode="mostrecent")


# ---------------------------------------------------------------- versions and hot swap

class View(NamedTuple):
    """What one request reads, once: the experiment and the versions its arms serve."""
    exp: ex.Experiment | None
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


# ---------------------------------------------------------------- the service

class Service:
    """Request handling, independent of the HTTP framework (see `create_app`)."""

    def __init__(self, cfg: ServingConfig, exp_cfg: ExperimentsConfig, registry, *, store_factory: Callable[[], Any],
                 exposure_sender: Callable[[dict], None] | None = None, kafka_cfg=None, metrics_registry=None,
                 loader=None):
        """Exposures go to `exposure_sender`, or to Kafka (`kafka_cfg.topics.exposures`) if it is None."""
        from prometheus_client import CollectorRegistry

        self.cfg, self.exp_cfg, self.registry = cfg, exp_cfg, registry
        self.metrics_registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
        self.metrics = ServingMetrics(self.metrics_registry)
        if loader is None:
            from unirec.model.snapshot import load_snapshot
            loader = lambda name: load_snapshot(registry, name)  # noqa: E731
        self.holder = ModelHolder(registry, loader, cfg.candidates, self.metrics)
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

    def _sequence(self, user_id: str):
        """(sequence or None, degraded)."""
        try:
            return self._store_or_none().read_users([user_id], fast=True).get(user_id), False
        except Exception as e:  # noqa: BLE001 - serve cold-start rather than fail
            self.metrics.degraded.inc()
            log.warning("serving: feature read failed for %r: %s", user_id, e)
            return None, True

    def _popularity(self, s: Servable) -> None:
        if s.popularity is None:
            try:
                rows = self._store_or_none().read_items(s.ids, fast=True)
            except Exception as e:  # noqa: BLE001
                log.warning("serving: item popularity unavailable: %s", e)
                rows = {}
            s.popularity = np.array([float((rows.get(i) or {}).get("positives_all") or 0) for i in s.ids])

    def _recommend(self, s: Servable, user_id: str, seq, k: int, exclude_seen: bool) -> tuple[list, list]:
        if not self.cfg.cache_users:
            return s.recommend(seq, k, exclude_seen)
        key = (s.version, user_id, exclude_seen)
        fp = (seq.watermark, len(seq.item_ids), seq.total_clicks, len(seq.query_ids))
        hit = self.cache.get(key, fp, k)
        self.metrics.cache.labels("miss" if hit is None else "hit").inc()
        if hit is not None:
            return hit.items[:k], hit.scores[:k]
        items, scores = s.recommend(seq, k, exclude_seen)
        self.cache.put(key, Entry(fp, items, scores, len(items) < k, seq, k))
        return items, scores

    def _prewarm(self, new: Servable, previous: str | None) -> None:
        """Recompute the recent users' lists of the previous latest with `new` (poller thread;
        `new` is not visible to requests yet, so nothing else touches its model)."""
        if previous is None or not self.cfg.cache_users or self.cfg.prewarm_s <= 0:
            return
        deadline, n = time.monotonic() + self.cfg.prewarm_s, 0
        for (_, user, excl), e in self.cache.recent(previous, self.cfg.prewarm_users):
            if time.monotonic() > deadline:
                break
            items, scores = new.recommend(e.seq, e.k, excl)
            self.cache.put((new.version, user, excl), e._replace(items=items, scores=scores, complete=len(items) < e.k))
            n += 1
        self.metrics.prewarmed.inc(n)
        log.info("serving: %s pre-warmed for %d users", new.version, n)

    def handle(self, endpoint: str, user_id: str, k: int, *, exclude_seen: bool = True, q: str | None = None,
               t0: float | None = None) -> tuple[int, dict, str]:
        """(HTTP status, body, arm) of one request; never raises."""
        t0 = time.perf_counter() if t0 is None else t0
        view, arm_name = self.view, "-"
        exp = view.exp
        try:
            if exp is None or not view.loaded:
                return 503, {"error": f"no model version published yet in {self.registry.root}"}, arm_name
            arm = exp.assign(user_id)
            arm_name = arm.name
            s = view.get(arm.version)
            if s is None:
                return 503, {"error": f"arm {arm.name}: version {arm.version} is not loaded (see the server log)"}, arm_name
            seq, degraded = self._sequence(user_id)
            cold = seq is None or not seq.item_ids
            if endpoint == "search":
                from unirec.model.text import hash_pieces
                mc = s.model.cfg
                pieces = hash_pieces(q, mc.n_buckets, ngram=mc.ngram, max_pieces=mc.max_query_pieces)
                if not pieces:
                    return 400, {"error": f"q: {q!r} has no searchable word"}, arm_name
                items, scores, cold = s.search(seq, pieces, k)
            elif cold:
                self._popularity(s)
                items, scores = s.popular(k)
            else:
                items, scores = self._recommend(s, user_id, seq, k, exclude_seen)
            if cold:
                self.metrics.cold_start.labels(endpoint).inc()
            rid = f"{self._rid_prefix}{next(self._rid_counter):x}"
            latency_ms = (time.perf_counter() - t0) * 1000.0
            body = {"request_id": rid, "user_id": user_id, "items": items, "scores": scores, "version": s.version,
                    "arm": arm.name, "experiment": exp.id, "cold_start": cold}
            if degraded:
                body["degraded"] = True
            self.exposures.send({"schema": ex.EXPOSURE_SCHEMA, "request_id": rid, "experiment": exp.id,
                                 "arm": arm.name, "version": s.version, "user_id": user_id, "endpoint": endpoint,
                                 "items": items, "ts": time.time(), "latency_ms": round(latency_ms, 3),
                                 "cold_start": cold, **({"query": q} if q is not None else {})})
            return 200, body, arm_name
        except Exception as e:  # noqa: BLE001 - a 500 with a message, counted, never a dropped connection
            log.exception("serving: %s failed for user %r", endpoint, user_id)
            return 500, {"error": f"internal error: {type(e).__name__}: {e}"}, arm_name
        finally:
            self.metrics.latency.labels(endpoint, arm_name).observe(time.perf_counter() - t0)

    async def submit(self, endpoint: str, user_id: str, k: int, **kw: Any) -> tuple[int, dict]:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        status, body, arm = await loop.run_in_executor(
            self.executor, lambda: self.handle(endpoint, user_id, k, t0=t0, **kw))
        self.metrics.requests.labels(endpoint, arm, str(status)).inc()
        return status, body


# ---------------------------------------------------------------- HTTP

def _json(status: int, body: Mapping[str, Any]):
    from starlette.responses import Response

    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_params(query: Mapping[str, str], cfg: ServingConfig, *, search: bool) -> tuple[str | None, dict]:
    """(error message or None, handler kwargs) from the query string: every message names its
    parameter. Plain code rather than FastAPI's declared parameters: those cost ~0.7 ms of
    CPU per request (dependency solving), a third of a cached request."""
    user_id = query.get("user_id")
    if user_id is None:
        return "user_id: required", {}
    if not user_id.strip():
        return "user_id: must not be empty", {}
    if len(user_id) > cfg.max_id_chars:
        return f"user_id: longer than {cfg.max_id_chars} characters", {}
    k = query.get("k")
    try:
        k = cfg.default_k if k is None else int(k)
    except ValueError:
        return f"k: must be an integer, got {k[:20]!r}", {}
    if not 1 <= k <= cfg.max_k:
        return f"k: must be between 1 and {cfg.max_k}, got {k}", {}
    out = {"user_id": user_id, "k": k}
    if search:
        q = query.get("q")
        if q is None:
            return "q: required", {}
        if not q.strip():
            return "q: must not be empty", {}
        if len(q) > cfg.max_query_chars:
            return f"q: longer than {cfg.max_query_chars} characters", {}
        out["q"] = q
    else:
        flag = query.get("exclude_seen")
        if flag is not None and flag.lower() not in _BOOL:
            return f"exclude_seen: must be true or false, got {flag[:20]!r}", {}
        out["exclude_seen"] = cfg.exclude_seen if flag is None else _BOOL[flag.lower()]
    return None, out


def create_app(service: Service):
    """The FastAPI app: validation on the event loop, work on the inference thread.

    Bad parameters are 400 with `{"error": "<param>: <what is wrong>"}`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from prometheus_client import make_asgi_app

    cfg = service.cfg

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.close()

    app = FastAPI(title="unirec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount("/metrics", make_asgi_app(service.metrics_registry))

    def endpoint(name: str):
        async def handle(request):
            err, kw = parse_params(request.query_params, cfg, search=name == "search")
            if err:
                service.metrics.requests.labels(name, "-", "400").inc()
                return _json(400, {"error": err})
            return _json(*await service.submit(name, kw.pop("user_id"), kw.pop("k"), **kw))
        return handle

    app.add_route("/recommend", endpoint("recommend"), methods=["GET"])
    app.add_route("/search", endpoint("search"), methods=["GET"])

    @app.get("/healthz")
    async def healthz():
        view = service.view
        exp = view.exp
        arms = {} if exp is None else {
            a.name: {"share": a.share, "version": getattr(view.get(a.version), "version", None)}
            for a in exp.arms}
        ok = exp is not None and all(v["version"] for v in arms.values() if v["share"] > 0)
        return _json(200 if ok else 503, {"status": "ok" if ok else "no_model",
                                          "experiment": exp and exp.id, "arms": arms})

    return app
