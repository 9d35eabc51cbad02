"""A JSON header plus a list of arrays in one .npz file, replaced atomically (tmp, fsync, rename,
fsync of the directory): what a crash leaves is the old file or the new one, never half."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def save_npz(path: Path, *, meta: dict, arrays: list[np.ndarray]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        np.savez(handle, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 **{f"a{i}": a for i, a in enumerate(arrays)})
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def load_npz(path: Path) -> tuple[dict, list[np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        arrays = [data[f"a{i}"] for i in range(len(data.files) - 1)]
    return meta, arrays


def fsync_directory(path: Path) -> None:
    """Make a rename in `path` durable before anything written after it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
