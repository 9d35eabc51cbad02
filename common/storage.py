"""How fedtune puts bytes on disk: every file it replaces goes through `atomic_write`.

A crash leaves the old file or the new one, never half: the bytes go to a temporary file in the
same directory, are fsynced, renamed over the target, and the directory is fsynced so the
rename itself survives a power cut. Appends (ledgers, metrics.jsonl) are fsynced before they
return. JSON has no NaN or infinity: `json_safe` stores them as null.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644, exclusive: bool = False) -> None:
    """Replace `path` with `data` atomically; the file has `mode` from its first byte.

    With `exclusive`, refuse (FileExistsError) when `path` already exists instead of replacing
    it: a signing key must never be overwritten by a second process creating it at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    descriptor, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if `path` exists, unlike a rename
            tmp.unlink()
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync: on disk before this returns."""
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Make a rename in `path` durable before anything written after it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_npz(path: Path, *, meta: dict, arrays: list[np.ndarray]) -> None:
    """A JSON header plus a list of arrays in one .npz file, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             **{f"a{i}": a for i, a in enumerate(arrays)})
    atomic_write(path, buffer.getvalue())


def load_npz(path: Path) -> tuple[dict, list[np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        arrays = [data[f"a{i}"] for i in range(len(data.files) - 1)]
    return meta, arrays


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None, at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
