"""Durable file writes: fsync the data, rename atomically, fsync the directory.

Shared by the model registry and the rollout state, so that a crash leaves either
the old file or the new one, never a torn one.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temp name beside `path`, fsync, rename over `path`, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)
