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
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from flwr.server.client_proxy import ClientProxy

from common.secure_aggregation.roster import Roster

log = logging.getLogger(__name__)


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
        # Flower's compat layer registers connected nodes when num_available/all/sample is called,
        # and otherwise every 5 s: ask first, so nodes already connected are not waited 5 s for.
        if client_manager.num_available() < min_available:
            client_manager.wait_for(min_available)
        chosen = self.candidates(client_manager)[:num_clients]
        if len(chosen) < num_clients:
            log.info("sampling failed: %d connected node(s) may be sampled (%d strangers left out), %d requested",
                     len(chosen), len(self.strangers), num_clients)
            return []
        return chosen

    def identified(self, client_manager) -> list[ClientProxy]:
        """Connected nodes identified as members (for evaluation: a node never identified gets nothing)."""
        return [p for p in self.candidates(client_manager) if p.node_id in self.members]
