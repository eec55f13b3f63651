"""What one registry version is on disk: its manifest and its files.

A version directory holds `item_embeddings.safetensors` (N x D), `item_ids.json`
(row order), `ranking.safetensors` (the ranking head and shared trunk), any
`<name>.safetensors` extras (item table, optimiser state) and `manifest.json`
(`Manifest`: lineage, watermark, offsets covered, metrics, sha256 of every
file, config hash). `encode_version` validates the arrays and turns them into
those files' bytes; `unirec.ops.registry` writes, verifies and reads them.
Tensors only go through safetensors: nothing is pickled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

FORMAT = "unirec-model/v1"
EMBEDDINGS, IDS, RANKING, MANIFEST = "item_embeddings.safetensors", "item_ids.json", "ranking.safetensors", "manifest.json"
_EXTRA = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class Manifest:
    version: str
    parent: str | None
    created_at: str                      # ISO-8601 UTC
    watermark: int | float | None        # event-time (epoch s) the version's data covers
    offsets: dict[str, dict[int, int]]   # {topic: {partition: next offset}} the version covers
    metrics: dict[str, Any]              # test-then-train figures etc.; non-finite floats stored as null
    files: dict[str, dict[str, Any]]     # {file: {"sha256": hex, "bytes": n}} for every file but the manifest
    config_hash: str
    model_config: dict[str, Any]
    item_count: int = 0
    embedding_dim: int = 0
    format: str = FORMAT

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["offsets"] = {t: {str(p): o for p, o in sorted(ps.items())} for t, ps in self.offsets.items()}
        return json.dumps(d, indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        d["offsets"] = {t: {int(p): int(o) for p, o in ps.items()} for t, ps in d["offsets"].items()}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class LoadedVersion:
    manifest: Manifest
    item_embeddings: np.ndarray          # (N, D)
    item_ids: list[str]                  # N ids, row order
    ranking: dict[str, np.ndarray]
    extra: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def hash_config(model_config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a config mapping."""
    text = json.dumps(model_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def finite_json(value: Any) -> Any:
    """Metrics as strict JSON: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(value, Mapping):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _tensor_file(tensors: Mapping[str, np.ndarray], what: str) -> bytes:
    arrays = {}
    for name, a in tensors.items():
        a = np.asarray(a)
        if a.dtype == object:
            raise ValueError(f"{what}[{name!r}]: object arrays cannot be stored")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise ValueError(f"{what}[{name!r}]: contains NaN or inf; refusing to publish")
        arrays[str(name)] = np.ascontiguousarray(a)
    return st_save(arrays, metadata={"format": FORMAT})


def encode_version(item_embeddings: np.ndarray, item_ids: Sequence[str], ranking: Mapping[str, np.ndarray],
            extra: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, bytes]:
    emb = np.asarray(item_embeddings)
    if emb.ndim != 2:
        raise ValueError(f"item_embeddings: expected a 2-d (items, dim) array, got shape {emb.shape}")
    ids = list(item_ids)
    if len(ids) != emb.shape[0]:
        raise ValueError(f"item_ids: {len(ids)} ids for {emb.shape[0]} embedding rows")
    if not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("item_ids: must be unique strings")
    blobs = {EMBEDDINGS: _tensor_file({"item_embeddings": emb}, "item_embeddings"),
             IDS: json.dumps(ids).encode(),
             RANKING: _tensor_file(ranking, "ranking")}
    for name, tensors in extra.items():
        if not _EXTRA.match(name) or f"{name}.safetensors" in blobs:
            raise ValueError(f"extra: bad or reserved name {name!r} (lowercase letters, digits, _)")
        blobs[f"{name}.safetensors"] = _tensor_file(tensors, f"extra[{name!r}]")
    return blobs
