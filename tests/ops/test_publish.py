"""Publisher: the gate decides, the registry commits first, Feast and the notice follow and never undo it."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from unirec.ops.config import PublishConfig
from unirec.ops.publish import NOTICE_SCHEMA, Publisher
from unirec.ops.registry import Registry


def snapshot(seed=0, n=5, d=3):
    rng = np.random.default_rng(seed)
    return {"item_embeddings": rng.standard_normal((n, d)).astype(np.float32),
            "item_ids": [str(i) for i in range(n)],
            "ranking": {"w": rng.standard_normal((d, d)).astype(np.float32)},
            "extra": {"idtable": {"rows": np.arange(1, n + 1), "capacity": np.array([n + 1])}}}


def figures(ndcg=0.05, events=500, loss=1.0, grad=2.0):
    return {"metrics": {"ndcg@10": ndcg, "eval_events": events}, "loss": loss, "grad_norm": grad}


class Recorder:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def __call__(self, *args):
        if self.fail:
            raise ConnectionError("broker down")
        self.calls.append(args)


def publisher(tmp_path, push=None, send=None, **cfg):
    return Publisher(Registry(tmp_path / "reg"), PublishConfig(**cfg), push_embeddings=push, send_notice=send)


def test_accepted_version_lands_in_the_registry_then_feast_then_the_notice(tmp_path):
    push, send = Recorder(), Recorder()
    pub = publisher(tmp_path, push, send)
    res = pub.publish(snapshot(), figures(), parent=None, watermark=123, offsets={"clicks": {0: 7}},
                      state_batch=4, model_config={"d_model": 3})
    assert res.accepted and res.version == "v000001"
    loaded = pub.registry.load()
    m = loaded.manifest
    assert m.watermark == 123 and m.offsets == {"clicks": {0: 7}} and m.metrics["state_batch"] == 4
    assert loaded.extra["idtable"]["capacity"][0] == 6
    ids, vectors, version, _ = push.calls[0]
    assert ids == snapshot()["item_ids"] and version == "v000001"
    np.testing.assert_array_equal(vectors, snapshot()["item_embeddings"])
    key, value = send.calls[0]
    note = json.loads(value)
    assert key == b"v000001" and note["schema"] == NOTICE_SCHEMA and note["offsets"] == {"clicks": {"0": 7}}


@pytest.mark.parametrize("fig, reason", [(figures(loss=math.nan), "loss_not_finite"),
                                         (figures(grad=1e9), "grad_norm_exploding"),
                                         (figures(ndcg=0.01), "metric_regressed")])
def test_refused_candidate_writes_nothing(tmp_path, fig, reason):
    push = Recorder()
    pub = publisher(tmp_path, push)
    first = pub.publish(snapshot(), figures(), parent=None, watermark=1, offsets={}, state_batch=1, model_config={})
    res = pub.publish(snapshot(1), fig, parent=first.version, watermark=2, offsets={}, state_batch=2, model_config={})
    assert not res.accepted and reason in res.reasons
    assert pub.registry.latest() == "v000001" and len(push.calls) == 1 and pub.counts["refused"] == 1


def test_operator_rollback_since_the_parent_is_reported_not_overwritten(tmp_path):
    pub = publisher(tmp_path)
    a = pub.publish(snapshot(), figures(), parent=None, watermark=1, offsets={}, state_batch=1, model_config={})
    b = pub.publish(snapshot(1), figures(), parent=a.version, watermark=2, offsets={}, state_batch=2, model_config={})
    pub.registry.rollback(a.version)
    res = pub.publish(snapshot(2), figures(), parent=b.version, watermark=3, offsets={}, state_batch=3,
                      model_config={})
    assert not res.accepted and res.reasons == ("parent_moved",) and pub.registry.latest() == a.version


def test_feast_or_notice_failures_are_counted_and_the_version_stands(tmp_path):
    pub = publisher(tmp_path, Recorder(fail=True), Recorder(fail=True))
    res = pub.publish(snapshot(), figures(), parent=None, watermark=1, offsets={}, state_batch=1, model_config={})
    assert res.accepted and pub.registry.latest() == res.version
    assert pub.counts["feast_errors"] == 1 and pub.counts["notice_errors"] == 1 and len(res.errors) == 2
