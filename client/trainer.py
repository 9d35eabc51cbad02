"""Local training of the adapter: DP-SGD with Opacus, or the plain baseline, through one loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from common.causal_lm import causal_lm_loss
from common.modeling import trainable_named_parameters
from common.privacy import HistoryEntry, PrivacyPlan, private_generator


@dataclass(frozen=True)
class TrainResult:
    train_loss: float
    steps: int
    history: list[HistoryEntry]  # accountant history after this round (unchanged without DP)


def train_locally(*, model: torch.nn.Module, dataset: TensorDataset, learning_rate: float,
                  head_learning_rate: float | None = None, batch_size: int, local_epochs: int, max_grad_norm: float,
                  plan: PrivacyPlan | None, history: list[HistoryEntry], seed: int) -> TrainResult:
    """Train the model's trainable parameters in place; with a `plan`, under DP-SGD.

    `seed` drives only non-private randomness (dropout, the baseline's shuffling). DP noise
    and Poisson sampling use a fresh OS-seeded generator of this client.
    """
    optimizer = _adamw(model, learning_rate=learning_rate, head_learning_rate=head_learning_rate or learning_rate)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        if plan is None:
            return _train_plain(model=model, dataset=dataset, optimizer=optimizer, batch_size=batch_size,
                                local_epochs=local_epochs, seed=seed, history=history)
        return _train_private(model=model, dataset=dataset, optimizer=optimizer, plan=plan,
                              max_grad_norm=max_grad_norm, local_epochs=local_epochs, history=history)


def _adamw(model: torch.nn.Module, *, learning_rate: float, head_learning_rate: float) -> torch.optim.Optimizer:
    """AdamW without weight decay; the classification head may take its own (larger) step size.

    The head starts from random values and needs to move far; the LoRA matrices perturb a
    pretrained network and, under DP noise, must move gently.
    """
    named = trainable_named_parameters(model)
    head = [p for name, p in named if _is_head(name)]
    lora = [p for name, p in named if not _is_head(name)]
    groups = [{"params": lora, "lr": learning_rate}]
    if head:
        groups.append({"params": head, "lr": head_learning_rate})
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=0.0)


def _is_head(name: str) -> bool:
    return "modules_to_save" in name


def _train_plain(*, model, dataset, optimizer, batch_size, local_epochs, seed, history) -> TrainResult:
    shuffle = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=shuffle)
    losses = []
    for _ in range(local_epochs):
        for input_ids, attention_mask, labels in loader:
            loss = _loss(model, input_ids, attention_mask, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return TrainResult(train_loss=_mean(losses), steps=len(losses), history=list(history))


def _train_private(*, model, dataset, optimizer, plan: PrivacyPlan, max_grad_norm, local_epochs,
                   history) -> TrainResult:
    """DP-SGD: Poisson batches, per-sample clipping, Gaussian noise, accountant per step."""
    generator = private_generator()
    loader = DPDataLoader(dataset, sample_rate=plan.sample_rate, generator=generator)
    # The model must be in train mode before wrapping: Opacus records activations only then.
    private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                               max_grad_norm=max_grad_norm,
                               expected_batch_size=max(1, round(plan.sample_rate * plan.num_examples)),
                               loss_reduction="mean", generator=generator)
    accountant = create_accountant(mechanism=plan.accountant)
    accountant.history = [tuple(h) for h in history]
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    losses, steps = [], 0
    try:
        for _ in range(local_epochs):
            for input_ids, attention_mask, labels in loader:
                if len(labels) == 0:
                    # An empty Poisson batch is still a DP step: it gets noise and is counted.
                    for p in dp_optimizer.params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                else:
                    loss = _loss(private_model, input_ids, attention_mask, labels)
                    loss.backward()
                    losses.append(loss.item())
                dp_optimizer.step()
                dp_optimizer.zero_grad()
                steps += 1
    finally:
        private_model.cleanup()  # remove Opacus hooks; the PEFT model stays usable
    if steps != plan.steps_per_round:
        raise RuntimeError(f"took {steps} DP steps, the privacy plan expects {plan.steps_per_round}")
    return TrainResult(train_loss=_mean(losses), steps=steps,
                       history=[(float(s), float(q), int(n)) for s, q, n in accountant.history])


def _loss(model, input_ids, attention_mask, labels) -> torch.Tensor:
    if labels.dim() == 2:  # causal LM: token labels, -100 outside the response
        return causal_lm_loss(model, input_ids, attention_mask, labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return torch.nn.functional.cross_entropy(logits, labels)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
