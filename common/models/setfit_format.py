"""A probe or two-stage classifier exported as a SetFit model: the standard Hugging Face form of
"sentence-transformer body + classification head", so `SetFitModel.from_pretrained(folder)` loads
it and `.predict(texts)` returns the run's label names.

The folder is a sentence-transformers model (the encoder with any LoRA merged in, the pooling it
was trained with, L2 normalisation) plus the head as a scikit-learn logistic regression holding the
trained weights, and the label names. The encoder sits in `0_Transformer/`, not at the top: no
config.json or adapter_config.json at the top means `AutoModelForSequenceClassification` and
`PeftModel.from_pretrained` fail with an error instead of loading the encoder under a fresh,
random head, which is what the PEFT files of earlier exports allowed (near-chance predictions,
only warnings).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.numpy import save_file

from fedtune.common.models.adapter import arrays_to_adapter
from fedtune.common.models.base_reference import BaseModelReference
from fedtune.common.models.pooled_classifier import head_linear
from fedtune.common.storage import atomic_write

SETFIT_CONFIG_FILE = "config_setfit.json"
HEAD_FILE = "model_head.pkl"  # SetFit's own: a pickle, which runs code when loaded
SAFE_HEAD_FILE = "model_head.safetensors"  # the same weights without code: what `fedtune predict` reads
BODY_DIR = "0_Transformer"
TOP_LEVEL = ("modules.json", "config_sentence_transformers.json")  # the rest of a save is the encoder's


def is_setfit_folder(folder: Path) -> bool:
    return (Path(folder) / SETFIT_CONFIG_FILE).is_file()


def save_setfit_model(*, model, arrays: list[np.ndarray], out_dir: Path, tokenizer, label_names: Sequence[str],
                      max_length: int, base: BaseModelReference) -> None:
    """Write `model` (a PEFT PooledClassifier) with the global `arrays` as a SetFit folder."""
    arrays_to_adapter(model, arrays)
    classifier = _merged(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as staging:
        _save_body(classifier, tokenizer=tokenizer, max_length=max_length, out_dir=Path(staging))
        for path in Path(staging).iterdir():
            shutil.move(str(path), str(out_dir / path.name))
    _save_head(head_linear(model), out_dir=out_dir)
    atomic_write(out_dir / SETFIT_CONFIG_FILE, json.dumps({"labels": [str(n) for n in label_names],
                                                           "normalize_embeddings": False}, indent=2) + "\n")
    base.save(out_dir)


def _merged(model):
    """The classifier with LoRA folded into the encoder's weights, on a copy (the run's model shares
    its frozen base tensors with other models). Where LoRA trained (B != 0), in float32: W + BA
    rounded to bf16 would not be the model that trained, whose fp32 LoRA ran beside the base. In
    probe mode (B = 0) the encoder is the base, kept in the precision the run scored it in."""
    copied = copy.deepcopy(model)
    if any(p.detach().abs().max() > 0 for name, p in copied.named_parameters() if ".lora_B." in name):
        copied = copied.float()
    return copied.merge_and_unload().cpu().eval()


def _save_body(classifier, *, tokenizer, max_length: int, out_dir: Path) -> None:
    """sentence-transformers' own save of encoder -> pooling -> normalize, the encoder's files then
    moved under BODY_DIR (modules.json says where each module is)."""
    from sentence_transformers import SentenceTransformer, models

    with tempfile.TemporaryDirectory() as encoder_dir:
        classifier.encoder.save_pretrained(encoder_dir)
        tokenizer.save_pretrained(encoder_dir)
        body = models.Transformer(encoder_dir, max_seq_length=max_length,
                                  model_args={"dtype": classifier.encoder.dtype})
        pooling = models.Pooling(body.get_word_embedding_dimension(), pooling_mode=classifier.pooling)
        SentenceTransformer(modules=[body, pooling, models.Normalize()], device="cpu").save(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)  # fedtune's model card takes its place
    (out_dir / BODY_DIR).mkdir()
    for path in list(out_dir.iterdir()):
        if path.is_file() and path.name not in TOP_LEVEL:
            path.rename(out_dir / BODY_DIR / path.name)
    modules = json.loads((out_dir / "modules.json").read_text(encoding="utf-8"))
    modules[0]["path"] = BODY_DIR
    (out_dir / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")


def _save_head(head, *, out_dir: Path) -> None:
    """The trained linear head as the logistic regression SetFit loads (`model_head.pkl`): its
    decision function is features @ W.T + b, the head's logits, so it predicts as the run did."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    weight = head.weight.detach().float().cpu().numpy().astype(np.float64)
    regression = LogisticRegression()
    regression.coef_ = weight
    regression.intercept_ = head.bias.detach().float().cpu().numpy().astype(np.float64)
    regression.classes_ = np.arange(weight.shape[0])
    regression.n_features_in_ = weight.shape[1]
    joblib.dump(regression, out_dir / HEAD_FILE)
    save_file({"weight": weight, "bias": regression.intercept_}, str(out_dir / SAFE_HEAD_FILE))


def load_without_pickle(folder: Path):
    """(predict function, label names) of a SetFit folder this module wrote, without unpickling
    anything: the body through sentence-transformers (safetensors weights, no remote code), the
    head from SAFE_HEAD_FILE. A folder from someone else may carry a model_head.pkl that runs
    code; this path never opens it."""
    from safetensors.numpy import load_file
    from sentence_transformers import SentenceTransformer

    folder = Path(folder)
    labels = json.loads((folder / SETFIT_CONFIG_FILE).read_text(encoding="utf-8"))["labels"]
    head = load_file(str(folder / SAFE_HEAD_FILE))
    body = SentenceTransformer(str(folder), device="cpu", trust_remote_code=False)

    def predict(texts: Sequence[str]) -> list[str]:
        features = body.encode(list(texts), convert_to_numpy=True).astype(np.float64)
        return [str(labels[i]) for i in (features @ head["weight"].T + head["bias"]).argmax(axis=1)]

    return predict
