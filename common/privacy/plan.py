"""A client's DP-SGD plan: sample rate, steps and the noise multiplier for the whole run,
calibrated once before the first round, and the epsilon schedule it leads to (`fedtune plan`).

A two-stage run (linear probing, then the adapter) has two stages in one plan and one
accountant history: the probe rounds are full-batch (every record in every step, q = 1) with
their own noise, calibrated to a declared share of the budget; the adapter rounds' noise is then
calibrated so the whole composed history ends at the budget.

A plan's size is capped before anything is calibrated (`size_problem`): the accountant's time
and memory grow with the DP steps it composes (the PRV accountant's grid with their square root
and with epsilon), so a run's rounds and total steps are bounded by the node's policy
(`max-rounds`, `max-dp-steps`), never by what a job or a command line asks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fedtune.common.counts import counted
from fedtune.common.errors import FedtuneError
from fedtune.common.privacy.accounting import HistoryEntry, compose, epsilon_of
from fedtune.common.privacy.calibration import UnreachableBudget, calibrate_sigma
from fedtune.common.training_modes import training_mode as mode_of

# The node policy's default caps (common/privacy/policy.py; node config `max-rounds`, `max-dp-steps`).
# 1,000 rounds is ten times the longest federated run in the fine-tuning literature we follow; 100,000
# DP steps is e.g. 20 rounds of one epoch over 80,000 records at batch 16. At that many steps one PRV
# accountant call near a budget takes at most about 20 s and 1.8 GB here (measured: q 0.01-1, epsilon
# 0.9-8), and a whole calibration a few such calls; the accountant's own bound (accounting.py) stops
# the calls far from the budget, whose grid would not fit.
DEFAULT_MAX_ROUNDS = 1_000
DEFAULT_MAX_DP_STEPS = 100_000


@dataclass(frozen=True)
class ProbeStage:
    """Two-stage runs: rounds 1..`rounds` train the head alone, full batch (sample rate 1)."""

    rounds: int
    steps_per_round: int
    noise_multiplier: float

    def entry(self) -> HistoryEntry:
        return (self.noise_multiplier, 1.0, self.steps_per_round)


@dataclass(frozen=True)
class PrivacyPlan:
    """One client's DP-SGD schedule, fixed before its first round for the whole run. With a
    `probe` stage, the other fields are the adapter rounds' (after the probe rounds)."""

    num_examples: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    planned_rounds: int
    target_epsilon: float
    target_delta: float
    accountant: str
    probe: ProbeStage | None = None

    def for_round(self, server_round: int) -> PrivacyPlan:
        """The single-stage plan a round trains under: a probe round's is the probe stage's."""
        if self.probe is None or not 1 <= server_round <= self.probe.rounds:
            return dataclasses.replace(self, probe=None)
        return dataclasses.replace(self, probe=None, sample_rate=1.0, steps_per_round=self.probe.steps_per_round,
                                   noise_multiplier=self.probe.noise_multiplier)

    def round_entry(self, server_round: int) -> HistoryEntry:
        plan = self.for_round(server_round)
        return (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)

    def stages_record(self) -> dict[str, Any] | None:
        """What a ledger record adds so a two-stage plan reads back whole (None: one stage)."""
        if self.probe is None:
            return None
        return {"probe": dataclasses.asdict(self.probe),
                "adapter": {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                            "steps_per_round": self.steps_per_round}}

    @property
    def smallest_noise_multiplier(self) -> float:
        return min(self.noise_multiplier, self.probe.noise_multiplier) if self.probe else self.noise_multiplier


def sampling_schedule(*, num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(Poisson sample rate q, DP steps per round) for N examples: what the accountant assumes."""
    sample_rate = min(1.0, batch_size / num_examples)
    return sample_rate, local_epochs * int(1 / sample_rate)


def plan_privacy(*, num_examples: int, batch_size: int, local_epochs: int, num_rounds: int,
                 target_epsilon: float, target_delta: float, accountant: str = "prv",
                 noise_multiplier: float = 0.0) -> PrivacyPlan:
    """Sample rate, steps per round and the noise multiplier for the whole planned run.

    Sample rate q = batch / N (Poisson sampling); a local epoch is int(1/q) steps, which is
    what Opacus' Poisson sampler draws. With `noise_multiplier` 0, sigma is calibrated so that
    `num_rounds` rounds spend at most `target_epsilon` at `target_delta`.
    """
    if num_examples < 1:
        raise FedtuneError("a client needs at least one training example for DP-SGD")
    sample_rate, steps_per_round = sampling_schedule(num_examples=num_examples, batch_size=batch_size,
                                                     local_epochs=local_epochs)
    if noise_multiplier <= 0:
        steps = num_rounds * steps_per_round
        try:
            noise_multiplier = calibrate_sigma(
                lambda sigma: epsilon_of([(sigma, sample_rate, steps)], delta=target_delta, accountant=accountant),
                target_epsilon=target_epsilon, tolerance=0.01)
        except UnreachableBudget as exc:
            raise FedtuneError(f"cannot reach epsilon {target_epsilon} at delta {target_delta} with "
                               f"{counted(num_rounds, 'round')} of {counted(steps_per_round, 'step')}: {exc} "
                               f"Raise target-epsilon or lower num-rounds/local-epochs") from None
    return PrivacyPlan(num_examples=num_examples, sample_rate=sample_rate,
                       steps_per_round=steps_per_round, noise_multiplier=float(noise_multiplier),
                       planned_rounds=num_rounds, target_epsilon=target_epsilon,
                       target_delta=target_delta, accountant=accountant)


def plan_two_stage(*, num_examples: int, batch_size: int, local_epochs: int, num_rounds: int, probe_rounds: int,
                   probe_steps: int, probe_share: float, target_epsilon: float, target_delta: float,
                   accountant: str = "prv", noise_multiplier: float = 0.0) -> PrivacyPlan:
    """Probe rounds calibrated to `probe_share` of the budget, the adapter rounds to the rest of
    the same history. A forced `noise_multiplier` is a floor for both stages' sigma."""
    if num_examples < 1:
        raise FedtuneError("a client needs at least one training example for DP-SGD")
    probe_steps_total = probe_rounds * probe_steps
    probe_sigma = max(noise_multiplier, _calibrated(
        lambda sigma: epsilon_of([(sigma, 1.0, probe_steps_total)], delta=target_delta, accountant=accountant),
        target_epsilon * probe_share, what=f"the {probe_rounds} probe round(s)"))
    sample_rate, steps_per_round = sampling_schedule(num_examples=num_examples, batch_size=batch_size,
                                                     local_epochs=local_epochs)
    rest = (num_rounds - probe_rounds) * steps_per_round
    adapter_sigma = max(noise_multiplier, _calibrated(
        lambda sigma: epsilon_of([(probe_sigma, 1.0, probe_steps_total), (sigma, sample_rate, rest)],
                                 delta=target_delta, accountant=accountant),
        target_epsilon, what=f"the {num_rounds - probe_rounds} adapter round(s)"))
    return PrivacyPlan(num_examples=num_examples, sample_rate=sample_rate, steps_per_round=steps_per_round,
                       noise_multiplier=float(adapter_sigma), planned_rounds=num_rounds, target_epsilon=target_epsilon,
                       target_delta=target_delta, accountant=accountant,
                       probe=ProbeStage(rounds=probe_rounds, steps_per_round=probe_steps,
                                        noise_multiplier=float(probe_sigma)))


def _calibrated(epsilon_at, target: float, *, what: str) -> float:
    try:
        return calibrate_sigma(epsilon_at, target_epsilon=target, tolerance=0.01)
    except UnreachableBudget as exc:
        raise FedtuneError(f"cannot fit {what} into epsilon {target:g}: {exc} Raise target-epsilon, lower "
                           f"num-rounds or probe-steps, or change probe-epsilon-share") from None


def planned_steps(config, *, num_examples: int | None) -> int:
    """The DP steps a run config plans over all its rounds (probe stage included). Without N (a job
    not yet matched to a node's data) a local epoch counts one step: the least it can be."""
    probe = mode_of(config.training_mode).probe_round_count(num_rounds=config.num_rounds,
                                                            probe_rounds=config.probe_rounds)
    if probe == config.num_rounds:  # no adapter round: N does not enter
        return probe * config.probe_steps
    per_epoch = 1 if num_examples is None else sampling_schedule(num_examples=num_examples,
                                                                 batch_size=config.batch_size, local_epochs=1)[1]
    return probe * config.probe_steps + (config.num_rounds - probe) * config.local_epochs * per_epoch


def size_problem(config, *, num_examples: int | None, max_rounds: int = DEFAULT_MAX_ROUNDS,
                 max_dp_steps: int = DEFAULT_MAX_DP_STEPS, party: str = "this node") -> str | None:
    """Why a run config plans more rounds or DP steps than the caps allow, or None; cheap (no
    accountant). The reason names the job's keys and the caps, never the step count: that count
    follows from N, and a node's refusal travels to the coordinator."""
    if config.num_rounds > max_rounds:
        return (f"num-rounds={config.num_rounds} asked, {party} plans at most {counted(max_rounds, 'round')} "
                f"(policy max-rounds); lower num-rounds")
    if planned_steps(config, num_examples=num_examples) > max_dp_steps:
        return (f"the job plans more DP steps over the run than the {max_dp_steps} {party} plans at most "
                f"(policy max-dp-steps); lower {mode_of(config.training_mode).size_keys}")
    return None


def plan_of_config(config, *, num_examples: int, max_rounds: int = DEFAULT_MAX_ROUNDS,
                   max_dp_steps: int = DEFAULT_MAX_DP_STEPS) -> PrivacyPlan:
    """The plan a client makes for a run config (any object with RunConfig's fields), by its mode.
    A plan over the caps is refused before the accountant is called."""
    problem = size_problem(config, num_examples=num_examples, max_rounds=max_rounds, max_dp_steps=max_dp_steps)
    if problem:
        raise FedtuneError(problem)
    common = dict(num_examples=num_examples, num_rounds=config.num_rounds, target_epsilon=config.target_epsilon,
                  target_delta=config.target_delta, accountant=config.accountant,
                  noise_multiplier=config.noise_multiplier)
    mode = mode_of(config.training_mode)
    if mode.has_probe_stage and mode.has_adapter_stage:
        return plan_two_stage(batch_size=config.batch_size, local_epochs=config.local_epochs,
                              probe_rounds=config.probe_rounds, probe_steps=config.probe_steps,
                              probe_share=config.probe_epsilon_share, **common)
    if mode.has_probe_stage:  # probe rounds only; full batch: every record in each of probe-steps steps
        return plan_privacy(batch_size=num_examples, local_epochs=config.probe_steps, **common)
    return plan_privacy(batch_size=config.batch_size, local_epochs=config.local_epochs, **common)


def same_schedule(plan: PrivacyPlan, config, *, num_examples: int) -> bool:
    """Whether a plan read back was made for this data and this config's steps (not its noise)."""
    mode = mode_of(config.training_mode)
    if not mode.has_adapter_stage:
        expected = (1.0, config.probe_steps, None)
    else:
        expected = (*sampling_schedule(num_examples=num_examples, batch_size=config.batch_size,
                                       local_epochs=config.local_epochs),
                    (config.probe_rounds, config.probe_steps) if mode.has_probe_stage else None)
    probe = (plan.probe.rounds, plan.probe.steps_per_round) if plan.probe else None
    return plan.num_examples == num_examples and (plan.sample_rate, plan.steps_per_round, probe) == expected


def is_probe_round(config, server_round: int) -> bool:
    """Whether a round trains the head alone: the one rule the plan, the trainer and the record share
    (rounds are numbered from 1; a client refuses any other number before this is asked)."""
    return mode_of(config.training_mode).probe_round(server_round, probe_rounds=config.probe_rounds)


def epsilon_after_next_round(history: list[HistoryEntry], plan: PrivacyPlan, server_round: int) -> float:
    return epsilon_of(compose(history, plan.round_entry(server_round)), delta=plan.target_delta,
                      accountant=plan.accountant)


def fits_budget(epsilon: float, plan: PrivacyPlan) -> bool:
    """The guard's test; the tiny slack absorbs the accountant's float noise, nothing more."""
    return math.isfinite(epsilon) and epsilon <= plan.target_epsilon * (1 + 1e-9)


def privacy_schedule(*, dataset_size: int, batch_size: int, local_epochs: int, rounds: int,
                     target_epsilon: float, delta: float, accountant: str = "prv",
                     noise_multiplier: float = 0.0, training_mode: str = "adapter", probe_rounds: int = 1,
                     probe_steps: int = 16, probe_share: float = 0.5) -> dict:
    """Noise multiplier and epsilon after each round, via the same plan, composition and budget
    guard as a client (a round the guard would refuse is marked). Each row's budget left is what
    an early stop after that round leaves unspent."""
    from types import SimpleNamespace

    config = SimpleNamespace(num_rounds=rounds, target_epsilon=target_epsilon, target_delta=delta,
                             accountant=accountant, noise_multiplier=noise_multiplier, batch_size=batch_size,
                             local_epochs=local_epochs, training_mode=training_mode, probe_rounds=probe_rounds,
                             probe_steps=probe_steps, probe_epsilon_share=probe_share)
    plan = plan_of_config(config, num_examples=dataset_size)
    history, per_round = [], []
    for server_round in range(1, rounds + 1):
        stage = plan.for_round(server_round)
        history = compose(history, plan.round_entry(server_round))
        epsilon = epsilon_of(history, delta=delta, accountant=accountant)
        per_round.append({"round": server_round, "epsilon": epsilon, "noise_multiplier": stage.noise_multiplier,
                          "sample_rate": stage.sample_rate, "steps": stage.steps_per_round,
                          "stage": mode_of(training_mode).stage(server_round, probe_rounds=probe_rounds),
                          "client_refuses": not fits_budget(epsilon, plan)})  # the client's own guard
    return {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
            "steps_per_round": plan.steps_per_round, "accountant": accountant, "delta": delta,
            "target_epsilon": target_epsilon, "training_mode": training_mode,
            "probe": dataclasses.asdict(plan.probe) if plan.probe else None, "rounds": per_round}
