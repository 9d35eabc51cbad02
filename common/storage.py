"""How fedtune puts bytes on disk: every file it replaces goes through `atomic_write`.

A crash leaves the old file or the new one, never half: the bytes go to a temporary file in the
same directory, are fsynced, renamed over the target, and the directory is fsynced so the
rename itself survives a power cut. Appends (ledgers, metrics.jsonl) are fsynced before they
return. JSON has no NaN or infinity: `json_safe` stores them as null.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, data: bytes | str, *, mode: int | None = None, exclusive: bool = False) -> None:
    """Replace `path` with `data` atomically.

    `mode` None creates the file as `open` would (0o666 less the umask); a given `mode` is the
    file's mode from its first byte (a private key is never readable by others, even briefly).
    With `exclusive`, refuse (FileExistsError) when `path` already exists instead of replacing
    it: a signing key must never be overwritten by a second process creating it at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(descriptor, mode)  # exactly `mode`, whatever the umask
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def _link_exclusive(tmp: Path, path: Path) -> None:
    """Give `tmp`'s content the name `path` unless `path` exists (a hard link, unlike a rename,
    refuses to replace); where the file system has no hard links, an exclusive create instead."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # e.g. a file system without hard links
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, os.stat(tmp).st_mode & 0o777)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(tmp.read_bytes())
            handle.flush()
            os.fsync(handle.fileno())


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


def file_sha256(path: Path) -> str:
    """SHA-256 of one file, read in 1 MiB pieces (a base model's weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory`, by path relative to it (what a saved artifact is)."""
    directory = Path(directory)
    return {str(path.relative_to(directory)): file_sha256(path)
            for path in sorted(directory.rglob("*")) if path.is_file()}
