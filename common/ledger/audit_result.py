"""What an audit found, and how its verdict reads (common/ledger/audit.py makes it).

The verdict never says more than what it rests on: "clean" only when every client ledger
verifies under a key the auditor brought from outside the run directory whose private half is
not in it (common/ledger/trust.py writes the "rests on" lines).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LedgerCheck:
    owner: str
    path: str
    records: int
    key_fingerprint: str
    key_pinned: bool
    problems: list[str] = field(default_factory=list)
    receipted: bool = False  # a receipt verifies under the pinned key, and the run agrees with it
    receipt_unattested: bool = False  # a receipt agrees, but verifies only under the directory's own key
    private_key_inside: bool = False  # the key it verifies under has its private half in the directory

    @property
    def attested(self) -> bool:
        """Its key came from outside the directory (pinned), and no one holding the directory holds its
        private half: only then is the ledger, and any receipt under that key, the institution's word."""
        return self.key_pinned and not self.private_key_inside


@dataclass
class ClientRow:
    client_id: str
    run_id: str
    round: int
    status: str
    steps: int
    noise_multiplier: float | None
    sample_rate: float | None
    claimed_epsilon: float | None
    recomputed_epsilon: float | None
    target_epsilon: float | None
    delta: float | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class AuditResult:
    ledgers: list[LedgerCheck]
    rows: list[ClientRow]
    problems: list[str]
    budget_exceeded: list[str]
    notes: list[str]
    policy_breaches: list[str] = field(default_factory=list)  # what the recorded node policy forbids
    trust: list[str] = field(default_factory=list)  # what the verdict rests on: whose keys, whose word

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 2 if self.budget_exceeded or self.policy_breaches else 0

    @property
    def verdict(self) -> str:
        """The verdict's first words (`--json`'s "verdict"): "clean" only when attested, else
        "consistent", as printed; a failure names itself."""
        if self.exit_code == 2 and not self.budget_exceeded:
            return "policy breached"
        return {0: "clean" if self.attested else "consistent", 1: "verification failed",
                2: "budget exceeded"}[self.exit_code]

    @property
    def unpinned(self) -> list[str]:
        """Client ledgers whose key the auditor did not pin (a receipt alone never stands in for a pin:
        it verifies under whatever key the directory supplies)."""
        return [c.owner for c in self._clients if not c.key_pinned]

    @property
    def keys_pinned(self) -> bool:
        return not self.unpinned

    @property
    def attested(self) -> bool:
        """Every client ledger verifies under a key the auditor brought whose private half is not in the
        directory: the only case the verdict may say "clean"."""
        return all(c.attested for c in self._clients)

    @property
    def _clients(self) -> list[LedgerCheck]:
        return [c for c in self.ledgers if c.owner != "server"]

    @property
    def verdict_text(self) -> str:
        """The verdict as a person reads it: never more than what it rests on (common/ledger/trust.py).
        "clean" only when the institutions' own keys vouch for every client ledger."""
        if self.exit_code or self.attested:
            return self.verdict
        inside = [c.owner for c in self._clients if c.private_key_inside]
        if inside:
            whose = "every client ledger" if len(inside) == len(self._clients) else ", ".join(inside)
            return (f"consistent (not independently attested: the private keys of {whose} are in the run "
                    f"directory, so whoever holds it could have signed those ledgers and any receipt of them)")
        if len(self.unpinned) == len(self._clients):
            return "consistent (keys not pinned: the run directory's own keys were trusted)"
        return (f"consistent (keys of {', '.join(self.unpinned)} not pinned: the run directory's own keys "
                f"were trusted for them)")

    def key_use(self, check: LedgerCheck) -> str:
        """How one ledger's key was come by, in a few words (the terminal view and the report)."""
        if check.key_pinned:
            return "pinned key, private half in this directory" if check.private_key_inside else \
                "pinned key, receipted" if check.receipted else "pinned key"
        return "key beside ledger, receipt agrees" if check.receipt_unattested else "key beside ledger"

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "verdict_text": self.verdict_text, "keys_pinned": self.keys_pinned,
                "attested": self.attested, "exit_code": self.exit_code, **asdict(self)}
