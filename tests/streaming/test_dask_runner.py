"""The same micro-batch PTransforms on another Beam runner: DaskRunner on a local Dask cluster.

Slow (a Dask cluster, and the DaskRunner executes Beam step by step), so it reads one
small bounded micro-batch."""
from __future__ import annotations

from pathlib import Path

import pytest

from unirec.features.config import FeaturesConfig
from unirec.streaming.config import StreamingConfig
from unirec.streaming.driver import Driver
from unirec.streaming.microbatch import run_beam, run_in_process
from unirec.streaming.replay import replay
from unirec.streaming.synthetic import source_stream

pytestmark = pytest.mark.integration
EVENTS = Path(__file__).resolve().parents[2] / ".cache/unirec/ml-100k/events.jsonl"


@pytest.fixture
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    try:
        yield cluster
    finally:
        cluster.close()


def test_one_micro_batch_on_a_local_dask_cluster_matches_the_in_process_run(kafka_cfg, tmp_path, dask_cluster):
    lines = source_stream(EVENTS, 600)
    replay(lines, kafka_cfg)
    features_cfg = FeaturesConfig(repo_dir=str(tmp_path / "feast"), state_path=str(tmp_path / "state.sqlite"))
    streaming_cfg = StreamingConfig(runner="DaskRunner", work_dir=str(tmp_path / "work"), arrival_grace_ms=0,
                                    runner_options=(f"--dask_client_address={dask_cluster.scheduler_address}",))
    with Driver(kafka_cfg, streaming_cfg, features_cfg, online=object()) as d:
        ranges = d.plan(full=True)
        on_dask = run_beam(ranges, d.spec, runner="DaskRunner", options=streaming_cfg.runner_options,
                           work_dir=streaming_cfg.work_dir)
        local = run_in_process(ranges, d.spec, d.store)
    assert on_dask.records == local.records == len(lines)
    assert on_dask.offsets == local.offsets
    assert len(on_dask.users) >= 5 and len(on_dask.items) >= 100
    assert sorted(on_dask.users, key=lambda s: s.user_id) == sorted(local.users, key=lambda s: s.user_id)
    assert sorted(on_dask.items, key=lambda s: s.item_id) == sorted(local.items, key=lambda s: s.item_id)
