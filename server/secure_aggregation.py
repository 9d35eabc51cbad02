"""SecAgg+ parameters derived from the run, instead of defaults that fail quietly."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from flwr.server.workflow import SecAggPlusWorkflow

from common.config import RunConfig

log = logging.getLogger(__name__)

ADAM_DRIFT_BOUND = 3.0  # per step, an Adam update moves a coordinate by about lr at most; 3x margin


@dataclass(frozen=True)
class SecAggParameters:
    num_shares: int
    reconstruction_threshold: int
    max_weight: float
    clipping_range: float
    timeout: float | None

    def describe(self) -> str:
        return (f"SecAgg+: {self.num_shares} shares, threshold {self.reconstruction_threshold}, "
                f"max weight {self.max_weight:g}, clipping range ±{self.clipping_range:.4g}")


def secagg_parameters(*, config: RunConfig, max_client_examples: int) -> SecAggParameters:
    """Shares, threshold, weight bound and value range for this run's sampled clients.

    - every sampled client shares its keys with all others (shares = clients per round) and a
      majority of them is needed to reconstruct a key (tolerates a minority dropping out);
    - `max_weight` exceeds the largest client's example count: SecAgg+ weighs an update by
      num_examples / max_weight, and a ratio above 1 overflows;
    - the clipping range covers every coordinate of an update: with AdamW and no weight decay a
      coordinate moves by about lr per step, so lr x steps x margin bounds one round's change.
    """
    n = config.clients_per_round
    threshold = max(2, n // 2 + 1)
    max_weight = float(config.secagg_max_weight or max_client_examples + 1)
    steps = config.local_epochs * math.ceil(max_client_examples / config.batch_size)
    largest_lr = max(config.learning_rate, config.head_learning_rate)
    clipping = config.secagg_clipping_range or ADAM_DRIFT_BOUND * largest_lr * steps
    return SecAggParameters(num_shares=n, reconstruction_threshold=min(threshold, n),
                            max_weight=max_weight, clipping_range=float(clipping),
                            timeout=config.round_timeout or None)


def secagg_workflow(params: SecAggParameters) -> SecAggPlusWorkflow:
    # Flower reads an int share count as absolute (must be > 2) and a float as a fraction of
    # the sampled clients: 1.0 means "everyone", which is also right for two clients.
    shares: int | float = params.num_shares if params.num_shares > 2 else 1.0
    threshold: int | float = (params.reconstruction_threshold if params.num_shares > 2 else 1.0)
    return SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                              max_weight=params.max_weight, clipping_range=params.clipping_range,
                              timeout=params.timeout)
