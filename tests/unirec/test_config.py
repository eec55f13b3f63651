"""pipeline.yaml loading: typed, frozen, strict, with ${ENV} expansion."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from unirec.config import ConfigError, load
from unirec.settings import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Inner:
    host: str = "localhost"
    port: int = 1
    ratio: float = 0.5
    tags: tuple[str, ...] = ()
    password: str | None = None


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    enabled: bool = True


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_shipped_pipeline_yaml_loads_into_frozen_sections():
    cfg = load(ROOT / "pipeline.yaml")
    assert isinstance(cfg, PipelineConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.seed = 1  # type: ignore[misc]


def test_missing_keys_take_defaults_and_ints_widen_to_float(tmp_path):
    cfg = load(write(tmp_path, "inner:\n  port: 9\n  ratio: 1\n"), Outer)
    assert cfg == Outer(inner=Inner(port=9, ratio=1.0))
    assert isinstance(cfg.inner.ratio, float)


def test_unknown_key_is_rejected_naming_file_and_dotted_key(tmp_path):
    path = write(tmp_path, "inner:\n  hots: x\n")
    with pytest.raises(ConfigError) as err:
        load(path, Outer)
    assert str(path) in str(err.value) and "inner.hots: unknown key" in str(err.value)


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="modle: unknown key"):
        load(write(tmp_path, "modle: {}\n"), PipelineConfig)


@pytest.mark.parametrize(
    "text, key",
    [
        ("inner:\n  port: '9'\n", "inner.port: expected int"),
        ("inner:\n  port: true\n", "inner.port: expected int"),
        ("inner:\n  ratio: fast\n", "inner.ratio: expected float"),
        ("enabled: 1\n", "enabled: expected bool"),
        ("inner: 3\n", "inner: expected a mapping"),
        ("inner:\n  tags: [a, 2]\n", "inner.tags[1]: expected str"),
    ],
)
def test_wrong_types_are_rejected_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load(write(tmp_path, text), Outer)


def test_env_vars_expand_inside_strings_only(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIREC_TEST_SECRET", "p@ss: #word")
    cfg = load(write(tmp_path, "inner:\n  password: ${UNIREC_TEST_SECRET}\n  host: ${UNIREC_NOPE:-fallback}\n"), Outer)
    assert cfg.inner.password == "p@ss: #word"
    assert cfg.inner.host == "fallback"


def test_unset_env_var_without_default_is_an_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("UNIREC_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"inner.password: environment variable \$\{UNIREC_UNSET\} is not set"):
        load(write(tmp_path, "inner:\n  password: ${UNIREC_UNSET}\n"), Outer)


def test_unreadable_and_non_mapping_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "absent.yaml", Outer)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(write(tmp_path, "- a\n- b\n"), Outer)


def test_a_value_outside_its_choices_is_rejected_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.weighter: gradient: must be 'log' or 'raw', got 'lg'"):
        load(write(tmp_path, "train:\n  weighter:\n    gradient: lg\n"), PipelineConfig)


@pytest.mark.parametrize("text, message", [
    ("streaming:\n  push_nice: 20\n", r"streaming: push_nice: must be within 0..19, got 20"),
    ("features:\n  sqlite_store: fast\n", r"features.sqlite_store: expected one of"),
])
def test_streaming_and_features_settings_outside_their_range_are_rejected(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), PipelineConfig)
