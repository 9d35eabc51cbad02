"""Deterministic test split and partitioning of the rest across clients (flwr-datasets)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.common.data.instructions import InstructionPairs, InstructionSplit
from fedtune.common.data.labelled import LabelledTexts, Split, rare_label_problem
from fedtune.common.errors import FedtuneError


Examples = LabelledTexts | InstructionPairs  # categories stand in for labels in the second
Part = Split | InstructionSplit


@dataclass(frozen=True)
class ClientSplit:
    """One institution's private data: it trains on `train` and reports on `validation`."""

    train: Part
    validation: Part


@dataclass(frozen=True)
class FederatedSplits:
    label_names: list[str]
    test: Part
    clients: list[ClientSplit]
    report: str
    validation: Part | None = None  # the coordinator's, for early stopping (None when it is off)

    @property
    def max_client_examples(self) -> int:
        return max(len(c.train) for c in self.clients)


def make_federated_splits(*, examples: Examples, num_clients: int, partitioner: str,
                          dirichlet_alpha: float, test_fraction: float, validation_fraction: float,
                          seed: int, stop_validation_fraction: float = 0.0) -> FederatedSplits:
    """Hold out a test split for the server, partition the rest, split each part train/val.

    With `stop_validation_fraction` the coordinator also holds out that share of all records,
    after the test split and before the partition, to decide early stopping on; at 0 the splits
    are exactly what they were without it."""
    n = len(examples)
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    n_stop = max(1, round(n * stop_validation_fraction)) if stop_validation_fraction > 0 else 0
    if n - n_test - n_stop < num_clients:
        raise FedtuneError(f"{n} examples ({n - n_test - n_stop} after holding out the coordinator's splits) cannot be "
                           f"spread over {num_clients} clients; lower num-clients or add data")
    problem = rare_label_problem(examples, test_fraction=test_fraction) if isinstance(examples, LabelledTexts) \
        else None
    if problem:  # label names go to every party: a class of one record would name that record's class
        raise FedtuneError(problem)
    test = examples.take(order[:n_test])
    validation = examples.take(order[n_test:n_test + n_stop]) if n_stop else None
    pool = order[n_test + n_stop:]
    parts = _partition(labels=[examples.labels[i] for i in pool], num_clients=num_clients,
                       partitioner=partitioner, alpha=dirichlet_alpha, seed=seed)
    clients = []
    for cid, local in enumerate(parts):
        local_order = np.random.default_rng([seed, cid]).permutation(pool[local])
        n_val = int(len(local_order) * validation_fraction)
        if len(local_order) - n_val < 1:
            raise FedtuneError(f"client {cid} got {len(local_order)} examples, too few to train; "
                               f"lower num-clients or validation-fraction")
        clients.append(ClientSplit(train=examples.take(local_order[n_val:]),
                                   validation=examples.take(local_order[:n_val])))
    sizes = ", ".join(str(len(c.train)) for c in clients)
    report = (f"{examples.cleaning_report()}. Test split: {len(test)}; "
              f"{f'coordinator validation split: {n_stop}; ' if n_stop else ''}"
              f"{partitioner} partition, train examples per client: {sizes}")
    return FederatedSplits(label_names=examples.label_names, test=test, clients=clients, report=report,
                           validation=validation)


def _partition(*, labels: list[int], num_clients: int, partitioner: str, alpha: float,
               seed: int) -> list[np.ndarray]:
    """Indices into `labels` for each client, using Flower Datasets' partitioners."""
    if partitioner == "category":
        return _by_category(labels=labels, num_clients=num_clients)
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


def _by_category(*, labels: list[int], num_clients: int) -> list[np.ndarray]:
    """Whole categories (labels) per client: the natural non-IID split of a corpus whose parts
    come from different places. Largest category first, each to the client with the fewest
    examples so far, so sizes stay as even as whole categories allow."""
    values = np.asarray(labels)
    categories, counts = np.unique(values, return_counts=True)
    if len(categories) < num_clients:
        raise FedtuneError(f"the category partitioner needs at least one category per client: "
                           f"{len(categories)} categor{'y' if len(categories) == 1 else 'ies'} for "
                           f"{num_clients} clients; lower num-clients, use partitioner = \"iid\", or give "
                           f"the data a 'category' column (causal-lm)")
    owned: list[list[int]] = [[] for _ in range(num_clients)]
    sizes = [0] * num_clients
    for category, count in sorted(zip(categories.tolist(), counts.tolist()), key=lambda cc: (-cc[1], cc[0])):
        client = min(range(num_clients), key=lambda c: (sizes[c], c))
        owned[client].append(category)
        sizes[client] += count
    return [np.flatnonzero(np.isin(values, cats)) for cats in owned]
