"""The node's policy, checked on every message before anything is read, trained or spent.

`Transport` is what the message itself showed (SecAgg+ or plain, and the SecAgg+ weight bound),
recorded by the secure-aggregation mod; the job is the coordinator's run config. A refusal's
reason names keys and the node's limits, never a data value: it travels to the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, Context

from fedtune.common.privacy.policy import NodePolicy

TRANSPORT_RECORD = "fedtune-transport"


@dataclass(frozen=True)
class Transport:
    """How the current train request arrived."""

    secure_aggregation: bool
    max_weight: float | None = None  # SecAgg+: the largest weight the protocol can carry
    peers: frozenset[str] | None = None  # SecAgg+: the institutions in this round's signed key list


def note_transport(context: Context, *, secure_aggregation: bool, max_weight: float | None = None,
                   peers: frozenset[str] | None = None) -> None:
    """Called by the SecAgg+ mod for each train request, before the client runs."""
    record: dict = {"secure-aggregation": secure_aggregation}
    if max_weight is not None:
        record["max-weight"] = float(max_weight)
    if peers is not None:
        record["peers"] = sorted(peers)
    context.state.config_records[TRANSPORT_RECORD] = ConfigRecord(record)


def transport_of(context: Context) -> Transport | None:
    """The transport the mod recorded for this message (None: no train request seen)."""
    record = context.state.config_records.get(TRANSPORT_RECORD)
    if record is None:
        return None
    max_weight, peers = record.get("max-weight"), record.get("peers")
    return Transport(secure_aggregation=bool(record["secure-aggregation"]),
                     max_weight=float(max_weight) if isinstance(max_weight, float) else None,
                     peers=frozenset(peers) if isinstance(peers, list) else None)


def request_refusal(*, policy: NodePolicy, job, transport: Transport | None) -> str | None:
    """Why a train request is refused before any data is read, or None."""
    reasons = policy.loosenings(job)
    too_large = policy.size_problem(job)  # the rounds cap, and steps no record count could lower
    if too_large:
        reasons.append(too_large)
    if transport is not None and policy.secure_aggregation and not transport.secure_aggregation:
        reasons.append("a plain (unmasked) train request arrived, this node sends updates only under SecAgg+")
    return "; ".join(reasons) or None


def data_refusal(*, policy: NodePolicy, config, transport: Transport | None, num_examples: int) -> str | None:
    """Why a train request is refused once the node knows its record count N, or None (the
    reason never states N: a refusal sends weight 0, and N would otherwise leave with it)."""
    if transport is not None and transport.secure_aggregation and transport.max_weight is not None \
            and transport.max_weight < num_examples:
        return (f"SecAgg+ max-weight {transport.max_weight:g} is below this node's training record count: its "
                f"weighted update would be scaled past the clipping range; raise max-client-examples (or "
                f"secagg-max-weight)")
    too_large = policy.size_problem(config, num_examples=num_examples)  # before the plan is calibrated
    if too_large:
        return too_large
    if config.dp:
        return policy.delta_problem(delta=config.target_delta, num_examples=num_examples)
    return None
