"""`unirec features apply|show|status` against a tmp repo and state store."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from unirec.cli import main
from unirec.features.online import OnlineStore
from unirec.features.sequence import merge
from unirec.features.state import StateStore


@pytest.mark.integration
def test_apply_show_and_status(tmp_path, capsys):
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(f"features:\n  repo_dir: {tmp_path / 'feast'}\n  state_path: {tmp_path / 'state.db'}\n")
    assert main(["-c", str(cfg_path), "features", "apply"]) == 0
    assert (tmp_path / "feast" / "feature_store.yaml").exists()

    from unirec.config import load
    cfg = load(cfg_path).features
    click = SimpleNamespace(event_id="c1", user_id="196", item_id="242", ts=881250949, label=1,
                            surface="rec", query_id=None)
    state = merge(None, "196", [click], max_len=5, allowed_lateness_s=10, max_queries=2).state
    OnlineStore(cfg).push_users([state])
    with StateStore(cfg.state_path) as st:
        st.commit_batch([state], [], {("clicks", 0): 1})
    capsys.readouterr()

    assert main(["-c", str(cfg_path), "features", "show", "user", "196"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["features"]["item_ids"] == ["242"] and shown["features"]["ts"] == [881250949]
    assert main(["-c", str(cfg_path), "features", "show", "user", "nobody"]) == 1
    capsys.readouterr()
    assert main(["-c", str(cfg_path), "features", "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["users"] == 1 and status["outbox"] == 1 and status["offsets"] == {"clicks/0": 1}
