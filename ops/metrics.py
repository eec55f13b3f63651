"""Every Prometheus metric of the pipeline, declared in one place, and the `/metrics` server.

`PipelineMetrics(registry)` declares the metrics on a `CollectorRegistry` that
the caller owns and passes around (never prometheus_client's global default),
so that tests and several pipelines in one process do not share series. Names
follow the Prometheus conventions: `unirec_` prefix, base units in the name
(`_seconds`, `_records`, `_ratio`), counters end in `_total`.

Accounting of events per `topic`. The driver reports per batch the records read
and the (topic, reason) of every dead letter (`record_batch`); valid and applied
counts follow, because every record read is applied or dead-lettered:

    consumed = valid + dead_lettered{reason in the decode reasons}
    valid    = applied + dead_lettered{reason="duplicate"} + dead_lettered{reason="late"}

Duplicates and late events are not separate counters: they are the
`duplicate` / `late` reasons of `unirec_events_dead_lettered_total`, so the
counter matches the dead-letter topic record for record and nothing is counted
twice. (Alerts on bad data exclude `duplicate`: re-delivery after a restart is
expected under at-least-once delivery and changes nothing.)

**Consumer lag** (`consumer_lag`) is `end offset - position` per topic-partition,
where the position is the next offset the pipeline has made durable (the state
store's offsets, which lead the Kafka-committed ones by up to
`streaming.kafka_commit_interval_s`) and
the end offsets come from one `KafkaConsumer.end_offsets` request. It needs no
consumer-group coordinator (the pipeline assigns partitions and never joins its
group), so it is right on the embedded broker, whose group tooling we do not
use. A broker that under-reports end offsets would make the lag read low but
never negative (clamped at 0); noida-db reports them correctly.

**Who sets what.** `unirec.ops.monitor.Monitor` turns the driver's batch reports,
the online learner's step stats and its publish events into these metrics (and
drift gauges); nothing else in the pipeline touches them. Training figures are
gauges of the last step (`unirec_train_loss{head}`, `unirec_eval_quality{metric}`:
test-then-train, i.e. measured on a batch before training on it), plus counters
of steps, evaluated events and non-finite losses (a counter, so that a NaN
between two scrapes is still seen). Feature freshness is Kafka arrival to
features online, per record, from a bounded sample of each batch.

**Serving and processes.** `serve(registry, bind)` exposes `/metrics` on a
daemon thread. In the default deployment every metric is set by the driver
process: the Beam workers (FnApiRunner threads, Dask worker processes) hand
their counts back in the batch outputs, and the driver records them, so one
registry in one process is correct for every runner. If code in *several
processes* must set metrics (e.g. a multi-process serving front end), use
prometheus_client's multiprocess mode: set `PROMETHEUS_MULTIPROC_DIR` to an
empty directory in the environment *before* Python starts (prometheus_client
picks its value store at import), and serve `exposition_registry()`, which then
aggregates every process's files (counters and histograms summed; gauges are
declared `mostrecent`, so the last value written by any process wins). Clear
the directory between runs, or stale files are summed in.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections import Counter as _Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, values
from prometheus_client.multiprocess import MultiProcessCollector

import unirec

DEFAULT_BIND = "127.0.0.1:9464"
# micro-batches: tens of ms (in-process) to tens of seconds (large Beam batches)
BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# feature writes: a Feast push of one batch, ms to seconds
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# arrival in Kafka -> features online: the arrival grace (0.5 s) plus a batch or two, up to minutes under backlog
FRESHNESS_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# serving: a cached list ~1 ms, a model pass a few ms, the 20 ms target in the middle
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)

TopicPartition = tuple[str, int]
# dead-letter reasons of valid events rejected by the per-user merge (unirec.features.sequence)
MERGE_REASONS = ("duplicate", "late")
LOSS_HEADS = ("retrieval", "ranking", "search")
WEIGHTED_HEADS = ("retrieval", "ranking")          # the adaptive weighter's heads
EVAL_METRICS = ("hr@10", "ndcg@10", "auc", "search_recall@10")
DRIFT_KINDS = ("input", "score", "embedding")        # what unirec_drift_comparisons_total counts


class PipelineMetrics:
    """The metrics of one pipeline, registered on `registry` (a fresh one if None)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self._version: str | None = None

        def counter(name, doc, labels=()):
            return Counter(name, doc, labels, registry=r)

        def gauge(name, doc, labels=()):
            return Gauge(name, doc, labels, registry=r, multiprocess_mode="mostrecent")

        # ---- streaming ---------------------------------------------------------------------
        self.events_consumed = counter(
            "unirec_events_consumed_total", "Kafka records read by the pipeline.", ("topic",))
        self.events_valid = counter(
            "unirec_events_valid_total", "Records that decoded into a valid event.", ("topic",))
        self.events_applied = counter(
            "unirec_events_applied_total", "Valid events merged into user state (not duplicate, not late).",
            ("topic",))
        self.events_dead_lettered = counter(
            "unirec_events_dead_lettered_total",
            "Records routed to the dead-letter topic, by reason (decode errors, duplicate, late).",
            ("topic", "reason"))
        self.consumer_lag = gauge(
            "unirec_consumer_lag_records",
            "Records in the partition after the pipeline's durable position (end offset - position).",
            ("topic", "partition"))
        self.microbatch_duration = Histogram(
            "unirec_microbatch_duration_seconds",
            "Wall time of one micro-batch, planning to Kafka commit (path: beam | in_process).",
            ("path",), registry=r, buckets=BATCH_BUCKETS)
        self.feature_write_duration = Histogram(
            "unirec_feature_write_duration_seconds",
            "Wall time of one push to the Feast online store (kind: users | items, or all when one "
            "timing covers both, as in the driver's batch report).",
            ("kind",), registry=r, buckets=WRITE_BUCKETS)
        self.feature_freshness = Histogram(
            "unirec_feature_freshness_seconds",
            "Kafka arrival of a record to its features being online (a stride sample of <= 1000 "
            "records per batch; the count is the sample size).",
            registry=r, buckets=FRESHNESS_BUCKETS)
        self.last_batch_time = gauge(
            "unirec_pipeline_last_batch_timestamp_seconds", "Unix time the last micro-batch's push completed.")
        self.events_watermark = gauge(
            "unirec_events_watermark_seconds", "Largest event time (epoch s) seen by the online learner.")

        # ---- online training (test-then-train: each batch is evaluated, then trained on) ------
        self.train_steps = counter("unirec_train_steps_total", "Optimizer steps of the online learner.")
        self.train_sequences = counter("unirec_train_sequences_total", "History windows trained on.")
        self.train_loss = gauge(
            "unirec_train_loss", "Last training loss per head (head: retrieval | ranking | search).", ("head",))
        self.train_nonfinite_loss = counter(
            "unirec_train_nonfinite_loss_total", "Training steps reporting a NaN or infinite loss, per head.",
            ("head",))
        self.loss_weight = gauge(
            "unirec_train_loss_weight", "Adaptive loss weight per head (head: retrieval | ranking).", ("head",))
        self.learning_rate = gauge("unirec_train_learning_rate", "Current learning rate of the online learner.")
        self.grad_norm = gauge("unirec_train_grad_norm", "Last pre-clipping gradient norm.")
        self.train_watermark = gauge(
            "unirec_train_watermark_seconds", "Event time (epoch s) of the newest data trained on.")
        self.eval_quality = gauge(
            "unirec_eval_quality",
            "Test-then-train quality of the last evaluated batch, before training on it "
            "(metric: hr@10 | ndcg@10 | auc | search_recall@10).", ("metric",))
        self.eval_events = counter("unirec_eval_events_total", "Events evaluated test-then-train.")
        self.items_live = gauge("unirec_model_items_live", "Items in the model's live item table.")
        self.items_added = counter("unirec_model_items_added_total", "Items added to the model's item table.")
        self.items_expired = counter("unirec_model_items_expired_total", "Items expired from the model's item table.")
        self.users_added = counter("unirec_model_users_added_total", "Users first seen by the online learner.")

        # ---- publishing (unirec.ops.registry, unirec.ops.gate) ---------------------------------
        self.publishes = counter("unirec_model_publishes_total", "Model versions published to the registry.")
        self.gate_rejections = counter(
            "unirec_model_gate_rejections_total", "Candidates the publish gate refused, by reason.", ("reason",))
        self.model_version = gauge(
            "unirec_model_version_info", "The version the learner last published (value 1).", ("version",))
        self.last_publish_time = gauge(
            "unirec_model_last_publish_timestamp_seconds",
            "Unix time of the last publish (set when training starts, so that a learner that never "
            "publishes is noticed).")
        self.model_watermark = gauge(
            "unirec_model_watermark_seconds", "Event time (epoch s) the last published version's data covers.")
        self.monitor_errors = counter(
            "unirec_monitor_errors_total",
            "Monitor calls or values that could not be used (kind: batch | input_drift | train | publish | log).",
            ("kind",))

        # ---- drift (unirec.ops.drift) -----------------------------------------------------
        self.embedding_cosine_distance = gauge(
            "unirec_drift_embedding_cosine_distance",
            "Mean cosine distance of item embeddings between the last two published versions (0..2).")
        self.embedding_neighbour_overlap = gauge(
            "unirec_drift_embedding_neighbour_overlap_ratio",
            "Mean overlap of each item's top-10 cosine neighbours between the last two versions (0..1).")
        self.embedding_shared_items = gauge(
            "unirec_drift_embedding_shared_items", "Items present in both of the last two versions.")
        self.score_psi = gauge(
            "unirec_drift_score_psi", "PSI of ranking scores, current window vs reference window.")
        self.item_popularity_js = gauge(
            "unirec_drift_item_popularity_js",
            "Jensen-Shannon divergence (base 2, 0..1) of item popularity, current vs reference window.")
        self.new_id_ratio = gauge(
            "unirec_drift_new_id_ratio",
            "Share of a window's distinct ids never seen before (0..1; entity: item | user).",
            ("entity",))
        self.query_terms_js = gauge(
            "unirec_drift_query_terms_js",
            "Jensen-Shannon divergence (base 2, 0..1) of query terms, current vs reference window.")
        self.calibration_gap = gauge(
            "unirec_drift_calibration_gap",
            "Mean predicted click probability minus observed positive rate (> 0: over-confident).")
        self.calibration_ece = gauge(
            "unirec_drift_calibration_ece", "Expected calibration error of ranking probabilities (10 bins).")
        self.drift_comparisons = counter(
            "unirec_drift_comparisons_total",
            "Drift values computed since the process started (kind: input | score windows compared with "
            "the window before, embedding: version pairs). The drift alerts wait for a few: warm-up.",
            ("kind",))
        if values.ValueClass is values.MutexValue:
            # Not computed yet: NaN, not 0 (an overlap of 0 would read as total drift). Skipped
            # in multiprocess mode, where a late-starting process would overwrite the most
            # recent value; there the alert rules guard instead (overlap needs shared items).
            for g in (self.embedding_cosine_distance, self.embedding_neighbour_overlap, self.score_psi,
                      self.item_popularity_js, self.query_terms_js, self.calibration_gap, self.calibration_ece,
                      # nor is a timestamp or a training figure of 0 a fact
                      self.last_batch_time, self.events_watermark, self.learning_rate, self.grad_norm,
                      self.train_watermark, self.items_live, self.last_publish_time, self.model_watermark):
                g.set(math.nan)
        for head in LOSS_HEADS:      # at 0, so that increase() sees the first NaN
            self.train_nonfinite_loss.labels(head)
        for kind in DRIFT_KINDS:     # at 0: the alerts' warm-up guard reads "none yet", not "no data"
            self.drift_comparisons.labels(kind)

    # ---- recording -------------------------------------------------------------------------
    def init_topics(self, topics: Iterable[str], reasons: Iterable[str]) -> None:
        """Create every (topic, reason) series at 0, so rates exist before the first event."""
        reasons = tuple(reasons)
        for t in topics:
            for c in (self.events_consumed, self.events_valid, self.events_applied):
                c.labels(t)
            for reason in reasons:
                self.events_dead_lettered.labels(t, reason)

    def record_batch(self, *, seconds: float, path: str, consumed: Mapping[str, int],
                     dead_letters: Iterable[tuple[str, str]]) -> BatchCounts:
        """One finished micro-batch: records read per topic and (topic, reason) of every dead letter."""
        counts = batch_counts(consumed, dead_letters)
        self.microbatch_duration.labels(path).observe(seconds)
        for counter, by_topic in ((self.events_consumed, counts.consumed), (self.events_valid, counts.valid),
                                  (self.events_applied, counts.applied)):
            for topic, n in by_topic.items():
                counter.labels(topic).inc(n)
        for (topic, reason), n in counts.dead_lettered.items():
            self.events_dead_lettered.labels(topic, reason).inc(n)
        return counts

    def set_consumer_lag(self, lags: Mapping[TopicPartition, int]) -> None:
        for (topic, partition), lag in lags.items():
            self.consumer_lag.labels(topic, str(partition)).set(lag)

    def set_embedding_drift(self, d) -> None:
        """`d`: a `drift.EmbeddingDrift`."""
        self.embedding_cosine_distance.set(d.mean_cosine_distance)
        self.embedding_neighbour_overlap.set(d.neighbour_overlap)
        self.embedding_shared_items.set(d.shared)

    def set_input_drift(self, d) -> None:
        """`d`: a `drift.InputDrift`; NaN fields (first window, no queries) leave their gauge alone."""
        for gauge, entity, value in ((self.item_popularity_js, None, d.item_popularity_js),
                                     (self.new_id_ratio, "item", d.new_item_share),
                                     (self.new_id_ratio, "user", d.new_user_share),
                                     (self.query_terms_js, None, d.query_terms_js)):
            if not math.isnan(value):
                (gauge if entity is None else gauge.labels(entity)).set(value)

    def set_model_version(self, version: str) -> None:
        """The info metric: value 1 for the current version. In one process the previous
        version's series is removed; in multiprocess mode (whose files cannot forget a series)
        it is set to 0, so query `unirec_model_version_info == 1`."""
        if values.ValueClass is values.MutexValue:
            with warnings.catch_warnings():   # prometheus_client warns whenever the env var is set (Feast sets it)
                warnings.filterwarnings("ignore", "Clearing labels", UserWarning)
                self.model_version.clear()
        elif self._version is not None and self._version != version:
            self.model_version.labels(self._version).set(0)
        self._version = version
        self.model_version.labels(version).set(1)

    def set_calibration(self, c) -> None:
        """`c`: a `drift.Calibration`."""
        self.calibration_gap.set(c.gap)
        self.calibration_ece.set(c.ece)

    def names(self) -> set[str]:
        """Every metric name as exposed (counters with `_total`), for checks of dashboards and rules."""
        return _names(self.registry)


class ServingMetrics:
    """The metrics of `unirec serve` (`unirec.ops.serving`), on the server's own `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("unirec_serving_requests_total", "Requests by endpoint, arm and HTTP status.",
                                ("endpoint", "arm", "status"), registry=r)
        self.latency = Histogram("unirec_serving_request_duration_seconds",
                                 "Server-side time of a request, arrival to response (endpoint, arm).",
                                 ("endpoint", "arm"), registry=r, buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("unirec_serving_batch_size_requests",
                                    "Requests answered together in one pass of the inference thread.",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32))
        self.cold_start = Counter("unirec_serving_cold_start_total", "Requests answered without a user sequence.",
                                  ("endpoint",), registry=r)
        self.degraded = Counter("unirec_serving_feature_errors_total",
                                "Feature-store reads that failed (request served cold-start).", registry=r)
        self.cache = Counter("unirec_serving_cache_total", "Ranked-list cache lookups (result: hit | miss).",
                             ("result",), registry=r)
        self.exposures = Counter("unirec_serving_exposures_total",
                                 "Exposure records (result: sent | dropped | failed).", ("result",), registry=r)
        self.prewarmed = Counter("unirec_serving_prewarmed_total",
                                 "Ranked lists recomputed with a new version before it went live.", registry=r)
        self.loads = Counter("unirec_serving_model_loads_total", "Model version loads (result: ok | failed).",
                             ("result",), registry=r)
        self.version = Gauge("unirec_serving_model_version", "1 for the version each arm serves (arm, version).",
                             ("arm", "version"), registry=r, multiprocess_mode="mostrecent")

    def names(self) -> set[str]:
        return _names(self.registry)


def _names(registry: CollectorRegistry) -> set[str]:
    """Every metric name as exposed (counters with `_total`)."""
    return {f.name + "_total" if f.type == "counter" else f.name for f in registry.collect()}


class BatchCounts(NamedTuple):
    consumed: dict[str, int]                  # topic -> records read
    valid: dict[str, int]                     # topic -> records that decoded
    applied: dict[str, int]                   # topic -> valid events merged into state
    dead_lettered: dict[tuple[str, str], int]  # (topic, reason) -> dead letters


def batch_counts(consumed: Mapping[str, int], dead_letters: Iterable[tuple[str, str]], *,
                 merge_reasons: tuple[str, ...] = MERGE_REASONS) -> BatchCounts:
    """Per-topic counts of one batch from the records read and the dead letters' (topic, reason).

    `valid` and `applied` follow from the accounting identity of the module docstring,
    which the driver guarantees (every record read is applied or dead-lettered with a reason)."""
    dead = _Counter(dead_letters)
    unknown = {t for t, _ in dead} - set(consumed)
    if unknown:
        raise ValueError(f"dead_letters: topics {sorted(unknown)} have no consumed count")
    valid, applied = {}, {}
    for topic, n in consumed.items():
        decode = sum(c for (t, r), c in dead.items() if t == topic and r not in merge_reasons)
        merge = sum(c for (t, r), c in dead.items() if t == topic and r in merge_reasons)
        if decode + merge > n:
            raise ValueError(f"dead_letters: {decode + merge} for topic {topic!r}, which had {n} records")
        valid[topic], applied[topic] = n - decode, n - decode - merge
    return BatchCounts(dict(consumed), valid, applied, dict(dead))


def consumer_lag(end_offsets: Mapping[TopicPartition, int], positions: Mapping[TopicPartition, int],
                 beginning_offsets: Mapping[TopicPartition, int] | None = None) -> dict[TopicPartition, int]:
    """Lag per partition of `end_offsets`: `max(0, end - position)`.

    A partition without a position (never read) counts from its beginning offset
    (0 if not given: pass `beginning_offsets` for topics with retention)."""
    begin = beginning_offsets or {}
    return {tp: max(0, end - positions.get(tp, begin.get(tp, 0))) for tp, end in end_offsets.items()}


# ---- /metrics ------------------------------------------------------------------------------
def parse_bind(bind: str) -> tuple[str, int]:
    """'host:port' or '[ipv6]:port' -> (host, port); port 0 picks a free port."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bind address {bind!r}: expected host:port, e.g. {DEFAULT_BIND!r}")
    return host.strip("[]"), int(port)


def exposition_registry(registry: CollectorRegistry, multiproc_dir: str | None = None):
    """What to serve: `registry`, or in multiprocess mode (`multiproc_dir` or
    $PROMETHEUS_MULTIPROC_DIR set by the user before unirec was imported — not the
    temp dir Feast sets on import, see `unirec/__init__.py`) a registry aggregating
    every process's files."""
    path = multiproc_dir or unirec.PROMETHEUS_MULTIPROC_DIR
    if not path:
        return registry
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=path)
    return merged


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(registry: CollectorRegistry, bind: str = DEFAULT_BIND) -> MetricsServer:
    """Serve `/metrics` of `registry` (see `exposition_registry`) on `bind` from a daemon thread."""
    host, port = parse_bind(bind)
    server, thread = start_http_server(port, addr=host, registry=exposition_registry(registry))
    return MetricsServer(server, thread)


# ---- A/B experiments (ops/experiments.py, streaming/experiment_feed.py) ----------------------
class ExperimentMetrics:
    """Per-arm A/B figures as gauges (they restart with every experiment epoch, so not counters)."""

    def __init__(self, registry):
        def gauge(name: str, doc: str, labels=("experiment", "arm")):
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode="mostrecent")

        self.exposures = gauge("unirec_ab_exposures", "Exposures (served lists) of the arm in this experiment.")
        self.clicked = gauge("unirec_ab_clicked_exposures", "Exposures with at least one attributed click.")
        self.clicks = gauge("unirec_ab_clicks", "Attributed clicks (request, item) of the arm.")
        self.ctr = gauge("unirec_ab_ctr_ratio", "Clicked exposures / exposures of the arm.")
        self.ndcg = gauge("unirec_ab_ndcg", "Mean NDCG of the clicked positions per exposure of the arm.")
        self.p99 = gauge("unirec_ab_latency_p99_seconds", "p99 server latency of the arm's exposures.")
        self.decision = gauge("unirec_ab_decision", "Per treatment arm: 1 wins, -1 loses, -2 guardrail breach, "
                              "0 otherwise.")

    def export(self, experiment_id: str, stats: Mapping, decisions: Iterable = ()) -> None:
        """stats: arm -> ops.attribution.ArmStats; decisions: ops.experiments.Decision per treatment."""
        for arm, s in stats.items():
            labels = (experiment_id, arm)
            self.exposures.labels(*labels).set(s.exposures)
            self.clicked.labels(*labels).set(s.clicked)
            self.clicks.labels(*labels).set(s.clicks)
            self.ctr.labels(*labels).set(s.ctr)
            self.ndcg.labels(*labels).set(s.ndcg)
            p99 = s.latency(0.99)
            self.p99.labels(*labels).set(math.nan if p99 is None else p99 / 1000.0)
        code = {"treatment_wins": 1, "control_wins": -1, "guardrail_breach": -2}
        for d in decisions:
            self.decision.labels(experiment_id, d.arm).set(code.get(d.verdict, 0))
