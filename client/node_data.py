"""Where an institution's records come from: a share of one corpus (simulation) or its own file
(deployment, named in the SuperNode's node config, never by the coordinator)."""

from __future__ import annotations

import difflib
import functools
import json
import math
from dataclasses import dataclass

from pathlib import Path

import numpy as np

from fedtune.common.config import RunConfig
from fedtune.common.data.splits import ClientSplit
from fedtune.common.errors import FedtuneError
from fedtune.common.execution import PROFILE_KEYS
from fedtune.common.privacy.policy import POLICY_KEYS
from fedtune.common.protocol import EvaluateInstructions, FitInstructions
from fedtune.common.run_data import federated_splits
from fedtune.common.values import coerce
from fedtune.common.tasks import get_task

# Node config keys that say where this institution's data and model are and how to read them;
# in deployment the coordinator's run config never names a file the node opens.
NODE_DATA_KEYS = ("data", "text-column", "label-column", "prompt-column", "response-column", "model",
                  "validation-fraction", "split-seed", "label-set", "task", "max-length")
# Flower's simulation engine sets partition-id and num-partitions itself.
# operator-key and app-sha256 are the node runtime's pins (common/trust/gate.py).
# PROFILE_KEYS: the node's hardware (device, base-dtype, threads, physical-batch-size).
NODE_KEYS = (*NODE_DATA_KEYS, *POLICY_KEYS, *PROFILE_KEYS, "client-id", "ledger-dir", "roster", "partition-id",
             "num-partitions", "operator-key", "app-sha256")


def check_node_keys(node: dict) -> None:
    """A misspelt key must not pass silently: `target_epsilon=1` ignored would mean the
    coordinator's budget applies."""
    for key in node:
        if key not in NODE_KEYS:
            hint = difflib.get_close_matches(key.replace("_", "-"), NODE_KEYS, n=1)
            raise FedtuneError(f"unknown node config key '{key}'." + (f" Did you mean '{hint[0]}'?" if hint else
                                                                        f" Known keys: {', '.join(NODE_KEYS)}"))


@dataclass(frozen=True)
class NodeData:
    client_id: str
    partition_id: int | None = None  # simulation: this share of the run's corpus
    path: str | None = None  # deployment: the institution's own CSV/JSONL/Parquet file
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    model: str = "default"  # deployment: the node's own copy of the agreed base model
    validation_fraction: float = 0.1  # deployment: the node's validation share, chosen by the node
    split_seed: int = 0  # deployment: which records are validation, chosen by the node
    label_names: tuple[str, ...] | None = None  # deployment: the federation's label set, pinned by the node
    task: str | None = None  # pinned: a job for another task is refused before the file is read
    max_length: int | None = None  # pinned: the job cannot vary which records fit (a count oracle)

    @classmethod
    def from_node_config(cls, node: dict) -> NodeData:
        check_node_keys(node)
        if "data" in node:
            client_id = str(node.get("client-id") or (f"client-{node['partition-id']}" if "partition-id" in node
                                                      else ""))
            if not client_id:
                raise FedtuneError("node config needs 'client-id' (this institution's name in ledgers and "
                                   "metrics), e.g. client-id='hospital-a'")
            return cls(client_id=client_id, path=str(node["data"]),
                       text_column=str(node.get("text-column", "text")),
                       label_column=str(node.get("label-column", "label")),
                       prompt_column=str(node.get("prompt-column", "prompt")),
                       response_column=str(node.get("response-column", "response")),
                       model=str(node.get("model", "default")),
                       validation_fraction=_node_number(node, "validation-fraction", float, 0.1, low=0.0, high=1.0),
                       split_seed=_node_number(node, "split-seed", int, 0, low=-math.inf),
                       label_names=_label_list(node["label-set"]) if "label-set" in node else None,
                       task=str(node["task"]) if "task" in node else None,
                       max_length=_node_number(node, "max-length", int, None, low=1) if "max-length" in node
                       else None)
        if "partition-id" in node:
            return cls(client_id=f"client-{int(node['partition-id'])}", partition_id=int(node["partition-id"]))
        raise FedtuneError("node config needs 'data' (this institution's CSV, JSONL or Parquet file, e.g. "
                           "data='/srv/records.csv') or, in a simulation, 'partition-id'")


def _node_number(node: dict, key: str, kind: type, default, *, low: float, high: float = math.inf):
    """A numeric node config key in [low, high), or an error that names it (and not its value)."""
    value = coerce(key, node.get(key, default), kind, source="node config key", quote=False)
    if not low <= value < high:
        raise FedtuneError(f"node config key '{key}' must lie in [{low:g}, {high:g})")
    return value


def _label_list(value) -> tuple[str, ...]:
    """A node's pinned label names: a JSON list of strings, as the coordinator sends them."""
    try:
        names = json.loads(str(value))
    except ValueError:
        names = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FedtuneError("node config key 'label-set' must be a JSON list of strings, e.g. "
                           "label-set='[\"negative\", \"positive\"]'")
    return tuple(names)


def pin_refusal(node: NodeData, *, job: RunConfig, sent: tuple[str, ...] | None) -> str | None:
    """What the node pinned must be what the job asks, or the request could probe its file:
    a label list (which labels it holds), a task (which columns it has) or a max-length (how
    many records fit it)."""
    reasons = []
    if node.label_names is not None and sent is not None and tuple(sent) != node.label_names:
        reasons.append("the job's label-names differ from the label set this node pinned (node config label-set)")
    if node.task is not None and job.task != node.task:
        reasons.append(f"task={job.task} asked, this node takes only task={node.task}")
    if node.max_length is not None and job.max_length != node.max_length:
        reasons.append(f"max-length={job.max_length} asked, this node takes only max-length={node.max_length}")
    return "; ".join(reasons) or None


def label_names_from(instructions: FitInstructions | EvaluateInstructions, config: RunConfig,
                     node: NodeData) -> tuple[str, ...]:
    """The federation's label names in order, as the coordinator sends them (a node's own file
    may lack some). Only a simulation derives them from the shared corpus: a real node never
    opens a file the coordinator names."""
    if instructions.label_names is not None:
        return instructions.label_names
    if node.label_names is not None:
        return node.label_names
    if node.path is not None:
        raise FedtuneError("the coordinator sent no label-names; this node reads no file the coordinator names, "
                           "so it cannot derive them. Nothing was read, trained or spent.")
    return tuple(federated_splits(config).label_names)


def model_of(config: RunConfig, node: NodeData) -> str:
    """The base model a node loads: in deployment its own copy (node config), never the job's path."""
    return node.model if node.path is not None else config.model


def data_version(node: NodeData) -> tuple | None:
    """Changes when the node's file does: a long-lived node reads an edited file again."""
    if node.path is None:
        return None
    try:
        stat = Path(node.path).stat()
    except OSError:
        return None  # the read itself says what is wrong
    return stat.st_mtime_ns, stat.st_size


def client_split(config: RunConfig, node: NodeData, label_names: tuple[str, ...]) -> ClientSplit:
    """This institution's train/validation split, labels indexed by the federation's names."""
    return _client_split(config, node, label_names, data_version(node))


@functools.lru_cache(maxsize=8)
def _client_split(config: RunConfig, node: NodeData, label_names: tuple[str, ...], version) -> ClientSplit:
    if node.path is None:
        return federated_splits(config).clients[node.partition_id]
    task = get_task(config.task)
    examples = task.load_examples(data=node.path, columns=task.data_columns(node), model=model_of(config, node),
                                  max_length=config.max_length)
    examples = task.align_labels(examples, label_names=label_names, source="this node's data file")
    order = np.random.default_rng([node.split_seed, 7]).permutation(len(examples))
    n_val = int(len(order) * node.validation_fraction)
    if len(order) - n_val < 1:
        raise FedtuneError(f"this node's data file has {len(order)} usable examples, too few to train")
    return ClientSplit(train=examples.take(order[n_val:]), validation=examples.take(order[:n_val]))
