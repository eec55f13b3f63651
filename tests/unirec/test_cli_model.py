"""`unirec model list|show|rollback|pin|unpin` against a temporary registry."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from unirec.cli import main
from unirec.ops.registry import Registry
from unirec.settings import PipelineConfig


@pytest.fixture
def reg(tmp_path):
    reg = Registry(tmp_path / "registry")
    for seed in (1, 2, 3):
        reg.publish(item_embeddings=np.full((seed + 1, 2), seed, np.float32), item_ids=[str(i) for i in range(seed + 1)],
                    ranking={"w": np.ones(2, np.float32)}, watermark=881250949 + seed, offsets={"clicks": {0: seed}},
                    metrics={"ndcg@10": 0.1 * seed, "eval_events": 100 * seed, "other": 1.0}, model_config={})
    return reg


def run(reg, *argv):
    return main(["model", *argv, "--registry", str(reg.root)])


def test_list_shows_every_version_with_latest_and_pinned_markers(reg, capsys):
    reg.pin("v000001")
    assert run(reg, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "VERSION" in lines[0] and "WATERMARK" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["P", "v000002", "*"]  # markers, then the version
    assert [line[4:11] for line in lines[1:]] == ["v000001", "v000002", "v000003"]
    assert "1997-12-04T15:55:52Z" in lines[3]  # watermark 881250952 as UTC
    assert "ndcg@10=0.3000" in lines[3] and "eval_events=300" in lines[3] and "other" not in lines[3]
    assert " v000002 " in lines[3]  # parent column


def test_list_reports_incomplete_versions(reg, capsys):
    (reg.versions_dir / "v000002" / "manifest.json").unlink()
    assert run(reg, "list") == 0
    out = capsys.readouterr().out
    assert "incomplete: v000002" in out and "manifest.json: missing" in out


def test_list_without_a_registry_says_so(tmp_path, capsys):
    assert main(["model", "list", "--registry", str(tmp_path / "none")]) == 0
    assert "no versions" in capsys.readouterr().out


def test_show_prints_the_manifest_as_json(reg, capsys):
    assert run(reg, "show", "v000002") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v000002" and shown["parent"] == "v000001" and shown["offsets"] == {"clicks": {"0": 2}}
    assert set(shown["files"]) == {"item_embeddings.safetensors", "item_ids.json", "ranking.safetensors"}
    assert run(reg, "show", "latest") == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v000003"


def test_show_verify_names_a_corrupt_file(reg, capsys):
    path = reg.versions_dir / "v000002" / "ranking.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert run(reg, "show", "v000002") == 0  # sizes still match: only --verify hashes
    capsys.readouterr()
    assert run(reg, "show", "v000002", "--verify") == 2
    assert "ranking.safetensors" in capsys.readouterr().err


def test_rollback_moves_latest(reg, capsys):
    assert run(reg, "rollback", "--to", "v000001", "--reason", "ndcg drop") == 0
    assert capsys.readouterr().out.strip() == "latest: v000003 -> v000001"
    assert reg.latest() == "v000001" and reg.history()[-1]["reason"] == "ndcg drop"


@pytest.mark.parametrize("target, message", [("v000042", "no version v000042"), ("3", "not a version name")])
def test_rollback_to_an_unknown_version_exits_2(reg, capsys, target, message):
    assert run(reg, "rollback", "--to", target) == 2
    err = capsys.readouterr().err
    assert err.startswith("unirec model rollback:") and message in err
    assert reg.latest() == "v000003"


def test_rollback_to_an_incomplete_version_exits_2(reg, capsys):
    (reg.versions_dir / "v000001" / "item_ids.json").unlink()
    assert run(reg, "rollback", "--to", "v000001") == 2
    assert "item_ids.json: missing" in capsys.readouterr().err
    assert reg.latest() == "v000003"


def test_pin_and_unpin(reg, capsys):
    assert run(reg, "pin", "v000002") == 0 and reg.pinned() == ["v000002"]
    assert run(reg, "unpin", "v000002") == 0 and reg.pinned() == []
    assert run(reg, "unpin", "v000002") == 2
    assert "not pinned" in capsys.readouterr().err


@pytest.mark.skipif("registry" not in {f.name for f in dataclasses.fields(PipelineConfig)},
                    reason="unirec.settings has no registry: section yet")
def test_registry_path_comes_from_pipeline_yaml(reg, tmp_path, capsys):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(f"registry:\n  path: {reg.root}\n  keep_last: 5\n")
    assert main(["-c", str(cfg), "model", "list"]) == 0
    assert "v000003" in capsys.readouterr().out
