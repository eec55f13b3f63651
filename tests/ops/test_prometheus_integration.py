"""A real Prometheus scrapes a real pipeline run through the Monitor and evaluates alerts.yml.

The run: events replayed into the embedded broker (plus malformed records), the
micro-batch `Driver` with online learning (`streaming.online.OnlineLoop`, which calls
`Monitor.on_train` / `on_publish`, publishing to a real registry) and `on_batch` wired
to `Monitor.on_batch` with lags from the broker's end offsets; the input windows are
fed the replayed events (`on_events`). Debian's `prometheus` scrapes the Monitor's
ephemeral port every second and evaluates the alert rules every second. Then drift
is injected the way a bad model would ship: the latest item table, shuffled across
ids, published through the registry, and the embedding-drift alerts must fire.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import socket

import numpy as np
import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from unirec.features.config import FeaturesConfig
from unirec.model.config import ModelConfig, OnlineConfig, TrainConfig
from unirec.ops.config import MonitoringConfig, PublishConfig, RegistryConfig
from unirec.ops.metrics import consumer_lag
from unirec.ops.monitor import Monitor
from unirec.ops.registry import Registry
from unirec.streaming.broker import client_kwargs
from unirec.streaming.config import StreamingConfig
from unirec.streaming.driver import Driver
from unirec.streaming.replay import replay
from unirec.streaming.synthetic import source_stream

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="prometheus not installed (Debian package `prometheus`; `make setup` installs it)"),
]
ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / ".cache/unirec/ml-100k/events.jsonl"
N_EVENTS, N_BAD = 3000, 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- Prometheus ------------------------------------------------------------------------------
class Prometheus:
    def __init__(self, tmp: Path, target_port: int):
        shutil.copy(ROOT / "ops" / "prometheus" / "alerts.yml", tmp / "alerts.yml")
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "unirec-pipeline",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}]}))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._ready(), 30, "prometheus ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        q = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = json.loads(urllib.request.urlopen(f"{self.url}/api/v1/{path}{q}", timeout=5).read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[tuple, float]:
        """{sorted label items (without __name__): value} of an instant query."""
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(r["value"][1])
                for r in self.api("query", query=expr)["result"]}

    def scalar(self, expr: str) -> float | None:
        res = self.query(expr)
        return next(iter(res.values())) if len(res) == 1 else None

    def scraped_after(self, t: float) -> None:
        """Wait for a scrape of the pipeline that started after unix time `t`."""
        wait_for(lambda: (self.scalar('timestamp(up{job="unirec-pipeline"})') or 0) > t, 10, "a fresh scrape")

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def wait_for(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if v := cond():
            return v
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---- the pipeline run ------------------------------------------------------------------------
def lag_probe(kafka_cfg, driver_ref: dict):
    """on_batch's lag: one end_offsets request minus the driver's positions (own consumer: the
    callback runs on the driver's push thread)."""
    consumer = KafkaConsumer(**client_kwargs(kafka_cfg), group_id=None, enable_auto_commit=False)

    def lags() -> dict:
        positions = dict(driver_ref["driver"].positions)
        ends = consumer.end_offsets([TopicPartition(*tp) for tp in positions])
        return consumer_lag({(tp.topic, tp.partition): o for tp, o in ends.items()}, positions)
    return consumer, lags


def feed_events(monitor: Monitor, lines: list[bytes], chunk: int = 250) -> None:
    """What the learner sees, in arrival order, as `on_events` windows."""
    events = [json.loads(x) for x in lines]
    for i in range(0, len(events), chunk):
        part = events[i:i + chunk]
        monitor.on_events(item_ids=[e["item_id"] for e in part if e["schema"] == "click/v1"],
                          user_ids=[e["user_id"] for e in part],
                          query_texts=[e["text"] for e in part if e["schema"] == "query/v1"],
                          watermark=max(e["ts"] for e in part))


def run_pipeline(tmp_path, kafka_cfg, monitor: Monitor, registry_cfg: RegistryConfig) -> dict:
    from unirec.streaming.online import OnlineLoop

    lines = source_stream(EVENTS, N_EVENTS)
    replay(lines, kafka_cfg)
    producer = KafkaProducer(**client_kwargs(kafka_cfg))
    for i in range(N_BAD):
        producer.send(kafka_cfg.topics.clicks, key=b"bad%d" % i, value=b"{not json")
    producer.flush()
    producer.close()
    span = max(json.loads(x)["ts"] for x in lines) - min(json.loads(x)["ts"] for x in lines) + 1
    features_cfg = FeaturesConfig(repo_dir=str(tmp_path / "feast"), state_path=str(tmp_path / "state.sqlite"),
                                  allowed_lateness_s=span)   # a fast replay of history (as `unirec run` does)
    streaming_cfg = StreamingConfig(group_id=f"g-{tmp_path.name}", max_batch_events=800,
                                    work_dir=str(tmp_path / "work"), recheck_s=0.5)
    learning = OnlineLoop(ModelConfig(d_model=16, n_heads=2, n_layers=1, n_buckets=2000, max_len=20),
                          TrainConfig(threads=1, batch_size=16, warmup_steps=5), OnlineConfig(max_steps_per_batch=8),
                          registry_cfg, monitor=monitor)
    ref: dict = {}
    consumer, lags = lag_probe(kafka_cfg, ref)
    try:
        with Driver(kafka_cfg, streaming_cfg, features_cfg, learning=learning,
                    on_batch=lambda report: monitor.on_batch(report, lags())) as driver:
            ref["driver"] = driver
            driver.run(once=True)
            feed_events(monitor, lines)
            return {"records": driver.totals["records"], "published": learning.state.published}
    finally:
        consumer.close()


def publish_table(reg: Registry, monitor: Monitor, emb: np.ndarray, ids: list[str], prev) -> str:
    """Publish an item table through the registry and tell the monitor, as the learner does."""
    latest = reg.load("latest")
    m = reg.publish(item_embeddings=emb, item_ids=ids, ranking=latest.ranking, watermark=latest.manifest.watermark,
                    offsets=latest.manifest.offsets, metrics=latest.manifest.metrics,
                    model_config=latest.manifest.model_config, extra=latest.extra)
    monitor.on_publish({"version": m.version, "accepted": True, "reason": "", "metrics": m.metrics,
                        "watermark": m.watermark, "item_ids": ids, "item_embeddings": emb,
                        "prev_item_ids": prev[0], "prev_item_embeddings": prev[1]})
    return m.version


# ---- the test --------------------------------------------------------------------------------
def test_prometheus_scrapes_the_pipeline_and_fires_drift_alerts(tmp_path, kafka_cfg):
    registry_cfg = RegistryConfig(path=str(tmp_path / "registry"),
                                  publish=PublishConfig(every_steps=10, every_seconds=0, min_eval_events=10**9))
    monitor = Monitor(MonitoringConfig(bind="127.0.0.1:0", log_path=str(tmp_path / "metrics.jsonl"),
                                       input_window_events=1000, score_window=500),
                      topics=[kafka_cfg.topics.clicks, kafka_cfg.topics.queries])
    monitor.start()
    prom = Prometheus(tmp_path, monitor.port)
    try:
        run = run_pipeline(tmp_path, kafka_cfg, monitor, registry_cfg)
        assert run["records"] == N_EVENTS + N_BAD and run["published"] >= 1
        prom.scraped_after(time.time())

        # ---- pipeline health, as Prometheus scraped it
        wait_for(lambda: prom.scalar("sum(unirec_events_consumed_total)") == N_EVENTS + N_BAD, 20,
                 "every record counted")
        assert prom.scalar('up{job="unirec-pipeline"}') == 1
        assert prom.scalar('sum(unirec_events_dead_lettered_total{reason!~"duplicate|late"})') == N_BAD
        lag = prom.query("unirec_consumer_lag_records")
        assert len(lag) == 6 and sum(lag.values()) == 0           # 2 topics x 3 partitions, caught up
        assert prom.scalar("sum(unirec_microbatch_duration_seconds_count)") >= 3
        assert 0 < prom.scalar("histogram_quantile(0.5, sum by (le) (unirec_feature_freshness_seconds_bucket))") < 120

        # ---- model quality and training
        wait_for(lambda: prom.scalar("unirec_model_publishes_total") == run["published"], 10, "publishes scraped")
        ndcg = prom.scalar('unirec_eval_quality{metric="ndcg@10"}')
        assert ndcg is not None and 0 <= ndcg <= 1
        assert prom.scalar("unirec_train_steps_total") > 0 and prom.scalar("unirec_eval_events_total") > 0
        losses = prom.query("unirec_train_loss")
        assert {dict(k)["head"] for k in losses} >= {"retrieval", "ranking"}
        assert all(math.isfinite(v) and v > 0 for v in losses.values())
        latest = Registry.from_config(registry_cfg).latest()
        assert prom.query("unirec_model_version_info") == {(("instance", f"127.0.0.1:{monitor.port}"),
                                                            ("job", "unirec-pipeline"), ("version", latest)): 1.0}

        # ---- drift series exist with plausible values
        for expr in ("unirec_drift_item_popularity_js", "unirec_drift_query_terms_js",
                     'unirec_drift_new_id_ratio{entity="item"}', "unirec_drift_calibration_ece"):
            v = prom.scalar(expr)
            assert v is not None and 0 <= v <= 1, (expr, v)
        assert prom.scalar("unirec_drift_calibration_gap") is not None

        # ---- drift injection: an unchanged republish (no drift), then the table shuffled across ids
        reg = Registry.from_config(registry_cfg)
        v = reg.load("latest")
        emb, ids = v.item_embeddings, v.item_ids
        publish_table(reg, monitor, emb.copy(), ids, (ids, emb))
        wait_for(lambda: prom.scalar("unirec_drift_embedding_cosine_distance") < 1e-6
                 and prom.scalar("unirec_drift_embedding_neighbour_overlap_ratio") == 1, 10, "a no-drift publish")
        time.sleep(2.5)   # two rule evaluations on the quiet gauges
        assert not prom.firing() & {"EmbeddingDriftHigh", "EmbeddingNeighbourhoodChanged"}
        shuffled = emb[np.random.default_rng(0).permutation(len(ids))]
        publish_table(reg, monitor, shuffled, ids, (ids, emb))
        fired = wait_for(lambda: {"EmbeddingDriftHigh", "EmbeddingNeighbourhoodChanged"} <= prom.firing(), 15,
                         "the embedding drift alerts to fire")
        assert fired
        assert prom.scalar("unirec_drift_embedding_cosine_distance") > 0.3

        # ---- a NaN loss pages at once
        monitor.on_train({"loss_ranking": float("nan")})
        wait_for(lambda: "TrainingLossNotFinite" in prom.firing(), 15, "the NaN-loss alert to fire")

        # ---- every dashboard query is valid PromQL on this server
        dash = json.loads((ROOT / "ops" / "grafana" / "unirec.json").read_text())
        for p in dash["panels"]:
            for t in p.get("targets", []):
                prom.api("query", query=t["expr"].replace("$instance", ".*"))
        assert {g["name"] for g in prom.api("rules")["groups"]} == {"unirec-pipeline", "unirec-model", "unirec-drift"}
    finally:
        prom.stop()
        monitor.close()
    kinds = {json.loads(x)["kind"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"start", "batch", "input_drift", "train", "publish"}
