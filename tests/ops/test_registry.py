"""The model registry: round trips, verified loads, atomic publishing, rollback, retention, crash safety."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from unirec.ops.config import RegistryConfig
from unirec.ops.registry import CorruptVersion, ParentMismatch, Registry, VersionNotFound, hash_config


def arrays(seed: int = 0, n: int = 6, d: int = 4):
    rng = np.random.default_rng(seed)
    return dict(item_embeddings=rng.standard_normal((n, d)).astype(np.float32),
                item_ids=[f"item-{seed}-{i}" for i in range(n)],
                ranking={"head.weight": rng.standard_normal((d, d)).astype(np.float32),
                         "trunk.0.bias": rng.standard_normal(d).astype(np.float32),
                         "step": np.array([seed], dtype=np.int64)})


def publish(reg: Registry, seed: int = 0, **kw):
    args = dict(arrays(seed), watermark=1000 + seed, offsets={"clicks": {0: 10 + seed, 1: 7}},
                metrics={"ndcg@10": 0.1 * seed, "eval_events": 500}, model_config={"d_model": 4})
    args.update(kw)
    return reg.publish(**args)


def test_publish_then_load_round_trips_every_array_and_the_manifest(tmp_path):
    reg = Registry(tmp_path)
    m1 = publish(reg, 1)
    m2 = publish(reg, 2, metrics={"ndcg@10": 0.3, "auc": math.nan}, extra={"optimizer": {"exp_avg": np.ones(3)}})
    assert (m1.version, m2.version) == ("v000001", "v000002")
    assert (m1.parent, m2.parent) == (None, "v000001")
    assert reg.latest() == "v000002"
    got = reg.load()
    want = arrays(2)
    np.testing.assert_array_equal(got.item_embeddings, want["item_embeddings"])
    assert got.item_ids == want["item_ids"]
    assert set(got.ranking) == set(want["ranking"])
    for k, v in want["ranking"].items():
        np.testing.assert_array_equal(got.ranking[k], v)
        assert got.ranking[k].dtype == v.dtype
    np.testing.assert_array_equal(got.extra["optimizer"]["exp_avg"], np.ones(3))
    m = got.manifest
    assert m.watermark == 1002 and m.offsets == {"clicks": {0: 12, 1: 7}}
    assert m.metrics == {"ndcg@10": 0.3, "auc": None}  # strict JSON: NaN becomes null
    assert m.item_count == 6 and m.embedding_dim == 4
    assert m.config_hash == hash_config({"d_model": 4}) != hash_config({"d_model": 8})
    for fname, info in m.files.items():  # the manifest's checksums are those of the files on disk
        data = (tmp_path / "versions" / m.version / fname).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert reg.load("v000001").manifest == reg.show("v000001") == m1
    assert [e["action"] for e in reg.history()] == ["publish", "publish"]


def test_registry_core_does_not_import_torch():
    code = "import sys, unirec.ops.registry, unirec.ops.gate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fname", ["item_embeddings.safetensors", "item_ids.json", "ranking.safetensors"])
def test_a_flipped_byte_is_caught_on_load_naming_the_file(tmp_path, fname):
    reg = Registry(tmp_path)
    publish(reg, 1)
    path = tmp_path / "versions" / "v000001" / fname
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    for call in (reg.load, reg.verify):
        with pytest.raises(CorruptVersion, match=fname):
            call("v000001")


def test_a_missing_file_or_manifest_makes_the_version_incomplete(tmp_path):
    reg = Registry(tmp_path)
    publish(reg, 1), publish(reg, 2)
    (tmp_path / "versions" / "v000001" / "ranking.safetensors").unlink()
    (tmp_path / "versions" / "v000002" / "manifest.json").unlink()
    with pytest.raises(CorruptVersion, match="ranking.safetensors: missing"):
        reg.load("v000001")
    with pytest.raises(CorruptVersion, match="manifest.json: missing"):
        reg.load("latest")
    good, bad = reg.scan()
    assert good == [] and set(bad) == {"v000001", "v000002"}
    assert reg.list_versions() == []


def test_a_manifest_naming_a_pickle_is_refused(tmp_path):
    reg = Registry(tmp_path)
    publish(reg, 1)
    vdir = tmp_path / "versions" / "v000001"
    (vdir / "model.pt").write_bytes(b"\x80\x04 not loaded")
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["files"]["model.pt"] = {"sha256": hashlib.sha256(b"\x80\x04 not loaded").hexdigest(), "bytes": 14}
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptVersion, match="model.pt.*only .safetensors and .json"):
        reg.load()


@pytest.mark.parametrize("change, match", [
    ({"item_ids": ["a"] * 6}, "unique"),
    ({"item_ids": ["a", "b"]}, "2 ids for 6"),
    ({"item_embeddings": np.zeros(6, np.float32)}, "2-d"),
    ({"ranking": {"w": np.array([1.0, math.nan])}}, r"ranking\['w'\].*NaN"),
    ({"item_embeddings": np.full((6, 4), np.inf, np.float32)}, "NaN or inf"),
    ({"extra": {"ranking": {"x": np.ones(1)}}}, "reserved"),
])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, change, match):
    reg = Registry(tmp_path)
    publish(reg, 1)
    with pytest.raises(ValueError, match=match):
        publish(reg, 2, **change)
    assert reg.latest() == "v000001"
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["v000001"]


def test_rollback_moves_latest_and_records_it(tmp_path):
    reg = Registry(tmp_path)
    publish(reg, 1), publish(reg, 2)
    assert reg.rollback("v000001", reason="bad ndcg") == "v000002"
    assert reg.latest() == "v000001" and reg.load().item_ids == arrays(1)["item_ids"]
    assert reg.history()[-1] | {"at": None} == {"at": None, "action": "rollback", "version": "v000001",
                                                 "previous": "v000002", "reason": "bad ndcg"}
    for bad in ("v000009", "../v000001", "latest-ish"):
        with pytest.raises(VersionNotFound):
            reg.rollback(bad)
    assert reg.latest() == "v000001"


def test_rollback_to_a_corrupt_version_is_refused(tmp_path):
    reg = Registry(tmp_path)
    publish(reg, 1), publish(reg, 2)
    (tmp_path / "versions" / "v000001" / "item_ids.json").write_text('["x","y","z","u","v","w"]')
    with pytest.raises(CorruptVersion, match="item_ids.json"):
        reg.rollback("v000001")
    assert reg.latest() == "v000002"


def test_publishing_on_a_stale_parent_raises_after_a_rollback(tmp_path):
    reg = Registry(tmp_path)
    publish(reg, 1), publish(reg, 2)
    reg.rollback("v000001")
    with pytest.raises(ParentMismatch, match="latest is v000001"):
        publish(reg, 3, parent="v000002")
    m = publish(reg, 3, parent="v000001")
    assert (m.version, m.parent) == ("v000003", "v000001")  # numbers never go back


def test_retention_keeps_the_newest_n_plus_pinned_and_latest(tmp_path):
    reg = Registry(tmp_path, keep_last=2)
    publish(reg, 1)
    reg.pin("v000001")
    for seed in range(2, 6):
        publish(reg, seed)
    assert [m.version for m in reg.list_versions()] == ["v000001", "v000004", "v000005"]
    reg.unpin("v000001")
    reg.rollback("v000004")
    publish(reg, 6)
    assert [m.version for m in reg.list_versions()] == ["v000005", "v000006"]
    reg.rollback("v000005")
    reg.keep_last = 1
    reg._retain()  # retention alone (normally after a publish): latest survives though not the newest
    assert [m.version for m in reg.list_versions()] == ["v000005", "v000006"]
    deleted = [e["version"] for e in reg.history() if e["action"] == "delete"]
    assert deleted == ["v000002", "v000003", "v000001", "v000004"]


def test_leftovers_of_a_killed_writer_are_removed_on_open_unless_a_writer_holds_the_lock(tmp_path):
    reg = Registry(tmp_path)
    publish(reg, 1)
    (tmp_path / "versions" / ".tmp-v000002-dead").mkdir()
    (tmp_path / "versions" / ".tmp-v000002-dead" / "item_ids.json").write_text("[")
    (tmp_path / ".latest.tmp-dead").write_text("v000002")
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer at work: its temp files are not leftovers
    try:
        assert Registry(tmp_path).cleaned == []
    finally:
        os.close(fd)
    reopened = Registry(tmp_path)
    assert sorted(reopened.cleaned) == [".latest.tmp-dead", ".tmp-v000002-dead"]
    assert not (tmp_path / "versions" / ".tmp-v000002-dead").exists()
    assert reopened.latest() == "v000001" and publish(reopened, 2).version == "v000002"


def test_a_torn_history_line_is_skipped_and_not_glued_to_the_next(tmp_path):
    reg = Registry(tmp_path)
    publish(reg, 1)
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"action": "publ')  # killed mid-append
    publish(reg, 2)
    assert [(e["action"], e["version"]) for e in reg.history()] == [("publish", "v000001"), ("publish", "v000002")]


def test_from_config_and_read_only_open(tmp_path):
    cfg = RegistryConfig(path=str(tmp_path / "reg"), keep_last=3)
    with pytest.raises(Exception, match="no model registry"):
        Registry.from_config(cfg, create=False)
    reg = Registry.from_config(cfg)
    assert reg.keep_last == 3 and reg.latest() is None and reg.list_versions() == []
    with pytest.raises(VersionNotFound, match="no version published"):
        reg.load()


# ---------------------------------------------------------------- crash safety (SIGKILL)

PUBLISHER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from unirec.ops.registry import Registry

    def hook(stage):
        if stage == "file:item_ids.json":
            print("mid-write", flush=True)   # the parent may kill us inside this window
            time.sleep(0.15)

    reg = Registry(sys.argv[1], keep_last=3, hook=hook)
    rng = np.random.default_rng(os.getpid())
    for n in range(10**9):  # large enough files that a random kill often lands inside a write
        reg.publish(item_embeddings=rng.standard_normal((20000, 32)).astype(np.float32),
                    item_ids=[str(i) for i in range(20000)],
                    ranking={"w": rng.standard_normal((256, 256)).astype(np.float32)},
                    watermark=n, offsets={"clicks": {0: n}}, metrics={"ndcg@10": 0.1}, model_config={})
""")


def assert_only_complete_versions(root: Path) -> Registry:
    """Open as a restarted process would, and check what a reader relies on."""
    vdir = root / "versions"
    before = {p.name for p in vdir.iterdir() if p.name.startswith(".")} if vdir.exists() else set()
    reg = Registry(root, keep_last=3)
    assert set(reg.cleaned) >= before  # every temp dir a kill left behind was cleaned
    assert not [p for p in (root / "versions").iterdir() if p.name.startswith(".")]
    names = [p.name for p in (root / "versions").iterdir()]
    for name in names:
        reg.verify(name)  # raises on any incomplete or corrupt version
    latest = reg.latest()
    if names:
        assert latest in names and reg.load().manifest.version == latest
    for m in reg.list_versions():
        assert m.parent is None or int(m.parent[1:]) < int(m.version[1:])
    return reg


@pytest.mark.parametrize("stage", ["file:item_embeddings.safetensors", "file:item_ids.json",
                                   "file:ranking.safetensors", "manifest", "renamed", "latest"])
def test_sigkill_at_every_publish_stage_leaves_only_complete_versions(tmp_path, stage):
    publish(Registry(tmp_path), 1)

    def die_at(at):
        if at == stage:
            os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:  # the writer: killed by its hook in the middle of publishing v000002
        try:
            publish(Registry(tmp_path, hook=die_at), 2)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    reg = assert_only_complete_versions(tmp_path)
    # latest moves last: until the pointer is replaced the old version is the one served
    assert reg.latest() == ("v000002" if stage == "latest" else "v000001")
    assert bool(reg.cleaned) == stage.startswith(("file:", "manifest"))
    before = reg.latest()
    m = publish(reg, 3)  # the restarted writer carries on from the version that was served
    assert m.parent == before and reg.latest() == m.version and reg.verify().version == m.version


@pytest.mark.integration
def test_sigkill_at_random_moments_while_publishing_in_a_loop(tmp_path):
    rnd = random.Random(7)
    cleaned = 0
    for kill in range(8):
        proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
        if kill % 2:  # inside the write window, signalled by the publisher
            for _ in range(rnd.randint(1, 3)):
                assert proc.stdout.readline() == "mid-write\n"
            time.sleep(rnd.uniform(0.0, 0.1))
        else:  # anywhere: startup, encoding, writing, renaming, retention
            time.sleep(rnd.uniform(0.5, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        cleaned += len(assert_only_complete_versions(tmp_path).cleaned)
    reg = Registry(tmp_path, keep_last=3)
    assert cleaned >= 4 and len(reg.list_versions()) >= 1
    numbers = [int(m.version[1:]) for m in reg.list_versions()]
    assert numbers == sorted(numbers) and len(numbers) <= 3


@pytest.mark.parametrize("kw, key", [({"keep_last": 0}, "keep_last"), ({"path": ""}, "path")])
def test_registry_config_rejects_meaningless_values(kw, key):
    with pytest.raises(ValueError, match=key):
        RegistryConfig(**kw)
