"""Checks an update (or a SecAgg+ aggregate) must pass before it touches the global adapter."""

from __future__ import annotations

import math

import numpy as np

from fedtune.common.config import RunConfig
from fedtune.common.training_modes import training_mode

ADAM_DRIFT_BOUND = 3.0  # per step, an AdamW update moves a coordinate by about lr at most; 3x margin


def coordinate_bound(*, config: RunConfig, max_client_examples: int) -> float:
    """How far one round of local training can move any single coordinate: AdamW (no weight decay)
    moves one by about lr a step; a probe round's SGD by at most lr x max-grad-norm a step plus
    noise averaged over every record (full batch), which the same margin covers."""
    steps = config.local_epochs * math.ceil(max_client_examples / config.batch_size)
    adapter = ADAM_DRIFT_BOUND * max(config.learning_rate, config.head_learning_rate) * steps
    probe = ADAM_DRIFT_BOUND * config.probe_learning_rate * max(config.max_grad_norm, 1.0) * config.probe_steps
    mode = training_mode(config.training_mode)
    return max(adapter if mode.has_adapter_stage else 0.0, probe if mode.has_probe_stage else 0.0)


def update_norm_bound(*, config: RunConfig, max_client_examples: int, num_parameters: int) -> float:
    """`max-update-norm`, or every coordinate at its bound: a norm no honest update can exceed."""
    if config.max_update_norm:
        return config.max_update_norm
    return coordinate_bound(config=config, max_client_examples=max_client_examples) * math.sqrt(num_parameters)


def update_problem(arrays: list[np.ndarray], *, shapes: list[tuple[int, ...]], max_norm: float) -> str | None:
    """Why `arrays` must not be applied, or None when it may: wrong tensors, NaN/Inf, too large."""
    if len(arrays) != len(shapes):
        return f"has {len(arrays)} tensors, the adapter has {len(shapes)}"
    for index, (array, shape) in enumerate(zip(arrays, shapes)):
        if tuple(array.shape) != tuple(shape):
            return f"has tensor {index} of shape {tuple(array.shape)}, expected {tuple(shape)}"
    if not all(np.isfinite(a).all() for a in arrays):
        return "contains NaN or Inf"
    norm = math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays))
    if norm > max_norm:
        return f"has L2 norm {norm:.4g}, above the bound {max_norm:.4g} (max-update-norm)"
    return None
