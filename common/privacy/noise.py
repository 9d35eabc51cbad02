"""The randomness of the DP mechanism: the node's own, never the run's."""

from __future__ import annotations

import os

import torch


def private_generator(*, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for DP noise or Poisson sampling that no other party can predict.

    Seeded with 64 bits from the operating system, per client, per round, per purpose; never from
    the run seed (a shared seed would make every client draw the same noise and the same batches).
    The sampler's lives on the CPU (where the data loader draws); the noise's on the gradients'
    device (where Opacus draws it).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator
