"""Local training of the adapter: DP-SGD with Opacus, or the plain baseline, through one loop."""

from __future__ import annotations

import contextlib
import json
import os
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

from fedtune.common.execution import check_trainables_fp32, device_of, on_device, seeded_rng
from fedtune.common.models.adapter import trainable_named_parameters
from fedtune.common.privacy.accounting import HistoryEntry
from fedtune.common.privacy.noise import private_generator
from fedtune.common.privacy.plan import PrivacyPlan

# (model, input_ids, attention_mask, labels) -> the batch's mean per-example loss: the task's
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# Progress inside a round (a simulation's status line): called with (steps done, steps planned).
# Set per message by the ClientApp's progress mod (client/app.py); None on a real node.
STEP_PROGRESS: ContextVar[Callable[[int, int], None] | None] = ContextVar("fedtune_step_progress", default=None)


@contextlib.contextmanager
def step_progress_file(path: Path) -> Iterator[None]:
    """Report this client's steps into `path` (step counts and a time, nothing from the data)."""

    def report(done: int, total: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"step": done, "steps": total, "time": time.time()}))
        os.replace(temporary, path)

    token = STEP_PROGRESS.set(report)
    try:
        yield
    finally:
        STEP_PROGRESS.reset(token)


def _report_progress(done: int, total: int) -> None:
    report = STEP_PROGRESS.get()
    if report is not None:
        try:
            report(done, total)
        except OSError:
            pass  # a progress line is never worth failing a round for


class StepProbe(Protocol):
    """A watcher inside the DP-SGD step, for the mechanism check (client/mechanism_check.py) only;
    production never passes one. It sees the sampler and optimizer before the first step, each
    piece's per-example gradients before they are clipped, and the noisy gradient of each step."""

    def start(self, loader: DPDataLoader, optimizer: DPOptimizer) -> None: ...

    def after_backward(self, piece: list[torch.Tensor], optimizer: DPOptimizer) -> None: ...

    def after_step(self, optimizer: DPOptimizer) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    train_loss: float
    steps: int
    history: list[HistoryEntry]  # accountant history after this round (unchanged without DP)


def train_locally(*, model: torch.nn.Module, dataset: TensorDataset, loss: LossFn, learning_rate: float,
                  head_learning_rate: float | None = None, batch_size: int, local_epochs: int, max_grad_norm: float,
                  plan: PrivacyPlan | None, history: list[HistoryEntry], seed: int,
                  physical_batch_size: int = 0, probe: StepProbe | None = None,
                  optimizer: str = "adamw") -> TrainResult:
    """Train the model's trainable parameters in place; with a `plan`, under DP-SGD.

    `seed` drives only non-private randomness (dropout, the baseline's shuffling). DP noise
    and Poisson sampling use a fresh OS-seeded generator of this client. A batch larger than
    `physical_batch_size` (0: no limit) is processed in pieces whose clipped per-example
    gradients are summed before the one noisy step: the same step, in bounded memory.
    `probe` (DP only) is the mechanism check's window into the step; None in production.
    `optimizer` "sgd" is plain SGD (a probe round's head: Adam's per-coordinate scaling would
    turn DP noise into full-size steps).
    """
    if optimizer == "sgd":
        optimizer = torch.optim.SGD([p for _, p in trainable_named_parameters(model)], lr=learning_rate)
    else:
        optimizer = _adamw(model, learning_rate=learning_rate, head_learning_rate=head_learning_rate or learning_rate)
    check_trainables_fp32(model)  # a bf16 base is fine; what trains, clips and gets noise is fp32
    with seeded_rng(seed):
        model.train()
        if plan is None:
            return _train_plain(model=model, dataset=dataset, loss=loss, optimizer=optimizer,
                                batch_size=batch_size, local_epochs=local_epochs, seed=seed, history=history,
                                physical=physical_batch_size)
        return _train_private(model=model, dataset=dataset, loss=loss, optimizer=optimizer, plan=plan,
                              max_grad_norm=max_grad_norm, local_epochs=local_epochs, history=history,
                              physical=physical_batch_size, probe=probe)


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


def _train_plain(*, model, dataset, loss, optimizer, batch_size, local_epochs, seed, history,
                 physical) -> TrainResult:
    shuffle = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=shuffle)
    losses: list[float] = []
    total_steps = local_epochs * len(loader)
    _report_progress(0, total_steps)
    for _ in range(local_epochs):
        for batch in loader:
            total = 0.0
            for piece in _pieces(on_device(batch, device_of(model)), physical):  # accumulation, by piece size
                share = len(piece[-1]) / len(batch[-1])
                piece_loss = loss(model, *piece) * share
                piece_loss.backward()
                total += piece_loss.item()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(total)
            _report_progress(len(losses), total_steps)
    return TrainResult(train_loss=_mean(losses), steps=len(losses), history=list(history))


def _pieces(batch: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
    """A batch cut into consecutive pieces of at most `size` examples (0: one piece)."""
    n = len(batch[0])
    if size <= 0 or n <= size:
        return [batch]
    return [[t[start:start + size] for t in batch] for start in range(0, n, size)]


def _train_private(*, model, dataset, loss, optimizer, plan: PrivacyPlan, max_grad_norm, local_epochs, physical,
                   history, probe: StepProbe | None = None) -> TrainResult:
    """DP-SGD: Poisson batches, per-sample clipping, Gaussian noise, accountant per step.

    With a physical batch size, Opacus' BatchMemoryManager cuts each Poisson batch into pieces
    whose clipped per-example gradients are summed before the one noisy step.
    """
    device = device_of(model)
    loader = DPDataLoader(dataset, sample_rate=plan.sample_rate, generator=private_generator())  # samples on the CPU
    # The model must be in train mode before wrapping: Opacus records activations only then.
    private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                               max_grad_norm=max_grad_norm,
                               expected_batch_size=max(1, round(plan.sample_rate * plan.num_examples)),
                               loss_reduction="mean", generator=private_generator(device=device))
    accountant = create_accountant(mechanism=plan.accountant)
    accountant.history = [tuple(h) for h in history]
    if probe is not None:
        probe.start(loader, dp_optimizer)
    batch = _LogicalBatch(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate), probe,
                          planned=plan.steps_per_round)
    dp_optimizer.attach_step_hook(batch.close)  # runs once per noisy step, after the batch's last piece
    try:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical or max(len(dataset), 1),
                                optimizer=dp_optimizer) as pieces:
            for _ in range(local_epochs):
                for piece in pieces:
                    if len(piece[-1]) == 0:
                        # An empty Poisson batch is still a DP step: it gets noise and is counted.
                        for p in dp_optimizer.params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    else:
                        piece = on_device(piece, device)
                        piece_loss = loss(private_model, *piece)  # a mean over this piece: exact per-example grads
                        piece_loss.backward()
                        if probe is not None:
                            probe.after_backward(piece, dp_optimizer)
                        batch.add(piece_loss.item(), len(piece[-1]))
                    dp_optimizer.step()  # clips and sums; noise and the step come after a batch's last piece
                    dp_optimizer.zero_grad()
    finally:
        private_model.cleanup()  # remove Opacus hooks; the PEFT model stays usable
        _forget_recorded_activations(model)
    if batch.steps != plan.steps_per_round:
        raise RuntimeError(f"took {batch.steps} DP steps, the privacy plan expects {plan.steps_per_round}")
    return TrainResult(train_loss=_mean(batch.losses), steps=batch.steps,
                       history=[(float(s), float(q), int(n)) for s, q, n in accountant.history])


def _forget_recorded_activations(model: torch.nn.Module) -> None:
    """Drop what Opacus' hooks left on the modules (cleanup clears only the parameters'). A step
    that failed between a forward and its backward (out of memory in a checkpointed layer's
    recomputation) leaves recorded inputs and a batch length behind, and the next step on this
    resident model would scale and pad every per-sample gradient with them."""
    for module in model.modules():
        for name in ("activations", "max_batch_len"):
            module.__dict__.pop(name, None)  # set as plain attributes (hasattr would ask a PEFT wrapper's child)


class _LogicalBatch:
    """Opacus' step hook: counts each noisy step for the accountant and records the loss of its
    logical (Poisson) batch, summed over the batch's physical pieces."""

    def __init__(self, account: Callable, probe: StepProbe | None = None, *, planned: int = 0) -> None:
        self.account, self.probe, self.planned = account, probe, planned
        _report_progress(0, planned)
        self.losses: list[float] = []
        self.steps = 0
        self._total, self._count = 0.0, 0

    def add(self, mean_loss: float, count: int) -> None:
        self._total += mean_loss * count
        self._count += count

    def close(self, optimizer: DPOptimizer) -> None:
        self.account(optimizer)
        if self.probe is not None:
            self.probe.after_step(optimizer)
        self.steps += 1
        _report_progress(self.steps, self.planned)
        if self._count:  # an empty batch has no loss to report
            self.losses.append(self._total / self._count)
        self._total, self._count = 0.0, 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
