"""What a classification run trains, as objects: one class per training mode and one registry.

A run config carries the mode's name (`training-mode`, a TOML key and part of the signed job);
every site that acts on it asks the mode object here, so a new mode is one class and one
registry line. Pure Python: `fedtune audit` and `fedtune plan` read configs without torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from fedtune.common.errors import FedtuneError

PROBE_STAGE, ADAPTER_STAGE = "probe", "adapter"  # a round's stage, as the plan table and the ledger name it


@dataclass(frozen=True)
class TrainingMode(ABC):
    """A probe stage trains the head alone on the encoder's frozen, pooled features (full batch);
    an adapter stage trains LoRA (and the head) through the model."""

    name: ClassVar[str]
    has_probe_stage: ClassVar[bool]
    has_adapter_stage: ClassVar[bool]
    pooled_head: ClassVar[bool]  # a PooledClassifier (fedtune's head) rather than Hugging Face's

    @property
    def freezes_lora(self) -> bool:
        """Without an adapter stage the LoRA matrices never train, so they never travel either."""
        return not self.has_adapter_stage

    @abstractmethod
    def probe_round(self, server_round: int, *, probe_rounds: int) -> bool:
        """Whether this round trains the head alone on cached features (rounds count from 1)."""

    @abstractmethod
    def probe_round_count(self, *, num_rounds: int, probe_rounds: int) -> int:
        """How many of the run's rounds are probe rounds: what the plan's DP steps are made of."""

    def stage(self, server_round: int, *, probe_rounds: int) -> str:
        return PROBE_STAGE if self.probe_round(server_round, probe_rounds=probe_rounds) else ADAPTER_STAGE

    @property
    def size_keys(self) -> str:
        """The keys that shrink the run's DP steps, for a refusal to name (e.g. 'lower num-rounds or
        probe-steps'): each stage adds the keys its steps grow with."""
        keys = ["num-rounds", *(["local-epochs"] if self.has_adapter_stage else []),
                *(["probe-steps"] if self.has_probe_stage else [])]
        listed = f"{', '.join(keys[:-1])} or {keys[-1]}"
        return f"{listed}, or raise batch-size" if self.has_adapter_stage else listed


@dataclass(frozen=True)
class AdapterMode(TrainingMode):
    """LoRA (or FFA-LoRA) and Hugging Face's sequence-classification head, every round."""

    name: ClassVar[str] = "adapter"
    has_probe_stage: ClassVar[bool] = False
    has_adapter_stage: ClassVar[bool] = True
    pooled_head: ClassVar[bool] = False

    def probe_round(self, server_round: int, *, probe_rounds: int) -> bool:
        return False

    def probe_round_count(self, *, num_rounds: int, probe_rounds: int) -> int:
        return 0


@dataclass(frozen=True)
class ProbeMode(TrainingMode):
    """Linear probing: the head alone over the frozen encoder, every round."""

    name: ClassVar[str] = "probe"
    has_probe_stage: ClassVar[bool] = True
    has_adapter_stage: ClassVar[bool] = False
    pooled_head: ClassVar[bool] = True

    def probe_round(self, server_round: int, *, probe_rounds: int) -> bool:
        return True

    def probe_round_count(self, *, num_rounds: int, probe_rounds: int) -> int:
        return num_rounds


@dataclass(frozen=True)
class TwoStageMode(TrainingMode):
    """Rounds 1..probe-rounds probe, the rest train the adapter from that head."""

    name: ClassVar[str] = "two-stage"
    has_probe_stage: ClassVar[bool] = True
    has_adapter_stage: ClassVar[bool] = True
    pooled_head: ClassVar[bool] = True

    def probe_round(self, server_round: int, *, probe_rounds: int) -> bool:
        return 1 <= server_round <= probe_rounds

    def probe_round_count(self, *, num_rounds: int, probe_rounds: int) -> int:
        return probe_rounds


TRAINING_MODES: dict[str, TrainingMode] = {mode.name: mode for mode in (AdapterMode(), ProbeMode(), TwoStageMode())}


def training_mode(name: str) -> TrainingMode:
    """The mode a config names; an unknown name is the user's to fix (config_checks says which key)."""
    try:
        return TRAINING_MODES[name]
    except KeyError:
        raise FedtuneError(f"unknown training mode {name!r}: must be one of {', '.join(TRAINING_MODES)}") from None
