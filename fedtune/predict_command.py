"""`fedtune predict`: labels for texts from an exported classifier, for people who just want labels.

It loads a run's `adapter/` folder the way its ecosystem does (a SetFit folder from a probe or
two-stage run; a PEFT adapter on its base from an adapter-mode run) and prints one label per
text, in input order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from fedtune.common.errors import FedtuneError


def predict(
    model: Path = typer.Argument(..., help="An exported classifier: a run's adapter/ folder."),
    text: Optional[list[str]] = typer.Option(None, "--text", help="A text to label (repeat for more)."),
    file: Optional[Path] = typer.Option(None, "--file", help="Texts to label: a CSV, TSV, JSONL or Parquet file "
                                        "(its --column), or a plain file with one text per line."),
    column: str = typer.Option("text", "--column", help="The column holding the texts in a data file."),
    base: Optional[Path] = typer.Option(None, "--base", help="The base model folder of an adapter-mode run "
                                        "(default: the packaged model, when the run used it)."),
) -> None:
    """Print the predicted label of each text, one per line, in input order."""
    texts = list(text or []) + (_read_texts(file, column=column) if file else [])
    if not texts:
        raise FedtuneError("nothing to label: give --text TEXT (repeatable) or --file FILE")
    for label in _labeller(Path(model), base=base)(texts):
        print(label)


def _read_texts(path: Path, *, column: str) -> list[str]:
    """The texts of a data file fedtune reads (its --column), or of a plain file, one per line."""
    from fedtune.common.data.files import SUPPORTED_SUFFIXES, read_records

    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        if not path.is_file():
            raise FedtuneError(f"--file {path} does not exist")
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows, columns = read_records(path)
    if column not in columns:
        raise FedtuneError(f"{path.name} has no column '{column}'; its columns: {', '.join(map(str, columns))}"
                           f" (choose one with --column)")
    return [str(row.get(column) or "") for row in rows]


def _labeller(folder: Path, *, base: Optional[Path]):
    from fedtune.common.models.setfit_format import is_setfit_folder, load_without_pickle

    if is_setfit_folder(folder):  # its head read from safetensors: model_head.pkl is never unpickled
        return load_without_pickle(folder)
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        raise FedtuneError(f"{folder} is not an exported fedtune classifier (no config_setfit.json or "
                           f"adapter_config.json): give a run's adapter/ folder")
    if json.loads(adapter_config.read_text(encoding="utf-8")).get("task_type") != "SEQ_CLS":
        raise FedtuneError(f"{folder} holds a causal-LM adapter: it generates text rather than labels "
                           f"(its README.md shows how to load it)")
    return _peft_classifier(folder, base=base or _packaged_base(folder))


def _packaged_base(folder: Path) -> Path:
    from fedtune.common.models.base_reference import PACKAGED_BASES, BaseModelReference
    from fedtune.common.tasks import resolve_model_path

    name = BaseModelReference.read(folder).name_or_path
    if name != PACKAGED_BASES["classification"].hub_id:
        raise FedtuneError(f"the adapter was trained on {name}: give its local folder with --base")
    return resolve_model_path("default")


def _peft_classifier(folder: Path, *, base: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder))
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(str(base), config=config),
                                      str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def labels(texts: list[str]) -> list[str]:
        out = []
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start:start + 64], truncation=True, padding=True, return_tensors="pt")
            with torch.no_grad():
                out += [config.id2label[i] for i in model(**batch).logits.argmax(-1).tolist()]
        return out

    return labels
