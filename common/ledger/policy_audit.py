"""Each client record checked against the node policy recorded in it.

A client signs the policy it acted under into every record (NodePolicy.to_record). The audit
then finds what that policy did not allow, or what no policy makes private: a round trained
without DP where the policy required it, a delta not below 1/N that the node did not choose
itself, and more evaluations answered than the policy allows. A ledger made before policies
were recorded is checked only where no policy is needed (a round without DP is never free).
"""

from __future__ import annotations

from typing import Any

from fedtune.common.protocol import Status


def policy_findings(owner: str, records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(breaches, notes) for one client's records, each naming the record and round."""
    breaches: list[str] = []
    notes: list[str] = []
    evaluations = 0
    for index, record in enumerate(records):
        name = f"{owner} record {index + 1} (round {record.get('round', '?')})"
        policy = record.get("policy") if isinstance(record.get("policy"), dict) else {}
        status = record.get("status")
        if status == Status.EVALUATED:
            evaluations += 1
            allowed = policy.get("max-evaluations")
            if isinstance(allowed, int) and evaluations > allowed:
                breaches.append(f"{name}: evaluation {evaluations} answered, its policy allows {allowed}")
            continue
        if status != Status.TRAINED:
            continue
        if record.get("dp") is False:
            if policy.get("dp") is False:
                notes.append(f"{name}: trained without DP, as its policy allowed: epsilon is infinite from here on")
            else:
                breaches.append(f"{name}: trained without DP (epsilon infinite)"
                                + (", though its policy requires DP" if policy.get("dp") else ""))
            continue
        delta, examples = record.get("delta"), record.get("local_examples")
        if isinstance(delta, (int, float)) and isinstance(examples, int) and examples > 0 and delta >= 1 / examples:
            text = f"{name}: delta {delta:g} is not below 1/N for its {examples} training records"
            allowed = policy.get("allow-large-delta") or policy.get("delta-set-by-node")  # the latter: older ledgers
            (notes if allowed else breaches).append(text + (" (the node allowed this delta itself)" if allowed else ""))
    return breaches, notes
