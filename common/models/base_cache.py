"""The base model, loaded from disk once per process and copied for each round.

A long-lived process (a node runtime across a run's rounds, a simulation actor across clients)
would otherwise re-read and re-initialise the same weights every message. The copy is exact: the
caller draws its random initialisation (head, LoRA A) under a seeded RNG, and a cache hit leaves
the RNG where the load would have left it, so a cached build equals a fresh one bit for bit.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable, Hashable

import torch

LOG = logging.getLogger("fedtune.models")
_cached: dict[Hashable, tuple[torch.nn.Module, torch.Tensor]] = {}
loads = 0  # how many times this process read a base model from disk (logged; the runtime reports it)


def _files_version(model_path: Path) -> tuple:
    """Changes when the folder's files do, so an edited model is read again."""
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                        for p in Path(model_path).iterdir() if p.is_file()))


def base_model(*, model_path: Path, key: Hashable, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A private copy of the base `load()` returns, read from disk only on the first call for `key`.
    Call it inside `torch.random.fork_rng` after seeding, exactly where `load()` would run."""
    global loads
    full_key = (str(model_path), _files_version(model_path), key)
    hit = _cached.get(full_key)
    if hit is None:
        model = load()
        _cached.clear()  # one base per process: a node serves one federation's model
        _cached[full_key] = (model, torch.get_rng_state())
        loads += 1
        LOG.info("loaded base model %s from disk (load %d in this process)", Path(model_path).name, loads)
        return copy.deepcopy(model)
    model, rng_after_load = hit
    torch.set_rng_state(rng_after_load)
    return copy.deepcopy(model)
