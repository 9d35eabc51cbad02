"""Institutions make their own keys (`fedtune node-keys`); the coordinator's `fedtune certs` makes none.

Whoever holds the coordinator's folder must not be able to act as any institution's node or sign
its ledger, and a second run must never replace a key the coordinator or auditor already pinned.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.common.ledger.chain import Ledger, canonical, create_ledger_keys, load_public_key, read_records, verify_records
from tests.helpers import fedtune

KEY_FILES = ("keys/supernode", "keys/supernode.pub", "ledger/ledger.key", "ledger/ledger.pub")


def _node_keys(tmp_path: Path, *extra: str):
    return fedtune("node-keys", "--out", str(tmp_path / "keys"), "--ledger-dir", str(tmp_path / "ledger"), *extra)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_node_keys_makes_owner_only_keys_whose_public_halves_match(tmp_path):
    made = _node_keys(tmp_path, "--name", "hospital-a")
    assert made.returncode == 0, made.stdout + made.stderr
    assert _mode(tmp_path / "keys" / "supernode") == 0o600 and _mode(tmp_path / "ledger" / "ledger.key") == 0o600
    assert _mode(tmp_path / "keys" / "supernode.pub") == 0o644 and _mode(tmp_path / "ledger" / "ledger.pub") == 0o644

    private = serialization.load_ssh_private_key((tmp_path / "keys" / "supernode").read_bytes(), password=None)
    public_line = (tmp_path / "keys" / "supernode.pub").read_text()
    public = serialization.load_ssh_public_key(public_line.encode())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert public_line.startswith("ecdsa-sha2-nistp384 ") and public_line.split()[-1] == "hospital-a"

    # what goes where, and what stays
    assert "send to the coordinator" in made.stdout and "flwr supernode register" in made.stdout
    assert "give to the auditor" in made.stdout and "ledger.pub" in made.stdout
    assert "never leaves" in made.stdout


def test_a_second_run_refuses_and_leaves_the_first_keys_byte_identical(tmp_path):
    assert _node_keys(tmp_path).returncode == 0
    before = {name: (tmp_path / name).read_bytes() for name in KEY_FILES}

    again = _node_keys(tmp_path)
    assert again.returncode == 3 and "already exists" in again.stderr and "never replaced" in again.stderr
    # only the ledger key is in the way: nothing is half-made in the new --out either
    ledger_taken = fedtune("node-keys", "--out", str(tmp_path / "fresh"), "--ledger-dir", str(tmp_path / "ledger"))
    assert ledger_taken.returncode == 3 and "ledger.key already exists" in ledger_taken.stderr
    assert not (tmp_path / "fresh" / "supernode").exists()
    assert {name: (tmp_path / name).read_bytes() for name in KEY_FILES} == before


def test_a_name_that_would_break_the_public_key_line_is_refused(tmp_path):
    result = fedtune("node-keys", "--out", str(tmp_path / "keys"), "--name", "hospital a")
    assert result.returncode == 3 and "--name" in result.stderr
    assert not (tmp_path / "keys" / "supernode").exists()


def _private_keys_under(root: Path) -> set[str]:
    found = set()
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            data = path.read_bytes()
            if b"PRIVATE KEY" in data or _loads_as_private_key(data):
                found.add(path.relative_to(root).as_posix())
    return found


def _loads_as_private_key(data: bytes) -> bool:
    loaders = (lambda: serialization.load_pem_private_key(data, password=None),
               lambda: serialization.load_der_private_key(data, password=None),
               lambda: serialization.load_ssh_private_key(data, password=None))
    for load in loaders:
        try:
            load()
            return True
        except (ValueError, TypeError):
            continue
    return False


def test_certs_writes_no_private_key_but_the_ca_and_superlink_ones(tmp_path):
    made = fedtune("certs", "--out", str(tmp_path / "creds"), "--hosts", "localhost")
    assert made.returncode == 0, made.stdout + made.stderr
    assert _private_keys_under(tmp_path / "creds") == {"ca.key", "superlink/server.key"}
    assert not (tmp_path / "creds" / "supernodes").exists()
    assert "fedtune node-keys" in made.stdout


def test_certs_nodes_says_institutions_now_make_their_own_keys(tmp_path):
    result = fedtune("certs", "--out", str(tmp_path / "creds"), "--hosts", "localhost", "--nodes", "3")
    assert result.returncode == 3 and "fedtune node-keys" in result.stderr
    assert not (tmp_path / "creds").exists()


def test_the_ledger_signs_with_the_key_node_keys_made(tmp_path):
    assert _node_keys(tmp_path).returncode == 0
    published = (tmp_path / "ledger" / "ledger.pub").read_bytes()  # what the auditor was given

    record = Ledger(tmp_path / "ledger").append({"round": 1, "epsilon": 0.5})

    assert (tmp_path / "ledger" / "ledger.pub").read_bytes() == published  # not replaced by the Ledger
    key = load_public_key(tmp_path / "ledger" / "ledger.pub")
    unsigned = {k: v for k, v in record.items() if k != "signature"}
    key.verify(base64.b64decode(record["signature"]), canonical(unsigned))  # raises if another key signed
    path = tmp_path / "ledger" / "ledger.jsonl"
    assert verify_records(path, read_records(path), key).ok


def test_a_roster_is_built_from_ledger_keys_and_checked_by_each_institution(tmp_path):
    for name in ("hospital-a", "hospital-b", "stranger"):
        create_ledger_keys(tmp_path / name)
    roster = tmp_path / "roster.json"
    built = fedtune("roster", "build", "--member", f"hospital-a={tmp_path / 'hospital-a' / 'ledger.pub'}",
                    "--member", f"hospital-b={tmp_path / 'hospital-b'}", "--out", str(roster),
                    "--expires", "2099-01-01")
    assert built.returncode == 0, built.stderr
    fingerprint = built.stdout.split("fingerprint")[1].split("\n")[0].strip()
    ok = fedtune("roster", "check", str(roster), "--institution", "hospital-a", "--key", str(tmp_path / "hospital-a"))
    assert ok.returncode == 0 and fingerprint in ok.stdout and "2 institutions" in ok.stdout
    # the same fingerprint whoever checks it: what institutions compare out of band
    assert fingerprint in fedtune("roster", "check", str(roster)).stdout
    for institution, key, says in (("hospital-a", "stranger", "lists another key for this node (hospital-a)"),
                                   ("stranger", "stranger", "does not list this node (stranger)")):
        wrong = fedtune("roster", "check", str(roster), "--institution", institution, "--key", str(tmp_path / key))
        assert wrong.returncode == 3 and says in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    again = fedtune("roster", "build", "--member", f"hospital-a={tmp_path / 'hospital-a'}", "--out", str(roster))
    assert again.returncode == 3 and "already exists" in again.stderr  # a roster is never silently replaced
