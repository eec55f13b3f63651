"""Exactly-once effect: SIGKILL the pipeline process at random moments, restart it, and
the online features equal the ones computed directly from the source events."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml

from unirec.features.config import FeaturesConfig
from unirec.streaming.synthetic import compare, expected, source_stream

pytestmark = pytest.mark.integration
EVENTS = Path(__file__).resolve().parents[2] / ".cache/unirec/ml-100k/events.jsonl"
KILLS = 5


def write_config(tmp_path: Path, kafka_cfg) -> Path:
    topics = kafka_cfg.topics
    cfg = {
        "kafka": {"bootstrap_servers": kafka_cfg.bootstrap_servers, "partitions": kafka_cfg.partitions,
                  "topics": {"clicks": topics.clicks, "queries": topics.queries, "dead_letter": topics.dead_letter}},
        "streaming": {"group_id": f"eo-{tmp_path.name}", "max_batch_events": 300, "max_wait_s": 0.5,
                      "recheck_s": 1.0, "work_dir": str(tmp_path / "work")},
        "features": {"repo_dir": str(tmp_path / "feast"), "state_path": str(tmp_path / "state.sqlite")},
        "online": {"enabled": False},        # features only here; tests/streaming/test_online.py kills learners
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(kafka_cfg, tmp_path, pipeline_process,
                                                                killed_while_replaying):
    rng = random.Random(int(os.environ.get("UNIREC_TEST_SEED", "7")))
    lines = source_stream(EVENTS, 10_000)
    chunks = [lines[i * len(lines) // KILLS:(i + 1) * len(lines) // KILLS] for i in range(KILLS)]
    config = write_config(tmp_path, kafka_cfg)
    kills = 0
    for chunk in chunks:
        kills += killed_while_replaying(config, kafka_cfg, chunk, rng, rate=2000, max_sleep_s=2.0, timeout_s=180)
    assert kills >= 5
    final = pipeline_process(config, "--once")
    assert final.proc.wait(timeout=600) == 0, "".join(final.log[-30:])

    from unirec.features.online import OnlineStore

    features_cfg = FeaturesConfig(repo_dir=str(tmp_path / "feast"), state_path=str(tmp_path / "state.sqlite"))
    result = compare(OnlineStore(features_cfg), expected(lines, features_cfg))
    assert result.users >= 50 and result.items >= 500
    assert (result.lost, result.duplicated) == (0, 0)
    assert result.identical, (result.mismatched_users[:5], result.mismatched_items[:5])
