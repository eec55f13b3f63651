"""Experiments: sticky assignment with minimal movement, attribution, the tests, guardrails, state."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from unirec.ops import experiments as ex
from unirec.ops.config import ArmConfig, ExperimentsConfig, GuardrailConfig

CFG = ExperimentsConfig(arms=(ArmConfig("control", "pinned", 0.5), ArmConfig("treatment", "latest", 0.5)),
                        min_exposures=10)
USERS = [f"user-{n}" for n in range(20000)]


def test_assignment_is_deterministic_sticky_and_follows_the_shares():
    shares = [("control", 0.3), ("treatment", 0.7)]
    arms = [ex.assign(u, "salt", shares) for u in USERS]
    assert arms == [ex.assign(u, "salt", shares) for u in USERS]          # same answer every time
    assert abs(arms.count("control") / len(USERS) - 0.3) < 0.015
    reshuffled = [ex.assign(u, "other-salt", shares) for u in USERS]
    assert 0.3 < np.mean([a != b for a, b in zip(arms, reshuffled)]) < 0.5  # a new salt: independent split


def test_changing_a_share_moves_only_the_users_it_must():
    old, new = [("control", 0.5), ("treatment", 0.5)], [("control", 0.8), ("treatment", 0.2)]
    before = [ex.assign(u, "s", old) for u in USERS]
    after = [ex.assign(u, "s", new) for u in USERS]
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert {m for m in moved} == {("treatment", "control")}              # only towards the grown arm
    assert abs(len(moved) / len(USERS) - 0.3) < 0.015                    # = |delta share|, the minimum
    assert ex.moved_share(old, new) == pytest.approx(0.3)
    assert ex.moved_share(old, old) == 0.0
    assert ex.moved_share([("a", 1.0), ("b", 0.0)], [("a", 0.0), ("b", 1.0)]) == pytest.approx(1.0)


def test_a_zero_share_arm_gets_nobody():
    assert {ex.assign(u, "s", [("control", 1.0), ("treatment", 0.0)]) for u in USERS[:2000]} == {"control"}


def test_state_pin_promote_rollback_resume():
    versions = {"latest": "v000003"}
    resolve = lambda v: versions.get(v, v)  # noqa: E731
    with pytest.raises(ValueError, match="pinned but not resolved"):
        ex.experiment(CFG, {})
    state = ex.pin_unresolved(CFG, {}, "v000001")
    assert ex.pin_unresolved(CFG, state, "v000002") is None              # pinned once, then fixed
    exp = ex.experiment(CFG, state)
    assert [(a.name, a.version, a.share) for a in exp.arms] == [("control", "v000001", 0.5), ("treatment", "latest", 0.5)]
    promoted = ex.promote(CFG, state, "treatment", resolve)
    exp = ex.experiment(CFG, promoted)
    assert (exp.control.version, exp.arms[1].version, exp.epoch) == ("v000003", "latest", 2)
    with pytest.raises(ValueError, match="not a treatment"):
        ex.promote(CFG, promoted, "control", resolve)
    rolled = ex.rollback(CFG, promoted, resolve)
    exp = ex.experiment(CFG, rolled)
    assert [(a.version, a.share) for a in exp.arms] == [("v000003", 1.0), ("latest", 0.0)] and exp.epoch == 3
    assert {exp.assign(u).name for u in USERS[:500]} == {"control"}
    resumed = ex.experiment(CFG, ex.resume(CFG, rolled))
    assert [a.share for a in resumed.arms] == [0.5, 0.5] and resumed.control.version == "v000003"
    assert [h["action"] for h in ex.resume(CFG, rolled)["history"]] == ["pin", "promote", "rollback", "resume"]


def test_state_file_round_trips_atomically(tmp_path):
    path = tmp_path / "sub" / "experiment.json"
    assert ex.load_state(path) == {}
    ex.save_state(path, {"epoch": 4, "versions": {"control": "v000002"}})
    assert ex.load_state(path) == {"epoch": 4, "versions": {"control": "v000002"}}
    assert [p.name for p in path.parent.iterdir()] == ["experiment.json"]


def exposure(rid, arm, items, ts=0.0, user="u1", experiment="default/1", latency_ms=5.0):
    return {"schema": ex.EXPOSURE_SCHEMA, "request_id": rid, "experiment": experiment, "arm": arm,
            "user_id": user, "items": items, "ts": ts, "latency_ms": latency_ms}


def click(rid, item, ts=1.0):
    return {"request_id": rid, "item_id": item, "ts": ts, "label": 1}


def test_list_ndcg_by_hand():
    assert ex.list_ndcg(5, []) == 0.0
    assert ex.list_ndcg(5, [0]) == 1.0
    assert ex.list_ndcg(5, [1]) == pytest.approx(1 / math.log2(3))
    assert ex.list_ndcg(5, [0, 2]) == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_attribution_joins_clicks_to_their_exposure_and_arm():
    exposures = [exposure("r1", "control", ["a", "b", "c"], user="u1"),
                 exposure("r2", "treatment", ["x", "y"], user="u2"),
                 exposure("r3", "treatment", ["x", "y"], user="u2"),
                 exposure("r4", "control", ["a"], experiment="default/0")]        # another experiment
    clicks = [click("r2", "y"), click("r2", "y"),                                   # duplicate: once
              click("r2", "x"), click("r1", "z"),                                   # z was not shown
              click("r3", "x", ts=5000.0),                                          # outside the window
              {"request_id": None, "item_id": "a", "ts": 1.0}, click("r9", "a")]   # no/unknown request
    stats = ex.attribute(exposures, clicks, window_s=3600, experiment_id="default/1")
    c, t = stats["control"], stats["treatment"]
    assert (c.exposures, c.clicked, c.clicks, c.ndcg) == (1, 0, 0, 0.0)
    assert (t.exposures, t.clicked, t.clicks) == (2, 1, 2)
    assert t.ctr == 0.5 and t.ndcg == pytest.approx((1.0 + 0.0) / 2)               # r2: both clicked = ideal
    assert t.users == {"u2": [2, 1]}


def test_incremental_attribution_accepts_clicks_before_their_exposure_and_forgets_old_ones():
    a = ex.Attributor("default/1", window_s=100)
    a.add_click(click("r1", "b", ts=10.0))                                  # the click's topic ran ahead
    a.add_exposure(exposure("r1", "control", ["a", "b"], ts=9.0))
    assert (a.stats["control"].clicked, a.stats["control"].ndcg) == (1, pytest.approx(1 / math.log2(3)))
    a.add_click(click("r-lost", "b", ts=20.0))
    a.add_exposure(exposure("r2", "control", ["a"], ts=500.0))              # time moves on: old state dropped
    assert "r1" not in a.open and a.ignored["unmatched"] == 1 and not a.waiting
    assert not a.add_click(click("r1", "a", ts=501.0))                      # its exposure is forgotten


def arm(n, c, users=100, p99=5.0, requests=None, errors=None):
    s = ex.ArmStats(exposures=n, clicked=c, requests=requests, errors=errors)
    per, rest = divmod(n, users)
    cs = [c // users + (1 if u < c % users else 0) for u in range(users)]
    s.users = {f"u{u}": [per + (1 if u < rest else 0), cs[u]] for u in range(users)}
    s.latencies_ms = [p99] * 10
    return s


def test_decisions():
    seq = dataclasses.replace(CFG, test="sequential")
    assert ex.decide(arm(5, 1), arm(5, 1), seq).verdict == "insufficient_data"
    assert ex.decide(arm(1000, 100), arm(1000, 104), seq).verdict == "continue"
    assert ex.decide(arm(5000, 500), arm(5000, 700), seq).verdict == "treatment_wins"
    assert ex.decide(arm(5000, 700), arm(5000, 500), seq).verdict == "control_wins"
    fixed = dataclasses.replace(CFG, test="fixed", horizon=4000)
    assert ex.decide(arm(3000, 300), arm(3000, 600), fixed).verdict == "continue"      # never before the horizon
    assert ex.decide(arm(5000, 500), arm(5000, 700), fixed).verdict == "treatment_wins"
    assert ex.decide(arm(5000, 500), arm(5000, 510), fixed).verdict == "no_difference"


def test_guardrails_override_a_winning_ctr():
    cfg = dataclasses.replace(CFG, guardrails=GuardrailConfig(max_p99_ms=20, max_error_rate=0.01, min_requests=100))
    slow = ex.decide(arm(5000, 500), arm(5000, 900, p99=35.0), cfg)
    assert slow.verdict == "guardrail_breach" and "p99 latency 35.0 ms > 20 ms" in slow.reasons
    failing = ex.decide(arm(5000, 500), arm(5000, 900, requests=5100, errors=100), cfg)
    assert failing.verdict == "guardrail_breach" and failing.reasons[0].startswith("error rate 0.0196")
    assert ex.decide(arm(50, 5), arm(50, 9, p99=99.0), cfg).verdict == "continue"   # too few requests to judge


def test_summary_and_prometheus_export():
    state = ex.pin_unresolved(CFG, {}, "v000001")
    exp = ex.experiment(CFG, state)
    stats = {"control": arm(5000, 500), "treatment": arm(5000, 700)}
    s = ex.summary(stats, exp, CFG)
    assert s["experiment"] == "default/1" and s["decisions"][0]["verdict"] == "treatment_wins"
    lo, hi = s["arms"]["treatment"]["ctr_ci"]
    assert lo < 0.14 < hi
    reg = CollectorRegistry()
    m = ex.ExperimentMetrics(reg)
    m.export(exp.id, stats, [ex.decide(stats["control"], stats["treatment"], CFG)])
    assert reg.get_sample_value("unirec_ab_ctr_ratio", {"experiment": "default/1", "arm": "treatment"}) == 0.14
    assert reg.get_sample_value("unirec_ab_decision", {"experiment": "default/1", "arm": "treatment"}) == 1


def test_tracker_follows_the_experiment_epoch_and_exports(tmp_path):
    cfg = dataclasses.replace(CFG, state_path=str(tmp_path / "experiment.json"))
    reg = CollectorRegistry()
    tracker = ex.Tracker(cfg, reg)
    assert tracker.update([exposure("r0", "control", ["a"])], []) is None      # nothing served yet
    ex.save_state(cfg.state_path, ex.pin_unresolved(cfg, {}, "v000001"))
    out = tracker.update([exposure("r1", "treatment", ["a", "b"]), exposure("r2", "control", ["a"])],
                         [click("r1", "b")])
    assert (out["arms"]["treatment"]["clicked"], out["arms"]["control"]["exposures"]) == (1, 1)
    assert reg.get_sample_value("unirec_ab_clicks", {"experiment": "default/1", "arm": "treatment"}) == 1
    ex.save_state(cfg.state_path, ex.resume(cfg, ex.load_state(cfg.state_path)))    # epoch 2: a new count
    out = tracker.update([exposure("r3", "treatment", ["a"], experiment="default/2")], [])
    assert out["experiment"] == "default/2" and out["arms"]["treatment"]["exposures"] == 1
