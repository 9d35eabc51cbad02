"""A round the client was already asked (a resumed coordinator) is answered without a second spend.

Re-sending the very update a client paid for is post-processing of a DP release and costs
nothing; training the round again would spend its privacy twice.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from fedtune.client.privacy_ledger import ClientPrivacyLedger
from fedtune.client.update_cache import UpdateCache
from fedtune.common.models.adapter import adapter_sha256
from fedtune.common.protocol import FitReport, Status

log = logging.getLogger(__name__)


def replay_round(*, ledger: ClientPrivacyLedger, cache: UpdateCache, run_id: str, server_round: int,
                 parameters: list[np.ndarray]) -> tuple[list[np.ndarray], int, dict] | None:
    """The reply for a round this client signed or cached before, or None for a new round."""
    signed = ledger.record_for(run_id, server_round)
    cached = cache.load(run_id=run_id, server_round=server_round)
    if cached is not None and cached.ledger_fields.get("run_id") != run_id:
        cached = None
    if signed is None and cached is None:
        return None
    zeros = [np.zeros_like(a) for a in parameters]
    if signed is not None and signed["status"] == Status.REFUSED_BUDGET:
        report = FitReport(client_id=ledger.client_id, server_round=server_round, status=Status.REFUSED_BUDGET,
                           epsilon=signed.get("epsilon"), ledger_head=ledger.head_hash)
        return zeros, 0, report.to_metrics()
    if cached is None or cached.global_sha256 != adapter_sha256(parameters):
        log.error("%s: round %d of run %s was already trained against %s global adapter; "
                  "not training it twice", ledger.client_id, server_round, run_id,
                  "a lost" if cached is None else "a different")
        report = FitReport(client_id=ledger.client_id, server_round=server_round, status=Status.ALREADY_SPENT,
                           epsilon=(signed or {}).get("epsilon"), ledger_head=ledger.head_hash)
        return zeros, 0, report.to_metrics()
    if signed is None:  # crashed after caching, before signing: nothing has left yet; sign now
        ledger.append(cached.ledger_fields)
    log.info("%s: round %d of run %s was already trained; re-sending that update (no new spend)",
             ledger.client_id, server_round, run_id)
    report = dataclasses.replace(FitReport.from_metrics(cached.metrics), ledger_head=ledger.head_hash, resent=True)
    return cached.update, cached.num_examples, report.to_metrics()


def replay_problem(*, cache: UpdateCache, run_id: str, server_round: int, peers: frozenset[str] | None) -> str | None:
    """Why a paid round must not be re-sent into this SecAgg+ session, or None.

    Once its masked update has left the node in one SecAgg+ session, it never goes into another:
    the node cannot know whether, or in which sum, the first session was unmasked (its own unmask
    request can be withheld while a threshold of peers reveal), and two different sums that share
    an update could be subtracted. The cost: a round asked again after a coordinator crash under
    SecAgg+ is answered with weight 0 (its spend stays recorded, nothing is spent again). On the
    plain path the coordinator sees each update anyway, so re-sending the same one reveals nothing.
    """
    if peers is None or not cache.sent_masked(run_id=run_id, server_round=server_round):
        return None
    return (f"round {server_round}'s update already left this node masked in another SecAgg+ session; it is "
            f"never put in a second one (two sums sharing it could be differenced)")
