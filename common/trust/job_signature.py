"""A job is the run config the coordinator's operator signed for the pinned app.

The operator signs (Ed25519) the whole run config a party will act on (pyproject.toml's defaults
fused with the `--run-config` overrides, as Flower fuses them), the app's FAB hash, a random job
id and an expiry. Institutions pin the operator's public key in their node config. Whoever can
reach the SuperLink's port can still submit runs; without the operator's key they cannot submit
one that any node trains for, nor change one key of a signed job. A verbatim copy of a signed job
under another run id is caught by the node's job bindings (client side: one job, one run).

A job names its federation: the fingerprint of the roster its institutions pinned (`job-roster`),
signed with the rest. A party compares it with the roster it pinned itself, so a verbatim copy of a
job (anyone can read it with `flwr ls`) submitted to a second federation whose nodes pin the same
operator key is refused there.
"""

from __future__ import annotations

import base64
import json
import secrets
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.common.errors import FedtuneError
from fedtune.common.protocol import JobWire
from fedtune.common.storage import atomic_write

DOMAIN = "fedtune-job-v1"  # a signature over a job is never valid as any other fedtune statement
OPERATOR_PRIVATE_FILE, OPERATOR_PUBLIC_FILE = "operator.key", "operator.pub"
# A signature only gates a job's start: one not started within a year is re-signed against the
# federation's current roster and app rather than left valid (and it keeps `date` arithmetic finite).
MAX_VALID_DAYS = 366


def make_operator_keys(out: Path) -> Path:
    """An operator's Ed25519 pair in `out` (private 0600, never replaced); returns the .pub path."""
    out = Path(out)
    private, public = out / OPERATOR_PRIVATE_FILE, out / OPERATOR_PUBLIC_FILE
    if private.exists() or public.exists():
        raise FedtuneError(f"{out} already holds an operator key; it is never replaced (institutions pinned it)")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    atomic_write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()), mode=0o600, exclusive=True)
    atomic_write(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def load_operator_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise FedtuneError(f"cannot read the operator key {path} ({type(exc).__name__}); make one with "
                           f"`fedtune operator-key --out DIR`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FedtuneError(f"{path} is not an Ed25519 private key (make one with `fedtune operator-key`)")
    return key


def load_operator_public_key(path: Path) -> Ed25519PublicKey:
    """The pinned operator key; the error names the file and the fix, never its contents."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise FedtuneError(f"cannot read the operator's public key {path} ({type(exc).__name__}); ask the "
                           f"coordinator's operator for operator.pub (`fedtune operator-key`)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise FedtuneError(f"{path} is not an Ed25519 public key (operator.pub from `fedtune operator-key`)")
    return key


def signed_bytes(run_config: Mapping[str, Any], app_sha256: str) -> bytes:
    """What the signature covers: every key but the signature, and the app, canonically."""
    body = {key: value for key, value in run_config.items() if key != JobWire.SIGNATURE}
    return json.dumps({"domain": DOMAIN, "app": app_sha256, "run-config": body}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


def new_job_keys(*, valid_days: int, federation: str, today: date | None = None) -> dict[str, str]:
    """A fresh job id and expiry and the federation's roster fingerprint, to add to the overrides
    before signing."""
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise FedtuneError(f"--valid-days must lie between 1 and {MAX_VALID_DAYS}: a job not started within a "
                           f"year is signed again, against the federation's current roster and app")
    if not federation:
        raise FedtuneError("a signed job names its federation: pass --roster PATH (the roster the institutions pinned)")
    expires = (today or date.today()) + timedelta(days=valid_days)
    return {JobWire.ID: secrets.token_hex(8), JobWire.EXPIRES: expires.isoformat(), JobWire.ROSTER: federation}


def sign(run_config: Mapping[str, Any], *, app_sha256: str, key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.sign(signed_bytes(run_config, app_sha256))).decode()


def job_problem(run_config: Mapping[str, Any], *, app_sha256: str, operator: Ed25519PublicKey) -> str | None:
    """Why this run config is not a job the pinned operator signed for this app, or None.
    The reason names keys only: it goes back to whoever submitted the run."""
    signature = str(run_config.get(JobWire.SIGNATURE, "") or "")
    if not signature:
        return "the run config is not signed (no job-signature): this node trains only jobs its pinned operator signed"
    try:
        operator.verify(base64.b64decode(signature, validate=True), signed_bytes(run_config, app_sha256))
    except (InvalidSignature, ValueError):
        return ("the job signature does not verify against the operator key this node pinned (another key "
                "signed it, or a key of the run config changed after signing)")
    if not run_config.get(JobWire.ID):
        return "the signed job has no job-id; sign it with `fedtune sign-job`"
    if not _expiry(run_config):
        return "the signed job has no valid job-expires date; sign it with `fedtune sign-job`"
    if not run_config.get(JobWire.ROSTER):
        return "the signed job names no federation (no job-roster); sign it with `fedtune sign-job --roster`"
    return None


def federation_problem(run_config: Mapping[str, Any], *, fingerprint: str) -> str | None:
    """Why a (verified) job is for another federation than the roster this party pinned, or None.
    Fingerprints are public (institutions compare them by phone): the reason may name both."""
    named = str(run_config.get(JobWire.ROSTER, "") or "")
    if named != fingerprint:
        return (f"the signed job is for the federation whose roster fingerprint is {named or '(none)'}, not this "
                f"party's ({fingerprint}): a job signed for one federation runs in no other; nothing of it was "
                f"executed")
    return None


def expiry_problem(run_config: Mapping[str, Any], *, today: date | None = None) -> str | None:
    """Why a (verified) job may not start today, or None: it may finish the run it started."""
    expires = _expiry(run_config)
    if expires is not None and (today or date.today()) > expires:
        return f"the signed job expired on {expires.isoformat()}; ask the operator to sign it again"
    return None


def _expiry(run_config: Mapping[str, Any]) -> date | None:
    try:
        return date.fromisoformat(str(run_config.get(JobWire.EXPIRES, "")))
    except ValueError:
        return None
