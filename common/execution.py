"""Where models run and in what precision: the one module that names a device or a dtype.

An execution profile is performance only. Whatever it says, the privacy plan (sigma, q, steps)
and every epsilon are the same: the profile is kept apart from the mechanism, as jax_privacy
keeps its performance flags. In a deployment it is the institution's (node config: hardware is
the node's business, like its model folder); in a simulation it is the run's. Every ledger
record names the profile that trained its round.

The frozen base may compute in bf16; everything that trains, travels or is clipped and noised
(LoRA A and B, a head, per-sample gradients, noise) stays fp32: bf16 has 8 bits of mantissa,
too coarse for noise and for small updates.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from fedtune.common.errors import FedtuneError
from fedtune.common.values import coerce

if TYPE_CHECKING:
    import torch

DEVICES_HELP = "'auto' (a GPU when there is one), 'cpu', 'cuda' or 'cuda:N'"
BASE_DTYPES = ("auto", "float32", "bfloat16")
# A frozen base stored in 4 bits (QLoRA's NormalFloat4, double-quantized) or 8 bits (LLM.int8()),
# through bitsandbytes: the linear layers' weights only; the base computes in base-dtype.
QUANTIZATIONS = ("none", "nf4", "int8")
# bitsandbytes' import (PEFT imports it whenever it is installed) warns that a CPU kernel from the
# Hugging Face hub is missing: fetched from a hub, and only for the eval-time repacking that
# ExecutionProfile.settle_quantized turns off. Not a user's concern.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# The profile's keys, dashed as in run and node configs; field names are these in snake_case.
PROFILE_KEYS = ("device", "base-dtype", "quantization", "activation-checkpointing", "threads", "physical-batch-size")


@dataclass(frozen=True)
class ExecutionProfile:
    device: str = "auto"
    base_dtype: str = "auto"  # auto: bfloat16 where the device computes it natively, else float32
    quantization: str = "none"  # the frozen base's linear weights: none, nf4 or int8 (causal LMs)
    activation_checkpointing: bool = False  # recompute each decoder layer in backward: memory for time
    threads: int = 0  # CPU threads for torch; 0 = what the process was given (its cores, Ray's share)
    physical_batch_size: int = 0  # examples per forward/backward pass; 0 = the task's default

    def __post_init__(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or _is_cuda_index(self.device)):
            raise FedtuneError(f"device must be {DEVICES_HELP}, not {self.device!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise FedtuneError(f"base-dtype must be one of {', '.join(BASE_DTYPES)}, not {self.base_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise FedtuneError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}")
        if self.threads < 0 or self.physical_batch_size < 0:
            raise FedtuneError("threads and physical-batch-size must be 0 (automatic) or a positive whole number")

    @classmethod
    def from_config(cls, config: Any) -> ExecutionProfile:
        """A simulation's profile: the run config's keys."""
        return cls(device=config.device, base_dtype=config.base_dtype, quantization=config.quantization,
                   activation_checkpointing=config.activation_checkpointing, threads=config.threads,
                   physical_batch_size=config.physical_batch_size)

    def overridden_by(self, node_config: Mapping[str, Any]) -> ExecutionProfile:
        """This profile with a node config's profile keys in force (a deployed node's own hardware)."""
        changes = {}
        for key in PROFILE_KEYS:
            if key in node_config:
                name = key.replace("-", "_")
                changes[name] = coerce(key, node_config[key], type(getattr(self, name)), source="node config key")
        return replace(self, **changes)

    def physical_batch(self, *, task_default: int) -> int:
        """Examples per forward/backward pass: this profile's, else the task's (0: the whole batch)."""
        return self.physical_batch_size or task_default

    def to_record(self, *, task_default_batch: int = 0) -> dict[str, Any]:
        """What a ledger record says trained the round: the resolved device, dtype, threads and batch."""
        import torch

        return {"device": str(self.torch_device()), "base-dtype": str(self.torch_dtype()).removeprefix("torch."),
                "quantization": self.quantization, "activation-checkpointing": self.activation_checkpointing,
                "threads": torch.get_num_threads(),
                "physical-batch-size": self.physical_batch(task_default=task_default_batch)}

    # -- resolution (torch is imported only here) ---------------------------------------------

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise FedtuneError(f"device {self.device!r} asked, but torch sees no CUDA GPU here; set device = \"cpu\" "
                               f"or \"auto\" in the node or run config")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.base_dtype == "auto":
            return torch.bfloat16 if native_bf16(self.torch_device()) else torch.float32
        return getattr(torch, self.base_dtype)

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    def pretrained_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` arguments that load a base as this profile says: its dtype, and for a
        quantized base the bitsandbytes config and the device (a quantized model is placed on
        load, not moved after). Only linear layers are quantized; transformers keeps the LM head
        and embeddings in `dtype`, and PEFT's LoRA layers (fp32, see adapter_to_fp32) wrap them."""
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype()}
        if not self.quantized:
            return kwargs
        try:
            import bitsandbytes  # noqa: F401 - transformers needs it; say so here, plainly
        except ImportError:
            raise FedtuneError(f"quantization {self.quantization!r} needs bitsandbytes: pip install "
                               f"bitsandbytes (or set quantization = \"none\")") from None
        from transformers import BitsAndBytesConfig

        if self.quantization == "nf4":  # QLoRA (Dettmers et al., 2023): NF4, double quantization
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=kwargs["dtype"])
        else:
            # Threshold 0: no outlier columns. LLM.int8() otherwise keeps a column in 16 bits when any
            # token of the batch exceeds 6 there, and on CUDA zeroes it in the 8-bit part for every
            # row: one example's activations would change another's forward, and so its per-sample
            # gradient, which clipping does not bound.
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
        return {**kwargs, "quantization_config": config, "device_map": {"": str(self.torch_device())}}

    def settle_quantized(self, base: torch.nn.Module) -> None:
        """Make a freshly loaded quantized base lean, shareable, and scored as it trains: tensors
        kept whole are copied off the checkpoint's memory map; 8-bit layers take their weights
        into their state now, not at a first forward (which would leave other models sharing the
        base without them); and 4-bit layers never repack themselves in place for a CPU kernel in
        eval mode (which rounds block scales to bf16, so the scored base would not be the trained
        one, and fails on layers narrower than a block)."""
        if not self.quantized:
            return
        import bitsandbytes as bnb
        import torch

        quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
        with torch.no_grad():
            for module in base.modules():
                for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    if tensor.device.type == "cpu" and not isinstance(tensor, quantized):
                        # Off the checkpoint's memory map: the few tensors kept whole (embeddings,
                        # norms) would hold the whole mapped file, 1.9 GB of a 1B model's 2.1 GB.
                        tensor.data = tensor.data.clone()
        for module in base.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):  # a 4-bit layer
                module.support_avx512bf16_for_cpu = False
            if hasattr(module, "init_8bit_state") and module.state.CB is None:  # an 8-bit layer
                # Its int8 weights move from the parameter into the layer's state at its first
                # forward, leaving the parameter empty for any other model sharing it (which would
                # then quantize the int8 values again): move them now, once, on the base.
                module.init_8bit_state()

    def apply_threads(self) -> None:
        """Use the threads this profile names (0: leave the process's own setting)."""
        import torch

        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (a CUDA GPU that supports it, or a CPU
    with AVX512-BF16 or AMX): there bf16 is about twice as fast; elsewhere it is emulated, slower."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# -- what every model and step relies on ------------------------------------------------------

TRAINABLE_MARKERS = (".lora_", "modules_to_save")  # the adapter's parameters (PEFT names)


def is_adapter_parameter(name: str) -> bool:
    return any(marker in name for marker in TRAINABLE_MARKERS)


def adapter_to_fp32(model: torch.nn.Module) -> None:
    """Every adapter parameter in fp32 (whatever the base's dtype), and each module that owns one
    casts its floating inputs to fp32: a bf16 activation meets fp32 weights, and Opacus records
    fp32 activations, so per-sample gradients are fp32."""
    owners = set()
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if is_adapter_parameter(f"{name}.{n}")]
        for _, param in own:
            param.data = param.data.float()
        if own and id(module) not in owners:
            owners.add(id(module))
            module.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module, args):
    import torch

    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float32
                 else a for a in args)


def check_trainables_fp32(model: torch.nn.Module) -> None:
    """The invariant checked before a first step: nothing that trains is below fp32."""
    import torch

    low = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if low:
        raise RuntimeError(f"{len(low)} trainable parameter(s) are not fp32 (e.g. {low[0]}); the DP step needs "
                           f"fp32 gradients, clipping and noise")


def base_dtype_name(model: torch.nn.Module) -> str:
    """The frozen base's precision as a profile names it ('float32', 'bfloat16')."""
    frozen = [p for name, p in model.named_parameters() if not is_adapter_parameter(name)]
    return str((frozen or list(model.parameters()))[0].dtype).removeprefix("torch.")


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def on_device(tensors, device: torch.device) -> list:
    """A batch's tensors on `device` (a no-op where they already are)."""
    return [t.to(device, non_blocking=True) for t in tensors]


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block under torch's global RNG seeded with `seed`, and restore every RNG after it,
    the CUDA ones too (torch.manual_seed reseeds them), so seeding never leaks into the caller."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def cores_given() -> int:
    """The CPU cores this process may run on (its affinity; Ray and cgroups narrow it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
