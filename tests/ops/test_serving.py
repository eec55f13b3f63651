"""`unirec serve`: answers from published versions, per-arm, hot-swapped; 4xx for bad input;
an exposure per response; cold start; a real uvicorn on an ephemeral port."""
from __future__ import annotations

import dataclasses
import socket
import threading
import time

import numpy as np
import pytest
import requests
import torch

from unirec.features.sequence import UserSequence
from unirec.model.config import ModelConfig, OnlineConfig, TrainConfig
from unirec.model.online import OnlineLearner
from unirec.model.text import hash_pieces
from unirec.ops import experiments as ex
from unirec.ops.config import ArmConfig, ExperimentsConfig, ServingConfig
from unirec.ops.http_api import create_app
from unirec.ops.registry import Registry
from unirec.ops.serving import Service

NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
ITEMS = [f"i{n}" for n in range(len(NAMES))]
MC = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_buckets=512, max_len=10, max_item_pieces=8,
                 max_query_pieces=8, dropout=0.0)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models: single-threaded (tests/conftest.py: `one_thread`)."""


def publish(reg: Registry, seed: int):
    """A tiny model over ITEMS (titles = NAMES) published the way the online learner does."""
    text = dict(zip(ITEMS, NAMES))
    pieces_of = lambda iid: hash_pieces(text[iid], MC.n_buckets, ngram=MC.ngram, max_pieces=MC.max_item_pieces)  # noqa: E731
    learner = OnlineLearner.fresh(MC, TrainConfig(seed=seed), OnlineConfig(item_capacity=32), pieces_of=pieces_of)
    learner.table.assign(ITEMS, [0] * len(ITEMS))
    learner.model.refresh_items()
    snap = learner.snapshot()
    return reg.publish(item_embeddings=snap["item_embeddings"], item_ids=snap["item_ids"], ranking=snap["ranking"],
                       extra={"idtable": snap["extra"]["idtable"]}, watermark=None, offsets={}, metrics={},
                       model_config=MC)


def seq(user: str, items: list[str]) -> UserSequence:
    n = len(items)
    return UserSequence(user, tuple(items), (1,) * n, tuple(range(100, 100 + n)), ("rec",) * n, ("",) * n,
                        watermark=100 + n - 1, total_clicks=n)


class FakeStore:
    """The two reads serving makes of the Feast online store."""

    def __init__(self, users: dict[str, UserSequence], popularity: dict[str, int] | None = None):
        self.users, self.popularity, self.fail, self.reads = users, popularity or {}, False, 0

    def read_users(self, ids, fast=False):
        self.reads += 1
        if self.fail:
            raise OSError("online store unavailable")
        return {u: self.users[u] for u in ids if u in self.users}

    def read_items(self, ids, fast=False):
        return {i: {"positives_all": self.popularity[i]} for i in ids if i in self.popularity}


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "registry")
    publish(r, seed=1)
    return r


def make_service(reg, tmp_path, store, *, arms=None, sender=None, **serving):
    exp_cfg = ExperimentsConfig(arms=arms or (ArmConfig("control", "latest", 1.0),),
                                state_path=str(tmp_path / "experiment.json"))
    sent: list[dict] = []
    svc = Service(ServingConfig(poll_s=0.05, **serving), exp_cfg, reg, store_factory=lambda: store,
                  exposure_sender=sender or sent.append)
    return svc, sent


class Server:
    """A real uvicorn on an ephemeral port, in a thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def wait_for(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


def test_recommend_answers_from_the_published_version_and_logs_the_exposure(reg, tmp_path):
    store = FakeStore({"u1": seq("u1", ITEMS[:5])})
    svc, sent = make_service(reg, tmp_path, store)
    with Server(create_app(svc)) as url:
        r = requests.get(f"{url}/recommend", params={"user_id": "u1", "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) == 5 and not set(body["items"]) & set(ITEMS[:5])   # seen items excluded
        assert body["scores"] == sorted(body["scores"], reverse=True)
        assert (body["version"], body["arm"], body["cold_start"]) == (reg.latest(), "control", False)
        with_seen = requests.get(f"{url}/recommend", params={"user_id": "u1", "k": 20, "exclude_seen": "false"}).json()
        assert set(with_seen["items"]) == set(ITEMS)
        found = requests.get(f"{url}/search", params={"user_id": "u1", "q": "golf", "k": 3}).json()
        assert (found["items"][0], found["cold_start"], found["version"]) == ("i6", False, reg.latest())
        wait_for(lambda: len(sent) == 3)
    assert (sent[2]["endpoint"], sent[2]["query"], sent[2]["items"]) == ("search", "golf", found["items"])
    e = sent[0]
    assert (e["schema"], e["request_id"], e["items"], e["arm"], e["version"]) == (
        "exposure/v1", body["request_id"], body["items"], "control", reg.latest())
    assert e["experiment"] == body["experiment"] and e["latency_ms"] > 0


@pytest.mark.parametrize("params,message", [
    ({"k": 3}, "user_id: required"),
    ({"user_id": "u1", "k": 0}, "k: must be between 1 and 100, got 0"),
    ({"user_id": "u1", "k": 101}, "k: must be between 1 and 100, got 101"),
    ({"user_id": "u1", "k": "ten"}, "k: must be an integer, got 'ten'"),
    ({"user_id": " "}, "user_id: must not be empty"),
    ({"user_id": "x" * 129}, "user_id: longer than 128 characters"),
    ({"user_id": "u1", "exclude_seen": "maybe"}, "exclude_seen: must be true or false, got 'maybe'"),
])
def test_bad_parameters_get_a_400_that_names_the_parameter(reg, tmp_path, params, message):
    svc, sent = make_service(reg, tmp_path, FakeStore({}))
    with Server(create_app(svc)) as url:
        r = requests.get(f"{url}/recommend", params=params)
        assert (r.status_code, r.json()["error"]) == (400, message)
        for p, msg in (({"user_id": "u1"}, "q: required"), ({"user_id": "u1", "q": "  "}, "q: must not be empty"),
                       ({"user_id": "u1", "q": "?!"}, "q: '?!' has no searchable word")):
            r = requests.get(f"{url}/search", params=p)
            assert (r.status_code, r.json()["error"]) == (400, msg)
    assert sent == []   # nothing was shown, nothing is logged


def test_cold_start_users_get_popular_items_and_query_only_search(reg, tmp_path):
    pop = {iid: n for n, iid in enumerate(ITEMS)}     # i19 most popular
    svc, _ = make_service(reg, tmp_path, FakeStore({}, pop))
    svc.refresh()
    status, body, _ = svc.handle("recommend", "new-user", 3)
    assert (status, body["items"], body["cold_start"]) == (200, ["i19", "i18", "i17"], True)
    status, body, _ = svc.handle("search", "new-user", 3, q="bravo")
    assert (status, body["items"][0], body["cold_start"]) == (200, "i1", True)   # the lexical match comes first


def test_a_failing_feature_store_degrades_to_cold_start_instead_of_failing(reg, tmp_path):
    store = FakeStore({"u1": seq("u1", ITEMS[:3])}, {"i4": 9})
    svc, _ = make_service(reg, tmp_path, store)
    svc.refresh()
    store.fail = True
    status, body, _ = svc.handle("recommend", "u1", 2)
    assert (status, body["items"][0], body["degraded"]) == (200, "i4", True)


def test_a_new_version_is_served_without_restart_and_no_request_fails(reg, tmp_path):
    users = {f"u{n}": seq(f"u{n}", ITEMS[n % 7: n % 7 + 4]) for n in range(30)}
    svc, _ = make_service(reg, tmp_path, FakeStore(users))
    first = reg.latest()
    results, stop = [], threading.Event()

    def client(url):
        with requests.Session() as s:
            n = 0
            while not stop.is_set():
                sent = time.monotonic()
                r = s.get(f"{url}/recommend", params={"user_id": f"u{n % 30}", "k": 5})
                results.append((r.status_code, r.json().get("version"), sent, time.monotonic()))
                n += 1

    with Server(create_app(svc)) as url:
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) > 30)
        second = publish(reg, seed=2).version
        wait_for(lambda: any(r[1] == second for r in results[-5:]))
        n_after = len(results)
        wait_for(lambda: len(results) > n_after + 30)
        stop.set()
        for t in threads:
            t.join(10)
    assert {r[0] for r in results} == {200}
    versions = [r[1] for r in results]
    assert versions[0] == first and versions[-1] == second
    # once a client has seen the new version, every request sent after that gets it (a
    # request already in flight on another connection may still answer with the old one)
    swapped_at = min(received for _, v, _, received in results if v == second)
    assert {v for _, v, sent, _ in results if sent > swapped_at} == {second}


def test_arms_serve_their_own_versions_and_promote_is_picked_up(reg, tmp_path):
    v1 = reg.latest()
    arms = (ArmConfig("control", "pinned", 0.5), ArmConfig("treatment", "latest", 0.5))
    users = {f"u{n}": seq(f"u{n}", ITEMS[:3]) for n in range(40)}
    svc, _ = make_service(reg, tmp_path, FakeStore(users), arms=arms)
    svc.refresh()                                           # resolves "pinned" to v1 and pins it in the registry
    assert v1 in reg.pinned()
    v2 = publish(reg, seed=2).version
    svc.refresh()
    exp = svc.view.exp
    by_arm = {}
    for u in users:
        _, body, _ = svc.handle("recommend", u, 3)
        by_arm.setdefault(body["arm"], set()).add(body["version"])
        assert body["arm"] == ex.assign(u, exp.salt, exp.shares)
    assert by_arm == {"control": {v1}, "treatment": {v2}}
    state = ex.promote(svc.exp_cfg, ex.load_state(svc.exp_cfg.state_path), "treatment", reg.resolve)
    ex.save_state(svc.exp_cfg.state_path, state)
    svc.refresh()
    assert {svc.handle("recommend", u, 3)[1]["version"] for u in users} == {v2}
    assert svc.view.exp.epoch == 2


def test_exposure_logging_never_blocks_or_fails_a_request(reg, tmp_path):
    def broken(rec):
        time.sleep(0.2)
        raise ConnectionError("broker down")

    svc, _ = make_service(reg, tmp_path, FakeStore({"u1": seq("u1", ITEMS[:3])}), sender=broken, exposure_queue=2)
    svc.refresh()
    t = time.perf_counter()
    statuses = [svc.handle("recommend", "u1", 3)[0] for _ in range(20)]
    assert statuses == [200] * 20 and time.perf_counter() - t < 2.0
    m = svc.metrics.exposures
    wait_for(lambda: m.labels("failed")._value.get() >= 1)
    assert m.labels("dropped")._value.get() >= 15     # the queue holds 2; the rest are dropped, counted
    svc.close()


def test_exposures_are_sent_in_order_in_batches_and_flushed_on_close():
    """The sender thread wakes every flush_s, not per record; close sends what is still queued."""
    from prometheus_client import CollectorRegistry

    from unirec.ops.exposures import ExposureLog
    from unirec.ops.metrics import ServingMetrics

    sent, wakeups = [], []
    log = ExposureLog(sent.append, ServingMetrics(CollectorRegistry()), maxsize=1000, flush_s=0.2)
    real = log._send_queued
    log._send_queued = lambda: (wakeups.append(len(log.q)), real())[1]
    for i in range(300):
        log.send({"user_id": f"u{i}"})
    log.close()
    assert [r["user_id"] for r in sent] == [f"u{i}" for i in range(300)]
    assert sum(wakeups) == 300 and len([n for n in wakeups if n]) <= 2   # one or two batches, not 300 wake-ups


def test_repeated_requests_hit_the_cache_until_the_sequence_changes(reg, tmp_path):
    store = FakeStore({"u1": seq("u1", ITEMS[:3])})
    svc, _ = make_service(reg, tmp_path, store)
    svc.refresh()
    a = svc.handle("recommend", "u1", 5)[1]["items"]
    assert svc.handle("recommend", "u1", 3)[1]["items"] == a[:3]
    assert svc.metrics.cache.labels("hit")._value.get() == 1
    store.users["u1"] = seq("u1", ITEMS[:4])                 # a new click: a new answer, without the new item
    b = svc.handle("recommend", "u1", 5)[1]["items"]
    assert ITEMS[3] not in b and svc.metrics.cache.labels("miss")._value.get() == 2


def test_requests_that_queue_are_answered_together_with_their_own_answers(reg, tmp_path):
    """While the inference thread is busy, requests queue; the next pass answers all of them at
    once (one feature read, one model pass per version), each exactly as if it came alone."""
    import asyncio

    users = {f"u{n}": seq(f"u{n}", ITEMS[n: n + 2 + n % 5]) for n in range(10)}
    svc, sent = make_service(reg, tmp_path, FakeStore(users), cache_users=0)
    svc.refresh()
    calls = [("recommend", u, 3 + n % 4, {}) for n, u in enumerate(users)] + [
        ("search", "u1", 4, {"q": "golf"}), ("search", "u2", 2, {"q": "india kilo"}), ("search", "nobody", 3, {"q": "lima"}),
        ("recommend", "nobody", 2, {}), ("search", "u3", 3, {"q": "?!"}), ("recommend", "u4", 6, {"exclude_seen": False})]
    alone = [svc.handle(e, u, k, **kw)[:2] for e, u, k, kw in calls]
    store_reads = svc._store.reads
    gate = threading.Event()
    svc.executor.submit(gate.wait)                       # the inference thread is busy: requests queue

    async def burst():
        tasks = [asyncio.create_task(svc.submit(e, u, k, **kw)) for e, u, k, kw in calls]
        await asyncio.sleep(0.1)
        gate.set()
        return await asyncio.gather(*tasks)

    together = asyncio.run(burst())
    strip = lambda b: {key: v for key, v in b.items() if key not in ("request_id", "scores")}  # noqa: E731
    assert [(st, strip(b)) for st, b in together] == [(st, strip(b)) for st, b in alone]
    for (_, b), (_, want) in zip(together, alone):
        np.testing.assert_allclose(b.get("scores", []), want.get("scores", []), rtol=1e-5)
    assert [st for st, _ in together].count(400) == 1
    assert svc._store.reads == store_reads + 1           # one feature read for the whole batch
    batches = svc.metrics_registry.get_sample_value("unirec_serving_batch_size_requests_count")
    assert batches == 1 and svc.metrics_registry.get_sample_value("unirec_serving_batch_size_requests_sum") == len(calls)
    wait_for(lambda: len(sent) == 2 * (len(calls) - 1))  # an exposure per answered request, each time
    svc.close()


def test_no_published_version_is_a_503_with_a_message(tmp_path):
    svc, _ = make_service(Registry(tmp_path / "empty"), tmp_path, FakeStore({}))
    svc.refresh()
    status, body, _ = svc.handle("recommend", "u1", 3)
    assert status == 503 and "no model version published" in body["error"]


def test_serving_order_follows_retrieval_times_ranking(reg, tmp_path):
    """The returned order is the product of the two heads, computed independently here."""
    from unirec.model.snapshot import load_snapshot

    svc, _ = make_service(reg, tmp_path, FakeStore({"u1": seq("u1", ITEMS[:4])}), candidates=20)
    svc.refresh()
    body = svc.handle("recommend", "u1", 16)[1]
    snap = load_snapshot(reg)
    h = snap.history(ITEMS[:4], [1] * 4, list(range(100, 104)), ["rec"] * 4, [None] * 4)
    with torch.no_grad():
        u = snap.model.user_state([h])[0]
        logits = torch.as_tensor(snap.item_embeddings) @ u / MC.temperature
        logits[[snap.item_ids.index(i) for i in ITEMS[:4]]] = -float("inf")
        rows = torch.as_tensor(snap.table.rows(snap.item_ids))
        prob = snap.model.rank([h], rows[None])[0]
    score = torch.softmax(logits, 0) * prob
    want = [snap.item_ids[j] for j in score.argsort(descending=True)[:16].tolist()]
    assert body["items"] == want
    np.testing.assert_allclose(body["scores"], sorted(score.tolist(), reverse=True)[:16], rtol=1e-4)


def test_serving_config_rejects_inconsistent_limits():
    with pytest.raises(ValueError, match="default_k"):
        ServingConfig(default_k=20, max_k=10)
    with pytest.raises(ValueError, match="shares must add up to 1"):
        ExperimentsConfig(arms=(ArmConfig("a", share=0.5), ArmConfig("b", share=0.6)))
    with pytest.raises(ValueError, match="version must be"):
        dataclasses.replace(ArmConfig("a"), version="v12")


def test_a_new_latest_is_prewarmed_so_recent_users_do_not_all_miss_at_once(reg, tmp_path):
    users = {f"u{n}": seq(f"u{n}", ITEMS[n: n + 4]) for n in range(10)}
    svc, _ = make_service(reg, tmp_path, FakeStore(users))
    svc.refresh()
    for u in users:
        svc.handle("recommend", u, 5)
    v2 = publish(reg, seed=2).version
    svc.refresh()
    assert svc.metrics.prewarmed._value.get() == 10
    got = {u: svc.handle("recommend", u, 5)[1] for u in users}
    assert {b["version"] for b in got.values()} == {v2}
    cache = svc.metrics.cache
    assert (cache.labels("hit")._value.get(), cache.labels("miss")._value.get()) == (10, 10)
    fresh, _ = make_service(reg, tmp_path, FakeStore(users), cache_users=0)
    fresh.refresh()
    assert all(fresh.handle("recommend", u, 5)[1]["items"] == got[u]["items"] for u in users)   # same answers


@pytest.mark.integration
def test_end_to_end_real_registry_feast_and_kafka_with_rollout_status(reg, tmp_path, kafka_cfg, capsys):
    """Serve from a real registry version and a real Feast (SQLite) store, exposures to the
    real broker; clicks carrying the request id come back through `unirec rollout status`."""
    import json

    import orjson
    import yaml

    from unirec.cli import main
    from unirec.cli.rollout import read_topic
    from unirec.features.config import FeaturesConfig
    from unirec.features.online import OnlineStore
    from unirec.streaming.events import ClickEvent, encode
    from unirec.streaming.replay import make_producer

    kafka = kafka_cfg                                   # fresh topics, exposures included, already created
    fcfg = FeaturesConfig(repo_dir=str(tmp_path / "feast"), state_path=str(tmp_path / "state.sqlite"))
    store = OnlineStore(fcfg)
    store.apply()
    users = {f"u{n}": seq(f"u{n}", ITEMS[n % 10: n % 10 + 5]) for n in range(40)}
    store.push_users(list(users.values()))
    arms = (ArmConfig("control", "pinned", 0.5), ArmConfig("treatment", "latest", 0.5))
    exp_cfg = ExperimentsConfig(arms=arms, state_path=str(tmp_path / "experiment.json"), min_exposures=5)
    svc = Service(ServingConfig(poll_s=0.05), exp_cfg, reg, store_factory=lambda: OnlineStore(fcfg), kafka_cfg=kafka)
    v2 = None
    with Server(create_app(svc)) as url:
        wait_for(lambda: requests.get(f"{url}/healthz").status_code == 200)
        v2 = publish(reg, seed=2).version             # treatment follows latest, control stays pinned
        wait_for(lambda: requests.get(f"{url}/healthz").json()["arms"]["treatment"]["version"] == v2)
        bodies = [requests.get(f"{url}/recommend", params={"user_id": u, "k": 3}).json() for u in users]
        assert all(b["cold_start"] is False and len(b["items"]) == 3 for b in bodies)
        assert {(b["arm"], b["version"]) for b in bodies} == {("control", reg.pinned()[0]), ("treatment", v2)}
        wait_for(lambda: svc.metrics.exposures.labels("sent")._value.get() == len(users), timeout=30)
        metrics_url = f"{url}/metrics"
        cfg_path = tmp_path / "pipeline.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topics": dataclasses.asdict(kafka.topics)},
            "registry": {"path": str(reg.root)},
            "experiments": {**dataclasses.asdict(exp_cfg), "arms": [dataclasses.asdict(a) for a in arms]}}))
        logged = [orjson.loads(v) for v in read_topic(kafka, kafka.topics.exposures, 30)]
        assert sorted(e["request_id"] for e in logged) == sorted(b["request_id"] for b in bodies)
        # every treatment user clicks their first item, control users nothing
        producer = make_producer(kafka)
        for n, b in enumerate(bodies):
            if b["arm"] == "treatment":
                click = ClickEvent(f"c{n}", b["user_id"], b["items"][0], int(time.time()), 1, "rec",
                                   request_id=b["request_id"])
                producer.send(kafka.topics.clicks, key=b["user_id"].encode(), value=encode(click))
        producer.flush()
        producer.close()
        capsys.readouterr()
        assert main(["-c", str(cfg_path), "rollout", "status", "--json", "--metrics-url", metrics_url]) == 0
        status = json.loads(capsys.readouterr().out)
    n_treat = sum(b["arm"] == "treatment" for b in bodies)
    t, c = status["arms"]["treatment"], status["arms"]["control"]
    assert (t["exposures"], t["clicked"], t["ctr"], t["ndcg"]) == (n_treat, n_treat, 1.0, 1.0)
    assert (c["exposures"], c["clicked"]) == (len(users) - n_treat, 0)
    assert (t["requests"], t["errors"]) == (n_treat, 0)                    # from the server's /metrics
    assert status["decisions"][0]["verdict"] in ("treatment_wins", "continue")
    assert main(["-c", str(cfg_path), "rollout", "promote"]) == 0
    state = ex.load_state(exp_cfg.state_path)
    assert state["versions"]["control"] == v2 and state["epoch"] == 2 and v2 in reg.pinned()


def test_exposures_to_a_dead_broker_fail_without_building_a_producer(monkeypatch):
    """kafka-python's producer blocks ~30 s on a dead bootstrap address; the sender probes first."""
    import socket

    from unirec.ops.exposures import KafkaSender
    from unirec.streaming import replay
    from unirec.streaming.config import KafkaConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed again: nothing listens there
    monkeypatch.setattr(replay, "make_producer", lambda *a, **k: pytest.fail("producer built for a dead broker"))
    sender = KafkaSender(KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}"), "exposures", metrics=None)
    with pytest.raises(RuntimeError, match="does not accept connections"):
        sender({"user_id": "u1"})
    with pytest.raises(RuntimeError, match="retrying later"):   # and does not probe again at once
        sender({"user_id": "u1"})
