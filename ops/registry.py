"""The model registry: immutable, checksummed versions in a local directory plus a `latest` pointer.

Layout under `root` (`registry.path` in pipeline.yaml):

    versions/v000012/item_embeddings.safetensors   item embedding matrix, key "item_embeddings" (N, D)
                    item_ids.json                  row -> item id (list of N strings)
                    ranking.safetensors            ranking head + shared trunk: the flat state dict given
                    <name>.safetensors             optional extra flat tensor dicts (e.g. "optimizer")
                    manifest.json                  version, parent, created_at, watermark, offsets,
                                                   metrics, sha256 + size of every other file, config hash
    latest                                         the current version's name (one line)
    pins.json                                      versions retention never deletes
    history.jsonl                                  audit log: publish / rollback / pin / unpin / delete
    .lock                                          writers hold an exclusive flock on it

Design choices:

* **Torch-free, safe formats only.** Tensors are numpy arrays written with
  `safetensors.numpy` (callers pass `t.detach().cpu().numpy()`); metadata is JSON.
  A manifest naming any other kind of file is refused, so a pickle is never loaded
  (if torch checkpoints are ever added they must go through `torch.load(..., weights_only=True)`).
  Non-finite floats in any tensor are refused at publish (a NaN table must never ship).
* **A reader never sees half a version.** A version is written into
  `versions/.tmp-<v>-<rand>` (same filesystem), every file fsynced, the manifest
  last, the directory fsynced, then renamed to `versions/<v>` and the parent fsynced.
  Only then does `latest` move: written to a temp name, fsynced, renamed over the
  old pointer (atomic), directory fsynced. A crash at any point leaves the old
  `latest` valid; the leftover temp directory is removed the next time a registry
  is opened (or published to) while no writer holds the lock, counted in `cleaned`
  and logged. Deletions rename a version to `versions/.del-*` first, for the same reason.
* **Loads verify.** `load` reads each file once into memory, checks its sha256 and
  size against the manifest, and parses those same bytes (no window between check
  and parse). Any mismatch raises `CorruptVersion` naming the file. The manifest
  itself has no checksum: it is the root of trust (fsynced before the rename).
* **Versions are monotonic**: `v` + 6+ digits, one more than the highest version
  directory present (retention always keeps the newest, so numbers are never reused).
* **One writer at a time** (flock on `.lock`; readers take no lock). `publish`
  is a compare-and-swap when the caller names `parent`: if `latest` is no longer
  that version (an operator rolled back), it raises `ParentMismatch` instead of
  silently publishing on top of the rollback; the learner should reload `latest`.
* **Retention** keeps the `keep_last` newest complete versions plus `latest` and
  every pinned version; it runs after each publish.
* The audit log is appended after the action it records, so a crash in between can
  lose a log line but never records something that did not happen; a torn last line
  is skipped on read and never glued to the next one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load

from unirec.ops.config import RegistryConfig
from unirec.ops.durable import fsync_dir as _fsync_dir
from unirec.ops.durable import replace_atomic as _replace_atomic
from unirec.ops.durable import write_durable as _write_durable
from unirec.ops.version_files import (  # noqa: F401  (Manifest, hash_config: part of the registry's API)
    EMBEDDINGS, IDS, MANIFEST, RANKING, LoadedVersion, Manifest, encode_version, finite_json, hash_config,
)

log = logging.getLogger(__name__)

LATEST = "latest"
_VERSION = re.compile(r"^v(\d{6,})$")
_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.(safetensors|json)$")
_TEMP_PREFIXES = (".tmp-", ".del-")


class RegistryError(Exception):
    """Anything the registry refuses; the message says what and where."""


class VersionNotFound(RegistryError):
    pass


class CorruptVersion(RegistryError):
    """A version directory that is incomplete or whose files do not match the manifest."""


class ParentMismatch(RegistryError):
    """`latest` moved since the caller loaded its parent (e.g. an operator rolled back)."""


# ---------------------------------------------------------------- the registry

class Registry:
    """A model registry rooted at a local directory; see the module docstring.

    `hook(stage)` is called at each publish stage (`file:<name>`, `manifest`,
    `renamed`, `latest`); tests use it to crash the writer at exact points."""

    def __init__(self, root: str | os.PathLike, *, keep_last: int = 10, create: bool = True,
                 clock: Callable[[], float] = time.time, hook: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        if keep_last < 1:
            raise ValueError(f"keep_last: must be >= 1, got {keep_last}")
        self.keep_last, self._clock, self._hook = keep_last, clock, hook or (lambda stage: None)
        if not self.versions_dir.is_dir():
            if not create:
                raise RegistryError(f"{self.root}: no model registry here (nothing published yet)")
            self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.cleaned: list[str] = []
        try:
            with self._lock(blocking=False) as held:
                if held:  # no writer is active, so every temp name is a crash leftover
                    self._sweep()
        except OSError as e:  # a read-only view of the registry: nothing to clean up
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise

    @classmethod
    def from_config(cls, cfg: RegistryConfig, **kw: Any) -> Registry:
        return cls(cfg.path, keep_last=cfg.keep_last, **kw)

    # ------------------------------------------------------------ locking and crash leftovers

    @contextlib.contextmanager
    def _lock(self, blocking: bool = True) -> Iterator[bool]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the flock (also released by the kernel if we are killed)

    def _sweep(self) -> None:
        """Remove what a killed writer left behind (call with the lock held)."""
        leftovers = [p for p in self.versions_dir.iterdir() if p.name.startswith(_TEMP_PREFIXES)]
        leftovers += [p for p in self.root.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
        for p in leftovers:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            self.cleaned.append(p.name)
        if leftovers:
            _fsync_dir(self.versions_dir)
            log.warning("model registry %s: removed %d leftover(s) of an interrupted write: %s",
                        self.root, len(leftovers), ", ".join(sorted(p.name for p in leftovers)))

    # ------------------------------------------------------------ reading

    def latest(self) -> str | None:
        """The current version's name, or None when nothing has been published."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def resolve(self, version: str) -> str:
        """A version name from a name or "latest"; VersionNotFound if it is neither."""
        if version == LATEST:
            name = self.latest()
            if name is None:
                raise VersionNotFound(f"{self.root}: no version published yet")
            return name
        if not _VERSION.match(version):
            raise VersionNotFound(f"{version!r} is not a version name (like v000012) or 'latest'")
        if not (self.versions_dir / version).is_dir():
            raise VersionNotFound(f"{self.root}: no version {version}")
        return version

    def _names(self) -> list[str]:
        names = [p.name for p in self.versions_dir.iterdir() if _VERSION.match(p.name)]
        return sorted(names, key=lambda n: int(n[1:]))

    def show(self, version: str = LATEST) -> Manifest:
        """The manifest of a version (files present with the right sizes; no hashing)."""
        name = self.resolve(version)
        path = self.versions_dir / name / MANIFEST
        try:
            m = Manifest.from_json(path.read_bytes())
        except FileNotFoundError:
            raise CorruptVersion(f"{path}: missing; version {name} is incomplete") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptVersion(f"{path}: unreadable manifest ({e})") from None
        if m.version != name:
            raise CorruptVersion(f"{path}: manifest names version {m.version!r}, directory is {name}")
        for fname, info in m.files.items():
            if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or "sha256" not in info:
                raise CorruptVersion(f"{path}: bad entry for {fname!r}")
            if not _FILE.match(fname):
                raise CorruptVersion(f"{path}: refusing file {fname!r} (only .safetensors and .json are loaded)")
            p = self.versions_dir / name / fname
            if not p.is_file():
                raise CorruptVersion(f"{p}: missing; version {name} is incomplete")
            if p.stat().st_size != info["bytes"]:
                raise CorruptVersion(f"{p}: {p.stat().st_size} bytes, manifest says {info['bytes']}")
        return m

    def scan(self) -> tuple[list[Manifest], dict[str, str]]:
        """(complete versions oldest first, {incomplete version: why})."""
        good, bad = [], {}
        for name in self._names():
            try:
                good.append(self.show(name))
            except RegistryError as e:
                bad[name] = str(e)
        return good, bad

    def list_versions(self) -> list[Manifest]:
        """Complete versions, oldest first."""
        return self.scan()[0]

    def _read_verified(self, name: str, fname: str, m: Manifest) -> bytes:
        path = self.versions_dir / name / fname
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptVersion(f"{path}: missing; version {name} is incomplete") from None
        want = m.files[fname]
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise CorruptVersion(f"{path}: sha256 does not match the manifest; version {name} is corrupt")
        return data

    def verify(self, version: str = LATEST) -> Manifest:
        """Check every file's sha256 against the manifest; CorruptVersion names the first bad file."""
        m = self.show(version)
        for fname in m.files:
            self._read_verified(m.version, fname, m)
        return m

    def load(self, version: str = LATEST) -> LoadedVersion:
        """Load a version after verifying every checksum (safetensors + JSON only)."""
        for attempt in range(3):
            name = self.resolve(version)
            try:
                return self._load(name)
            except RegistryError:
                # "latest" may have moved and retention removed the old one meanwhile: follow it
                if version != LATEST or self.latest() == name or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _load(self, name: str) -> LoadedVersion:
        m = self.show(name)
        for required in (EMBEDDINGS, IDS, RANKING):
            if required not in m.files:
                raise CorruptVersion(f"{self.versions_dir / name / MANIFEST}: lists no {required}")
        blobs = {f: self._read_verified(name, f, m) for f in m.files}

        def tensors(fname: str) -> dict[str, np.ndarray]:
            try:
                return st_load(blobs[fname])
            except Exception as e:  # safetensors raises its own error types
                raise CorruptVersion(f"{self.versions_dir / name / fname}: not a valid safetensors file ({e})") from None

        emb = tensors(EMBEDDINGS).get("item_embeddings")
        ids = json.loads(blobs[IDS])
        if emb is None or emb.ndim != 2 or len(ids) != emb.shape[0]:
            raise CorruptVersion(f"{self.versions_dir / name}: item_embeddings and item_ids do not match")
        extra = {f.removesuffix(".safetensors"): tensors(f) for f in m.files
                 if f.endswith(".safetensors") and f not in (EMBEDDINGS, RANKING)}
        return LoadedVersion(m, emb, ids, tensors(RANKING), extra)

    def pinned(self) -> list[str]:
        try:
            return list(json.loads((self.root / "pins.json").read_text()))
        except FileNotFoundError:
            return []

    def history(self) -> list[dict[str, Any]]:
        """Audit log entries, oldest first (a torn last line from a crash is skipped)."""
        try:
            lines = (self.root / "history.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    # ------------------------------------------------------------ writing

    def _now(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds")

    def _audit(self, action: str, version: str, **fields: Any) -> None:
        path = self.root / "history.jsonl"
        line = json.dumps({"at": self._now(), "action": action, "version": version, **fields}) + "\n"
        new = not path.exists()
        with open(path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a crash tore the last line: never glue onto it
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        if new:
            _fsync_dir(self.root)

    def _set_latest(self, name: str) -> None:
        _replace_atomic(self.root / LATEST, f"{name}\n".encode())

    def _next_version(self) -> str:
        nums = [int(n[1:]) for n in self._names()]
        return f"v{(max(nums) + 1 if nums else 1):06d}"

    def publish(self, *, item_embeddings: np.ndarray, item_ids: Sequence[str], ranking: Mapping[str, np.ndarray],
                watermark: float | None, offsets: Mapping[str, Mapping[int, int]], metrics: Mapping[str, Any],
                model_config: Any, config_hash: str | None = None, parent: str | None = LATEST,
                extra: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> Manifest:
        """Write a new version and move `latest` to it; returns its manifest.

        `parent`: the version these weights descend from. The default "latest"
        takes whatever is current; an explicit name (or None for "from scratch")
        must equal the current `latest`, otherwise `ParentMismatch`.
        `model_config` may be a dataclass; `config_hash` defaults to `hash_config(model_config)`."""
        if dataclasses.is_dataclass(model_config) and not isinstance(model_config, type):
            model_config = dataclasses.asdict(model_config)
        model_config = finite_json(dict(model_config))  # a mapping or a dataclass instance
        blobs = encode_version(item_embeddings, item_ids, ranking, extra or {})
        emb_shape = np.asarray(item_embeddings).shape
        with self._lock():
            self._sweep()
            current = self.latest()
            if parent == LATEST:
                parent = current
            elif parent != current:
                raise ParentMismatch(f"{self.root}: latest is {current}, not the parent {parent}; "
                                     "reload the latest version before publishing")
            m = Manifest(
                version=self._next_version(), parent=parent, created_at=self._now(),
                watermark=finite_json(watermark),
                offsets={str(t): {int(p): int(o) for p, o in ps.items()} for t, ps in offsets.items()},
                metrics=finite_json(dict(metrics)),
                files={f: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for f, b in blobs.items()},
                config_hash=config_hash or hash_config(model_config), model_config=model_config,
                item_count=int(emb_shape[0]), embedding_dim=int(emb_shape[1]))
            self._write_version(m, blobs)
            self._set_latest(m.version)
            self._hook("latest")
            self._audit("publish", m.version, previous=current)
            self._retain()
        return m

    def _write_version(self, m: Manifest, blobs: Mapping[str, bytes]) -> None:
        tmp = self.versions_dir / f".tmp-{m.version}-{secrets.token_hex(4)}"
        tmp.mkdir()
        for fname, data in blobs.items():
            _write_durable(tmp / fname, data)
            self._hook(f"file:{fname}")
        _write_durable(tmp / MANIFEST, m.to_json().encode())
        self._hook("manifest")
        _fsync_dir(tmp)
        os.rename(tmp, self.versions_dir / m.version)
        _fsync_dir(self.versions_dir)
        self._hook("renamed")

    def rollback(self, to: str, *, reason: str = "") -> str | None:
        """Point `latest` at an existing complete version (checksums verified); returns the previous one."""
        with self._lock():
            name = self.verify(to).version
            previous = self.latest()
            self._set_latest(name)
            self._audit("rollback", name, previous=previous, reason=reason)
        log.info("model registry %s: latest rolled back %s -> %s %s", self.root, previous, name, reason)
        return previous

    def pin(self, version: str) -> str:
        """Protect a complete version from retention."""
        with self._lock():
            name = self.verify(version).version
            pins = sorted(set(self.pinned()) | {name})
            _replace_atomic(self.root / "pins.json", json.dumps(pins).encode())
            self._audit("pin", name)
        return name

    def unpin(self, version: str) -> None:
        with self._lock():
            pins = self.pinned()
            if version not in pins:
                raise VersionNotFound(f"{self.root}: {version} is not pinned (pinned: {', '.join(pins) or 'none'})")
            _replace_atomic(self.root / "pins.json", json.dumps([p for p in pins if p != version]).encode())
            self._audit("unpin", version)

    def _retain(self) -> None:
        """Delete complete versions beyond the newest `keep_last`, except latest and pinned (lock held)."""
        complete = [m.version for m in self.list_versions()]
        keep = set(complete[-self.keep_last:]) | set(self.pinned()) | {self.latest()}
        for name in complete:
            if name in keep:
                continue
            trash = self.versions_dir / f".del-{name}-{secrets.token_hex(4)}"
            os.rename(self.versions_dir / name, trash)  # disappears atomically, then is removed
            _fsync_dir(self.versions_dir)
            shutil.rmtree(trash)
            self._audit("delete", name, reason=f"retention keep_last={self.keep_last}")
