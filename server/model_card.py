"""The adapter's README.md: a Hugging Face model card that says what the adapter is and the privacy
guarantee it was trained under, so the guarantee travels with the model.

Everything in it comes from what the coordinator already records: the run config, metrics.jsonl
and summary.json. It states totals only: nothing from which one client's record count follows
(no record count, not even a total; no per-client q, sigma or steps: q = batch / N). Those
stay in the ledgers.
Pure functions of those: tested without a federation (tests/test_adapter_artifact.py).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

from fedtune.common.config import RunConfig
from fedtune.common.counts import counted
from fedtune.common.models.base_reference import BaseModelReference
from fedtune.common.protocol import Status
from fedtune.common.training_modes import training_mode

PIPELINE_TAGS = {"classification": "text-classification", "causal-lm": "text-generation"}
UNIT_OF_PRIVACY = "one record (one training example) of one client's own data"


@dataclass(frozen=True)
class ClientPrivacy:
    """One client's privacy facts over the run, from its latest report (epsilon is cumulative)."""

    client_id: str
    epsilon: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    rounds_trained: int = 0
    steps: int = 0
    train_records: int | None = None


@dataclass(frozen=True)
class CardFacts:
    """What the card states; `label_names` is empty for a task without labels."""

    config: RunConfig
    run_id: str
    base: BaseModelReference
    label_names: tuple[str, ...]
    test_records: int
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]
    version: str
    base_dtype: str = "float32"  # the precision the frozen base computed (and was scored) in


def fedtune_version() -> str:
    try:
        return importlib.metadata.version("fedtune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def client_privacy(rounds: list[dict[str, Any]]) -> list[ClientPrivacy]:
    """Per client (sorted by id): latest epsilon, sigma, q and record count, and what it trained."""
    latest: dict[str, dict[str, Any]] = {}
    trained: dict[str, set[int]] = {}
    steps: dict[str, int] = {}
    for record in rounds:
        for cid, entry in record.get("clients", {}).items():
            facts = latest.setdefault(cid, {})
            facts.update({k: entry[k] for k in ("epsilon", "noise_multiplier", "sample_rate") if k in entry})
            if entry.get("num_examples"):  # a refusal carries weight 0, not the client's size
                facts["train_records"] = int(entry["num_examples"])
            if entry.get("status") == Status.TRAINED and not entry.get("resent"):
                trained.setdefault(cid, set()).add(int(record["round"]))
                steps[cid] = steps.get(cid, 0) + int(entry.get("steps", 0))
    return [ClientPrivacy(client_id=cid, rounds_trained=len(trained.get(cid, ())), steps=steps.get(cid, 0),
                          **latest[cid]) for cid in sorted(latest)]


def model_card(facts: CardFacts) -> str:
    """The whole README.md: YAML front matter Hugging Face reads, then the sections."""
    sections = [_front_matter(facts), _title(facts), _base_section(facts.base), _labels_section(facts),
                _usage_section(facts), _data_section(facts), _results_section(facts.summary),
                _privacy_section(facts), _training_section(facts)]
    return "\n".join(s for s in sections if s)


def _front_matter(facts: CardFacts) -> str:
    library = "setfit" if _pooled(facts) else "peft"
    lora = [] if facts.label_names and not training_mode(facts.config.training_mode).has_adapter_stage else ["lora"]
    tags = ["fedtune", library, *lora, "federated-learning", "flower"]
    if facts.config.dp:
        tags += ["differential-privacy", "dp-sgd", "opacus"]
    if facts.config.secure_aggregation:
        tags.append("secure-aggregation")
    tags.append(f"base_model:{'finetune' if _pooled(facts) else 'adapter'}:{facts.base.name_or_path}")
    lines = ["---", f"library_name: {library}", f"base_model: {_yaml(facts.base.name_or_path)}"]
    if facts.config.task in PIPELINE_TAGS:
        lines.append(f"pipeline_tag: {PIPELINE_TAGS[facts.config.task]}")
    return "\n".join(lines + ["tags:"] + [f"- {_yaml(t)}" for t in tags] + ["---", ""])


def _pooled(facts: CardFacts) -> bool:
    return bool(facts.label_names) and training_mode(facts.config.training_mode).pooled_head


def _title(facts: CardFacts) -> str:
    cfg = facts.config
    what = "classifier (SetFit format)" if _pooled(facts) else "LoRA adapter"
    privacy = (f"DP-SGD, (epsilon, delta) = ({cfg.target_epsilon:g}, {cfg.target_delta:g}) per client"
               if cfg.dp else "no differential privacy")
    return (f"# fedtune {what}: {cfg.task}\n\nTrained by fedtune {facts.version} in federated run "
            f"`{facts.run_id}` across {counted(cfg.num_clients, 'client')} ({privacy}; secure aggregation "
            f"{'on (SecAgg+)' if cfg.secure_aggregation else 'off'}).\n")


def _base_section(base: BaseModelReference) -> str:
    hashes = [f"- `{name}` sha256 `{digest}`" for name, digest in sorted(base.weights_sha256.items())]
    return "\n".join([
        "## Base model", "", f"`{base.name_or_path}`: {base.source}.", "",
        "Weights the adapter was trained on (check your copy with `sha256sum`; base_model.json holds the same):",
        *hashes, ""])


def _labels_section(facts: CardFacts) -> str:
    if not facts.label_names:
        return ""
    rows = [f"| {i} | {_cell(name)} |" for i, name in enumerate(facts.label_names)]
    return "\n".join(["## Labels", "", "Output index to label name (also `id2label` in config.json):", "",
                      "| index | label |", "|---|---|", *rows, ""])


def _usage_section(facts: CardFacts) -> str:
    if facts.label_names and training_mode(facts.config.training_mode).pooled_head:
        load = ("from setfit import SetFitModel\n\n"
                "# this folder is a SetFit model: the encoder (LoRA merged in), its pooling, and the trained head\n"
                "# (model_head.pkl is a pickle: load only a folder you trust; `fedtune predict` reads\n"
                "# model_head.safetensors instead)\n"
                "model = SetFitModel.from_pretrained(ADAPTER)\n"
                "names = model.predict(texts)  # label names; model.predict_proba(texts) for probabilities")
    elif facts.label_names:
        load = ("from peft import PeftModel\n"
                "from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer\n\n"
                "config = AutoConfig.from_pretrained(ADAPTER)  # id2label: the label names\n"
                "base = AutoModelForSequenceClassification.from_pretrained(BASE, config=config)\n"
                "model = PeftModel.from_pretrained(base, ADAPTER).eval()\n"
                "tokenizer = AutoTokenizer.from_pretrained(ADAPTER)  # truncates at the run's max-length\n"
                "logits = model(**tokenizer(texts, truncation=True, padding=True, return_tensors=\"pt\")).logits\n"
                "names = [config.id2label[i] for i in logits.argmax(-1).tolist()]")
    else:
        load = ("from peft import PeftModel\n"
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER).eval()\n"
                "tokenizer = AutoTokenizer.from_pretrained(ADAPTER)")
    where = ("`ADAPTER` is this folder (it holds the whole model)." if _pooled(facts) else
             "`ADAPTER` is this folder, `BASE` a local folder holding the base model above.")
    return "\n".join(["## How to load", "", where, "",
                      "```python", load, "```", ""])


def _data_section(facts: CardFacts) -> str:
    """No record count at all: the card travels with the model, and an institution's count is its own.
    Even a total gives it away: over an even split (`iid`) it is K times each count, and in a federation
    of two each institution subtracts its own."""
    cfg = facts.config
    trained = sum(1 for c in client_privacy(facts.rounds) if c.rounds_trained)
    return "\n".join([
        "## Data", "",
        f"- coordinator's held-out test split: {facts.test_records} records",
        f"- texts truncated to {cfg.max_length} tokens; partitioner `{cfg.partitioner}`",
        f"- {trained} of {counted(cfg.num_clients, 'client')} trained on their own data, which never left them; how many "
        f"records each holds stays in its own ledger", ""])


def _results_section(summary: dict[str, Any]) -> str:
    scores = [f"- {key}: {value:.4f}" for key, value in summary.items()
              if key.startswith(("test_", "initial_", "base_")) and key != "test_examples"  # a size, in Data
              and isinstance(value, (int, float))]
    return "\n".join(["## Results", "",
                      f"On the coordinator's test split after {summary.get('rounds_completed', 0)} round(s) "
                      f"(`initial_` and `base_`: before training):", "", *scores, ""])


def _privacy_section(facts: CardFacts) -> str:
    """The guarantee and the run's totals. No per-client sigma, q or steps: q = batch / N, sigma is
    calibrated from q, and steps = epochs * N / batch, so each gives that client's record count away.
    Those figures stay in the clients' signed ledgers, which the institutions hold."""
    cfg = facts.config
    if not cfg.dp:
        return ("## Privacy\n\nNo differential privacy: this run trained without DP-SGD (`dp = false`), so the "
                "adapter carries no privacy guarantee for the clients' records.\n")
    trained = [c for c in client_privacy(facts.rounds) if c.rounds_trained]
    spent = [c.epsilon for c in trained if c.epsilon is not None]
    return "\n".join([
        "## Privacy guarantee", "",
        f"Each client's guarantee is (epsilon, delta)-differential privacy for {UNIT_OF_PRIVACY} "
        f"(sample-level DP), enforced at the client by DP-SGD (Opacus, Poisson sampling): each example's "
        f"gradient clipped to L2 norm C, Gaussian noise of standard deviation sigma * C added per step.", "",
        f"- unit of privacy: {UNIT_OF_PRIVACY}",
        f"- delta: {cfg.target_delta:g} (the run's target-delta; a client's own policy may set a smaller one)",
        f"- clipping bound C (max-grad-norm): {cfg.max_grad_norm:g}",
        f"- accountant: {cfg.accountant} (epsilon composed over every round the client trained)",
        f"- target epsilon per client: {cfg.target_epsilon:g}",
        f"- largest epsilon any client spent: {_num(max(spent)) if spent else 'none (no client trained)'}",
        f"- secure aggregation: {_secure_aggregation(cfg.secure_aggregation)}",
        "",
        "Each client's epsilon is the cumulative spend it reported and signed in its own ledger. Its sigma, "
        "sampling rate and steps are not stated here: each follows from its record count (q = batch / N). They "
        "stay in the ledgers, which the institutions hold; `fedtune audit <run directory>` re-checks them.", ""])


def _training_section(facts: CardFacts) -> str:
    cfg = facts.config
    return "\n".join([
        "## Training", "",
        f"- fedtune {facts.version}, run `{facts.run_id}`, seed {cfg.seed}",
        f"- {facts.summary.get('rounds_completed', 0)} of {counted(cfg.num_rounds, 'round')}, "
        f"{cfg.clients_per_round} of {counted(cfg.num_clients, 'client')} per round, "
        f"{cfg.local_epochs} local epoch(s), batch size {cfg.batch_size}",
        f"- training mode `{cfg.training_mode}`{_probe_settings(cfg)}",
        _lora_line(cfg),
        f"- secure aggregation: {'on' if cfg.secure_aggregation else 'off'}",
        f"- the base computed in {facts.base_dtype}{_quantized(cfg)} (everything trained in float32); the scores "
        f"above are that precision's: load the base with `dtype=torch.{facts.base_dtype}` to reproduce them "
        f"exactly. Each node trained on its own execution profile, which its ledger records per round", ""])


def _lora_line(cfg) -> str:
    if cfg.task == "classification" and not training_mode(cfg.training_mode).has_adapter_stage:
        return "- the encoder stayed frozen: only the linear head over its pooled features trained (no LoRA)"
    return (f"- LoRA variant `{cfg.lora_variant}`, rank {cfg.lora_rank}, alpha {cfg.lora_alpha}, "
            f"learning rate {cfg.learning_rate:g}")


def _quantized(cfg) -> str:
    if cfg.quantization == "none":
        return ""
    return (f", its linear layers quantized to {cfg.quantization} by bitsandbytes (QLoRA); the adapter also "
            f"loads into the unquantized base with `PeftModel.from_pretrained`")


def _probe_settings(cfg) -> str:
    if not training_mode(cfg.training_mode).has_probe_stage:
        return ""
    return (f", pooling `{cfg.pooling or 'as the model was trained'}`, {cfg.probe_steps} full-batch head steps "
            f"per probe round at SGD step {cfg.probe_learning_rate:g}")


def _secure_aggregation(on: bool) -> str:
    return ("on (SecAgg+): the coordinator saw only the sum of the clients' updates" if on
            else "off: the coordinator saw each client's (already noised) update")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _cell(text: str) -> str:
    """A label name inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _yaml(text: str) -> str:
    """A YAML scalar: quoted when plain style could misread it."""
    plain = text and all(c.isalnum() or c in "-_./:" for c in text) and not text[0] in "-:."
    return text if plain else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
