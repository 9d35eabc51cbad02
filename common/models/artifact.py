"""The files beside the adapter weights that make its folder a self-describing Hugging Face artifact.

- config.json (classifiers): the base's config with the federation's label names, so
  `AutoConfig.from_pretrained(adapter_dir).id2label` names what each output index predicts.
- adapter_config.json: `base_model_name_or_path` rewritten to a portable name, never the folder a
  run happened to load from; base_model.json beside it holds the base's weight hashes.
- tokenizer_config.json: `model_max_length` set to the run's max-length, so the saved tokenizer
  truncates as training and evaluation did.
- every file one mode (`share_files`): the adapter is what the user takes home, not a secret.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Sequence

from fedtune.common.errors import FedtuneError
from fedtune.common.models.base_reference import BaseModelReference
from fedtune.common.storage import atomic_write

ADAPTER_CONFIG_FILE = "adapter_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def is_sequence_classifier(model) -> bool:
    """A PEFT model with a label head: Hugging Face's (SEQ_CLS) or fedtune's PooledClassifier."""
    configs = getattr(model, "peft_config", {})
    return is_pooled_classifier(model) or any(str(getattr(c, "task_type", "")) == "SEQ_CLS"
                                              for c in configs.values())


def is_pooled_classifier(model) -> bool:
    """fedtune's PooledClassifier under PEFT (common/models/pooled_classifier.py, which builds on
    this module's neighbours and so cannot be imported here)."""
    base = getattr(model, "get_base_model", lambda: None)()
    return getattr(base, "pooling", None) is not None and hasattr(base, "pooled")


def save_label_config(*, model, out_dir: Path, label_names: Sequence[str]) -> None:
    """config.json: the base's config, its head's outputs named by `label_names` (in head order)."""
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    if is_pooled_classifier(model):  # the encoder's config counts no labels
        config.num_labels = base.classifier.out_features
    if config.num_labels != len(label_names):
        raise FedtuneError(f"the classifier head has {config.num_labels} outputs but the run has "
                           f"{len(label_names)} label names; the adapter was not saved with labels")
    config.id2label = {i: str(name) for i, name in enumerate(label_names)}
    config.label2id = {str(name): i for i, name in enumerate(label_names)}
    config.architectures = [type(base).__name__]
    config.save_pretrained(str(out_dir))


def name_base(*, out_dir: Path, base: BaseModelReference) -> None:
    """Point adapter_config.json at the portable base name; record the base's hashes beside it."""
    _update_json(Path(out_dir) / ADAPTER_CONFIG_FILE, base_model_name_or_path=base.name_or_path)
    base.save(out_dir)


def save_tokenizer(*, tokenizer, out_dir: Path, max_length: int = 0) -> None:
    """The run's tokenizer; with `max_length`, truncation=True cuts where the run did."""
    tokenizer.save_pretrained(str(out_dir))
    if max_length > 0:
        _update_json(Path(out_dir) / TOKENIZER_CONFIG_FILE, model_max_length=int(max_length))


def _update_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def share_files(out_dir: Path) -> None:
    """Every file under `out_dir` the mode `open` gives a new file (0o666 less the umask: 0644 as a
    rule), as the config and tokenizer files already have: safetensors writes its weights 0600."""
    mode = 0o666 & ~_umask()
    for path in sorted(Path(out_dir).rglob("*")):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _umask() -> int:
    """The process's umask, read without setting it where Linux says it (threads may create files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current
