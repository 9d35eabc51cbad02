"""An institution's privacy policy: what its node will do, whatever the coordinator asks.

The policy lives in the node config (deployment) with safe defaults: DP on, secure aggregation
on, the node's own epsilon and delta, clipping bound and accountant, client evaluation off and
the train loss withheld. A job (the coordinator's run config) may ask for something tighter,
which the node then uses; a request to loosen any of these is refused with the reason, before
anything is read or spent. In a simulation one researcher holds every node, so the run config
is the policy (`of_simulation`), and node config keys may still tighten it.

The policy is copied into every ledger record, so an auditor checks each round against the
policy that was in force.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from fedtune.common.errors import FedtuneError
from fedtune.common.privacy.plan import DEFAULT_MAX_DP_STEPS, DEFAULT_MAX_ROUNDS, size_problem
from fedtune.common.values import coerce

# Stricter accountant first: RDP's epsilon bound is never below PRV's for the same history.
ACCOUNTANT_STRICTNESS = {"prv": 0, "rdp": 1}

POLICY_KEYS = ("dp", "secure-aggregation", "target-epsilon", "target-delta", "allow-large-delta", "max-grad-norm",
               "noise-multiplier", "accountant", "max-evaluations", "share-train-loss", "secagg-min-contributors",
               "max-rounds", "max-dp-steps", "secagg-max-colluders")
# The smallest SecAgg+ round a node joins by default: with two contributors each learns the other's update.
MIN_CONTRIBUTORS = 3


@dataclass(frozen=True)
class NodePolicy:
    """The node's limits. Each field's docstring-like comment says what 'tighter' means."""

    dp: bool = True  # tighter: true
    secure_aggregation: bool = True  # tighter: true
    target_epsilon: float = 8.0  # tighter: smaller; over the node's whole ledger, every run
    target_delta: float = 1e-5  # tighter: smaller
    # A delta at or above 1/N (N: the node's training records) lets a mechanism publish whole records;
    # trained only when this is true. Only the node's own config (or a simulation's researcher) sets
    # it: a job's allow-large-delta is never read on a deployed node.
    allow_large_delta: bool = False  # tighter: false
    max_grad_norm: float = 1.0  # tighter: smaller (the clipping bound C)
    noise_multiplier: float = 0.0  # >0: the node always uses at least this sigma; tighter: larger
    accountant: str = "prv"  # tighter: rdp
    max_evaluations: int = 0  # client evaluations answered over the node's whole ledger
    share_train_loss: bool = False  # the (non-private) train loss in the clear reply
    secagg_min_contributors: int = MIN_CONTRIBUTORS  # SecAgg+ peers, and signed contributors; tighter: larger
    # Institutions that may collude with the coordinator: the node joins only SecAgg+ rounds whose
    # threshold t satisfies 2t > n + this (n sampled), or a split story about who dropped out, with
    # their signatures on both stories, rebuilds both masks of one node. Tighter: larger.
    secagg_max_colluders: int = 0
    # The largest run this node plans for, checked before any calibration (the accountant's time and
    # memory grow with the steps it composes): a job over either is refused. Tighter: smaller.
    max_rounds: int = DEFAULT_MAX_ROUNDS
    max_dp_steps: int = DEFAULT_MAX_DP_STEPS  # over the whole run, probe stage included

    def __post_init__(self) -> None:
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise FedtuneError("node policy 'target-epsilon' must be a positive number")
        if not 0.0 < self.target_delta < 1.0:
            raise FedtuneError("node policy 'target-delta' must lie strictly between 0 and 1")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise FedtuneError("node policy 'max-grad-norm' must be a positive number")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise FedtuneError("node policy 'noise-multiplier' must be 0 (calibrate) or a positive number")
        if self.accountant not in ACCOUNTANT_STRICTNESS:
            raise FedtuneError(f"node policy 'accountant' must be one of {', '.join(ACCOUNTANT_STRICTNESS)}")
        if self.max_evaluations < 0:
            raise FedtuneError("node policy 'max-evaluations' must be 0 (never) or a positive whole number")
        if self.secagg_min_contributors < 2:
            raise FedtuneError("node policy 'secagg-min-contributors' must be at least 2: a 'sum' of one update is "
                               "that update")
        if self.secagg_max_colluders < 0:
            raise FedtuneError("node policy 'secagg-max-colluders' must be 0 or a positive whole number")
        if self.max_rounds < 1 or self.max_dp_steps < 1:
            raise FedtuneError("node policy 'max-rounds' and 'max-dp-steps' must be positive whole numbers (the "
                               "largest run this node plans for)")

    # -- where a policy comes from -----------------------------------------------------------

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any], *, defaults: NodePolicy | None = None) -> NodePolicy:
        """The policy keys of a node config over `defaults` (the safe values unless given)."""
        base = defaults or cls()
        values: dict[str, Any] = {}
        for key in POLICY_KEYS:
            if key in node:
                field = key.replace("-", "_")
                values[field] = coerce(key, node[key], type(getattr(base, field)), source="node config key",
                                       quote=False)
        return replace(base, **values)

    @classmethod
    def of_simulation(cls, config: Any) -> NodePolicy:
        """A simulation's researcher holds every node: its run config is the policy, train loss,
        allow-large-delta and (when it asks for them) client evaluations included. A federation of
        two clients per round is the researcher's choice to make: its SecAgg+ rounds then need two."""
        evaluations = config.num_rounds if config.fraction_evaluate > 0 else 0
        min_contributors = max(2, min(MIN_CONTRIBUTORS, config.clients_per_round))
        return cls(dp=config.dp, secure_aggregation=config.secure_aggregation,
                   target_epsilon=config.target_epsilon, target_delta=config.target_delta,
                   allow_large_delta=config.allow_large_delta, max_grad_norm=config.max_grad_norm, noise_multiplier=config.noise_multiplier,
                   accountant=config.accountant, max_evaluations=evaluations, share_train_loss=True,
                   secagg_min_contributors=min_contributors, secagg_max_colluders=config.secagg_max_colluders)

    # -- what a job may ask ------------------------------------------------------------------

    def loosenings(self, job: Any) -> list[str]:
        """Why the job (a RunConfig) asks for less privacy than this policy allows; [] if it does not.

        Each reason names the key, the job's value and the node's limit: the coordinator learns
        the node's policy, which it could read from any reply anyway, and nothing of the data.
        """
        reasons = []
        if self.dp and not job.dp:
            reasons.append("dp=false asked, this node requires dp=true")
        if self.secure_aggregation and not job.secure_aggregation:
            reasons.append("secure-aggregation=false asked, this node requires secure aggregation")
        if job.dp or self.dp:
            if job.target_epsilon > self.target_epsilon:
                reasons.append(f"target-epsilon={job.target_epsilon:g} asked, this node allows at most "
                               f"{self.target_epsilon:g}")
            if job.target_delta > self.target_delta:
                reasons.append(f"target-delta={job.target_delta:g} asked, this node allows at most "
                               f"{self.target_delta:g}")
            if job.max_grad_norm > self.max_grad_norm:
                reasons.append(f"max-grad-norm={job.max_grad_norm:g} asked, this node clips at most at "
                               f"{self.max_grad_norm:g}")
            if self.noise_multiplier > 0 and 0 < job.noise_multiplier < self.noise_multiplier:
                reasons.append(f"noise-multiplier={job.noise_multiplier:g} asked, this node uses at least "
                               f"{self.noise_multiplier:g}")
            if ACCOUNTANT_STRICTNESS.get(job.accountant, -1) < ACCOUNTANT_STRICTNESS[self.accountant]:
                reasons.append(f"accountant={job.accountant} asked, this node accounts with {self.accountant}")
        return reasons

    def applied_to(self, job: Any) -> Any:
        """The job's config with every policy value put in force (the job's when tighter). What the
        job trains stays the job's, even where a smaller budget would pick another default: the
        coordinator expects the arrays of the job's mode."""
        dp = self.dp or job.dp
        sigma = max(self.noise_multiplier, job.noise_multiplier) if self.noise_multiplier > 0 else \
            job.noise_multiplier
        strictest = max(job.accountant, self.accountant, key=lambda a: ACCOUNTANT_STRICTNESS.get(a, -1))
        return job.with_overrides(
            dp=dp, secure_aggregation=self.secure_aggregation or job.secure_aggregation,
            target_epsilon=min(self.target_epsilon, job.target_epsilon),
            target_delta=min(self.target_delta, job.target_delta), allow_large_delta=self.allow_large_delta,
            max_grad_norm=min(self.max_grad_norm, job.max_grad_norm), noise_multiplier=sigma,
            accountant=strictest, training_mode=job.training_mode, probe_learning_rate=job.probe_learning_rate)

    def size_problem(self, job: Any, *, num_examples: int | None = None) -> str | None:
        """Why the job plans more rounds or DP steps than this node's caps, or None: asked before
        anything is calibrated. Without N only the rounds and the steps every record count implies
        are judged; the reason never states a step count (it follows from N)."""
        return size_problem(job, num_examples=num_examples, max_rounds=self.max_rounds,
                            max_dp_steps=self.max_dp_steps)

    def delta_problem(self, *, delta: float, num_examples: int) -> str | None:
        """delta >= 1/N permits releasing a whole record; refused unless the node allowed it.
        The reason never states N: it travels to the coordinator."""
        if num_examples > 0 and delta >= 1.0 / num_examples and not self.allow_large_delta:
            return (f"target-delta={delta:g} is not below 1/N for this node's N training records (a delta that "
                    f"large lets a whole record be published); ask for a smaller target-delta, or set "
                    f"allow-large-delta = true for this node (simulation: --set allow-large-delta=true; "
                    f"deployment: the node's own config only)")
        return None

    def to_record(self) -> dict[str, Any]:
        """The policy as every ledger record carries it (dashed keys, like the node config)."""
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}
