"""Deterministic test split and partitioning of the rest across clients (flwr-datasets)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from common.config import RunConfig
from common.data import LabelledTexts, load_labelled_texts
from common.errors import FedtuneError


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class ClientSplit:
    """One institution's private data: it trains on `train` and reports on `validation`."""

    train: Split
    validation: Split


@dataclass(frozen=True)
class FederatedSplits:
    label_names: list[str]
    test: Split
    clients: list[ClientSplit]
    report: str

    @property
    def max_client_examples(self) -> int:
        return max(len(c.train) for c in self.clients)


def make_federated_splits(*, examples: LabelledTexts, num_clients: int, partitioner: str,
                          dirichlet_alpha: float, test_fraction: float, validation_fraction: float,
                          seed: int) -> FederatedSplits:
    """Hold out a test split for the server, partition the rest, split each part train/val."""
    n = len(examples)
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    if n - n_test < num_clients:
        raise FedtuneError(f"{n} examples ({n - n_test} after holding out the test split) cannot be "
                           f"spread over {num_clients} clients; lower num-clients or add data")
    test = _take(examples, order[:n_test])
    pool = order[n_test:]
    parts = _partition(labels=[examples.labels[i] for i in pool], num_clients=num_clients,
                       partitioner=partitioner, alpha=dirichlet_alpha, seed=seed)
    clients = []
    for cid, local in enumerate(parts):
        local_order = np.random.default_rng([seed, cid]).permutation(pool[local])
        n_val = int(len(local_order) * validation_fraction)
        if len(local_order) - n_val < 1:
            raise FedtuneError(f"client {cid} got {len(local_order)} examples, too few to train; "
                               f"lower num-clients or validation-fraction")
        clients.append(ClientSplit(train=_take(examples, local_order[n_val:]),
                                   validation=_take(examples, local_order[:n_val])))
    sizes = ", ".join(str(len(c.train)) for c in clients)
    report = (f"{examples.cleaning_report()}. Test split: {len(test)}; "
              f"{partitioner} partition, train examples per client: {sizes}")
    return FederatedSplits(label_names=examples.label_names, test=test, clients=clients, report=report)


def _take(examples: LabelledTexts, idx: np.ndarray) -> Split:
    return Split(texts=[examples.texts[i] for i in idx], labels=[examples.labels[i] for i in idx])


def _partition(*, labels: list[int], num_clients: int, partitioner: str, alpha: float,
               seed: int) -> list[np.ndarray]:
    """Indices into `labels` for each client, using Flower Datasets' partitioners."""
    import datasets  # heavy import, only needed here
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    table = datasets.Dataset.from_dict({"row": list(range(len(labels))), "label": labels})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_clients)
    else:
        part = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha,
                                    min_partition_size=2, self_balancing=False, seed=seed)
    part.dataset = table
    try:
        return [np.asarray(part.load_partition(i)["row"], dtype=np.int64) for i in range(num_clients)]
    except ValueError as exc:
        raise FedtuneError(f"cannot make a {partitioner} partition over {num_clients} clients from "
                           f"{len(labels)} examples: {exc}. Raise dirichlet-alpha or lower num-clients") from None


@functools.lru_cache(maxsize=4)
def _cached_splits(data: str, text_column: str, label_column: str, num_clients: int, partitioner: str,
                   dirichlet_alpha: float, test_fraction: float, validation_fraction: float,
                   seed: int) -> FederatedSplits:
    examples = load_labelled_texts(data=data, text_column=text_column, label_column=label_column)
    return make_federated_splits(examples=examples, num_clients=num_clients, partitioner=partitioner,
                                 dirichlet_alpha=dirichlet_alpha, test_fraction=test_fraction,
                                 validation_fraction=validation_fraction, seed=seed)


def federated_splits(config: RunConfig) -> FederatedSplits:
    """The splits a run uses; every party recomputes the same ones from the config (cached)."""
    return _cached_splits(config.data, config.text_column, config.label_column, config.num_clients,
                          config.partitioner, config.dirichlet_alpha, config.test_fraction,
                          config.validation_fraction, config.seed)
