"""What makes a run config meaningful: each rule names the key to fix (common/config.py builds it).

Every party (coordinator, node, `fedtune sign-job`) parses a job through RunConfig, so these
rules are the same everywhere: a value one party rejects, every party rejects.
"""

from __future__ import annotations

import math
from typing import Any

from fedtune.common.errors import FedtuneError
from fedtune.common.faults import check_faults
from fedtune.common.training_modes import TRAINING_MODES, training_mode

PARTITIONERS = ("iid", "dirichlet", "category")
ACCOUNTANTS = ("prv", "rdp")
LORA_VARIANTS = ("lora", "ffa")
POOLINGS = ("mean", "cls")


def check_run_config(config: Any) -> None:
    """Reject values that cannot make a meaningful run (a RunConfig), saying which key to fix."""
    check(config.partitioner in PARTITIONERS, "partitioner", f"must be one of {', '.join(PARTITIONERS)}")
    check(config.lora_variant in LORA_VARIANTS, "lora_variant", f"must be one of {', '.join(LORA_VARIANTS)}")
    _check_modes(config)
    check(config.accountant in ACCOUNTANTS, "accountant", f"must be one of {', '.join(ACCOUNTANTS)}")
    for key in ("num_clients", "clients_per_round", "num_rounds", "local_epochs", "batch_size", "probe_steps",
                "max_length", "lora_rank", "lora_alpha"):
        check(getattr(config, key) >= 1, key, "must be at least 1")
    check(config.clients_per_round <= config.num_clients, "clients_per_round",
          f"cannot exceed num-clients ({config.num_clients})")
    check(_positive(config.learning_rate), "learning_rate", "must be a positive number")
    check(_positive(config.head_learning_rate), "head_learning_rate", "must be a positive number")
    check(_positive(config.target_epsilon), "target_epsilon", "must be a positive number")
    check(0.0 < config.target_delta < 1.0, "target_delta", "must lie strictly between 0 and 1")
    check(_positive(config.max_grad_norm), "max_grad_norm", "must be a positive number")
    check(config.noise_multiplier >= 0 and math.isfinite(config.noise_multiplier), "noise_multiplier",
          "must be 0 (calibrate) or a positive number")
    check(config.secagg_clipping_range >= 0 and math.isfinite(config.secagg_clipping_range),
          "secagg_clipping_range", "must be 0 (auto) or a positive number")
    check(config.secagg_max_weight >= 0, "secagg_max_weight", "must be 0 (auto) or positive")
    check(config.max_client_examples >= 0, "max_client_examples", "must be 0 (auto) or positive")
    check(config.max_update_norm >= 0 and math.isfinite(config.max_update_norm), "max_update_norm",
          "must be 0 (auto) or a positive number")
    check(config.round_timeout >= 0 and math.isfinite(config.round_timeout), "round_timeout",
          "must be 0 (no timeout) or a positive number of seconds")
    check(config.physical_batch_size >= 0, "physical_batch_size", "must be 0 (auto) or positive")
    check(config.quantization == "none" or config.task == "causal-lm", "quantization",
          "applies to task 'causal-lm' (a billion-parameter decoder); a classification base is small enough "
          "to keep whole: set quantization = \"none\"")
    check(not config.activation_checkpointing or config.task == "causal-lm", "activation_checkpointing",
          "applies to task 'causal-lm' (a classification step is small enough): set it to false")
    check(math.isfinite(config.gpus_per_client) and config.gpus_per_client >= 0
          and (config.gpus_per_client <= 1 or config.gpus_per_client.is_integer()), "gpus_per_client",
          "must be 0 (none), a share of one GPU (up to 1), or a whole number of GPUs")
    check(config.samples >= 0, "samples", "must be 0 (none) or a positive number of prompts")
    check(config.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
    check(0.0 <= config.lora_dropout < 1.0, "lora_dropout", "must lie in [0, 1)")
    check(_positive(config.dirichlet_alpha), "dirichlet_alpha", "must be a positive number")
    check(0.0 < config.test_fraction < 1.0, "test_fraction", "must lie strictly between 0 and 1")
    check(0.0 <= config.validation_fraction < 1.0, "validation_fraction", "must lie in [0, 1)")
    check(0.0 <= config.fraction_evaluate <= 1.0, "fraction_evaluate", "must lie in [0, 1]")
    if config.inject_faults:
        check_faults(config.inject_faults, secure_aggregation=config.secure_aggregation,
                     num_clients=config.num_clients)
    check(config.secagg_max_colluders >= 0, "secagg_max_colluders", "must be 0 or a positive whole number")
    if config.secure_aggregation:
        check(config.clients_per_round >= 2, "clients_per_round", "must be at least 2 with secure-aggregation "
              "(SecAgg+ sums several updates); set secure-aggregation=false for a single client")
        threshold = secagg_threshold(clients=config.clients_per_round, max_colluders=config.secagg_max_colluders)
        check(threshold <= config.clients_per_round, "secagg_max_colluders",
              f"is too large for {config.clients_per_round} clients per round: no threshold t <= clients satisfies "
              f"2t > clients + colluders")


def secagg_threshold(*, clients: int, max_colluders: int) -> int:
    """The smallest SecAgg+ threshold t with 2t > clients + colluders (and at least 2): below it a
    split story about who dropped out, signed by the colluders on both sides, rebuilds both masks
    of one node; above it fewer dropouts are tolerated."""
    return max(2, (clients + max_colluders) // 2 + 1)


def _check_modes(config: Any) -> None:
    """The training mode, probing and early-stopping keys (probe/two-stage need a label head)."""
    check(config.training_mode in TRAINING_MODES, "training_mode", f"must be one of {', '.join(TRAINING_MODES)}")
    mode = training_mode(config.training_mode)
    check(not mode.pooled_head or config.task == "classification", "training_mode",
          "must be 'adapter' for this task (probing trains a label head)")
    check(config.pooling in ("", *POOLINGS), "pooling", "must be '', 'mean' or 'cls'")
    check(not (mode.has_probe_stage and mode.has_adapter_stage) or 1 <= config.probe_rounds < config.num_rounds,
          "probe_rounds", f"must leave at least one adapter round in {mode.name} (1 <= probe-rounds < num-rounds)")
    check(0.0 < config.probe_epsilon_share < 1.0, "probe_epsilon_share", "must lie strictly between 0 and 1")
    check(config.early_stopping_patience >= 0, "early_stopping_patience", "must be 0 (off) or a round count")
    check(0.0 < config.stop_validation_fraction < 0.5, "stop_validation_fraction", "must lie in (0, 0.5)")
    check(_positive(config.probe_learning_rate), "probe_learning_rate", "must be a positive number")


def check(ok: bool, name: str, requirement: str) -> None:
    if not ok:
        raise FedtuneError(f"config key '{name.replace('_', '-')}' {requirement}.")


def _positive(value: float) -> bool:
    return value > 0 and math.isfinite(value)
