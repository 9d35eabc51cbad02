"""The run configuration: one typed object, loaded from TOML and `--set key=value` overrides.

Keys are dashed on the outside (TOML files, `--set`, Flower run config: `lora-rank`) and
snake_case on the inside (`config.lora_rank`). Precedence: defaults < TOML file < `--set`.
Some defaults follow the task (TASK_DEFAULTS): those keys default to 0 or "", meaning "the task's
value", resolved when the config is built, so every party resolves the same job the same way.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedtune.common.errors import FedtuneError
from fedtune.common.execution import ExecutionProfile
from fedtune.common.config_checks import check, check_run_config
from fedtune.common.privacy.budget_defaults import defaults_for_budget
from fedtune.common.protocol import JobWire
from fedtune.common.tasks import TASK_NAMES
from fedtune.common.values import coerce

# What a key set to 0 or "" becomes. classification: tuned on BBC News (BENCHMARKS.md); causal-lm:
# what configs/causal-lm.toml measured (FFA-LoRA is tuned for classification only).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"num_clients": 5, "partitioner": "iid", "batch_size": 64, "lora_variant": "ffa"},
    "causal-lm": {"num_clients": 3, "partitioner": "category", "batch_size": 32, "lora_variant": "lora"},
}
# learning-rate 0: by task and LoRA variant (plain LoRA wants smaller steps than FFA-LoRA).
TASK_LEARNING_RATES = {("classification", "ffa"): 5e-2, ("classification", "lora"): 1e-2,
                       ("causal-lm", "ffa"): 5e-3, ("causal-lm", "lora"): 5e-3}


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors PEFT's field(metadata=help)
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a federated fine-tuning run. Defaults are the offline demo."""

    task: str = _opt("classification", "'classification' (a label per text) or 'causal-lm' (instruction "
                                       "fine-tuning of a generative model on prompt/response pairs).")
    model: str = _opt("default", "'default' (the task's packaged model: all-MiniLM-L6-v2, or SmolLM2-135M-"
                                 "Instruct for causal-lm) or a local HF model folder.")
    data: str = _opt("default", "'default' (the task's packaged corpus: BBC News, or chatterbot for causal-lm), "
                                "'bbc-news', 'chatterbot', or a CSV, JSONL or Parquet file.")
    text_column: str = _opt("text", "Column holding the text in a user data file.")
    label_column: str = _opt("label", "Column holding the class label in a user data file.")
    prompt_column: str = _opt("prompt", "causal-lm: column holding the prompt (Alpaca instruction/input/output "
                                        "columns are recognised too).")
    response_column: str = _opt("response", "causal-lm: column holding the response the model learns.")
    num_clients: int = _opt(0, "Institutions (virtual SuperNodes) in the federation; 0 = the task's (5, or 3 "
                               "for causal-lm).")
    clients_per_round: int = _opt(0, "Clients sampled to train each round; 0 = all of them.")
    num_rounds: int = _opt(3, "Federated rounds to run (the privacy plan covers all of them).")
    local_epochs: int = _opt(1, "Passes over its local data a client makes each round.")
    batch_size: int = _opt(0, "Expected batch size; DP sample rate = batch-size / local N; 0 = the task's (64, "
                              "or 32 for causal-lm).")
    physical_batch_size: int = _opt(0, "Profile: examples per forward/backward pass (memory only: a larger batch is "
                                       "done in pieces, same update); 0 = whole batch, or 8 for causal-lm. A deployed "
                                       "node takes it from its own node config.")
    device: str = _opt("auto", "Profile: where models run: 'auto' (a GPU when torch sees one), 'cpu', 'cuda' or "
                               "'cuda:N'. Performance only; a deployed node takes it from its own node config.")
    base_dtype: str = _opt("auto", "Profile: the frozen base's precision: 'float32', 'bfloat16', or 'auto' (bfloat16 "
                                   "where the device does it natively, else float32). Trainables, gradients and "
                                   "noise stay float32. A deployed node takes it from its own node config.")
    threads: int = _opt(0, "Profile: CPU threads a client trains with; 0 = the cores it is given (a simulated "
                           "client: its Ray share). A deployed node takes it from its own node config.")
    quantization: str = _opt("none", "Profile (causal-lm): the frozen base's linear layers stored in 4 bits "
                                      "('nf4', QLoRA) or 8 bits ('int8') through bitsandbytes, or 'none'. LoRA, "
                                      "gradients and noise stay float32. A deployed node sets its own.")
    activation_checkpointing: bool = _opt(False, "Profile (causal-lm): recompute each decoder layer during backward "
                                                 "(less memory, about a third more time). A deployed node sets its own.")
    gpus_per_client: float = _opt(0.0, "Simulation: the share of a GPU each simulated client takes (0.5: two "
                                       "clients per GPU, each held to half its memory); 0 = none.")
    ray_address: str = _opt("", "Simulation: attach to a running Ray cluster at this address (e.g. "
                                "'192.168.0.5:6379', started with `ray start --head`); '' = a local Ray.")
    learning_rate: float = _opt(0.0, "AdamW learning rate for the LoRA matrices; 0 = tuned for the task and "
                                     "variant (0.05 for ffa, 0.01 for lora; 0.005 for causal-lm).")
    head_learning_rate: float = _opt(1e-1, "AdamW learning rate for the (randomly initialised) classifier head.")
    max_length: int = _opt(128, "Tokens kept per text (longer texts are truncated).")
    lora_rank: int = _opt(8, "LoRA rank r.")
    lora_alpha: int = _opt(16, "LoRA scaling alpha.")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA branch.")
    lora_target_modules: str = _opt("", "Comma-separated module names for LoRA; '' picks per architecture.")
    lora_mlp: bool = _opt(False, "Also adapt the MLP projections (when lora-target-modules is '').")
    lora_variant: str = _opt("", "'lora' trains A and B; 'ffa' (FFA-LoRA) freezes A at its seed-derived "
                                  "value on every party and trains and sends only B (exact averaging, "
                                  "about half the upload); '' = the task's (ffa, or lora for causal-lm).")
    training_mode: str = _opt("", "classification: 'adapter' (LoRA/FFA-LoRA and the head), 'probe' (the head "
                                   "alone over the model's frozen pooled features: private linear probing) or "
                                   "'two-stage' (probe rounds, then adapter rounds from that head); '' = chosen "
                                   "from target-epsilon as measured (README, 'Defaults per budget').")
    pooling: str = _opt("", "How texts become one vector for the head in probe and two-stage: 'mean' or 'cls'; "
                            "'' = the pooling the model was trained with (its sentence-transformers config), "
                            "else mean.")
    head_prior: bool = _opt(True, "probe/two-stage: start the head from the (public) label names' embeddings.")
    probe_steps: int = _opt(16, "probe/two-stage: full-batch DP steps per round on the head.")
    probe_learning_rate: float = _opt(0.0, "probe/two-stage: SGD step size for the head; 0 = by budget.")
    probe_rounds: int = _opt(1, "two-stage: rounds of linear probing before the adapter rounds.")
    probe_epsilon_share: float = _opt(0.5, "two-stage: share of each client's epsilon the probe rounds may spend "
                                           "(the adapter rounds get the rest; one accountant history).")
    early_stopping_patience: int = _opt(0, "Stop when the coordinator's validation accuracy has not improved for "
                                           "this many rounds (the rest of every budget stays unspent); 0 = off.")
    stop_validation_fraction: float = _opt(0.05, "With early stopping: share of all records the coordinator holds out.")
    dp: bool = _opt(True, "Train with DP-SGD (Opacus). false gives the non-private baseline.")
    target_epsilon: float = _opt(8.0, "Each client's total epsilon budget for the whole run.")
    target_delta: float = _opt(1e-5, "Each client's delta; at or above 1/N of a client's N training records "
                                      "it is refused unless allow-large-delta.")
    allow_large_delta: bool = _opt(False, "Simulation only: run with a target-delta at or above 1/N (it lets a "
                                          "whole record be published). A deployed node ignores this key and takes "
                                          "it from its own node config only.")
    max_grad_norm: float = _opt(1.0, "Per-sample gradient clipping bound C.")
    noise_multiplier: float = _opt(0.0, "0 calibrates sigma from the budget; >0 forces this sigma.")
    accountant: str = _opt("prv", "Privacy accountant: 'prv' (tight) or 'rdp'.")
    secure_aggregation: bool = _opt(True, "Aggregate with SecAgg+; false uses plain FedAvg.")
    secagg_clipping_range: float = _opt(0.0, "SecAgg+ range for update entries; 0 derives it from the run.")
    secagg_max_weight: int = _opt(0, "SecAgg+ max example count per client; 0 derives it from the data.")
    max_update_norm: float = _opt(0.0, "Reject an update (or aggregate) with a larger L2 norm; 0 derives it.")
    round_timeout: float = _opt(0.0, "Seconds to wait for replies in a round stage; 0 waits forever.")
    partitioner: str = _opt("", "How examples are split across clients: 'iid', 'dirichlet' (label skew) or "
                                "'category' (whole labels/categories per client); '' = the task's (iid, or "
                                "category for causal-lm).")
    dirichlet_alpha: float = _opt(0.5, "Label skew for the dirichlet partitioner (smaller = more skew).")
    test_fraction: float = _opt(0.1, "Share of all examples held out for server-side testing.")
    validation_fraction: float = _opt(0.1, "Share of each client's examples kept for its validation.")
    fraction_evaluate: float = _opt(0.0, "Share of clients evaluating on their validation split each round "
                                         "(their metrics travel in clear, outside DP; 0 = none).")
    seed: int = _opt(0, "Seeds splits, partitions, client sampling and initialisation; never DP noise.")
    max_client_examples: int = _opt(0, "Largest training set of any institution (bounds SecAgg+ weights and "
                                       "update checks); 0 derives it from the run's data (simulation).")
    output_dir: str = _opt("", "Run directory the coordinator writes; '' = runs/<timestamp> (simulate: --out).")
    roster: str = _opt("", "Coordinator: the roster file; only nodes whose signed keys prove a member are sampled.")
    secagg_max_colluders: int = _opt(0, "SecAgg+: institutions that may collude with the coordinator; the "
                                        "threshold t is chosen so that 2t > clients-per-round + this.")
    samples: int = _opt(8, "causal-lm: held-out prompts whose greedy generations go to samples.md (0 = none).")
    max_new_tokens: int = _opt(48, "causal-lm: tokens generated per sample prompt.")
    inject_faults: str = _opt("", "Fault drill for simulations: 'ROUND:FAULT[:CLIENTS]; ...' "
                                  "(dropouts, bad updates, a coordinator crash; see README).")

    def __post_init__(self) -> None:
        check(self.task in TASK_NAMES, "task", f"must be one of {', '.join(TASK_NAMES)}")
        # What was asked, before the task's values fill the 0/"" keys: with_overrides starts from it.
        object.__setattr__(self, "_declared", {spec.name: getattr(self, spec.name) for spec in fields(self)})
        for name, value in self._task_values().items():
            object.__setattr__(self, name, value)
        self.validate()

    def _task_values(self) -> dict[str, Any]:
        """The keys left at 0 or "" (and clients-per-round 0: every client), given the task's values."""
        defaults = TASK_DEFAULTS[self.task]
        values = {name: getattr(self, name) or default for name, default in defaults.items()}
        values["clients_per_round"] = self.clients_per_round or values["num_clients"]
        values["learning_rate"] = self.learning_rate or TASK_LEARNING_RATES.get(
            (self.task, values["lora_variant"]), 0.0)
        by_budget = defaults_for_budget(dp=self.dp, target_epsilon=self.target_epsilon)
        if self.task != "classification":
            by_budget["training_mode"] = "adapter"  # probing needs a label head
        values["training_mode"] = self.training_mode or by_budget["training_mode"]
        values["probe_learning_rate"] = self.probe_learning_rate or by_budget.get("probe_learning_rate", 5.0)
        return values

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, *, path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
        """Defaults, then the TOML file (if any), then `key=value` overrides."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(_read_toml(Path(path)))
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise FedtuneError(f"--set expects key=value, got {item!r}")
            values[key.strip()] = raw.strip()
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from dashed keys (TOML, `--set`, Flower run config), coercing each value."""
        by_key = {_dashed(f.name): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in JobWire.KEYS:  # who signed the job: checked by the party, not a training setting
                continue
            spec = by_key.get(key)
            if spec is None:
                hint = difflib.get_close_matches(key, list(by_key), n=1)
                suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
                raise FedtuneError(f"unknown config key '{key}'.{suggestion}")
            kwargs[spec.name] = coerce(key, value, spec.type)
        return cls(**kwargs)

    def with_overrides(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (snake_case names), validated again; keys that were left
        to the task or to num-clients follow the new values."""
        return RunConfig(**{**self._declared, **changes})

    # -- export ------------------------------------------------------------------------------

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Dashed keys with plain values, as Flower's run config and our TOML files hold them."""
        return {_dashed(k): v for k, v in asdict(self).items()}

    def to_toml(self) -> str:
        """The fully resolved config as TOML text (written to every run directory)."""
        lines = []
        for key, value in self.to_flower().items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        return "\n".join(lines) + "\n"

    # -- derived -----------------------------------------------------------------------------

    @property
    def profile(self) -> ExecutionProfile:
        """The run's execution profile (a simulation's; a deployed node uses its own)."""
        return ExecutionProfile.from_config(self)

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def validate(self) -> None:
        """Reject values that cannot make a meaningful run, saying which key to fix."""
        check_run_config(self)
        self.profile  # noqa: B018 - its own checks: device, base-dtype, threads


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def _read_toml(path: Path) -> dict[str, Any]:
    """Read a config file: plain dashed keys, or a pyproject's [tool.flwr.app.config] table."""
    if not path.is_file():
        raise FedtuneError(f"config file not found: {path}")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedtuneError(f"config file {path} is not valid TOML: {exc}") from None
    table = document.get("tool", {}).get("flwr", {}).get("app", {}).get("config", document)
    nested = [k for k, v in table.items() if isinstance(v, dict)]
    if nested:
        raise FedtuneError(f"config file {path}: unexpected table(s) {nested}; use plain key = value lines")
    return dict(table)
