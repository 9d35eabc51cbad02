"""Which registered nodes are which roster institutions: the coordinator samples only those.

Flower samples from every node registered at the SuperLink, and in Flower 1.41 anyone who reaches
the port can register one. A stranger sampled into a SecAgg+ round relays keys no honest node
accepts, and every honest node then refuses the key list: the round fails for all. So the
coordinator learns each node's institution from what a node cannot fake, its SecAgg+ key
statement signed with its institution's identity key as the roster pins it (checked at setup,
server/secure_aggregation.py), and:
- samples identified members only, once enough of them are connected; nodes not yet identified
  are sampled only to fill a round, and learn their identity at its setup;
- a node whose statement does not verify (not a member, another member's name, a key the roster
  does not list) is a stranger for the rest of the run: never sampled again, for fit or
  evaluation; a node that failed setup otherwise (an error, a refusal) is left out of that round
  only, and replaced from the nodes not yet tried.
The institutions' own checks do not depend on any of this: it keeps a round alive, nothing more.

Before a round the coordinator waits for its nodes (`wait_for_nodes`), saying every
NODE_WAIT_REPORT_S in Flower's log (what `flwr run --stream` shows) which institutions it waits for,
by name once the connected nodes are identified, by count before; after NODE_WAIT_LIMIT_S it gives
up with an error that says who did not connect, instead of Flower's 24-hour wait.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from flwr.common.logger import log as flower_log
from flwr.server.client_proxy import ClientProxy

from fedtune.common.errors import FedtuneError
from fedtune.common.secure_aggregation.roster import Roster

log = logging.getLogger(__name__)

NODE_WAIT_LIMIT_S = 600.0  # a round whose nodes are not all connected by then ends the run
NODE_WAIT_REPORT_S = 30.0  # how often the coordinator says whom it is waiting for


@dataclass
class NodeIdentities:
    roster: Roster
    members: dict[int, str] = field(default_factory=dict)  # node id -> the institution its signature proved
    strangers: dict[int, str] = field(default_factory=dict)  # node id -> why it is never sampled again

    def problem(self, *, institution: object, signature: object, statement: bytes | None) -> str | None:
        """Why a setup reply does not prove a roster member (one line, no key), or None."""
        if not isinstance(institution, str) or institution not in self.roster.members:
            return "it claims no institution the roster lists"
        if not isinstance(signature, bytes) or statement is None or \
                not self.roster.verifies(institution=institution, statement=statement, signature=signature):
            return f"its keys are not signed with {institution}'s roster key"
        return None

    def identify(self, node_id: int, institution: str) -> None:
        if self.members.get(node_id) != institution:
            log.info("node %d is %s (its signed key statement verifies against the roster)", node_id, institution)
        self.members[node_id] = institution

    def may_speak_for(self, node_id: int, institution: str) -> bool:
        """Whether a text from `node_id` may be taken as `institution`'s: not from a stranger, nor
        naming an institution another node proved to be."""
        if node_id in self.strangers:
            return False
        proved = self.members.get(node_id)
        if proved is not None:
            return proved == institution
        return institution not in self.members.values()

    def reject(self, node_id: int, why: str) -> None:
        if node_id not in self.strangers:
            log.warning("node %d is not sampled again in this run: %s", node_id, why)
        self.members.pop(node_id, None)
        self.strangers[node_id] = why

    def candidates(self, client_manager, *, exclude: set[int] = frozenset()) -> list[ClientProxy]:
        """Connected nodes that may be sampled, identified members first (at most one node per
        institution), then nodes not yet identified; each group in random order (`random`: the
        run's seed, as Flower samples)."""
        connected = [p for p in client_manager.all().values() if p.node_id not in exclude
                     and p.node_id not in self.strangers]
        identified, unknown, seen = [], [], set()
        for proxy in random.sample(connected, len(connected)):
            institution = self.members.get(proxy.node_id)
            if institution is None:
                unknown.append(proxy)
            elif institution not in seen:
                seen.add(institution)
                identified.append(proxy)
        return identified + unknown

    def sample(self, client_manager, num_clients: int, *, min_available: int) -> list[ClientProxy]:
        """`num_clients` nodes for a fit round, or [] when fewer may be sampled (the round is
        skipped, as Flower's own sampling does)."""
        wait_for_nodes(client_manager, min_available, identities=self)
        chosen = self.candidates(client_manager)[:num_clients]
        if len(chosen) < num_clients:
            log.info("sampling failed: %d connected node(s) may be sampled (%d strangers left out), %d requested",
                     len(chosen), len(self.strangers), num_clients)
            return []
        return chosen

    def identified(self, client_manager) -> list[ClientProxy]:
        """Connected nodes identified as members (for evaluation: a node never identified gets nothing)."""
        return [p for p in self.candidates(client_manager) if p.node_id in self.members]


class NodesMissing(FedtuneError):
    """The nodes a round needs did not connect within NODE_WAIT_LIMIT_S; the message says who."""


def wait_for_nodes(client_manager, needed: int, *, identities: NodeIdentities | None = None) -> None:
    """Return once `needed` nodes are connected. Meanwhile say whom the coordinator waits for, at
    once and every NODE_WAIT_REPORT_S; raise NodesMissing after NODE_WAIT_LIMIT_S."""
    # Flower's compat layer registers connected nodes when num_available/all/sample is called,
    # and otherwise every 5 s: ask first, so nodes already connected are not waited 5 s for.
    if client_manager.num_available() >= needed:
        return
    limit, deadline = NODE_WAIT_LIMIT_S, time.monotonic() + NODE_WAIT_LIMIT_S
    while True:
        waiting, _ = _whom(client_manager, needed, identities)
        flower_log(logging.INFO, waiting)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if client_manager.wait_for(needed, timeout=min(NODE_WAIT_REPORT_S, remaining)) and \
                client_manager.num_available() >= needed:
            flower_log(logging.INFO, "%d node(s) connected: the round goes on", client_manager.num_available())
            return
    _, missing = _whom(client_manager, needed, identities)
    message = (f"gave up after waiting {_duration(limit)} for the federation's nodes: {missing}. Start the "
               f"missing SuperNodes and submit the job again")
    flower_log(logging.ERROR, message)
    raise NodesMissing(message)


def _whom(client_manager, needed: int, identities: NodeIdentities | None) -> tuple[str, str]:
    """('waiting for ...', '... did not connect ...'): in names where they are knowable (every
    connected node is identified), else in counts (with the roster's names, if any)."""
    connected = [p.node_id for p in client_manager.all().values()]
    short = max(needed - len(connected), 0)
    if identities is None:
        seen = f"{len(connected)} of {needed} connected"
        return f"waiting for {short} more node(s) ({seen})", f"{short} node(s) did not connect ({seen})"
    roster = sorted(identities.roster.members)
    named = sorted({identities.members[n] for n in connected if n in identities.members})
    unknown = [n for n in connected if n not in identities.members and n not in identities.strangers]
    strangers = sum(n in identities.strangers for n in connected)
    odd = [f"{len(unknown)} not yet identified"] if unknown else []
    odd += [f"{strangers} stranger(s), never sampled"] if strangers else []
    if not unknown and needed == len(roster):
        missing = [m for m in roster if m not in named]
        seen = "connected: " + ", ".join(named + odd or ["none"])
        return (f"waiting for {len(missing)} of {len(roster)} institutions: {', '.join(missing)} ({seen})",
                f"{', '.join(missing)} did not connect ({seen})")
    seen = f"{len(connected)} connected" + (f": {', '.join(named + odd)}" if named or strangers else "")
    seen += f"; roster: {', '.join(roster)}"
    return f"waiting for {short} more node(s) ({seen})", f"{short} of {needed} node(s) did not connect ({seen})"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
