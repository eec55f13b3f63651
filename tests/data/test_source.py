"""`unirec.data.source`: fetching the RecBole wheel and reading its ml-100k files."""
from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from unirec.data import DataError, prepare
from unirec.data.config import DataConfig
from unirec.data.source import locate_raw, read_items, read_ratings


def fake_wheel(path: Path, hand_dir: Path, members=("ml-100k.inter", "ml-100k.item")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name in members:
            zf.writestr(f"recbole/dataset_example/ml-100k/{name}", (hand_dir / name).read_bytes())
        zf.writestr("recbole/__init__.py", "")
    return path


def no_network(monkeypatch):
    calls = []

    def fail(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for recbole==1.2.1")

    monkeypatch.setattr(subprocess, "run", fail)
    return calls


def test_wheel_already_in_cache_is_used_without_pip(tmp_path, hand_dir, monkeypatch):
    calls = no_network(monkeypatch)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    fake_wheel(tmp_path / "cache" / "wheels" / "recbole-1.2.1-py3-none-any.whl", hand_dir)
    raw = locate_raw(cfg)
    assert calls == []
    assert raw.kind == "atomic" and raw.ratings == tmp_path / "cache" / "ml-100k" / "raw" / "ml-100k.inter"
    assert raw.ratings.read_bytes() == (hand_dir / "ml-100k.inter").read_bytes()
    assert len(read_ratings(raw)[0]) == 9


def test_pip_download_is_asked_for_the_pinned_version(tmp_path, hand_dir, monkeypatch):
    calls = []

    def download(cmd, **kw):
        calls.append(cmd)
        fake_wheel(Path(cmd[cmd.index("-d") + 1]) / "recbole-1.2.1-py3-none-any.whl", hand_dir)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", download)
    out = prepare(DataConfig(cache_dir=str(tmp_path / "cache")))
    assert len(calls) == 1 and "--no-deps" in calls[0] and "recbole==1.2.1" in calls[0]
    assert (out / "events.jsonl").is_file()
    prepare(DataConfig(cache_dir=str(tmp_path / "cache")))
    assert len(calls) == 1  # second run: nothing fetched


def test_fetch_failure_says_what_to_do(tmp_path, monkeypatch):
    no_network(monkeypatch)
    with pytest.raises(DataError) as err:
        prepare(DataConfig(cache_dir=str(tmp_path / "cache")))
    msg = str(err.value)
    assert "No matching distribution" in msg and "data.path" in msg and "wheels" in msg


def test_wheel_without_the_dataset_is_reported(tmp_path, hand_dir, monkeypatch):
    no_network(monkeypatch)
    fake_wheel(tmp_path / "cache" / "wheels" / "recbole-1.2.1-py3-none-any.whl", hand_dir, members=("ml-100k.inter",))
    with pytest.raises(DataError, match="ml-100k.item"):
        locate_raw(DataConfig(cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache" / "ml-100k" / "raw").exists()  # no half-extracted folder left


def test_atomic_columns_are_found_by_name(tmp_path):
    folder = tmp_path / "cols"
    folder.mkdir()
    (folder / "ml-100k.inter").write_text("timestamp:float\trating:float\titem_id:token\tuser_id:token\n5\t4\t7\t3\n")
    (folder / "ml-100k.item").write_text("class:token_seq\titem_id:token\tmovie_title:token_seq\nDrama Sci-Fi\t7\tBrazil\n")
    raw = locate_raw(DataConfig(path=str(folder)))
    ratings, rejected = read_ratings(raw)
    items, _ = read_items(raw)
    assert rejected == [] and (ratings[0].user_id, ratings[0].item_id, ratings[0].rating, ratings[0].ts) == ("3", "7", 4, 5)
    assert items["7"] == {"item_id": "7", "title": "Brazil", "year": None, "genres": ["Drama", "Sci-Fi"]}
