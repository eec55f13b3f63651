"""The Monitor: what the pipeline reports becomes metrics, drift gauges and run-log lines, and
no odd input ever raises into the pipeline."""
from __future__ import annotations

import json
import math
import time
import urllib.request
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from unirec.ops import gate
from unirec.ops.config import MonitoringConfig, PublishConfig
from unirec.ops.metrics import DEFAULT_BIND
from unirec.ops.monitor import Monitor
from unirec.streaming.driver import BatchReport


def _strict(line: str) -> dict:
    def no_constant(name):
        raise AssertionError(f"non-JSON constant {name} in the run log")
    return json.loads(line, parse_constant=no_constant)


@pytest.fixture
def make(tmp_path):
    made = []

    def _make(**kw) -> Monitor:
        cfg = MonitoringConfig(**{"bind": "", "log_path": str(tmp_path / "run" / "metrics.jsonl"), **kw})
        m = Monitor(cfg, topics=["clicks", "queries"])
        made.append(m)
        return m

    yield _make
    for m in made:
        m.close()


def lines(m: Monitor, kind: str | None = None) -> list[dict]:
    out = [_strict(x) for x in m._log.path.read_text().splitlines()]
    return [x for x in out if kind is None or x["kind"] == kind]


def value(m: Monitor, name: str, **labels) -> float | None:
    return m.metrics.registry.get_sample_value(name, labels)


def report(batch_id=1, records=10, dead=None, **kw) -> BatchReport:
    now = time.time()
    return BatchReport(batch_id, records, 3, 4, Counter(dead or {}), "beam", kw.get("seconds", {"run": 0.2, "push": 0.05}),
                       kw.get("pushed_at", now), kw.get("arrival_ms", [int(now * 1000) - 2000] * records))


# ---- batches ---------------------------------------------------------------------------------
def test_driver_batch_reports_are_counted_under_topic_all(make):
    m = make()
    m.on_batch(report(records=10, dead={"malformed_json": 2, "duplicate": 1}), {("clicks", 0): 5, ("queries", 1): 2})
    m.on_batch(report(batch_id=2, records=5), {("clicks", 0): 0, ("queries", 1): 0})
    assert value(m, "unirec_events_consumed_total", topic="all") == 15
    assert value(m, "unirec_events_valid_total", topic="all") == 13
    assert value(m, "unirec_events_applied_total", topic="all") == 12
    assert value(m, "unirec_events_dead_lettered_total", topic="all", reason="late") == 0   # created at 0
    assert value(m, "unirec_consumer_lag_records", topic="clicks", partition="0") == 0
    assert value(m, "unirec_microbatch_duration_seconds_count", path="beam") == 2
    assert value(m, "unirec_feature_write_duration_seconds_sum", kind="all") == pytest.approx(0.1)
    # every record was 2 s old when its features went online
    assert value(m, "unirec_feature_freshness_seconds_count") == 15
    assert value(m, "unirec_feature_freshness_seconds_sum") / 15 == pytest.approx(2.0, abs=0.01)
    first = lines(m, "batch")[0]
    assert first["records"] == 10 and first["lag"] == 7 and first["lag_max"] == 5
    assert first["dead_letters"] == {"malformed_json": 2, "duplicate": 1}
    assert first["seconds"] == pytest.approx(0.25) and first["freshness_p95"] == pytest.approx(2.0, abs=0.01)


def test_per_topic_reports_are_counted_per_topic(make):
    m = make()
    r = SimpleNamespace(batch_id=1, records=12, users=1, items=1, path="in_process", seconds={"run": 0.1},
                        pushed_at=time.time(), arrival_ms=[], consumed={"clicks": 8, "queries": 4},
                        dead_letters=Counter({("queries", "late"): 1}))
    m.on_batch(r, {})
    assert value(m, "unirec_events_applied_total", topic="clicks") == 8
    assert value(m, "unirec_events_applied_total", topic="queries") == 3
    assert value(m, "unirec_events_consumed_total", topic="all") is None


def test_driver_reports_with_per_topic_counts_are_counted_per_topic(make):
    """The driver's report carries both: dead letters per reason and per (topic, reason)."""
    m = make()
    r = SimpleNamespace(batch_id=1, records=12, users=1, items=1, path="in_process", seconds={"run": 0.1},
                        pushed_at=time.time(), arrival_ms=[], consumed={"clicks": 8, "queries": 4},
                        dead_letters=Counter({"late": 1, "malformed_json": 2}),
                        dead_letters_by_topic=Counter({("queries", "late"): 1, ("clicks", "malformed_json"): 2}))
    m.on_batch(r, {})
    m.on_batch(SimpleNamespace(**{**vars(r), "consumed": {"clicks": 0, "queries": 0}, "records": 0,
                                  "dead_letters": Counter(), "dead_letters_by_topic": Counter()}), {})
    assert value(m, "unirec_events_valid_total", topic="clicks") == 6
    assert value(m, "unirec_events_applied_total", topic="queries") == 3
    assert value(m, "unirec_events_dead_lettered_total", topic="clicks", reason="malformed_json") == 2
    assert value(m, "unirec_events_consumed_total", topic="all") is None


def test_freshness_is_sampled_on_large_batches(make):
    m = make()
    m.on_batch(report(records=5000), {})
    assert value(m, "unirec_feature_freshness_seconds_count") == 1000


# ---- input drift -----------------------------------------------------------------------------
def test_input_windows_compare_each_window_with_the_one_before(make):
    m = make(input_window_events=4)
    m.on_events(item_ids=["a", "b"], user_ids=["u1"], query_texts=["star wars"], watermark=100)
    assert lines(m, "input_drift")[-1]["closed"] is False
    m.on_events(item_ids=["a"], user_ids=["u1"], query_texts=[], watermark=150)   # window 1 closes: reference only
    first = lines(m, "input_drift")[-1]
    assert first["closed"] and first["new_item_share"] is None and "new_item_share" in first["nonfinite"]
    assert math.isnan(value(m, "unirec_drift_item_popularity_js"))
    assert value(m, "unirec_drift_new_id_ratio", entity="item") is None       # not "100% new" at start
    m.on_events(item_ids=["a", "c", "c", "d"], user_ids=["u1", "u2"], query_texts=[], watermark=200)
    second = lines(m, "input_drift")[-1]
    assert second["new_item_share"] == pytest.approx(2 / 3)                   # c, d of {a, c, d}
    assert value(m, "unirec_drift_new_id_ratio", entity="user") == pytest.approx(0.5)
    assert 0 < value(m, "unirec_drift_item_popularity_js") < 1
    assert math.isnan(value(m, "unirec_drift_query_terms_js"))               # no queries in window 2
    assert value(m, "unirec_events_watermark_seconds") == 200


def test_drift_comparisons_are_counted_per_kind_for_the_alerts_warm_up(make):
    m = make(input_window_events=2, score_window=10)
    assert [value(m, "unirec_drift_comparisons_total", kind=k) for k in ("input", "score", "embedding")] == [0, 0, 0]
    for n in range(4):                                   # 4 windows: the first is the reference
        m.on_events(item_ids=["a", f"b{n}"], user_ids=["u1"], query_texts=[], watermark=100 + n)
    m.on_events(item_ids=["a"], user_ids=["u1"], query_texts=[], watermark=200)   # an open window counts nothing
    assert value(m, "unirec_drift_comparisons_total", kind="input") == 3
    for _ in range(3):
        m.on_train({"rank_probs": [0.5] * 10, "rank_labels": [1, 0] * 5})
    assert value(m, "unirec_drift_comparisons_total", kind="score") == 2
    ids, emb = _table()
    for v in range(3):
        m.on_publish({"version": f"v{v}", "accepted": True, "item_ids": ids, "item_embeddings": emb + v})
    assert value(m, "unirec_drift_comparisons_total", kind="embedding") == 2


# ---- training --------------------------------------------------------------------------------
def test_train_stats_become_gauges_and_counters(make):
    m = make()
    stats = {"watermark": 880_000_000, "steps": 4, "sequences": 64, "lr": 2e-3, "loss_retrieval": 3.5,
             "loss_ranking": 0.6, "loss_search": 2.0, "w_retrieval": 1.2, "w_ranking": 0.8, "grad_norm": 5.0,
             "eval": {"hr@10": 0.2, "ndcg@10": 0.1, "auc": 0.7, "search_recall@10": None, "eval_events": 300},
             "items_new": 3, "items_expired": 1, "users_new": 2, "items_live": 1500}
    m.on_train(stats)
    m.on_train({**stats, "eval": None})
    assert value(m, "unirec_train_steps_total") == 8 and value(m, "unirec_train_sequences_total") == 128
    assert value(m, "unirec_train_loss", head="search") == 2.0
    assert value(m, "unirec_train_loss_weight", head="ranking") == 0.8
    assert value(m, "unirec_eval_quality", metric="ndcg@10") == 0.1
    assert value(m, "unirec_eval_quality", metric="search_recall@10") is None
    assert value(m, "unirec_eval_events_total") == 300
    assert value(m, "unirec_model_items_live") == 1500 and value(m, "unirec_model_items_added_total") == 6
    assert value(m, "unirec_train_watermark_seconds") == 880_000_000
    # training has started: "no publish for too long" counts from now
    assert value(m, "unirec_model_last_publish_timestamp_seconds") == pytest.approx(time.time(), abs=5)
    line = lines(m, "train")[0]
    assert line["loss_ranking"] == 0.6 and line["eval"]["ndcg@10"] == 0.1 and line["eval"]["search_recall@10"] is None


def test_a_nan_loss_is_counted_and_logged_as_null(make):
    m = make()
    m.on_train({"loss_ranking": float("nan"), "loss_retrieval": 1.0})
    assert value(m, "unirec_train_nonfinite_loss_total", head="ranking") == 1
    assert value(m, "unirec_train_nonfinite_loss_total", head="retrieval") == 0
    line = lines(m, "train")[0]
    assert line["loss_ranking"] is None and line["nonfinite"] == ["loss_ranking"]


def test_score_windows_give_calibration_and_psi_between_windows(make):
    m = make(score_window=200)
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200)
    m.on_train({"rank_probs": p.tolist(), "rank_labels": (rng.uniform(0, 1, 200) < p).astype(int).tolist()})
    assert abs(value(m, "unirec_drift_calibration_gap")) < 0.1       # calibrated by construction
    assert math.isnan(value(m, "unirec_drift_score_psi"))             # first window: reference only
    m.on_train({"rank_probs": (0.5 + p / 2).tolist(), "rank_labels": [0] * 200})   # shifted up, all negative
    assert value(m, "unirec_drift_score_psi") > 0.25
    assert value(m, "unirec_drift_calibration_gap") == pytest.approx(np.mean(0.5 + p / 2))
    assert lines(m, "train")[-1]["score_psi"] > 0.25


# ---- publishing ------------------------------------------------------------------------------
def _table(n=40, d=8, seed=0):
    return [f"i{k}" for k in range(n)], np.random.default_rng(seed).normal(size=(n, d))


def test_publishes_update_the_version_and_embedding_drift(make):
    m = make()
    ids, emb = _table()
    base = {"reason": "", "metrics": {"ndcg@10": 0.1}, "watermark": 880_000_000, "item_ids": ids,
            "prev_item_ids": None, "prev_item_embeddings": None}
    m.on_publish({**base, "version": "v000001", "accepted": True, "item_embeddings": emb})
    assert math.isnan(value(m, "unirec_drift_embedding_cosine_distance"))   # nothing to compare with
    # the monitor remembers the last published table when the event has no previous one
    m.on_publish({**base, "version": "v000002", "accepted": True, "item_embeddings": emb * 2})
    assert value(m, "unirec_drift_embedding_cosine_distance") == pytest.approx(0, abs=1e-6)
    assert value(m, "unirec_drift_embedding_neighbour_overlap_ratio") == 1
    shuffled = emb[np.random.default_rng(1).permutation(len(ids))]
    m.on_publish({**base, "version": "v000003", "accepted": True, "item_embeddings": shuffled})
    assert value(m, "unirec_drift_embedding_cosine_distance") > 0.5
    assert value(m, "unirec_model_publishes_total") == 3
    assert value(m, "unirec_model_version_info", version="v000003") == 1
    assert value(m, "unirec_model_version_info", version="v000002") is None
    assert value(m, "unirec_model_watermark_seconds") == 880_000_000
    last = lines(m, "publish")[-1]
    assert last["version"] == "v000003" and last["items"] == 40 and last["embedding_shared_items"] == 40


def test_the_event_previous_table_wins_and_refusals_count_by_reason(make):
    m = make()
    ids, emb = _table()
    m.on_publish({"version": "v1", "accepted": True, "item_ids": ids, "item_embeddings": -emb,
                  "prev_item_ids": ids, "prev_item_embeddings": emb})
    assert value(m, "unirec_drift_embedding_cosine_distance") == pytest.approx(2.0)
    m.on_publish({"version": None, "accepted": False, "reason": "metric_regressed; grad_norm_exploding"})
    m.on_publish({"version": None, "accepted": False, "reason": "Parent moved!"})
    decision = gate.check({"ndcg@10": 0.1}, None, grad_norm=float("nan"), loss=1.0, cfg=PublishConfig())
    m.on_publish({"version": None, "accepted": decision.ok, "reason": str(decision)})
    assert value(m, "unirec_model_gate_rejections_total", reason="grad_norm_not_finite") == 1
    assert value(m, "unirec_model_gate_rejections_total", reason="metric_regressed") == 1
    assert value(m, "unirec_model_gate_rejections_total", reason="grad_norm_exploding") == 1
    assert value(m, "unirec_model_gate_rejections_total", reason="other") == 1       # bounded label values
    assert value(m, "unirec_model_gate_rejections_total", reason="loss_not_finite") == 0
    assert value(m, "unirec_model_publishes_total") == 1


# ---- odd input -------------------------------------------------------------------------------
@pytest.mark.parametrize("call, kind", [
    (lambda m: m.on_batch(None, None), "batch"),
    (lambda m: m.on_batch(report(records=1, dead={"late": 3}), {}), "batch"),       # more dead letters than records
    (lambda m: m.on_events(item_ids=7, user_ids=[], query_texts=[], watermark=1), "input_drift"),
    (lambda m: m.on_train("loss"), "train"),
    (lambda m: m.on_train({"rank_probs": [0.5, 0.5], "rank_labels": [1]}), "train"),
    (lambda m: m.on_publish(["v1"]), "publish"),
    (lambda m: m.on_publish({"accepted": True, "version": "v1", "item_ids": ["a", "b"],
                             "item_embeddings": np.zeros((3, 2))}), "publish"),
])
def test_odd_input_is_logged_and_counted_never_raised(make, call, kind):
    m = make()
    call(m)
    assert value(m, "unirec_monitor_errors_total", kind=kind) >= 1
    assert "error" in lines(m, kind)[-1]


def test_odd_values_are_skipped_and_the_rest_is_kept(make):
    m = make()
    m.on_batch(report(records=4), {("clicks", 0): 3, "garbage": 1, ("clicks", 1): "x"})
    assert value(m, "unirec_consumer_lag_records", topic="clicks", partition="0") == 3
    m.on_train({"loss_retrieval": "high", "lr": 1e-3, "eval": {"ndcg@10": "n/a", "hr@10": 0.3},
                "rank_probs": [0.2, 1.7, float("nan")], "rank_labels": [1, 0, 0]})
    assert value(m, "unirec_train_learning_rate") == 1e-3 and value(m, "unirec_eval_quality", metric="hr@10") == 0.3
    assert value(m, "unirec_train_loss", head="retrieval") is None
    assert value(m, "unirec_monitor_errors_total", kind="batch") == 1
    assert value(m, "unirec_monitor_errors_total", kind="train") == 1          # two predictions dropped
    assert "error" not in lines(m, "train")[-1]


# ---- serving and config ----------------------------------------------------------------------
def test_start_serves_metrics_on_an_ephemeral_port_and_close_stops_it(make):
    m = make(bind="127.0.0.1:0")
    m.start()
    m.on_train({"steps": 2})
    body = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5).read().decode()
    assert "unirec_train_steps_total 2.0" in body
    m.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=2)


def test_no_bind_serves_nothing_and_no_log_path_writes_nothing(tmp_path):
    m = Monitor(MonitoringConfig(bind="", log_path=""), topics=["clicks"])
    m.start()
    m.on_train({"steps": 1})
    m.close()
    assert m.port is None and list(tmp_path.iterdir()) == []


def test_every_line_is_strict_json_with_time_and_kind(make):
    m = make(input_window_events=1)
    m.on_batch(report(), {})
    m.on_events(item_ids=["a"], user_ids=["u"], query_texts=["x"], watermark=float("inf"))
    m.on_train({"loss_search": float("inf"), "eval": {"auc": float("nan")}})
    m.on_publish({"version": "v1", "accepted": True, "metrics": {"ndcg@10": float("nan")}})
    got = lines(m)
    assert [x["kind"] for x in got] == ["start", "batch", "input_drift", "train", "publish"]
    assert all(isinstance(x["t"], float) for x in got)


def test_config_defaults_and_validation():
    assert MonitoringConfig().bind == DEFAULT_BIND
    with pytest.raises(ValueError, match="expected host:port"):
        MonitoringConfig(bind="9464")
    with pytest.raises(ValueError, match="score_window"):
        MonitoringConfig(score_window=0)
