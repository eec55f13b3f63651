"""The pipeline's monitor: what the pipeline process calls after every batch, window of events,
training step and publish. It sets the Prometheus metrics (`unirec.ops.metrics`), computes
drift (`unirec.ops.drift`) and appends the run log that `unirec report` reads.

    monitor = Monitor(cfg.monitoring, topics=[clicks, queries]); monitor.start()
    monitor.on_batch(report, lags)      # a streaming.driver.BatchReport, {(topic, partition): lag}
    monitor.on_events(item_ids=[...], user_ids=[...], query_texts=[...], watermark=ts)
    monitor.on_train(stats)             # losses, weights, lr, test-then-train eval, ranking predictions
    monitor.on_publish(event)           # a publish or a gate refusal, with the item table
    monitor.close()

Design choices:

* **Never raises into the pipeline.** Every `on_*` call is guarded: an exception is
  logged and counted in `unirec_monitor_errors_total{kind}`, and the call still writes
  its log line (with an `error` field). Single odd values (a string where a number
  belongs, a malformed lag entry) are skipped and counted without dropping the rest.
* **Windows are counted in events** (`unirec.ops.windows`): input windows hold
  `input_window_events` clicks + queries, score windows `score_window` ranking
  predictions; each closed window is compared with the one before it.
* **Per-topic accounting when the report has it.** A report with `consumed`
  ({topic: records}) and dead letters keyed by (topic, reason) is counted per topic;
  the driver's `BatchReport` (records in total, dead letters per reason) is counted
  under `topic="all"`. The first batch decides which, and creates the zero series.
* **The learner's liveness.** The first `on_train` sets the last-publish time to now
  if nothing was published yet, so "no publish for too long" also catches a learner
  that never publishes; a pipeline without online learning never sets it.
* **Thread safety.** The driver calls `on_batch` from its push thread while the learner
  calls the others: one lock serialises the calls. Each is cheap except the embedding
  drift of a publish, bounded by `max_drift_items` (O(n^2 d) exact neighbour search).

Run log (`log_path`, JSON lines, appended; `unirec report` reads the last run): every
line has `t` (unix time) and `kind`; numbers are finite or null (the names of top-level
keys that were NaN/inf are listed in `nonfinite`); never arrays, only small dicts.

    start        topics, bind
    batch        batch_id records users items path seconds phases{} dead_letters{reason: n}
                 lag lag_max freshness_p50 freshness_p95
    input_drift  watermark clicks queries window window_events closed
                 [item_popularity_js new_item_share new_user_share query_terms_js]  (when closed)
    train        the numeric keys of `stats` as given, eval{}, rank_n,
                 [score_psi calibration_gap calibration_ece]  (when a score window closed)
    publish      version accepted reason watermark metrics{}, reasons[] (refused: the label values
                 counted), items (with a table), [embedding_cosine_distance
                 embedding_neighbour_overlap embedding_shared_items] (against a previous table)
    any kind     error (the call failed; its figures may be missing)
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unirec.ops import drift
from unirec.ops.config import MonitoringConfig
from unirec.ops.gate import REASONS as GATE_REASONS
from unirec.ops.metrics import EVAL_METRICS, LOSS_HEADS, MERGE_REASONS, WEIGHTED_HEADS, PipelineMetrics, serve
from unirec.ops.windows import InputWindows, ScoreWindows

log = logging.getLogger(__name__)

ALL_TOPICS = "all"
FRESHNESS_SAMPLE = 1000            # records per batch observed in the freshness histogram
_LABEL = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_SMALL = 32                        # items kept of a dict or list in a log line


# ---- plain values ------------------------------------------------------------------------------
def number(x: Any) -> float | None:
    """A real number as float (numpy scalars included; bool and str are not numbers), else None."""
    if x is None or isinstance(x, (bool, str, bytes)):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def count(x: Any) -> int | None:
    v = number(x)
    return int(v) if v is not None and math.isfinite(v) and v >= 0 else None


def label(x: Any) -> str:
    """A bounded-cardinality label value: lower-case identifiers pass, anything else is `other`."""
    s = str(x)
    return s if _LABEL.match(s) else "other"


def plain(x: Any, depth: int = 0) -> Any:
    """JSON-safe copy: finite numbers, null for NaN/inf, short strings, small dicts and lists."""
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, str):
        return x[:200]
    v = number(x)
    if v is not None and not isinstance(x, np.ndarray):
        return v if math.isfinite(v) else None
    if depth < 2 and isinstance(x, Mapping):
        return {str(k): plain(val, depth + 1) for k, val in list(x.items())[:_SMALL]}
    if depth < 2 and isinstance(x, (list, tuple)) and len(x) <= _SMALL:
        return [plain(val, depth + 1) for val in x]
    return None


def _id_list(x: Any, name: str) -> list[str]:
    if x is None:
        return []
    if isinstance(x, (str, bytes)) or not isinstance(x, Iterable):
        raise TypeError(f"{name}: expected a list of ids, got {type(x).__name__}")
    return [str(i) for i in x if i is not None]


def rejection_reasons(reason: Any) -> list[str]:
    """Label values for a gate refusal: the gate's reason codes found in `reason` (a code, codes
    joined by any separator, or `str(GateDecision)`), else the whole of it if it is an identifier,
    else `other` (label values must stay few)."""
    text = str(reason or "")
    found = [r for r in GATE_REASONS if re.search(rf"\b{r}\b", text)]
    return found or [label(text.strip())]


def batch_accounting(report: Any) -> tuple[dict[str, int], Counter, bool]:
    """(records per topic, dead letters per (topic, reason), per_topic) of a batch report.

    Per topic if the report has a non-empty `consumed` {topic: records} and dead letters
    keyed by (topic, reason) (`dead_letters_by_topic`, or `dead_letters` so keyed);
    otherwise everything under topic "all" (`records`, dead letters keyed by reason)."""
    consumed_in = getattr(report, "consumed", None)
    per_topic = isinstance(consumed_in, Mapping) and bool(consumed_in)
    dead_in = (getattr(report, "dead_letters_by_topic", None) if per_topic else None) \
        or getattr(report, "dead_letters", None) or {}
    per_topic = per_topic and all(isinstance(k, tuple) and len(k) == 2 for k in dead_in)
    if not per_topic:
        dead_in = getattr(report, "dead_letters", None) or {}
    dead: Counter = Counter()
    for key, n in dead_in.items():
        topic, reason = key if per_topic else (ALL_TOPICS, key)
        dead[(str(topic), label(reason))] += count(n) or 0
    if per_topic:
        consumed = {str(t): count(n) or 0 for t, n in consumed_in.items()}
    else:
        consumed = {ALL_TOPICS: count(getattr(report, "records", 0)) or 0}
    return consumed, dead, per_topic


# ---- run log -----------------------------------------------------------------------------------
class RunLog:
    """Append-only JSON lines at `path` ("" = off); the file stays open and is flushed per line."""

    def __init__(self, path: str):
        self.path = Path(path) if path else None
        self._f = None

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._f.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# ---- the monitor -------------------------------------------------------------------------------
class Monitor:
    """One per pipeline process; see the module docstring for the contract."""

    def __init__(self, cfg: MonitoringConfig, *, topics: list[str], registry=None):
        self.cfg = cfg
        self.topics = [str(t) for t in topics]
        self.metrics = PipelineMetrics(registry)
        self.port: int | None = None
        self._server = None
        self._lock = threading.RLock()
        self._log = RunLog(cfg.log_path)
        self._inputs = InputWindows(cfg.input_window_events)
        self._scores = ScoreWindows(cfg.score_window, cfg.psi_bins, cfg.calibration_bins)
        self._per_topic: bool | None = None        # decided by the first batch
        self._published: tuple[list[str], np.ndarray] | None = None
        self._publish_time_set = False
        self._watermark = -math.inf
        for reason in GATE_REASONS:
            self.metrics.gate_rejections.labels(reason)
        self._write("start", {"topics": self.topics, "bind": cfg.bind})

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Serve /metrics on `cfg.bind` (if set); `self.port` is the bound port."""
        if not self.cfg.bind or self._server is not None:
            return
        try:
            self._server = serve(self.metrics.registry, self.cfg.bind)
        except OSError as e:
            raise RuntimeError(f"monitoring.bind {self.cfg.bind}: cannot serve /metrics: {e}") from e
        self.port = self._server.port
        log.info("serving /metrics on %s (port %d)", self.cfg.bind, self.port)

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.stop()
                self._server = None
            self._log.close()

    def __enter__(self) -> Monitor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing
    def _error(self, kind: str, what: str) -> None:
        self.metrics.monitor_errors.labels(kind).inc()
        log.warning("monitor %s: %s", kind, what)

    @contextlib.contextmanager
    def _call(self, kind: str, line: dict) -> Iterator[None]:
        """Serialise the call, swallow and count any error, then write the call's log line."""
        with self._lock:
            try:
                yield
            except Exception as e:  # noqa: BLE001 - monitoring must never stop the pipeline
                self._error(kind, f"{type(e).__name__}: {e}")
                line["error"] = f"{type(e).__name__}: {e}"[:300]
            self._write(kind, line)

    def _write(self, kind: str, line: dict) -> None:
        record = {"t": time.time(), "kind": kind}
        nonfinite = [k for k, v in line.items() if (n := number(v)) is not None and not math.isfinite(n)]
        record.update({str(k): plain(v) for k, v in line.items()})
        if nonfinite:
            record["nonfinite"] = nonfinite
        try:
            self._log.write(record)
        except Exception as e:  # noqa: BLE001 - a full disk must not stop the pipeline either
            self._error("log", f"{self._log.path}: {e}")

    # ------------------------------------------------------------ batches
    def on_batch(self, report: Any, lags: Mapping[tuple[str, int], int]) -> None:
        line: dict = {}
        with self._call("batch", line):
            m = self.metrics
            for key in ("batch_id", "records", "users", "items"):
                line[key] = count(getattr(report, key, None))
            if line["records"] is None:
                raise TypeError(f"report: expected a BatchReport with a record count, got {type(report).__name__}")
            consumed, dead, per_topic = batch_accounting(report)
            if self._per_topic is None:
                self._per_topic = per_topic
                m.init_topics(self.topics if per_topic else [ALL_TOPICS], MERGE_REASONS)
            phases = {str(k): s for k, v in (getattr(report, "seconds", None) or {}).items()
                      if (s := number(v)) is not None and math.isfinite(s) and s >= 0}
            path = label(getattr(report, "path", "other"))
            m.record_batch(seconds=sum(phases.values()), path=path, consumed=consumed, dead_letters=dead.elements())
            line.update(path=path, seconds=sum(phases.values()), phases=phases,
                        dead_letters={r: n for (_, r), n in dead.items()})
            if "push" in phases:
                m.feature_write_duration.labels("all").observe(phases["push"])
            pushed_at = number(getattr(report, "pushed_at", None))
            pushed_at = pushed_at if pushed_at is not None and math.isfinite(pushed_at) else time.time()
            m.last_batch_time.set(pushed_at)
            line.update(self._freshness(getattr(report, "arrival_ms", None), pushed_at))
            line.update(self._lags(lags))

    def _freshness(self, arrival_ms: Any, pushed_at: float) -> dict:
        if arrival_ms is None or len(arrival_ms) == 0:
            return {}
        ms = np.asarray(arrival_ms, dtype=np.float64)
        ms = ms[np.isfinite(ms)]
        stride = max(1, math.ceil(ms.size / FRESHNESS_SAMPLE))
        ages = np.maximum(0.0, pushed_at - ms[::stride] / 1000.0)
        for age in ages.tolist():
            self.metrics.feature_freshness.observe(age)
        if not ages.size:
            return {}
        p50, p95 = np.percentile(ages, [50, 95])
        return {"freshness_p50": float(p50), "freshness_p95": float(p95)}

    def _lags(self, lags: Any) -> dict:
        clean, bad = {}, 0
        for key, value in (lags or {}).items():
            try:
                topic, partition = key
                lag = count(value)
                if lag is None:
                    raise ValueError(value)
                clean[(str(topic), int(partition))] = lag
            except (TypeError, ValueError):
                bad += 1
        if bad:
            self._error("batch", f"{bad} malformed lag entries skipped")
        self.metrics.set_consumer_lag(clean)
        return {"lag": sum(clean.values()), "lag_max": max(clean.values(), default=0)}

    # ------------------------------------------------------------ input drift
    def on_events(self, *, item_ids: list[str], user_ids: list[str], query_texts: list[str],
                  watermark: int) -> None:
        line: dict = {"watermark": number(watermark)}
        with self._call("input_drift", line):
            items, users = _id_list(item_ids, "item_ids"), _id_list(user_ids, "user_ids")
            texts = [t for t in (query_texts or []) if isinstance(t, str)]
            if len(texts) != len(query_texts or []):
                self._error("input_drift", f"{len(query_texts) - len(texts)} query texts that are not strings skipped")
            w = number(watermark)
            if w is not None and math.isfinite(w) and w > self._watermark:
                self._watermark = w
                self.metrics.events_watermark.set(w)
            d = self._inputs.add(items, users, texts)
            line.update(clicks=len(items), queries=len(texts), window=self._inputs.index,
                        window_events=self._inputs.events, closed=d is not None)
            if d is not None:
                self.metrics.set_input_drift(d)
                if self._inputs.index > 1:      # the first window is the reference: nothing compared
                    self.metrics.drift_comparisons.labels("input").inc()
                line.update(d._asdict())

    # ------------------------------------------------------------ training
    def on_train(self, stats: Mapping[str, Any]) -> None:
        line: dict = {}
        with self._call("train", line):
            if not isinstance(stats, Mapping):
                raise TypeError(f"stats: expected a mapping, got {type(stats).__name__}")
            m = self.metrics
            if not self._publish_time_set:
                self._publish_time_set = True
                m.last_publish_time.set(time.time())
            line.update({k: v for k, v in stats.items() if number(v) is not None})
            for key, counter in (("steps", m.train_steps), ("sequences", m.train_sequences),
                                 ("items_new", m.items_added), ("items_expired", m.items_expired),
                                 ("users_new", m.users_added)):
                if (n := count(stats.get(key))) is not None:
                    counter.inc(n)
            for head in LOSS_HEADS:
                if (v := number(stats.get(f"loss_{head}"))) is not None:
                    m.train_loss.labels(head).set(v)
                    if not math.isfinite(v):
                        m.train_nonfinite_loss.labels(head).inc()
            for head in WEIGHTED_HEADS:
                if (v := number(stats.get(f"w_{head}"))) is not None:
                    m.loss_weight.labels(head).set(v)
            for key, gauge in (("lr", m.learning_rate), ("grad_norm", m.grad_norm),
                               ("watermark", m.train_watermark), ("items_live", m.items_live)):
                if (v := number(stats.get(key))) is not None:
                    gauge.set(v)
            line.update(self._eval(stats.get("eval")))
            if stats.get("rank_probs") is not None:
                line.update(self._rank(stats.get("rank_probs"), stats.get("rank_labels")))

    def _eval(self, ev: Any) -> dict:
        if ev is None:
            return {}
        if not isinstance(ev, Mapping):
            self._error("train", f"eval: expected a mapping, got {type(ev).__name__}")
            return {}
        for key in EVAL_METRICS:
            if (v := number(ev.get(key))) is not None and math.isfinite(v):
                self.metrics.eval_quality.labels(key).set(v)
        if (n := count(ev.get("eval_events"))) is not None:
            self.metrics.eval_events.inc(n)
        return {"eval": {k: v for k, v in ev.items() if number(v) is not None or v is None}}

    def _rank(self, probs: Any, labels: Any) -> dict:
        if labels is None:
            self._error("train", "rank_probs without rank_labels skipped")
            return {}
        dropped, closed = self._scores.add(probs, labels)
        if dropped:
            self._error("train", f"{dropped} ranking predictions outside [0, 1] or labels not 0/1 skipped")
        out: dict = {"rank_n": len(probs) - dropped}
        if closed is not None:
            psi, cal = closed
            if not math.isnan(psi):
                self.metrics.score_psi.set(psi)
                self.metrics.drift_comparisons.labels("score").inc()
            self.metrics.set_calibration(cal)
            out.update(score_psi=psi, calibration_gap=cal.gap, calibration_ece=cal.ece)
        return out

    # ------------------------------------------------------------ publishing
    def on_publish(self, event: Mapping[str, Any]) -> None:
        line: dict = {}
        with self._call("publish", line):
            if not isinstance(event, Mapping):
                raise TypeError(f"event: expected a mapping, got {type(event).__name__}")
            m = self.metrics
            accepted = event.get("accepted") is True
            version = event.get("version")
            reasons = rejection_reasons(event.get("reason"))
            line.update(version=None if version is None else str(version), accepted=accepted,
                        reason=str(event.get("reason") or ""), watermark=number(event.get("watermark")),
                        metrics=event.get("metrics") if isinstance(event.get("metrics"), Mapping) else None)
            if not accepted:
                line["reasons"] = reasons
                for reason in reasons:
                    m.gate_rejections.labels(reason).inc()
                return
            m.publishes.inc()
            self._publish_time_set = True
            m.last_publish_time.set(time.time())
            if version is not None:
                m.set_model_version(str(version))
            if (w := number(event.get("watermark"))) is not None and math.isfinite(w):
                m.model_watermark.set(w)
            line.update(self._embedding_drift(event))

    def _embedding_drift(self, event: Mapping[str, Any]) -> dict:
        ids, emb = event.get("item_ids"), event.get("item_embeddings")
        if ids is None or emb is None:
            return {}
        ids, emb = _id_list(ids, "item_ids"), np.array(emb, dtype=np.float32)   # a copy: ours to keep
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(f"item_embeddings: shape {emb.shape} for {len(ids)} item ids")
        prev = self._published
        if event.get("prev_item_ids") is not None and event.get("prev_item_embeddings") is not None:
            prev = (_id_list(event["prev_item_ids"], "prev_item_ids"), event["prev_item_embeddings"])
        self._published = (ids, emb)
        out: dict = {"items": len(ids)}
        if prev is None:
            return out
        try:
            d = drift.embedding_drift(prev[0], prev[1], ids, emb, k=self.cfg.neighbours,
                                      max_items=self.cfg.max_drift_items)
        except ValueError as e:   # e.g. a new embedding size: no drift between these versions
            self._error("publish", f"embedding drift: {e}")
            return out
        self.metrics.set_embedding_drift(d)
        self.metrics.drift_comparisons.labels("embedding").inc()
        out.update(embedding_cosine_distance=d.mean_cosine_distance,
                   embedding_neighbour_overlap=d.neighbour_overlap, embedding_shared_items=d.shared)
        return out
