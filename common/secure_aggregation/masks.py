"""Masks and quantization for SecAgg+, at full strength.

`mask_arrays` stands in for Flower 1.41's `secaggplus_utils.pseudo_rand_gen`, which XOR-folds the
shared secret into a 32-bit seed for NumPy's Mersenne Twister: an honest-but-curious coordinator
that learns every self-mask at unmask time is left with one 32-bit pairwise seed to search (about
1.7 CPU-hours). Here the whole secret keys HKDF-SHA256, whose output keys ChaCha20; the keystream
gives the mask words. Both sides (client masking, coordinator unmasking) call this one function.

`quantize` stands in for Flower's `quantization.quantize`, whose stochastic rounding draws from
NumPy's global, unseeded-per-client generator; here each call draws from a generator seeded from
the operating system, so no party can predict (or replay) a client's rounding.
"""

from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASK_INFO = b"fedtune secagg+ mask v1"
_NONCE = bytes(16)  # each HKDF output key is used for exactly one keystream: a fixed nonce is safe


def mask_arrays(secret: bytes, mod_range: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform int64 masks in [0, mod_range) for arrays of `shapes`, expanded from all of `secret`.

    `mod_range` must be a power of two no larger than 2**32 (what Flower's workflow allows), so a
    32-bit keystream word reduced modulo it stays uniform.
    """
    if mod_range <= 0 or mod_range & (mod_range - 1) or mod_range > 2**32:
        raise ValueError("mod_range must be a power of two, at most 2**32")
    if not secret:
        raise ValueError("a mask needs a non-empty secret")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MASK_INFO).derive(secret)
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(4 * sum(sizes))), dtype="<u4").astype(np.int64)
    words &= mod_range - 1
    masks, start = [], 0
    for shape, size in zip(shapes, sizes):
        masks.append(words[start:start + size].reshape(shape))
        start += size
    return masks


def quantize(arrays: list[np.ndarray], clipping_range: float, target_range: int) -> list[np.ndarray]:
    """Clip to ±clipping_range and map onto [0, target_range] with unbiased stochastic rounding."""
    rng = np.random.default_rng(secrets.randbits(128))
    scale = target_range / (2 * clipping_range)
    quantized = []
    for array in arrays:
        scaled = (np.clip(array, -clipping_range, clipping_range) + clipping_range) * scale
        floor = np.floor(scaled)
        rounded = floor + (rng.random(np.shape(scaled)) < (scaled - floor))
        quantized.append(np.asarray(rounded, dtype=np.int64))
    return quantized
