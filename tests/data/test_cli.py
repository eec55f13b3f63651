"""`unirec data prepare` from the command line."""
from __future__ import annotations

from unirec.cli import main


def write_config(tmp_path, body: str):
    path = tmp_path / "pipeline.yaml"
    path.write_text(body)
    return str(path)


def test_prepare_prints_one_summary_line(tmp_path, hand_dir, capsys):
    cfg = write_config(tmp_path, f"data:\n  cache_dir: {tmp_path / 'cache'}\n  path: {hand_dir}\n  query_share: 0.5\n")
    assert main(["-c", cfg, "data", "prepare"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert "3 users, 5 items, 9 clicks" in out[0] and "4 queries" in out[0] and str(tmp_path / "cache") in out[0]
    assert main(["-c", cfg, "data", "prepare"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_bad_data_path_exits_2_with_the_reason(tmp_path, capsys):
    cfg = write_config(tmp_path, f"data:\n  cache_dir: {tmp_path / 'cache'}\n  path: {tmp_path / 'missing'}\n")
    assert main(["-c", cfg, "data", "prepare"]) == 2
    assert "data.path" in capsys.readouterr().err


def test_bad_config_value_exits_2(tmp_path, capsys):
    cfg = write_config(tmp_path, "data:\n  query_share: 2.0\n")
    assert main(["-c", cfg, "data", "prepare"]) == 2
    assert "query_share" in capsys.readouterr().err
