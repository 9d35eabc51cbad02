"""The gate a run passes before anything of it executes on a party's machine: the pinned app,
then the operator's signature on the job, then its federation (the pinned roster's fingerprint),
then one run per signed job. The first failure is the refusal, one line that names keys and hashes
only (it goes back to whoever submitted the run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.common.errors import FedtuneError
from fedtune.common.protocol import JobWire
from fedtune.common.trust.app_pin import PinnedApp, fab_problem, installed_app, pin_problem
from fedtune.common.trust.job_bindings import bind_problem
from fedtune.common.trust.job_signature import expiry_problem, federation_problem, job_problem, load_operator_public_key

OPERATOR_KEY, APP_PIN = "operator-key", "app-sha256"  # node config keys (the institution's own)


@dataclass(frozen=True)
class RunGate:
    app: PinnedApp
    operator: Ed25519PublicKey
    bindings_dir: Path | None  # where this party records which run each signed job became
    federation: str | None = None  # the fingerprint of the roster this party pinned (None: not checked here)

    @classmethod
    def from_pins(cls, *, operator_key: Path | str | None, app_sha256: str | None = None,
                  bindings_dir: Path | None, federation: str | None = None) -> RunGate:
        """The gate for this installation; a missing or unusable pin is a setup error, raised here
        so the party never starts without one."""
        if not operator_key:
            raise FedtuneError(f"no {OPERATOR_KEY}: pin the operator's public key (operator.pub from `fedtune "
                               f"operator-key`), e.g. {OPERATOR_KEY}='/srv/fedtune/operator.pub'; this party runs "
                               f"only jobs that key signed")
        app = installed_app()
        problem = pin_problem(app_sha256, app)
        if problem:
            raise FedtuneError(problem)
        return cls(app=app, operator=load_operator_public_key(Path(str(operator_key))), bindings_dir=bindings_dir,
                   federation=federation)

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any], *, federation: str | None) -> RunGate:
        """A node's gate; `federation` is the fingerprint of the roster its config pins (the caller
        loads it: fedtune/job_commands.py `node_gate`). A node always checks it: without a roster
        it cannot tell one federation's job from another's, so it never starts."""
        ledger = node.get("ledger-dir")
        gate = cls.from_pins(operator_key=node.get(OPERATOR_KEY), app_sha256=str(node.get(APP_PIN, "") or ""),
                             bindings_dir=Path(str(ledger)) if ledger else None, federation=federation)
        if not federation:
            raise FedtuneError("no roster: a signed job names its federation by its roster's fingerprint, and this "
                               "node runs only its own federation's jobs; set node config roster='PATH' to the "
                               "roster the institutions pinned (`fedtune roster build`)")
        return gate

    def refusal(self, *, fab_hash: str, fab_content: bytes, run_config: Mapping[str, Any],
                run_id: int) -> str | None:
        problem = (fab_problem(fab_hash=fab_hash, fab_content=fab_content, pinned=self.app)
                   or job_problem(run_config, app_sha256=self.app.sha256, operator=self.operator))
        if not problem and self.federation is not None:
            problem = federation_problem(run_config, fingerprint=self.federation)
        if problem:
            return problem
        expired = expiry_problem(run_config)
        if self.bindings_dir is None:
            return expired
        return bind_problem(self.bindings_dir, job_id=str(run_config[JobWire.ID]), run_id=run_id, refuse_new=expired)
