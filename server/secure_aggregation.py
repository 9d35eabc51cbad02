"""SecAgg+ parameters derived from the run, instead of defaults that fail quietly."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from common.config import RunConfig
from common.errors import FedtuneError
from server.update_validation import coordinate_bound

log = logging.getLogger(__name__)


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
    if config.secagg_max_weight and config.secagg_max_weight <= max_client_examples:
        raise FedtuneError(f"secagg-max-weight {config.secagg_max_weight} must exceed the largest client's "
                           f"example count ({max_client_examples}); set it to 0 to derive it")
    max_weight = float(config.secagg_max_weight or max_client_examples + 1)
    clipping = config.secagg_clipping_range or coordinate_bound(config=config,
                                                                max_client_examples=max_client_examples)
    return SecAggParameters(num_shares=n, reconstruction_threshold=min(threshold, n),
                            max_weight=max_weight, clipping_range=float(clipping),
                            timeout=config.round_timeout or None)


class GuardedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ with one more rule: never unmask a "sum" of fewer than two updates.

    Refusing clients join the protocol with weight 0, and their status travels in clear; if only
    one sampled client actually trained, the unmasked aggregate would be that client's update.
    The round then stops before the unmask stage: the masked vectors reveal nothing alone.
    """

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        current_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        strategy = context.strategy
        try:
            ok = super().collect_masked_vectors_stage(grid, context, state)
        except (ValueError, TypeError, IndexError) as exc:  # e.g. a masked vector of the wrong shape
            strategy.record_replies(current_round, state.legacy_results, state.failures).failures = 0
            self._note_halt(context, f"SecAgg+ could not sum the masked updates ({exc}); "
                                     "a client sent a malformed update")
            return False
        outcome = strategy.record_replies(current_round, state.legacy_results, state.failures)
        trained = sum(1 for _, res in state.legacy_results if res.num_examples > 0)
        if ok and trained < 2:
            outcome.aggregation_failed = ("no client trained" if trained == 0 else
                                          "only one client trained; its update is not unmasked alone")
            log.warning("round %d: %s", current_round, outcome.aggregation_failed)
            return False
        if not ok:
            outcome.aggregation_failed = "SecAgg+ halted: too few clients answered (below the threshold)"
        return ok

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().setup_stage(grid, context, state)
        if not ok:
            self._note_halt(context, "SecAgg+ halted in setup: too few clients answered")
        return ok

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        # Flower 1.41 keeps every *sampled* node in the unmask stage's "dead" list, and asks the
        # survivors for key shares of a node that dropped before sharing its keys: nobody holds
        # any (the clients raise KeyError), so one dropout in setup or share-keys failed the
        # whole round. Only nodes that shared keys can have masked anyone; only they count.
        state.sampled_node_ids = set(state.active_node_ids)
        # Nor did anyone mask with a node that left before sharing keys: drop it from every
        # neighbour set, or the unmask stage looks up its keys (KeyError) or removes a mask
        # nobody added when another node drops later in the same round.
        for nid, neighbours in state.nid_to_neighbours.items():
            neighbours &= state.sampled_node_ids | {nid}
        if not ok:
            self._note_halt(context, "SecAgg+ halted while sharing keys: too few clients answered")
        return ok

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().unmask_stage(grid, context, state)
        if not ok:
            self._note_halt(context, "SecAgg+ halted in unmask: too few key shares to remove the masks")
        return ok

    @staticmethod
    def _note_halt(context: LegacyContext, reason: str) -> None:
        current_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        outcome = context.strategy.outcomes.get(current_round)
        if outcome is not None:
            outcome.aggregation_failed = reason
        log.warning("round %d: %s", current_round, reason)


def secagg_workflow(params: SecAggParameters) -> SecAggPlusWorkflow:
    # Flower reads an int share count as absolute (must be > 2) and a float as a fraction of
    # the sampled clients: 1.0 means "everyone", which is also right for two clients.
    shares: int | float = params.num_shares if params.num_shares > 2 else 1.0
    threshold: int | float = (params.reconstruction_threshold if params.num_shares > 2 else 1.0)
    return GuardedSecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                              max_weight=params.max_weight, clipping_range=params.clipping_range,
                              timeout=params.timeout)
