"""Online learning in the real pipeline: Kafka -> Beam (FineTune) -> registry + Feast + model-updates,
and SIGKILL during training and publishing never leaves a half version or loses training data."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import yaml
from kafka import KafkaConsumer

from unirec.config import load
from unirec.features.state import StateStore
from unirec.ops.registry import Registry
from unirec.streaming.broker import client_kwargs
from unirec.streaming.replay import replay
from unirec.streaming.synthetic import source_stream

EVENTS = Path(__file__).resolve().parents[2] / ".cache/unirec/ml-100k/events.jsonl"

pytestmark = pytest.mark.integration


def write_config(tmp_path: Path, kafka_cfg, **publish) -> Path:
    t = kafka_cfg.topics
    cfg = {
        "model": {"d_model": 16, "n_layers": 1, "max_len": 20, "n_buckets": 2000},
        "train": {"batch_size": 16, "threads": 1},
        "online": {"item_capacity": 64, "replay_buffer": 200},
        "registry": {"path": str(tmp_path / "registry"), "keep_last": 50,
                     "publish": {"every_steps": 1, "every_seconds": 0.0, "min_eval_events": 10**9} | publish},
        "kafka": {"bootstrap_servers": kafka_cfg.bootstrap_servers, "partitions": kafka_cfg.partitions,
                  "topics": {"clicks": t.clicks, "queries": t.queries, "dead_letter": t.dead_letter,
                             "model_updates": t.model_updates}},
        "streaming": {"group_id": f"ol-{tmp_path.name}", "max_batch_events": 400, "max_wait_s": 0.5,
                      "recheck_s": 1.0, "work_dir": str(tmp_path / "work")},
        "features": {"repo_dir": str(tmp_path / "feast"), "state_path": str(tmp_path / "state.sqlite"),
                     "allowed_lateness_s": 10**9},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_fine_tunes_and_publishes_to_registry_feast_and_the_updates_topic(kafka_cfg, tmp_path):
    from unirec.features.online import OnlineStore
    from unirec.streaming.driver import Driver
    from unirec.streaming.online import from_config

    cfg = load(write_config(tmp_path, kafka_cfg))
    replay(source_stream(EVENTS, 1500), kafka_cfg, rate=None)
    learning = from_config(cfg)
    with Driver(cfg.kafka, cfg.streaming, cfg.features, learning=learning) as driver:
        driver.run(once=True)
        positions = dict(driver.positions)
    reg = Registry(tmp_path / "registry")
    latest = reg.load()
    m = latest.manifest
    assert learning.state.published >= 2 and m.version == learning.learner.version
    # the newest version covers exactly what the pipeline applied
    assert {(t, p): o for t, ps in m.offsets.items() for p, o in ps.items()} == positions
    assert m.metrics["eval_events"] > 0 and 0 <= m.metrics["ndcg@10"] <= 1 and m.watermark > 8e8
    with StateStore(cfg.features.state_path) as store:
        assert list(store.train_log_after(0)) == []                     # the published version covers the log
    # every batch was scored before it was trained on
    assert all(h.get("eval_events") is not None for h in learning.history) and learning.history
    # Feast holds the latest version's vectors
    sample = latest.item_ids[:5]
    got = OnlineStore(cfg.features).read_item_embeddings(sample)
    assert set(got) == set(sample) and {g["model_version"] for g in got.values()} == {m.version}
    row = latest.item_ids.index(sample[0])
    assert got[sample[0]]["embedding"] == pytest.approx(latest.item_embeddings[row].tolist(), rel=1e-6)
    # one notice per version on the model-updates topic
    consumer = KafkaConsumer(cfg.kafka.topics.model_updates, **client_kwargs(cfg.kafka), auto_offset_reset="earliest")
    notices, deadline = [], time.monotonic() + 20
    while len(notices) < learning.state.published and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            notices += [json.loads(r.value) for r in records]
    consumer.close()
    assert sorted(n["version"] for n in notices) == sorted(v["version"] for v in learning.versions if v["accepted"])
    assert learning.publisher.counts["notice_errors"] == 0


def test_a_restart_resumes_from_the_latest_version_and_retrains_the_logged_batches(kafka_cfg, tmp_path):
    from unirec.streaming.driver import Driver
    from unirec.streaming.online import from_config

    cfg = load(write_config(tmp_path, kafka_cfg, every_steps=10**6))   # never due: only the explicit publish
    lines = source_stream(EVENTS, 2000)
    replay(lines[:1000], kafka_cfg, rate=None)
    first = from_config(cfg)
    with Driver(cfg.kafka, cfg.streaming, cfg.features, learning=first) as driver:
        driver.run(once=True)
        published = first.publish(first.learner.state_batch, dict(driver.positions))
    assert published.accepted
    steps_at_publish = first.learner.trainer.steps
    replay(lines[1000:], kafka_cfg, rate=None)
    with Driver(cfg.kafka, cfg.streaming, cfg.features, learning=from_config(cfg)) as driver:
        driver.run(once=True)                                   # trains on, then "crashes": no publish
        trained_on = driver.learning.learner.trainer.steps
    with StateStore(cfg.features.state_path) as store:
        logged = list(store.train_log_after(0))
    assert logged and all(b > published.manifest.metrics["state_batch"] for b, _ in logged)
    resumed = from_config(cfg)
    with Driver(cfg.kafka, cfg.streaming, cfg.features, learning=resumed) as driver:
        assert resumed.learner.version == published.version and resumed.state.replayed_batches == len(logged)
        # the same examples again, from the published weights and optimiser state: the same number of steps
        assert resumed.learner.trainer.steps == trained_on > steps_at_publish


def test_sigkill_during_training_and_publishing_leaves_complete_versions(kafka_cfg, tmp_path, pipeline_process,
                                                                        killed_while_replaying):
    rng = random.Random(int(os.environ.get("UNIREC_TEST_SEED", "11")))
    lines = source_stream(EVENTS, 4000)
    config = write_config(tmp_path, kafka_cfg, every_steps=3)
    chunks = [lines[i * len(lines) // 4:(i + 1) * len(lines) // 4] for i in range(4)]
    kills = 0
    for chunk in chunks:                           # batches train and publish back to back
        kills += killed_while_replaying(config, kafka_cfg, chunk, rng, rate=3000, max_sleep_s=3.0, timeout_s=240)
        reg = Registry(tmp_path / "registry")      # opening sweeps what a killed publish left
        assert not [p for p in reg.versions_dir.iterdir() if p.name.startswith(".")]
        for m in reg.list_versions():              # only complete versions: every checksum verifies
            reg.verify(m.version)
    assert kills >= 3
    final = pipeline_process(config, "--once")
    assert final.proc.wait(timeout=600) == 0, "".join(final.log[-30:])
    reg = Registry(tmp_path / "registry")
    latest = reg.load()
    with StateStore(tmp_path / "state.sqlite") as store:
        offsets = store.offsets()
    assert sum(offsets.values()) == len(lines)
    versions = reg.list_versions()
    names = {m.version for m in versions}
    assert all(m.parent is None or m.parent in names for m in versions)     # one lineage
    steps = [m.metrics["total_steps"] for m in sorted(versions, key=lambda m: m.version)]
    assert steps == sorted(steps)                # a restart resumes the optimiser, it never starts over
    assert latest.manifest.metrics["total_steps"] > 0
