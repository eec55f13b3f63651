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


@pytest.mark.integration
def test_repush_fills_a_new_online_store_from_the_state_store(tmp_path, capsys):
    """Switching the SQLite layout starts an empty online store; `repush` writes every state."""
    from unirec.config import load
    from unirec.features import item_stats

    base = f"features:\n  repo_dir: {tmp_path / 'feast'}\n  state_path: {tmp_path / 'state.db'}\n  push_batch_rows: 2\n"
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(base + "  sqlite_store: batched\n")
    cfg = load(cfg_path).features
    clicks = [SimpleNamespace(event_id=f"c{i}", user_id=f"u{i % 3}", item_id=f"i{i % 4}", ts=100 + i, label=i % 2,
                              surface="rec", query_id=None) for i in range(9)]
    states = [merge(None, u, [c for c in clicks if c.user_id == u], max_len=5, allowed_lateness_s=10,
                    max_queries=2).state for u in ("u0", "u1", "u2")]
    items = item_stats.apply({}, clicks, bucket_s=cfg.item_bucket_s, windows_s=cfg.item_windows_s)
    with StateStore(cfg.state_path) as st:
        st.commit_batch(states, items.values(), {("clicks", 0): 9})
    OnlineStore(cfg).apply()

    cfg_path.write_text(base + "  sqlite_store: packed\n")
    packed = load(cfg_path).features
    fresh = OnlineStore(packed)
    fresh.apply()
    assert fresh.read_users(["u0"]) == {}
    capsys.readouterr()
    assert main(["-c", str(cfg_path), "features", "repush"]) == 0
    assert json.loads(capsys.readouterr().out) == {"online_store": "sqlite", "users": 3, "items": 4}
    online = OnlineStore(packed)
    assert online.read_users(["u0", "u1", "u2"]) == {s.user_id: s.for_serving() for s in states}
    assert online.read_items(list(items)) == {
        i: item_stats.feature_row(s, bucket_s=cfg.item_bucket_s, windows_s=cfg.item_windows_s) for i, s in items.items()}
