"""The one atomic write every file fedtune replaces goes through."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedtune.common.storage import atomic_write, json_safe, load_npz, save_npz


def test_atomic_write_replaces_whole_files_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    atomic_write(target, "first")
    atomic_write(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_modes_follow_the_umask_unless_given_and_a_private_file_is_never_overwritten(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "plain", "x")
        atomic_write(tmp_path / "public.pem", "p", mode=0o644)
        atomic_write(tmp_path / "ledger.key", b"k1", mode=0o600, exclusive=True)
        with pytest.raises(FileExistsError):
            atomic_write(tmp_path / "ledger.key", b"k2", mode=0o600, exclusive=True)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == {"plain": "0o600", "public.pem": "0o644", "ledger.key": "0o600"}
    assert (tmp_path / "ledger.key").read_bytes() == b"k1"


def test_npz_round_trip_and_json_without_nan(tmp_path):
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.int64)]
    save_npz(tmp_path / "c.npz", meta={"round": 2}, arrays=arrays)
    meta, loaded = load_npz(tmp_path / "c.npz")
    assert meta == {"round": 2} and all(np.array_equal(a, b) for a, b in zip(arrays, loaded))
    assert json_safe({"a": [float("nan"), 1.0, float("inf")], "b": (2, float("-inf"))}) == \
        {"a": [None, 1.0, None], "b": [2, None]}
