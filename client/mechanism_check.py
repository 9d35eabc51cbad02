"""The empirical check of the DP mechanism: the clients' own DP-SGD step, watched from inside.

A white-box canary experiment in the spirit of Nasr et al. (USENIX Security 2023): the client's
trainer (`train_locally`: Opacus' Poisson sampler, per-example clipping, noise, the same code a
round runs) steps a small LoRA model at learning rate 0 with the run's sigma, clipping bound C
and sample rate. LoRA's B starts at zero, so no real example has a gradient on any LoRA A entry;
each canary record gets a gradient of norm 10 C on its own A entry (a Dirac canary, written
into its per-example gradient before clipping) and nothing elsewhere. So after one noisy step
the A entry of a canary, over C, is N(1, sigma^2) when the canary was sampled and N(0, sigma^2)
when not, and an entry no canary owns is a canary-out world: N(0, sigma^2). Every step is fresh
noise and a fresh Poisson draw, so one run gives many independent trials of `steps` steps each.
mechanism_stats turns them into a lower bound on epsilon at 95%; a bound above the accountant's
claim is a finding. The network is a stand-in (2 layers, 32 wide): the canary entries never see
its real gradients, so what is measured is the step code, whatever the run's model.
"""

from __future__ import annotations

import math
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedtune.client.mechanism_stats import CONFIDENCE, RateBounds, bound_rates, claim_profile, trial_statistic
from fedtune.common.errors import FedtuneError
from fedtune.common.execution import seeded_rng

FAULTS = ("half-noise", "no-clipping", "double-rate")  # broken mechanisms, for tests and benchmarks only
RANK, WIDTH, LENGTH = 16, 32, 4  # LoRA rank r on query and value: 2 layers x 2 x r x WIDTH A entries
REAL_RECORDS = 64  # ordinary records in every Poisson batch beside the canaries
DIRAC = 10.0  # a canary's gradient norm, in units of C: clipping must cut it to C
SENTINEL, FIRST_ID = 1, 3  # a canary record starts with SENTINEL, then FIRST_ID + its number


@dataclass(frozen=True)
class MechanismCheck:
    """One check: the accountant's claim for `steps` steps and the measured lower bound."""

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    delta: float
    steps: int  # DP steps in one trial: the claims are for this many
    claim_epsilon: float  # Opacus' PRV accountant at `delta`, as the clients account
    claim_epsilon_pld: float  # dp_accounting's PLD accountant at `delta`
    lower_epsilon: float  # the bound at `delta`, at `confidence`
    gdp_epsilon: float  # Nasr et al.'s Gaussian-shaped extrapolation at `delta`: a heuristic
    tightest_delta: float  # where the bound comes closest to the PLD claim
    tightest_claim: float
    tightest_lower: float
    rates: RateBounds  # of the threshold test, on the held-out half of the trials
    in_trials: int  # canary-in trials, both halves
    out_trials: int
    measured_sigma: float  # spread of the canary-out entries over C: the noise multiplier applied
    measured_rate: float  # mean canary-in entry over C: the sample rate, if clipping holds at C
    confidence: float
    dp_steps: int  # noisy steps the trainer took
    seconds: float
    fault: str | None  # the injected break, if any (never in a real check)

    @property
    def finding(self) -> bool:
        """The bound exceeds a claim: the mechanism leaks more than the accountant says."""
        return self.tightest_lower > self.tightest_claim or self.lower_epsilon > self.claim_epsilon

    @property
    def tightness(self) -> float:
        return self.tightest_lower / self.tightest_claim if self.tightest_claim > 0 else math.inf

    def describe(self) -> str:
        verdict = "FINDING: the mechanism leaks more than claimed" if self.finding else "no finding"
        return (f"sigma {self.noise_multiplier:g}, q {self.sample_rate:.4g}, C {self.max_grad_norm:g}, "
                f"{self.steps} step(s): claimed eps {self.claim_epsilon:.3f} at delta {self.delta:.0e}, "
                f"measured >= {self.lower_epsilon:.3f} ({self.confidence:.0%}); closest at delta "
                f"{self.tightest_delta:.0e}: {self.tightest_lower:.3f} of {self.tightest_claim:.3f} "
                f"({self.tightness:.2f}x); {verdict}")


def check_mechanism(*, noise_multiplier: float, sample_rate: float, max_grad_norm: float, delta: float,
                    steps: int = 1, trials: int = 1_000_000, physical_batch_size: int = 0, seed: int | None = None,
                    fault: str | None = None) -> MechanismCheck:
    """Run the client's DP-SGD step on canaries and bound epsilon for `steps` steps from below.

    `trials` is the number of canary-in trials wanted (about as many canary-out ones come
    free). `seed` fixes the noise, the sampling and the split (None: the OS's randomness, as a
    client's). `fault` breaks the mechanism on purpose, one of FAULTS: tests only.
    """
    if fault is not None and fault not in FAULTS:
        raise FedtuneError(f"unknown mechanism fault; one of {', '.join(FAULTS)}")
    if not (noise_multiplier > 0 and 0 < sample_rate <= 1 and max_grad_norm > 0 and 0 < delta < 1 and steps >= 1):
        raise FedtuneError("the mechanism check needs sigma > 0, 0 < q <= 1, C > 0, 0 < delta < 1 and steps >= 1")
    from fedtune.common.privacy.accounting import epsilon_of

    started = time.perf_counter()
    inside, outside, dp_steps = _canary_scores(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                               max_grad_norm=max_grad_norm, steps=steps, trials=trials,
                                               physical=physical_batch_size, seed=seed, fault=fault)
    profile = claim_profile(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    rng = np.random.default_rng(None if seed is None else (seed, 1))  # not the canaries' draw again
    rates = bound_rates(inside=trial_statistic(inside, noise_multiplier=noise_multiplier, sample_rate=sample_rate),
                        outside=trial_statistic(outside, noise_multiplier=noise_multiplier, sample_rate=sample_rate),
                        profile=profile, rng=rng)
    lowers = [rates.epsilon(d) for d in profile.deltas]
    best = int(np.argmax([lo / max(c, 1e-12) for lo, c in zip(lowers, profile.epsilons)]))
    return MechanismCheck(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, max_grad_norm=max_grad_norm, delta=delta,
        steps=steps, claim_epsilon=epsilon_of([(noise_multiplier, sample_rate, steps)], delta=delta),
        claim_epsilon_pld=profile.epsilons[0], lower_epsilon=lowers[0], gdp_epsilon=rates.gdp_epsilon(delta),
        tightest_delta=profile.deltas[best], tightest_claim=profile.epsilons[best], tightest_lower=lowers[best],
        rates=rates, in_trials=len(inside), out_trials=len(outside), measured_sigma=float(outside.std()),
        measured_rate=float(inside.mean()), confidence=CONFIDENCE, dp_steps=dp_steps, seconds=time.perf_counter() - started, fault=fault)


def check_run(*, run_dir: Path, client_id: str, steps: int = 1, trials: int = 1_000_000,
              seed: int | None = None) -> MechanismCheck:
    """The check for one client of a finished run, with the sigma, q and delta of its last DP
    round in its ledger, the run's C (under the node's cap) and physical batch size.

    One step per trial by default: the step is what the code implements (a round composes
    independent steps, which is the accountant's arithmetic), and one-step trials are ten times
    as many as ten-step ones for the same time, so the bound comes closest to the claim."""
    from fedtune.common.config import RunConfig
    from fedtune.common.ledger.audit import find_ledgers
    from fedtune.common.ledger.chain import read_records

    ledgers = find_ledgers(Path(run_dir))
    if client_id not in ledgers:
        raise FedtuneError(f"{run_dir} has no ledger of a client named by the given id; "
                           f"ledgers found: {len(ledgers)}")
    trained = [r for r in read_records(ledgers[client_id]) if r.get("status") == "trained" and r.get("dp")]
    if not trained:
        raise FedtuneError(f"the ledger at {ledgers[client_id]} records no round trained with DP: nothing to check")
    config_path = Path(run_dir) / "config.toml"
    if not config_path.is_file():
        raise FedtuneError(f"{config_path} not found: the check needs the run's clipping bound (max-grad-norm)")
    config, last = RunConfig.load(path=config_path), trained[-1]
    try:
        sigma, rate, delta = float(last["noise_multiplier"]), float(last["sample_rate"]), float(last["delta"])
        cap = float((last.get("policy") or {}).get("max-grad-norm", config.max_grad_norm))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FedtuneError(f"the last DP record in {ledgers[client_id]} lacks a readable noise_multiplier, "
                           f"sample_rate, delta or policy") from None
    # The node's policy caps C over the run's (NodePolicy.applied_to): the bound in force is the smaller.
    return check_mechanism(noise_multiplier=sigma, sample_rate=rate, max_grad_norm=min(config.max_grad_norm, cap),
                           delta=delta, steps=steps, trials=trials, physical_batch_size=config.physical_batch_size,
                           seed=seed)


def _canary_scores(*, noise_multiplier, sample_rate, max_grad_norm, steps, trials, physical, seed,
                   fault) -> tuple[np.ndarray, np.ndarray, int]:
    """(in-trial scores, out-trial scores, DP steps taken): each (trials, steps), from one run of
    the trainer over canaries and ordinary records."""
    from fedtune.client.trainer import train_locally
    from fedtune.common.privacy.plan import PrivacyPlan
    from fedtune.common.tasks import get_task

    model, lora_a = _stand_in_model()
    entries = sum(p.numel() for p in lora_a)
    owned = np.random.default_rng(seed).permutation(entries)
    canaries, free = np.sort(owned[: entries // 2]), np.sort(owned[entries // 2:])
    dataset = _records(canaries=len(canaries))
    total = math.ceil(trials / len(canaries)) * steps  # each step gives every canary and free entry a score
    plan = PrivacyPlan(num_examples=len(dataset), sample_rate=sample_rate, steps_per_round=total,
                       noise_multiplier=noise_multiplier, planned_rounds=1, target_epsilon=math.inf,
                       target_delta=1e-5, accountant="prv")
    probe = _CanaryProbe(lora_a=lora_a, canaries=torch.from_numpy(canaries), max_grad_norm=max_grad_norm,
                         steps=total, seed=seed, fault=fault)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small step 3x faster on one thread than on two
    try:
        train_locally(model=model, dataset=dataset, loss=get_task("classification").loss, learning_rate=0.0,
                      batch_size=max(1, round(sample_rate * len(dataset))), local_epochs=1,
                      max_grad_norm=max_grad_norm, plan=plan, history=[], seed=0, physical_batch_size=physical,
                      probe=probe)
    finally:
        torch.set_num_threads(threads)
    scores = torch.stack(probe.scores).numpy()  # (DP steps, A entries)
    usable = len(scores) // steps * steps
    return _trials(scores[:usable, canaries], steps), _trials(scores[:usable, free], steps), len(scores)


def _trials(scores: np.ndarray, steps: int) -> np.ndarray:
    """(DP steps, entries) -> (trials, steps): consecutive runs of `steps` steps of one entry."""
    blocks = scores.reshape(len(scores) // steps, steps, scores.shape[1])
    return blocks.transpose(0, 2, 1).reshape(-1, steps).astype(np.float64)


def _stand_in_model():
    """A 2-layer, 32-wide BERT classifier built from a config (nothing to download), with LoRA
    on query and value: (model, its LoRA A matrices)."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedtune.common.models.lora import LoraSettings, attach_lora

    config = BertConfig(vocab_size=4096 + FIRST_ID, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * WIDTH, max_position_embeddings=2 * LENGTH)
    with seeded_rng(0):
        model = attach_lora(BertForSequenceClassification(config), task_type="SEQ_CLS",
                            lora=LoraSettings(rank=RANK, alpha=RANK), targets=["query", "value"], seed=0)
    model.train()
    lora_a = [p for name, p in model.named_parameters() if p.requires_grad and ".lora_A." in name]
    return model, lora_a


def _records(*, canaries: int) -> torch.utils.data.TensorDataset:
    """`canaries` canary records (SENTINEL, then their number) and REAL_RECORDS random ones."""
    generator = torch.Generator().manual_seed(0)
    count = canaries + REAL_RECORDS
    ids = torch.randint(FIRST_ID + canaries, 4096 + FIRST_ID, (count, LENGTH), generator=generator)
    ids[:canaries, 0] = SENTINEL
    ids[:canaries, 1] = FIRST_ID + torch.arange(canaries)
    labels = torch.randint(0, 2, (count,), generator=generator)
    return torch.utils.data.TensorDataset(ids, torch.ones_like(ids), labels)


class _CanaryProbe:
    """The trainer's StepProbe: writes each sampled canary's Dirac gradient before clipping and
    reads every A entry of each noisy step, in units of C."""

    def __init__(self, *, lora_a: list[torch.nn.Parameter], canaries: torch.Tensor, max_grad_norm: float,
                 steps: int, seed: int | None, fault: str | None) -> None:
        self.lora_a, self.canaries, self.norm = lora_a, canaries, max_grad_norm
        self.steps, self.seed, self.fault = steps, seed, fault
        self.offsets = np.cumsum([0] + [p.numel() for p in lora_a]).tolist()
        self.scores: list[torch.Tensor] = []

    def start(self, loader, optimizer) -> None:
        loader.batch_sampler.steps = self.steps  # one "epoch" of exactly the steps needed, whatever q
        if self.seed is not None:
            optimizer.generator.manual_seed(self.seed)  # the loader's generator too: one object
        if self.fault == "half-noise":
            optimizer.noise_multiplier /= 2
        elif self.fault == "no-clipping":
            optimizer.clip_and_accumulate = types.MethodType(_accumulate_unclipped, optimizer)
        elif self.fault == "double-rate":
            loader.batch_sampler.sample_rate = min(1.0, 2 * loader.batch_sampler.sample_rate)

    def after_backward(self, piece: list[torch.Tensor], optimizer) -> None:
        rows = torch.nonzero(piece[0][:, 0] == SENTINEL).squeeze(1)
        if len(rows) == 0:
            return
        for p in optimizer.params:
            p.grad_sample[rows] = 0
        entries = self.canaries[piece[0][rows, 1] - FIRST_ID]
        for p, start, end in zip(self.lora_a, self.offsets, self.offsets[1:]):
            mine = (entries >= start) & (entries < end)
            if mine.any():
                index = torch.unravel_index(entries[mine] - start, p.shape)
                p.grad_sample[(rows[mine], *index)] = DIRAC * self.norm

    def after_step(self, optimizer) -> None:
        scale = optimizer.expected_batch_size / self.norm
        self.scores.append(torch.cat([p.grad.reshape(-1) for p in self.lora_a]) * scale)


def _accumulate_unclipped(optimizer) -> None:
    """DPOptimizer.clip_and_accumulate without the clipping: the "no-clipping" fault."""
    for p in optimizer.params:
        grad = p.grad_sample.sum(dim=0).to(p.dtype)
        p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
