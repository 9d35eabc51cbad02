"""The tasks fedtune trains, by config name; each is one module implementing `Task` (base.py).

Adding a task is one new module with a module-level `TASK` and one line in `TASK_MODULES`.
A task module is imported on first use: it loads torch and transformers, which the config,
`fedtune audit` and `fedtune --help` never need.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from fedtune.common.errors import FedtuneError
from fedtune.common.tasks.base import Task

TASK_MODULES = {
    "classification": "fedtune.common.tasks.classification",
    "causal-lm": "fedtune.common.tasks.causal_lm",
}
TASK_NAMES = tuple(TASK_MODULES)


@functools.cache
def get_task(name: str) -> Task:
    if name not in TASK_MODULES:
        raise FedtuneError(f"unknown task '{name}'; one of {', '.join(TASK_NAMES)}")
    return importlib.import_module(TASK_MODULES[name]).TASK


def resolve_model_path(model: str, *, task: str = "classification") -> Path:
    """The model folder a run uses: 'default' is the task's packaged model."""
    return get_task(task).model_path(model)


def build_lora_model(*, task: str, model_path: Path, num_labels: int, lora, seed: int, head=None, profile=None,
                     resident: bool = False):
    """The run's model for `task`: the frozen base with LoRA (and a head where the task has one)."""
    return get_task(task).build_model(model_path=model_path, num_labels=num_labels, lora=lora, seed=seed, head=head,
                                      profile=profile, resident=resident)
