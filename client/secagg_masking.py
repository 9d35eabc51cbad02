"""What a SecAgg+ node sends in place of its update: weighted, quantized and masked (as Flower's
`secaggplus_mod` does), with fedtune's full-strength masks (common/secure_aggregation/masks.py)."""

from __future__ import annotations

import numpy as np
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, parameters_mod
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedtune.client.secagg_checks import Refusal
from fedtune.client.secagg_state import SecAggState
from fedtune.common.secure_aggregation.masks import mask_arrays, quantize


def masked_update(state: SecAggState, update: list[np.ndarray], num_examples: int, *,
                  masking_peers: list[int]) -> list[np.ndarray]:
    """[weight, weight x update] quantized, plus the self mask, plus/minus each pairwise mask (as Flower)."""
    if num_examples > state.max_weight:
        raise Refusal("the update's weight exceeds the round's max weight")
    if not all(np.isfinite(a).all() for a in update):  # quantized, NaN would shift the sum silently
        raise Refusal("this node's update holds NaN or Inf (local training diverged?); it is not sent")
    q_ratio = round(num_examples / state.max_weight * state.target_range)
    weighted = [a * (q_ratio / state.target_range) for a in update]
    vector = factor_combine(q_ratio, quantize(weighted, state.clipping_range, state.target_range))
    shapes = [a.shape for a in vector]
    vector = [a + m for a, m in zip(vector, mask_arrays(state.rd_seed, state.mod_range, shapes))]
    for peer in masking_peers:
        shared = generate_shared_key(bytes_to_private_key(state.sk1), bytes_to_public_key(state.pk1s[peer]))
        sign = 1 if state.node_id > peer else -1
        vector = [a + sign * m for a, m in zip(vector, mask_arrays(shared, state.mod_range, shapes))]
    return parameters_mod(vector, state.mod_range)
