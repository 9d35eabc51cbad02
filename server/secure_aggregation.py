"""fedtune's SecAgg+ on the coordinator: Flower's workflow with parameters derived from the run,
the clients' signed keys relayed, a consistency check before unmasking, and refusals recorded.

The clients (client/secure_aggregation.py) check everything this side sends: this module is what
an honest coordinator runs, not what the clients rely on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedtune.common.config import RunConfig
from fedtune.common.config_checks import secagg_threshold
from fedtune.common.errors import FedtuneError
from fedtune.common.protocol import SecAggRefusal, SecAggWire
from fedtune.server.secagg_setup import admit, replace
from fedtune.server.secagg_unmask import consistency_check, survivor_signatures, unmask
from fedtune.server.update_validation import coordinate_bound

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
      threshold t with 2t > clients + secagg-max-colluders is needed to reconstruct a key (a
      strict majority by default; tolerates the rest dropping out);
    - `max_weight` exceeds the largest client's example count: SecAgg+ weighs an update by
      num_examples / max_weight, and a ratio above 1 overflows;
    - the clipping range covers every coordinate of an update: with AdamW and no weight decay a
      coordinate moves by about lr per step, so lr x steps x margin bounds one round's change.
    """
    n = config.clients_per_round
    threshold = secagg_threshold(clients=n, max_colluders=config.secagg_max_colluders)
    if config.secagg_max_weight and config.secagg_max_weight <= max_client_examples:
        raise FedtuneError(f"secagg-max-weight {config.secagg_max_weight} must exceed the largest client's "
                           f"example count ({max_client_examples}); set it to 0 to derive it")
    max_weight = float(config.secagg_max_weight or max_client_examples + 1)
    clipping = config.secagg_clipping_range or coordinate_bound(config=config,
                                                                max_client_examples=max_client_examples)
    return SecAggParameters(num_shares=n, reconstruction_threshold=min(threshold, n),
                            max_weight=max_weight, clipping_range=float(clipping),
                            timeout=config.round_timeout or None)


class _Relay:
    """The grid as one SecAgg+ stage sees it: adds fedtune's keys to setup requests and keeps
    every reply, so signatures are read after Flower's code ran; a node's refusal (a record, see
    `SecAggRefusal`) is kept and handed to Flower's workflow as a failed reply."""

    def __init__(self, grid: Grid, *, run_id: str, timeout: float | None) -> None:
        self._grid, self.run_id, self.timeout = grid, run_id, timeout
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.refusals: list[tuple[int, SecAggRefusal]] = []  # (node id, what it sent), until noted

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            config = msg.content.config_records[RECORD_KEY_CONFIGS]
            if config.get(SecAggKey.STAGE) == Stage.SETUP:
                config[SecAggWire.RUN_ID] = self.run_id
        self.sent += messages
        replies = self._grid.send_and_receive(messages, timeout=self.timeout if timeout is None else timeout)
        self.replies = [self._read_refusal(reply) for reply in replies]
        return self.replies

    def _read_refusal(self, reply: Message) -> Message:
        if not reply.has_content() or SecAggWire.REFUSAL not in reply.content.config_records:
            return reply
        node_id = reply.metadata.src_node_id
        try:
            self.refusals.append((node_id, SecAggRefusal.from_record(reply.content.config_records[SecAggWire.REFUSAL])))
        except FedtuneError as exc:  # kept out of every record: only an honest node's refusal is read
            log.warning("node %d refused secure aggregation with a malformed refusal (%s); not recorded", node_id, exc)
        # Flower's workflow counts it as a node that failed this stage, as it counts an error reply
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason="refused secure aggregation"),
                       metadata=reply.metadata)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class GuardedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ with what fedtune's clients require, and two rules of the coordinator's own.

    - setup requests carry the run id the clients sign into their key statements; each client's
      signature and institution id are relayed to its peers with its public keys;
    - with the roster (server/node_identities.py), a node whose key statement does not verify for
      the institution it names, or that failed setup otherwise, is dropped before share-keys (no
      peer ever sees its keys) and its place goes to a node not yet tried: a stranger's registered
      node cannot make every honest node refuse the key list;
    - each masked vector comes with its sender's signature on the survivor list it expects; if
      someone dropped out after sharing keys, a consistency check first has the survivors sign
      the shorter list (server/secagg_unmask.py);
    - never unmask a "sum" of fewer than two updates: refusing clients join with weight 0 and their
      status travels in clear, so with one trained client the "sum" would be its update;
    - a client's refusal (its reason, raised at any stage) is kept for metrics.jsonl and the ledger.
    """

    def __init__(self, *args, run_id: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_id = run_id
        self._signed_at_collection: list[tuple[int, bool, bytes]] = []

    def _relay(self, grid: Grid) -> _Relay:
        return _Relay(grid, run_id=self.run_id, timeout=self.timeout)

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        relay = self._relay(grid)
        ok = super().setup_stage(relay, context, state)
        if not relay.sent:  # nobody sampled: Flower already said why
            self._note_halt(context, "SecAgg+ halted in setup: too few clients answered")
            return ok
        strategy, server_round = context.strategy, _round(context)
        identities = getattr(strategy, "identities", None)
        outcome = strategy.outcomes.get(server_round)
        failed = admit(relay.replies, state, identities=identities, run_id=self.run_id, server_round=server_round,
                       outcome=outcome)
        # Refusals are read once the nodes proved who they are (admit): a node of the same batch
        # cannot file a refusal in the name of an institution that proves itself beside it.
        self._note_refusals(context, relay)
        if identities is not None:
            failed |= set(state.sampled_node_ids) - state.active_node_ids - failed  # no reply at all
            replacements: list[_Relay] = []

            def send(messages: list[Message]) -> list[Message]:
                replacements.append(self._relay(grid))
                return replacements[-1].send_and_receive(messages)

            replace(send, state, failed=failed, identities=identities, client_manager=context.client_manager,
                    setup=relay.sent[0].content.config_records[RECORD_KEY_CONFIGS], run_id=self.run_id,
                    fitins=lambda: compat.fitins_to_recorddict(strategy.fit_ins[server_round], True),
                    server_round=server_round, outcome=outcome)
            for again in replacements:  # after replace's own admit, for the same reason
                self._note_refusals(context, again)
        ok = self._check_threshold(state)
        if not ok:
            self._note_halt(context, "SecAgg+ halted in setup: too few clients answered")
        return ok

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        relay = self._relay(grid)
        ok = super().share_keys_stage(relay, context, state)
        self._note_refusals(context, relay)
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

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        current_round = _round(context)
        strategy = context.strategy
        relay = self._relay(grid)
        try:
            ok = super().collect_masked_vectors_stage(relay, context, state)
        except (ValueError, TypeError, IndexError) as exc:  # e.g. a masked vector of the wrong shape
            strategy.record_replies(current_round, state.legacy_results, state.failures).failures = 0
            self._note_halt(context, f"SecAgg+ could not sum the masked updates ({exc}); "
                                     "a client sent a malformed update")
            return False
        self._note_refusals(context, relay)
        self._signed_at_collection = survivor_signatures(relay.replies, state)
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

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        relay = self._relay(grid)
        signed = self._signed_at_collection
        if state.active_node_ids != state.sampled_node_ids:  # someone dropped after sharing keys
            signed = consistency_check(relay.send_and_receive, state, _round(context))
            self._note_refusals(context, relay)
            if len(signed) < state.threshold:  # no client would reveal a share: do not ask
                self._note_halt(context, "SecAgg+ halted at the consistency check: fewer survivors than the "
                                         "threshold signed the survivor list")
                return False
        ok = unmask(relay.send_and_receive, context, state, _round(context), signed)
        self._note_refusals(context, relay)
        if not ok:
            self._note_halt(context, "SecAgg+ halted in unmask: too few key shares to remove the masks")
        return ok

    @staticmethod
    def _note_refusals(context: LegacyContext, relay: _Relay) -> None:
        """Keep each client's refusal reason for the round's record (bounded by `SecAggRefusal`).
        A refusal is not signed: one naming an institution that another node proved to be, or sent
        by a node found a stranger, is not recorded under that institution's name."""
        outcome = context.strategy.outcomes.get(_round(context))
        identities = getattr(context.strategy, "identities", None)
        refusals, relay.refusals = relay.refusals, []
        for node_id, refusal in refusals:
            if identities is not None and not identities.may_speak_for(node_id, refusal.institution):
                log.warning("round %d: node %d's refusal names %s, which it has not proved to be; not recorded",
                            _round(context), node_id, refusal.institution)
                continue
            if outcome is not None:
                # the first refusal is the reason; a later stage only finds the round already ended
                outcome.secagg_refusals.setdefault(refusal.institution, refusal.describe())
                log.warning("round %d: %s refused secure aggregation at %s", _round(context),
                            refusal.institution, refusal.describe())

    @staticmethod
    def _note_halt(context: LegacyContext, reason: str) -> None:
        outcome = context.strategy.outcomes.get(_round(context))
        if outcome is not None:
            outcome.aggregation_failed = outcome.aggregation_failed or reason
        log.warning("round %d: %s", _round(context), reason)


def _round(context: LegacyContext) -> int:
    return int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])


def secagg_workflow(params: SecAggParameters, *, run_id: str) -> SecAggPlusWorkflow:
    # Flower reads an int share count as absolute (must be > 2) and a float as a fraction of
    # the sampled clients: 1.0 means "everyone", which is also right for two clients.
    shares: int | float = params.num_shares if params.num_shares > 2 else 1.0
    threshold: int | float = (params.reconstruction_threshold if params.num_shares > 2 else 1.0)
    return GuardedSecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                              max_weight=params.max_weight, clipping_range=params.clipping_range,
                              timeout=params.timeout, run_id=run_id)
