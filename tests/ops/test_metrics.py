"""The metric declarations, the recorders, `/metrics` serving and multiprocess aggregation."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import urllib.error
import urllib.request

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from unirec.ops import drift
from unirec.ops.metrics import (
    MERGE_REASONS, PipelineMetrics, ServingMetrics, batch_counts, consumer_lag, exposition_registry, parse_bind,
    serve,
)


def _value(m: PipelineMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_names_follow_prometheus_conventions():
    m = PipelineMetrics()
    families = list(m.registry.collect())
    assert len(families) == len(m.names()) >= 16
    for f in families:
        assert f.name.startswith("unirec_"), f.name
        assert f.documentation, f.name
        if f.type == "histogram":
            assert f.name.endswith("_seconds"), f.name
        if f.type == "gauge":
            assert not f.name.endswith("_total"), f.name
    assert "unirec_events_consumed_total" in m.names()


def test_serving_metrics_are_declared_here_with_the_same_conventions():
    s = ServingMetrics()
    families = list(s.registry.collect())
    assert len(families) == len(s.names()) >= 10
    for f in families:
        assert f.name.startswith("unirec_serving_") and f.documentation, f.name
        if f.type == "histogram":
            assert f.name.endswith(("_seconds", "_requests")), f.name
        if f.type == "gauge":
            assert not f.name.endswith("_total"), f.name
    assert not s.names() & PipelineMetrics().names()      # one process may serve both registries
    assert "unirec_serving_requests_total" in s.names()


def test_registries_are_isolated_from_each_other_and_from_the_global_one():
    a, b = PipelineMetrics(), PipelineMetrics()   # a second declaration would fail on a shared registry
    a.events_consumed.labels("clicks").inc(2)
    assert _value(a, "unirec_events_consumed_total", topic="clicks") == 2
    assert _value(b, "unirec_events_consumed_total", topic="clicks") is None
    assert prometheus_client.REGISTRY.get_sample_value("unirec_events_consumed_total", {"topic": "clicks"}) is None


def test_init_topics_creates_zero_series():
    m = PipelineMetrics()
    m.init_topics(["clicks", "queries"], ["malformed_json", "duplicate"])
    assert _value(m, "unirec_events_consumed_total", topic="queries") == 0
    assert _value(m, "unirec_events_dead_lettered_total", topic="clicks", reason="duplicate") == 0


def test_record_batch_adds_counts_and_observes_the_duration():
    m = PipelineMetrics()
    dead = [("clicks", "malformed_json"), ("clicks", "duplicate"), ("clicks", "duplicate"), ("queries", "late")]
    for _ in range(2):
        m.record_batch(seconds=0.3, path="beam", consumed={"clicks": 10, "queries": 4}, dead_letters=dead)
    assert _value(m, "unirec_events_consumed_total", topic="clicks") == 20
    assert _value(m, "unirec_events_valid_total", topic="clicks") == 18      # 10 - 1 malformed
    assert _value(m, "unirec_events_applied_total", topic="clicks") == 14    # 9 - 2 duplicates
    assert _value(m, "unirec_events_valid_total", topic="queries") == 8
    assert _value(m, "unirec_events_applied_total", topic="queries") == 6    # 4 - 1 late
    assert _value(m, "unirec_events_dead_lettered_total", topic="clicks", reason="duplicate") == 4
    assert _value(m, "unirec_microbatch_duration_seconds_count", path="beam") == 2
    assert _value(m, "unirec_microbatch_duration_seconds_bucket", path="beam", le="0.25") == 0
    assert _value(m, "unirec_microbatch_duration_seconds_bucket", path="beam", le="0.5") == 2


def test_merge_reasons_match_the_per_user_merge():
    from unirec.features import sequence

    assert set(MERGE_REASONS) == {sequence.DUPLICATE, sequence.LATE}


@pytest.mark.parametrize("consumed, dead, match", [
    ({"clicks": 1}, [("queries", "late")], "topics \\['queries'\\] have no consumed count"),
    ({"clicks": 1}, [("clicks", "late"), ("clicks", "oversize")], "2 for topic 'clicks', which had 1"),
])
def test_batch_counts_rejects_inconsistent_reports(consumed, dead, match):
    with pytest.raises(ValueError, match=match):
        batch_counts(consumed, dead)


def test_consumer_lag_clamps_and_counts_unread_partitions_from_their_beginning():
    ends = {("clicks", 0): 100, ("clicks", 1): 50, ("clicks", 2): 30, ("queries", 0): 8}
    lags = consumer_lag(ends, {("clicks", 0): 60, ("clicks", 1): 55}, {("clicks", 2): 10})
    assert lags == {("clicks", 0): 40, ("clicks", 1): 0, ("clicks", 2): 20, ("queries", 0): 8}
    m = PipelineMetrics()
    m.set_consumer_lag(lags)
    assert _value(m, "unirec_consumer_lag_records", topic="clicks", partition="2") == 20


def test_drift_gauges_read_nan_until_computed():
    m = PipelineMetrics()
    for name in ("unirec_drift_embedding_neighbour_overlap_ratio", "unirec_drift_score_psi",
                 "unirec_drift_calibration_gap"):
        assert math.isnan(_value(m, name)), name


def test_drift_setters_export_results_including_nan():
    m = PipelineMetrics()
    m.set_embedding_drift(drift.EmbeddingDrift(0.25, math.nan, 1, 0))
    m.set_calibration(drift.calibration([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]))
    assert _value(m, "unirec_drift_embedding_cosine_distance") == 0.25
    assert math.isnan(_value(m, "unirec_drift_embedding_neighbour_overlap_ratio"))
    assert _value(m, "unirec_drift_calibration_gap") == pytest.approx(-0.25)
    assert _value(m, "unirec_drift_calibration_ece") == pytest.approx(0.25)


@pytest.mark.parametrize("bind, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0)), ("0.0.0.0:80", ("0.0.0.0", 80)),
])
def test_parse_bind(bind, expected):
    assert parse_bind(bind) == expected


@pytest.mark.parametrize("bind", ["9464", ":9464", "localhost:", "localhost:99999", "localhost:http"])
def test_parse_bind_rejects_bad_addresses(bind):
    with pytest.raises(ValueError, match="expected host:port"):
        parse_bind(bind)


def test_serve_exposes_metrics_over_http_and_stops(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    m = PipelineMetrics()
    m.events_consumed.labels("clicks").inc(5)
    server = serve(m.registry, "127.0.0.1:0")
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'unirec_events_consumed_total{topic="clicks"} 5.0' in body
        assert "# TYPE unirec_microbatch_duration_seconds histogram" in body
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


_CHILD = """
import sys
from unirec.ops.metrics import PipelineMetrics
m = PipelineMetrics()
m.events_consumed.labels("clicks").inc(3)
m.consumer_lag.labels("clicks", "0").set(float(sys.argv[1]))
m.microbatch_duration.labels("beam").observe(0.2)
"""


def test_multiprocess_mode_aggregates_every_process(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for lag in ("7", "4"):   # one after the other: the later gauge value is the most recent
        subprocess.run([sys.executable, "-c", _CHILD, lag], env=env, check=True, timeout=60)
    merged = exposition_registry(CollectorRegistry(), multiproc_dir=str(tmp_path))
    assert merged.get_sample_value("unirec_events_consumed_total", {"topic": "clicks"}) == 6
    assert merged.get_sample_value("unirec_consumer_lag_records", {"topic": "clicks", "partition": "0"}) == 4
    assert merged.get_sample_value("unirec_microbatch_duration_seconds_count", {"path": "beam"}) == 2


def test_single_process_serves_the_given_registry(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    r = CollectorRegistry()
    assert exposition_registry(r) is r


@pytest.mark.integration
def test_consumer_lag_on_the_embedded_broker(kafka_cfg):
    """Lag from one end_offsets request minus the pipeline's positions, no consumer group."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from unirec.streaming import broker

    topic = kafka_cfg.topics.clicks
    producer = KafkaProducer(**broker.client_kwargs(kafka_cfg))
    for i in range(30):
        producer.send(topic, key=b"u%d" % (i % 7), value=b"v")
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(**broker.client_kwargs(kafka_cfg), group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        ends = {(tp.topic, tp.partition): off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()
    assert sum(consumer_lag(ends, {}).values()) == 30              # nothing applied yet
    half = {tp: end // 2 for tp, end in ends.items()}               # positions the state store would hold
    assert consumer_lag(ends, half) == {tp: end - end // 2 for tp, end in ends.items()}
    assert set(consumer_lag(ends, ends).values()) == {0}
