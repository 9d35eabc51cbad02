"""The data of a run: every party recomputes the same test split and client partitions from the
run config (the seed fixes them), cached per process."""

from __future__ import annotations

import functools

from fedtune.common.config import RunConfig
from fedtune.common.data.splits import FederatedSplits, make_federated_splits
from fedtune.common.tasks import get_task


@functools.lru_cache(maxsize=4)
def _cached_splits(task: str, data: str, columns: tuple[str, str], model: str, max_length: int, num_clients: int,
                   partitioner: str, dirichlet_alpha: float, test_fraction: float, validation_fraction: float,
                   seed: int, stop_validation_fraction: float) -> FederatedSplits:
    examples = get_task(task).load_examples(data=data, columns=columns, model=model, max_length=max_length)
    return make_federated_splits(examples=examples, num_clients=num_clients, partitioner=partitioner,
                                 dirichlet_alpha=dirichlet_alpha, test_fraction=test_fraction,
                                 validation_fraction=validation_fraction, seed=seed,
                                 stop_validation_fraction=stop_validation_fraction)


def federated_splits(config: RunConfig) -> FederatedSplits:
    """The splits a run uses; every party recomputes the same ones from the config (cached)."""
    return _cached_splits(config.task, config.data, get_task(config.task).data_columns(config), config.model,
                          config.max_length, config.num_clients, config.partitioner, config.dirichlet_alpha,
                          config.test_fraction, config.validation_fraction, config.seed,
                          config.stop_validation_fraction if config.early_stopping_patience else 0.0)
