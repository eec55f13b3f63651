"""`unirec run` (what `make run` does): the whole chain on a small stream, for real."""
from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest

from unirec.cli import main
from unirec.config import load
from unirec.streaming import broker

pytestmark = pytest.mark.integration

INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_dataset(folder: Path, n_users=20, n_items=40, n_ratings=600) -> None:
    rng = random.Random(3)
    folder.mkdir()
    ratings = [f"{rng.randint(1, n_users)}\t{rng.randint(1, n_items)}\t{rng.randint(1, 5)}\t{880000000 + 60 * k}"
               for k in range(n_ratings)]
    items = [f"{i}\tMovie {i} Night\t1990\tComedy Drama" for i in range(1, n_items + 1)]
    (folder / "ml-100k.inter").write_text("\n".join([INTER, *ratings]) + "\n")
    (folder / "ml-100k.item").write_text("\n".join([ITEM, *items]) + "\n")


def expected_clicks(events):
    return [e for e in events if "item_id" in e]


def test_run_replays_through_the_pipeline_into_feast_and_a_second_fresh_run_starts_over(tmp_path, capsys):
    write_dataset(tmp_path / "raw")
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(f"""
data: {{cache_dir: {tmp_path}/cache, path: {tmp_path}/raw}}
kafka:
  bootstrap_servers: 127.0.0.1:{free_port()}
  embedded: {{run_dir: {tmp_path}/broker}}
streaming: {{work_dir: {tmp_path}/work, max_wait_s: 0.3}}
features: {{repo_dir: {tmp_path}/feast, state_path: {tmp_path}/state.sqlite}}
model: {{d_model: 16, n_layers: 1, max_len: 10, n_buckets: 500}}
train: {{threads: 1}}
registry: {{path: {tmp_path}/registry, publish: {{every_seconds: 0.5}}}}
monitoring: {{bind: "127.0.0.1:0", log_path: {tmp_path}/run/metrics.jsonl}}
""")
    cfg = load(cfg_path)
    try:
        for _ in range(2):   # the second --fresh run must not see the first run's events again
            assert main(["-c", str(cfg_path), "run", "--fresh", "--rate", "0"]) == 0
            out = capsys.readouterr()
            summary = json.loads(out.out)
            # the broker it started outlives the run, and the user is told how to stop it
            assert f"keeps running at {cfg.kafka.bootstrap_servers}" in out.err and "unirec broker stop" in out.err
            events = [json.loads(line) for line in open(tmp_path / "cache/ml-100k/events.jsonl")]
            assert summary["events_replayed"] == len(events) > 600          # clicks + synthetic queries
            assert summary["pipeline"]["records"] == len(events)
            assert not [k for k in summary["pipeline"] if k.startswith("dead_letter")], summary["pipeline"]
            sample = summary["feast_online_sample"]
            first_user = events[0]["user_id"]
            expected = [e["item_id"] for e in events if e["user_id"] == first_user and "item_id" in e]
            assert sample["user_id"] == first_user
            assert sample["clicks_online"] == len(expected)
            assert sample["last_items"] == expected[-5:]
            learned = summary["online_learning"]
            # the fresh run starts from an empty registry: its versions are its own
            assert learned["versions"][0]["version"] == "v000001" and learned["versions_published"] >= 1
            assert learned["learner"]["events"] == len(expected_clicks(events))
            assert learned["test_then_train_over_time"] and Path(summary["artefacts"]["report"]).is_file()
    finally:
        broker.stop(cfg.kafka)


def test_run_without_the_sentence_encoders_files_says_what_to_do_before_starting_anything(tmp_path, capsys):
    write_dataset(tmp_path / "raw")
    cfg_path = tmp_path / "pipeline.yaml"
    port = free_port()
    cfg_path.write_text(f"""
data: {{cache_dir: {tmp_path}/cache, path: {tmp_path}/raw}}
kafka: {{bootstrap_servers: 127.0.0.1:{port}, embedded: {{run_dir: {tmp_path}/broker}}}}
model: {{sentence_encoder: true, sentence_encoder_path: {tmp_path}/no-such-folder}}
""")
    assert main(["-c", str(cfg_path), "run", "--fresh"]) == 2
    err = capsys.readouterr().err
    assert "model.sentence_encoder_path" in err and "model.safetensors" in err and "Traceback" not in err
    assert not broker.status(load(cfg_path).kafka).running          # it stopped before starting the broker
