"""`unirec report` on a run log written by the real Monitor and a real registry (tmp_path)."""
from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest

from unirec.cli import main
from unirec.ops import drift
from unirec.ops.config import MonitoringConfig
from unirec.ops.monitor import Monitor
from unirec.ops.registry import Registry
from unirec.ops.report import FIGURES, ReportError, drift_per_version, read_log, rolling_mean, series, write_report
from unirec.streaming.driver import BatchReport

PNG = b"\x89PNG\r\n\x1a\n"


def _publish(reg: Registry, emb: np.ndarray, ids: list[str], ndcg: float):
    return reg.publish(item_embeddings=emb.astype(np.float32), item_ids=ids, ranking={"w": np.zeros(2, np.float32)},
                       watermark=880_000_000, offsets={"clicks": {0: 10}}, metrics={"ndcg@10": ndcg, "eval_events": 300},
                       model_config={"d_model": 8})


def _run(tmp_path, *, steps: int = 30) -> tuple:
    """A small run: batches, windows, training reports, three publishes (the last one shuffled)."""
    log, reg = tmp_path / "run" / "metrics.jsonl", Registry(tmp_path / "registry")
    m = Monitor(MonitoringConfig(bind="", log_path=str(log), input_window_events=50, score_window=100),
                topics=["clicks", "queries"])
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(60)]
    emb = rng.normal(size=(60, 8))
    prev = None
    for step in range(steps):
        now = time.time()
        m.on_batch(BatchReport(step, 100, 10, 20, Counter({"late": 1}), "beam", {"run": 0.1, "push": 0.02}, now,
                               [int(now * 1000) - 800] * 100), {("clicks", 0): 100 - step})
        m.on_events(item_ids=rng.choice(ids, 20).tolist(), user_ids=["u1", "u2"], query_texts=["star wars"],
                    watermark=880_000_000 + step)
        p = rng.uniform(0, 1, 40)
        m.on_train({"steps": 1, "loss_retrieval": 4 - step / 10, "loss_ranking": 0.7, "w_retrieval": 1.1,
                    "w_ranking": 0.9, "eval": {"ndcg@10": 0.05 + step / 300, "hr@10": 0.1, "eval_events": 40},
                    "rank_probs": p.tolist(), "rank_labels": (p > 0.5).astype(int).tolist()})
        if step in (10, 20, 29):
            table = emb[rng.permutation(60)] if step == 29 else emb + rng.normal(scale=0.05, size=emb.shape)
            v = _publish(reg, table, ids, 0.1)
            m.on_publish({"version": v.version, "accepted": True, "reason": "", "metrics": v.metrics,
                          "watermark": v.watermark, "item_ids": ids, "item_embeddings": table,
                          "prev_item_ids": None if prev is None else ids, "prev_item_embeddings": prev})
            prev = table
    m.on_publish({"version": None, "accepted": False, "reason": "metric_regressed", "metrics": {}})
    m.close()
    return log, reg


def test_the_report_writes_every_figure_and_a_page_that_shows_them(tmp_path):
    log, reg = _run(tmp_path)
    page = write_report(log, reg.root, tmp_path / "out")
    text = page.read_text()
    for name, _ in FIGURES:
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG
        assert f'src="{name}"' in text
    assert "3000 records" in text.replace(",", "") and "3 published, 1 refused" in text
    for v in reg.list_versions():
        assert f"<td>{v.version}</td>" in text


def test_drift_per_version_comes_from_the_log_and_the_registry_fills_gaps(tmp_path):
    log, reg = _run(tmp_path)
    data, versions = read_log(log), reg.list_versions()
    rows = {r[0]: r[1:] for r in drift_per_version(data, reg, versions)}
    assert rows["v000001"] == (None, None)                     # nothing before it
    assert rows["v000002"][0] < 0.05 and rows["v000003"][0] > 0.5   # fine-tune vs shuffled table
    # without the log, the same figures are computed from the registry (parent -> version)
    from_registry = {r[0]: r[1:] for r in drift_per_version(read_log(tmp_path / "missing.jsonl"), reg, versions)}
    a, b = reg.load("v000002"), reg.load("v000003")
    d = drift.embedding_drift(a.item_ids, a.item_embeddings, b.item_ids, b.item_embeddings)
    assert from_registry["v000003"] == pytest.approx((d.mean_cosine_distance, d.neighbour_overlap))
    assert from_registry["v000003"][0] == pytest.approx(rows["v000003"][0], abs=1e-5)


def test_only_the_last_run_is_read_and_torn_lines_are_skipped(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [{"t": 1.0, "kind": "start"}, {"t": 2.0, "kind": "train", "loss_ranking": 9.0},
             {"t": 10.0, "kind": "start"}, {"t": 11.0, "kind": "train", "loss_ranking": 0.5},
             {"t": 12.0, "kind": "train", "error": "TypeError: x"}, {"t": 13.0, "kind": "train", "loss_ranking": None}]
    log.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"t": 14.0, "kind": "tr')
    data = read_log(log)
    assert data.runs == 2 and data.skipped == 1 and data.t0 == 10.0
    x, y = series(data.of("train"), "loss_ranking", data.t0)
    assert x.tolist() == [1.0] and y.tolist() == [0.5]        # error and null lines give no point
    assert len(read_log(log, all_runs=True).of("train")) == 3


def test_rolling_mean():
    assert rolling_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_nothing_to_report_is_an_error(tmp_path):
    with pytest.raises(ReportError, match="nothing to report"):
        write_report(tmp_path / "none.jsonl", tmp_path / "no-registry", tmp_path / "out")


def test_a_log_without_training_still_gives_every_figure(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"t": 1.0, "kind": "start"}) + "\n")
    write_report(log, tmp_path / "no-registry", tmp_path / "out")
    assert all((tmp_path / "out" / name).read_bytes()[:8] == PNG for name, _ in FIGURES)


def test_cli_prints_the_page_path_and_exits_2_without_data(tmp_path, capsys):
    log, reg = _run(tmp_path, steps=12)
    assert main(["report", "--log", str(log), "--registry", str(reg.root)]) == 0
    page = capsys.readouterr().out.strip()
    assert page == str(log.parent / "report" / "index.html")
    assert main(["report", "--log", str(tmp_path / "x.jsonl"), "--registry", str(tmp_path / "y")]) == 2
    assert "nothing to report" in capsys.readouterr().err
