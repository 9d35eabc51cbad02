"""Training modes as objects (common/training_modes.py): the registry, each mode's answers, and
the plan, config checks, update bound and model card giving what the string comparisons they
replaced gave (the `_legacy_*` functions below are those comparisons, as they were). No torch,
no federation, no accountant: milliseconds."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from fedtune.common.privacy import budget_defaults
from fedtune.common.privacy import plan as plan_module
from fedtune.common.training_modes import (TRAINING_MODES, AdapterMode, ProbeMode, TrainingMode, TwoStageMode,
                                   training_mode)
from fedtune.server import model_card
from fedtune.server.update_validation import ADAM_DRIFT_BOUND, coordinate_bound

NAMES = ("adapter", "probe", "two-stage")


def _legacy_is_probe_round(config, server_round: int) -> bool:
    return config.training_mode == "probe" or (config.training_mode == "two-stage"
                                               and 1 <= server_round <= config.probe_rounds)


def _legacy_planned_steps(config, *, num_examples: int | None) -> int:
    if config.training_mode == "probe":
        return config.num_rounds * config.probe_steps
    per_epoch = 1 if num_examples is None else int(1 / min(1.0, config.batch_size / num_examples))
    if config.training_mode == "two-stage":
        return (config.probe_rounds * config.probe_steps
                + (config.num_rounds - config.probe_rounds) * config.local_epochs * per_epoch)
    return config.num_rounds * config.local_epochs * per_epoch


def _legacy_size_keys(mode: str) -> str:
    return ("num-rounds or probe-steps" if mode == "probe" else
            "num-rounds, local-epochs or probe-steps, or raise batch-size" if mode == "two-stage"
            else "num-rounds or local-epochs, or raise batch-size")


def _legacy_coordinate_bound(config, *, max_client_examples: int) -> float:
    steps = config.local_epochs * -(-max_client_examples // config.batch_size)
    adapter = ADAM_DRIFT_BOUND * max(config.learning_rate, config.head_learning_rate) * steps
    probe = ADAM_DRIFT_BOUND * config.probe_learning_rate * max(config.max_grad_norm, 1.0) * config.probe_steps
    return {"adapter": adapter, "probe": probe}.get(config.training_mode, max(adapter, probe))


def _configs():
    """Every mode over a few shapes of run (two-stage needs an adapter round left)."""
    for mode, rounds, probe_rounds, epochs, batch in itertools.product(NAMES, (2, 5), (1, 3), (1, 2), (8, 64)):
        if mode == "two-stage" and probe_rounds >= rounds:
            continue
        yield RunConfig(training_mode=mode, num_rounds=rounds, probe_rounds=probe_rounds, local_epochs=epochs,
                        batch_size=batch, probe_steps=7, probe_learning_rate=3.0, secure_aggregation=False,
                        num_clients=1, clients_per_round=1)


@pytest.fixture
def no_accountant(monkeypatch):
    """A fixed sigma and epsilon: the plan's shape, not its numbers, is what these tests compare."""
    monkeypatch.setattr(plan_module, "calibrate_sigma", lambda epsilon_at, *, target_epsilon, tolerance: 1.5)
    monkeypatch.setattr(plan_module, "epsilon_of", lambda history, *, delta, accountant: 0.0)


def test_the_registry_holds_the_three_modes_by_name():
    assert tuple(TRAINING_MODES) == NAMES == budget_defaults.TRAINING_MODES
    assert [type(m) for m in TRAINING_MODES.values()] == [AdapterMode, ProbeMode, TwoStageMode]
    for name, mode in TRAINING_MODES.items():
        assert isinstance(mode, TrainingMode) and mode.name == name and training_mode(name) is mode


def test_an_unknown_mode_is_a_clear_error_naming_the_known_ones():
    with pytest.raises(FedtuneError, match="unknown training mode 'finetune': must be one of adapter, probe, "
                                           "two-stage"):
        training_mode("finetune")
    with pytest.raises(FedtuneError, match="'training-mode' must be one of adapter, probe, two-stage"):
        RunConfig(training_mode="finetune")


def test_each_mode_answers_what_it_trains():
    adapter, probe, two_stage = (training_mode(n) for n in NAMES)
    assert (adapter.pooled_head, probe.pooled_head, two_stage.pooled_head) == (False, True, True)
    assert (adapter.freezes_lora, probe.freezes_lora, two_stage.freezes_lora) == (False, True, False)
    assert (adapter.has_probe_stage, probe.has_probe_stage, two_stage.has_probe_stage) == (False, True, True)
    assert (adapter.has_adapter_stage, probe.has_adapter_stage, two_stage.has_adapter_stage) == (True, False, True)
    assert [m.size_keys for m in (adapter, probe, two_stage)] == [_legacy_size_keys(n) for n in NAMES]


@pytest.mark.parametrize("probe_rounds", [1, 2, 4])
def test_probe_rounds_per_mode_are_rounds_one_to_probe_rounds_in_two_stage(probe_rounds):
    rounds = range(1, 7)
    adapter, probe, two_stage = (training_mode(n) for n in NAMES)
    assert [adapter.probe_round(r, probe_rounds=probe_rounds) for r in rounds] == [False] * 6
    assert [probe.probe_round(r, probe_rounds=probe_rounds) for r in rounds] == [True] * 6
    assert [two_stage.probe_round(r, probe_rounds=probe_rounds) for r in rounds] == [r <= probe_rounds
                                                                                     for r in rounds]
    assert [two_stage.stage(r, probe_rounds=probe_rounds) for r in rounds] == (
        ["probe"] * probe_rounds + ["adapter"] * (6 - probe_rounds))
    assert [m.probe_round_count(num_rounds=6, probe_rounds=probe_rounds) for m in (adapter, probe, two_stage)] == [
        0, 6, probe_rounds]


def test_the_plan_rules_answer_as_the_string_comparisons_did():
    for config in _configs():
        for server_round in range(0, config.num_rounds + 2):
            assert plan_module.is_probe_round(config, server_round) == _legacy_is_probe_round(config, server_round)
        for n in (None, 10, 100, 1000):
            assert plan_module.planned_steps(config, num_examples=n) == _legacy_planned_steps(config, num_examples=n)
        refusal = plan_module.size_problem(config, num_examples=1000, max_dp_steps=1)
        assert refusal.endswith(f"lower {_legacy_size_keys(config.training_mode)}")


def test_plan_of_config_builds_each_modes_stages_as_before(no_accountant):
    for config in _configs():
        plan = plan_module.plan_of_config(config, num_examples=100)
        assert plan_module.same_schedule(plan, config, num_examples=100)
        if config.training_mode == "probe":
            assert (plan.probe, plan.sample_rate, plan.steps_per_round) == (None, 1.0, config.probe_steps)
        elif config.training_mode == "two-stage":
            assert (plan.probe.rounds, plan.probe.steps_per_round) == (config.probe_rounds, config.probe_steps)
            assert plan.steps_per_round == config.local_epochs * int(100 / config.batch_size)
        else:
            assert plan.probe is None and plan.steps_per_round == config.local_epochs * int(100 / config.batch_size)
        others = [m for m in NAMES if m != config.training_mode
                  and not (m == "two-stage" and config.probe_rounds >= config.num_rounds)]
        for other in others:
            assert not plan_module.same_schedule(plan, config.with_overrides(training_mode=other), num_examples=100)


def test_the_plan_table_names_each_rounds_stage(no_accountant):
    for mode, expected in (("adapter", ["adapter"] * 4), ("probe", ["probe"] * 4),
                           ("two-stage", ["probe", "probe", "adapter", "adapter"])):
        schedule = plan_module.privacy_schedule(dataset_size=100, batch_size=10, local_epochs=1, rounds=4,
                                                target_epsilon=2.0, delta=1e-5, training_mode=mode, probe_rounds=2)
        assert [row["stage"] for row in schedule["rounds"]] == expected and schedule["training_mode"] == mode


def test_config_checks_ask_the_mode():
    with pytest.raises(FedtuneError, match="'probe-rounds' must leave at least one adapter round in two-stage"):
        RunConfig(training_mode="two-stage", num_rounds=3, probe_rounds=3)
    RunConfig(training_mode="probe", num_rounds=3, probe_rounds=3)  # probe-rounds means nothing to probe
    for mode in ("probe", "two-stage"):
        with pytest.raises(FedtuneError, match="'training-mode' must be 'adapter' for this task"):
            RunConfig(task="causal-lm", training_mode=mode)
    assert RunConfig(task="causal-lm", training_mode="adapter").training_mode == "adapter"


def test_the_update_bound_and_model_card_follow_the_modes_stages():
    for config in _configs():
        assert coordinate_bound(config=config, max_client_examples=300) == pytest.approx(
            _legacy_coordinate_bound(config, max_client_examples=300))
        settings = model_card._probe_settings(config)
        assert (settings == "") == (config.training_mode == "adapter")
        if settings:
            assert "7 full-batch head steps per probe round at SGD step 3" in settings


def test_the_registry_imports_without_torch():
    """`fedtune audit` and `fedtune plan` read configs without torch; the registry must not pull it in."""
    code = "import sys, common.training_modes, common.config_checks; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
