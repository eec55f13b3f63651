"""`unirec rollout promote|rollback|resume` and `unirec serve` argument errors (no broker needed)."""
from __future__ import annotations

import yaml

from unirec.cli import main
from unirec.ops import experiments as ex
from unirec.ops.registry import Registry


def config(tmp_path) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"registry": {"path": str(tmp_path / "registry")},
                                    "experiments": {"state_path": str(tmp_path / "experiment.json")}}))
    return str(path)


def publish(reg: Registry):
    import numpy as np
    return reg.publish(item_embeddings=np.zeros((2, 4), np.float32), item_ids=["a", "b"], ranking={},
                       watermark=None, offsets={}, metrics={}, model_config={}).version


def test_promote_rollback_resume_steer_the_state_and_pin_versions(tmp_path, capsys):
    cfg = config(tmp_path)
    reg = Registry(tmp_path / "registry")
    v1 = publish(reg)
    assert main(["-c", cfg, "rollout", "promote"]) == 2                       # control not pinned yet
    assert "pinned but not resolved" in capsys.readouterr().err
    ex.save_state(tmp_path / "experiment.json", ex.pin_unresolved(ex.ExperimentsConfig(), {}, v1))  # as serve does
    v2 = publish(reg)
    assert main(["-c", cfg, "rollout", "promote"]) == 0
    assert f"control={v2} (50%), treatment=latest (50%)" in capsys.readouterr().out
    assert v2 in reg.pinned()
    v3 = publish(reg)
    assert main(["-c", cfg, "rollout", "rollback"]) == 0
    assert f"control={v2} (100%), treatment=latest (0%)" in capsys.readouterr().out
    assert main(["-c", cfg, "rollout", "resume"]) == 0
    state = ex.load_state(tmp_path / "experiment.json")
    assert (state["epoch"], state["versions"]["control"], state["shares"]) == (4, v2, None)
    assert reg.latest() == v3                                                  # the registry's latest is untouched


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys):
    cfg = config(tmp_path)
    assert main(["-c", cfg, "serve", "--bind", "no-port"]) == 2
    assert "bind address 'no-port'" in capsys.readouterr().err
    assert main(["-c", cfg, "rollout", "rollback"]) == 2                      # nothing published: no registry
    assert "no model registry" in capsys.readouterr().err
