"""The resident model host: each process loads its base once, attaches the adapter once, and
resets it per message.

A long-lived process (a node runtime across a run's rounds, a simulation actor across clients)
would otherwise re-read the weights every message, or deep-copy the whole base (16 GiB for an
8B model in bf16). Here the base is read once, in the profile's dtype, onto its device; LoRA
(and a head) are attached after that (opacus#820: the other order left LoRA weights that never
trained); and the built model is kept. Per message, its adapter parameters are restored from a
snapshot taken right after the build, so a build from the host equals a fresh build bit for
bit: the random initialisation (head, LoRA A) is drawn under the caller's seeded RNG, which a
cached base leaves exactly where the load would have.

Two holders in one process (a simulation's coordinator beside its clients) get two models that
share the frozen base's tensors: the weights are in memory once.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterator

import torch

from fedtune.common.errors import FedtuneError
from fedtune.common.execution import ExecutionProfile, adapter_to_fp32, is_adapter_parameter, seeded_rng

LOG = logging.getLogger("fedtune.models")
KEPT_BUILDS = 4  # built models kept per process (a coordinator's, a client's, a mode change)
base_loads = 0  # times this process read a base model from disk (the node runtime reports it)
builds = 0  # times this process attached an adapter to a base


@dataclass
class _Base:
    model: torch.nn.Module
    rng_after_load: torch.Tensor


@dataclass
class _Built:
    model: torch.nn.Module
    snapshot: dict[str, tuple[torch.Tensor, bool]]  # adapter parameter -> (initial value, requires_grad)
    modes: dict[str, bool]  # module -> training flag, as built


_bases: dict[Hashable, _Base] = {}
_built: dict[Hashable, _Built] = {}


def _files_version(model_path: Path) -> tuple:
    """Changes when the folder's files do, so an edited model is read again."""
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                        for p in Path(model_path).iterdir() if p.is_file()))


def hosted_model(*, model_path: Path, profile: ExecutionProfile, seed: int, base_key: Hashable,
                 load: Callable[..., torch.nn.Module], attach: Callable[[torch.nn.Module], torch.nn.Module],
                 build_key: Hashable, resident: bool = False, causal_lm: bool = False) -> torch.nn.Module:
    """The model `attach(base)` builds, with the base `load(**from_pretrained_kwargs)` reads loaded
    once per process and seed; both run under torch's RNG seeded with `seed` (restored after), as
    a fresh build.

    `resident`: the process's one model for this build, reset to its initial adapter (a client
    per message); else a new model over the same base tensors (one a coordinator keeps).
    `causal_lm`: whether the profile's causal-LM keys (quantization, activation checkpointing)
    apply to this model; elsewhere they are refused, so no ledger records what did not happen."""
    global builds
    if not causal_lm and (profile.quantized or profile.activation_checkpointing):
        raise FedtuneError("the profile sets quantization or activation-checkpointing, which apply to task "
                           "'causal-lm' only; set quantization = \"none\" and activation-checkpointing = false "
                           "in the node or run config")
    device, dtype = profile.torch_device(), profile.torch_dtype()
    # The seed belongs to the base: the RNG state a load leaves is the seed's (a random head).
    base_id = (str(model_path), _files_version(model_path), base_key, seed, str(device), str(dtype),
               profile.quantization)
    key = (base_id, build_key)
    built = _built.get(key) if resident else None
    if built is not None:
        _restore(built)
        return built.model
    with seeded_rng(seed):
        base = _base(base_id, load=lambda: _loaded(load, profile, device))
        torch.set_rng_state(base.rng_after_load)  # where a fresh load leaves the RNG: attach draws next
        model = attach(_sharing_frozen_tensors(base.model))
        if not profile.quantized:  # PEFT puts LoRA beside its base layer; moving bnb weights would copy them
            model = model.to(device)
    adapter_to_fp32(model)
    builds += 1
    if resident:
        if len(_built) >= KEPT_BUILDS:
            _built.pop(next(iter(_built)))
        _built[key] = _Built(model=model, snapshot=_snapshot(model),
                             modes={name: m.training for name, m in model.named_modules()})
    return model


def _loaded(load: Callable[..., torch.nn.Module], profile: ExecutionProfile, device: torch.device) -> torch.nn.Module:
    """The base as the profile says: a quantized one placed on its device as it loads and settled
    before any model shares it (ExecutionProfile.settle_quantized); any other moved there."""
    base = load(**profile.pretrained_kwargs())
    if profile.quantized:
        profile.settle_quantized(base)
        return base
    return base.to(device)


def _base(base_id: Hashable, *, load: Callable[[], torch.nn.Module]) -> _Base:
    global base_loads
    base = _bases.get(base_id)
    if base is None:
        _bases.clear()  # one base per process: a node serves one federation's model
        _built.clear()
        model = load()
        model.requires_grad_(False)
        base = _bases[base_id] = _Base(model=model, rng_after_load=torch.get_rng_state())
        base_loads += 1
        LOG.info("loaded base model %s from disk (load %d in this process)", Path(base_id[0]).name, base_loads)
    return base


def _sharing_frozen_tensors(base: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the same frozen weights: attaching LoRA changes the tree, not the tensors."""
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers(), _layer_state_tensors(base))}
    return copy.deepcopy(base, memo)


def _layer_state_tensors(base: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Frozen tensors a layer keeps outside its parameters (bitsandbytes' 8-bit layers keep their
    int8 weights and scales in `layer.state`): shared too, never copied."""
    for module in base.modules():
        state = getattr(module, "state", None)
        if state is not None and not isinstance(state, dict) and hasattr(state, "__dict__"):
            yield from (value for value in vars(state).values() if isinstance(value, torch.Tensor))


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()
            if is_adapter_parameter(name)}


@torch.no_grad()
def _restore(built: _Built) -> None:
    parameters = dict(built.model.named_parameters())
    for name, (value, requires_grad) in built.snapshot.items():
        parameter = parameters[name]
        parameter.copy_(value)
        parameter.requires_grad_(requires_grad)
        parameter.grad = None
    for name, module in built.model.named_modules():
        module.training = built.modes[name]


def forget_all() -> None:
    """Drop every cached base and model (tests; a process that changes federation)."""
    _bases.clear()
    _built.clear()
