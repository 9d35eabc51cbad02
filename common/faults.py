"""Fault injection for drills in simulation: `inject-faults = "ROUND:FAULT[:CLIENTS]; ..."`.

Federations fail in ways that are hard to arrange by hand: an institution's node vanishes in
the middle of secure aggregation, a buggy client sends garbage, the coordinator is killed. A
fault plan makes each of these happen at a chosen round, to chosen clients (partition ids),
so researchers and tests can see what the system does. Examples:

    "2:drop-unmask:0"                 client 0 vanishes in round 2's SecAgg+ unmask stage
    "3:drop-collect-masked-vectors:0,1,2"  three clients vanish after training in round 3
    "1:nan:0; 1:scale-1000:1"         client 0 sends NaN, client 1 an update 1000x too large
    "2:crash-coordinator"             the coordinator process is killed once round 2's replies are in
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.common.errors import FedtuneError

# A client that vanishes: before answering a SecAgg+ stage, or (collect-masked-vectors, fit)
# after it trained and signed its ledger but before its reply leaves.
DROP_STAGES = {
    "drop-setup": "setup",
    "drop-share-keys": "share_keys",
    "drop-collect-masked-vectors": "collect_masked_vectors",
    "drop-unmask": "unmask",
}
DROP_FIT = "drop-fit"  # plain aggregation: vanishes after training
CORRUPTIONS = ("nan", "wrong-shape", "scale-1000")  # the update a client sends is broken
STALL = "stall"  # the client answers only after twice the round timeout
CRASH_COORDINATOR = "crash-coordinator"  # the coordinator is SIGKILLed after a round's fit replies
CLIENT_FAULTS = (*DROP_STAGES, DROP_FIT, *CORRUPTIONS, STALL)
FAULTS = (*CLIENT_FAULTS, CRASH_COORDINATOR)


@dataclass(frozen=True)
class Fault:
    round: int
    kind: str
    clients: frozenset[int]


def parse_faults(spec: str) -> tuple[Fault, ...]:
    """Parse a fault plan, or raise FedtuneError naming the entry that is wrong."""
    faults = []
    for entry in (part.strip() for part in spec.replace("\n", ";").split(";")):
        if not entry:
            continue
        parts = [p.strip() for p in entry.split(":")]
        hint = f"inject-faults entry {entry!r}"
        if len(parts) not in (2, 3) or not parts[0].isdigit() or int(parts[0]) < 1:
            raise FedtuneError(f"{hint}: expected ROUND:FAULT[:CLIENTS], e.g. '2:drop-unmask:0,3'.")
        kind = parts[1]
        if kind not in FAULTS:
            raise FedtuneError(f"{hint}: unknown fault {kind!r}; one of {', '.join(FAULTS)}.")
        try:
            clients = frozenset(int(c) for c in parts[2].split(",") if c.strip()) if len(parts) == 3 else frozenset()
        except ValueError:
            raise FedtuneError(f"{hint}: clients must be comma-separated partition ids.") from None
        if kind in CLIENT_FAULTS and not clients:
            raise FedtuneError(f"{hint}: {kind} needs the clients it hits, e.g. '{parts[0]}:{kind}:0'.")
        if kind == CRASH_COORDINATOR and clients:
            raise FedtuneError(f"{hint}: {kind} takes no clients.")
        faults.append(Fault(round=int(parts[0]), kind=kind, clients=clients))
    return tuple(faults)


def check_faults(spec: str, *, secure_aggregation: bool, num_clients: int) -> None:
    """The plan must fit the run: SecAgg+ stages only under SecAgg+, clients that exist."""
    for fault in parse_faults(spec):
        if fault.kind in DROP_STAGES and not secure_aggregation:
            raise FedtuneError(f"inject-faults: {fault.kind} needs secure-aggregation=true; use {DROP_FIT}.")
        if fault.kind == DROP_FIT and secure_aggregation:
            raise FedtuneError(f"inject-faults: {DROP_FIT} is for plain aggregation; under SecAgg+ use "
                               f"drop-collect-masked-vectors.")
        unknown = sorted(c for c in fault.clients if c >= num_clients)
        if unknown:
            raise FedtuneError(f"inject-faults: client(s) {unknown} do not exist (num-clients {num_clients}).")


def client_fault(spec: str, *, server_round: int, partition_id: int, kinds: tuple[str, ...]) -> str | None:
    """The fault of one of `kinds` planned for this client in this round, if any."""
    for fault in parse_faults(spec):
        if fault.round == server_round and fault.kind in kinds and partition_id in fault.clients:
            return fault.kind
    return None


def coordinator_crashes(spec: str, *, server_round: int) -> bool:
    return any(f.kind == CRASH_COORDINATOR and f.round == server_round for f in parse_faults(spec))


class InjectedFault(RuntimeError):
    """Raised inside a ClientApp to make it vanish: Flower reports the node as failed."""
