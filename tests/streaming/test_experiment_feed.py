"""A/B attribution in the pipeline: exposures from Kafka, the batches' applied clicks, per-arm
gauges equal to a one-shot attribution of the same log, rebuilt identically after a restart,
bad exposures dead-lettered."""
from __future__ import annotations

import time

import orjson
import pytest
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from unirec.features.config import FeaturesConfig
from unirec.ops.attribution import attribute
from unirec.ops.config import ArmConfig, ExperimentsConfig
from unirec.ops.experiments import EXPOSURE_SCHEMA, experiment
from unirec.streaming.broker import client_kwargs
from unirec.streaming.config import StreamingConfig
from unirec.streaming.driver import Driver
from unirec.streaming.events import ClickEvent, encode
from unirec.streaming.experiment_feed import BAD_EXPOSURE, ExperimentFeed, parse_exposure
from unirec.streaming.replay import replay

pytestmark = pytest.mark.integration


def test_parse_exposure_names_what_is_wrong():
    good = {"request_id": "r", "user_id": "u", "arm": "a", "items": ["i1"], "ts": 1.5}
    assert parse_exposure(orjson.dumps(good)) == good
    for raw, why in [(b"{", "not JSON"), (b"[1]", "not a JSON object"),
                     (orjson.dumps({**good, "items": "i1"}), "items"), (orjson.dumps({"arm": "a"}), "missing"),
                     (orjson.dumps({**good, "ts": "x"}), "ts"), (orjson.dumps({**good, "arm": ""}), "arm")]:
        with pytest.raises(ValueError, match=why):
            parse_exposure(raw)


def log_of(exp, users: int, now: int):
    """One served list per user; users of the treatment click the top item, every third
    control user clicks the third item; a few clicks are not attributable."""
    exposures, clicks = [], []
    for u in range(users):
        user, arm = f"u{u}", exp.assign(f"u{u}").name
        items = [f"i{(u + j) % 50}" for j in range(5)]
        exposures.append({"schema": EXPOSURE_SCHEMA, "request_id": f"r{u}", "user_id": user, "experiment": exp.id,
                          "arm": arm, "version": "v1", "items": items, "ts": now + u, "latency_ms": 4.0 + u % 3})
        pick = 0 if arm == "treatment" else (2 if u % 3 == 0 else None)
        if pick is not None:
            clicks.append(ClickEvent(f"c{u}", user, items[pick], now + u + 5, 1, "rec", position=pick,
                                     request_id=f"r{u}"))
    clicks.append(ClickEvent("c-none", "u1", "i999", now + 9, 1, "rec", request_id="r1"))      # not shown
    clicks.append(ClickEvent("c-noreq", "u2", "i2", now + 9, 1, "rec"))                      # no request id
    return exposures, clicks


def test_pipeline_attributes_clicks_per_arm_and_rebuilds_after_restart(kafka_cfg, tmp_path, read_dead_letters):
    ecfg = ExperimentsConfig(arms=(ArmConfig("control", "v000001", 0.5), ArmConfig("treatment", "v000002", 0.5)),
                             state_path=str(tmp_path / "experiment.json"))
    exp = experiment(ecfg, {})
    now = int(time.time()) - 600
    exposures, clicks = log_of(exp, 60, now)
    producer = KafkaProducer(**client_kwargs(kafka_cfg))
    for e in exposures[:30]:
        producer.send(kafka_cfg.topics.exposures, key=e["user_id"].encode(), value=orjson.dumps(e))
    producer.send(kafka_cfg.topics.exposures, key=b"u0", value=b"{not an exposure")
    producer.flush()
    replay([encode(c) for c in clicks], kafka_cfg)
    for e in exposures[30:]:   # exposures may arrive after their clicks: those clicks wait
        producer.send(kafka_cfg.topics.exposures, key=e["user_id"].encode(), value=orjson.dumps(e))
    producer.flush()
    producer.close()

    features_cfg = FeaturesConfig(repo_dir=str(tmp_path / "feast"), state_path=str(tmp_path / "state.sqlite"))
    scfg = StreamingConfig(group_id="ab", max_batch_events=20, work_dir=str(tmp_path / "work"), recheck_s=0.5)
    want = attribute(exposures, clicks, window_s=ecfg.attribution_window_s, experiment_id=exp.id)
    assert want["treatment"].clicked > 0 and want["control"].clicked > 0

    registry = CollectorRegistry()
    feed = ExperimentFeed(kafka_cfg, ecfg, kafka_cfg.limits, group_id="ab", registry=registry)
    with Driver(kafka_cfg, scfg, features_cfg, experiments=feed) as d:
        d.run(once=True)
        for _ in range(20):                 # the last exposures may come one poll later
            if feed.counts["exposures"] >= len(exposures):
                break
            feed.after_batch([])
            time.sleep(0.2)
    arms = feed.last["arms"]
    for name in ("control", "treatment"):
        assert (arms[name]["exposures"], arms[name]["clicked"], arms[name]["clicks"]) == \
            (want[name].exposures, want[name].clicked, want[name].clicks)
        assert arms[name]["ndcg"] == pytest.approx(want[name].ndcg)
        gauge = registry.get_sample_value("unirec_ab_clicked_exposures", {"experiment": exp.id, "arm": name})
        assert gauge == want[name].clicked
    assert feed.counts[f"dead_letter.{BAD_EXPOSURE}"] == 1

    # A restart rebuilds the same figures from the topics (nothing is double counted) and
    # does not dead-letter the bad exposure a second time.
    again = ExperimentFeed(kafka_cfg, ecfg, kafka_cfg.limits, group_id="ab", registry=CollectorRegistry())
    with Driver(kafka_cfg, scfg, features_cfg, experiments=again) as d:
        d.run(once=True)
    assert {n: (a["exposures"], a["clicked"], a["clicks"]) for n, a in again.last["arms"].items()} == \
        {n: (a["exposures"], a["clicked"], a["clicks"]) for n, a in arms.items()}
    letters = read_dead_letters(kafka_cfg)
    assert [(d.reason, d.source_topic) for d in letters] == [(BAD_EXPOSURE, kafka_cfg.topics.exposures)]

