"""Pooled features: each record's (feature vector, label) through a PooledClassifier's encoder,
computed once per node and kept on disk.

A probe round trains the head alone: its features depend only on the frozen base, the encoder's
LoRA, the pooling, the precision and the node's tokenized data. A Ray simulation moves a client
to another actor each round, so a per-process cache alone recomputes them every round; the file
`cache_dir/<key>.safetensors` lets any process of the node read them back. The key is a sha256
over everything the vectors depend on (`feature_key`): any change is another file, never a stale
hit. The files are derived from private records, so they are owner-only (0o600 in a 0o700
folder), safetensors (no pickle), written atomically, and only the newest few are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save as save_tensors
from torch.utils.data import DataLoader, TensorDataset

from fedtune.common.models.adapter import adapter_sha256
from fedtune.common.models.base_reference import WEIGHT_SUFFIXES, weights_sha256
from fedtune.common.storage import atomic_write

LOG = logging.getLogger("fedtune.models")
FORMAT = "fedtune-pooled-features-1"  # bump when `pooled_features` computes anything differently
SUFFIX = ".safetensors"
MEMORY_ENTRIES = 4  # per process: a node's train split, the coordinator's test split, and spares
FEATURES_DIR = "features"  # beside a node's ledger, in a coordinator's run directory: owner-only
DISK_ENTRIES = 8  # per folder: older files (another run's LoRA, an older data file) are removed
_memory: dict[str, TensorDataset] = {}
_base_digests: dict[tuple, str] = {}  # (folder, weight files' names, sizes, mtimes) -> sha256


def encoder_fingerprint(model) -> str:
    """Changes when anything the features depend on does: every LoRA matrix of the encoder."""
    return adapter_sha256([p.detach().cpu().numpy() for name, p in model.named_parameters() if ".lora_" in name])


@torch.no_grad()
def pooled_features(model, dataset: TensorDataset, *, batch_size: int = 64) -> TensorDataset:
    """(feature vector, label) for each record of a tokenized dataset, through the model's encoder.

    Runs on the encoder's device; the vectors come back float32 on the CPU whatever the encoder's
    precision (the head trains in fp32)."""
    classifier = model.get_base_model()
    device = next(classifier.encoder.parameters()).device
    was_training = classifier.training
    classifier.eval()
    vectors, labels = [], []
    try:
        for input_ids, attention_mask, label in DataLoader(dataset, batch_size=batch_size):
            pooled = classifier.pooled(input_ids.to(device), attention_mask.to(device))
            vectors.append(pooled.float().detach().cpu())
            labels.append(label.detach().cpu())
    finally:
        classifier.train(was_training)
    if not vectors:
        return TensorDataset(torch.zeros((0, classifier.config.hidden_size)), torch.zeros((0,), dtype=torch.long))
    return TensorDataset(torch.cat(vectors), torch.cat(labels))


def base_sha256(model_path: Path) -> str:
    """One digest of a model folder's weight files, hashed once per process: memoized by the files'
    names, sizes and mtimes, so a replaced base is hashed (and missed) again."""
    folder = Path(model_path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) \
        if folder.is_dir() else []
    version = (str(folder.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if version not in _base_digests:
        digests = weights_sha256(folder)
        _base_digests[version] = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest() \
            if digests else ""
    return _base_digests[version]


def _base_digest(encoder) -> str:
    """The base's weights: the folder the encoder was loaded from (its config's `_name_or_path`);
    where that holds no weight files (a model built in memory), the frozen parameters themselves."""
    folder = getattr(encoder.config, "_name_or_path", "")
    digest = base_sha256(Path(folder)) if folder else ""
    if digest:
        return "files:" + digest
    frozen = [p.detach().cpu().float().numpy() for name, p in encoder.named_parameters() if ".lora_" not in name]
    return "parameters:" + adapter_sha256(frozen)


def _encoder_config(encoder) -> str:
    """The architecture the weights run in (activation, norm epsilon...): a changed config.json
    with the same weights computes other features."""
    config = encoder.config.to_dict()
    for where in ("_name_or_path", "dtype", "torch_dtype", "transformers_version"):  # no bearing, or keyed apart
        config.pop(where, None)
    return json.dumps(config, sort_keys=True, default=str)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    return f"{tensor.dtype}{tuple(tensor.shape)}".encode() + tensor.numpy().tobytes()


def feature_key(*, model, dataset: TensorDataset) -> str:
    """sha256 over what the features depend on: the base's weight files and config, the dataset's tensors
    (input ids, attention mask, labels: data file, max length, tokenizer and label order), the
    pooling, the encoder's parameter dtypes, and its LoRA (every matrix, and each layer's scaling)."""
    classifier = model.get_base_model()
    encoder = classifier.encoder
    lora_scaling = sorted((name, json.dumps(module.scaling, sort_keys=True)) for name, module in model.named_modules()
                          if isinstance(getattr(module, "scaling", None), dict))
    lora_shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters() if ".lora_" in name]
    parts = [("format", FORMAT.encode()), ("base", _base_digest(encoder).encode()),
             *((name, _tensor_bytes(t)) for name, t in zip(("input_ids", "attention_mask", "labels"), dataset.tensors)),
             ("config", _encoder_config(encoder).encode()),
             ("pooling", str(classifier.pooling).encode()),
             ("dtypes", ",".join(sorted({str(p.dtype) for p in encoder.parameters()})).encode()),
             ("lora", encoder_fingerprint(model).encode()),
             ("lora_layout", repr((lora_shapes, lora_scaling)).encode())]
    digest = hashlib.sha256()
    for name, data in parts:  # each part framed by its name and length: no two keys run together
        digest.update(f"{name}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def cached_pooled_features(*, model, dataset: TensorDataset, cache_dir: Path | None) -> TensorDataset:
    """`pooled_features`, computed once: from this process's memory, else `cache_dir/<key>.safetensors`
    (any process of the node), else computed and written there. `cache_dir` None: memory only."""
    key = feature_key(model=model, dataset=dataset)
    if key in _memory:
        return _memory[key]
    width = model.get_base_model().config.hidden_size
    path = Path(cache_dir) / f"{key}{SUFFIX}" if cache_dir is not None else None
    features = _read(path, dataset=dataset, width=width) if path is not None else None
    if features is None:
        features = pooled_features(model, dataset)
        LOG.info("computed pooled features of %d records (%s)", len(features),
                 f"cached as {path.name}" if path is not None else "kept in memory only")
        if path is not None:
            _write(path, features=features, key=key)
    if len(_memory) >= MEMORY_ENTRIES:
        _memory.pop(next(iter(_memory)))
    _memory[key] = features
    return features


def clear_memory() -> None:
    """Forget this process's features (the files stay): the next call reads them from disk."""
    _memory.clear()


def _read(path: Path, *, dataset: TensorDataset, width: int) -> TensorDataset | None:
    """The features in `path`, or None when there are none; a file that cannot be read or does not
    fit the dataset is recomputed (and rewritten), with a warning: a cache is never an error."""
    if not path.is_file():
        return None
    try:
        tensors = load_tensors(path.read_bytes())
        features, labels = tensors["features"], tensors["labels"]
        labels_match = labels.shape == dataset.tensors[2].shape and torch.equal(labels, dataset.tensors[2].cpu())
        if features.dtype != torch.float32 or tuple(features.shape) != (len(dataset), width) or not labels_match:
            raise ValueError(f"features {tuple(features.shape)} {features.dtype} do not fit {len(dataset)} records")
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as exc:
        LOG.warning("pooled features %s are unreadable (%s: %s); computing them again", path.name,
                    type(exc).__name__, exc)
        return None
    _touch(path)
    LOG.info("read pooled features of %d records from %s", len(features), path.name)
    return TensorDataset(features, labels)


def _write(path: Path, *, features: TensorDataset, key: str) -> None:
    """Owner-only and atomic; a folder that cannot be written costs a recomputation later, not the round."""
    vectors, labels = features.tensors
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        atomic_write(path, save_tensors({"features": vectors.contiguous(), "labels": labels.contiguous()},
                                        metadata={"key": key, "format": FORMAT}), mode=0o600)
        _prune(path.parent, keep=DISK_ENTRIES)
    except OSError as exc:
        LOG.warning("could not cache pooled features in %s (%s: %s)", path.parent, type(exc).__name__, exc)


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # the newest files are kept: one just read counts as new
    except OSError:
        pass


def _prune(folder: Path, *, keep: int) -> None:
    """Remove all but the `keep` most recently written or read feature files."""
    files = sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for stale in files[keep:]:
        stale.unlink(missing_ok=True)
