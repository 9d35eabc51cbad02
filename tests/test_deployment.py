"""A real deployment on loopback, what an institution sees when setting up: SuperLink with TLS and
SuperNode authentication, `check-node` and `run-node`'s errors for a bad key, CA, data or roster.
The jobs themselves run in tests/test_pinned_deployment.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.common.trust.job_signature import make_operator_keys
from fedtune.certs import make_credentials
from fedtune.common.ledger.chain import create_ledger_keys
from tests.conftest import make_texts, write_csv
from tests.deployment import LoopbackFederation, free_port, wait_for
from tests.helpers import fedtune, run_fedtune

pytestmark = pytest.mark.slow

SITES = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink (TLS + node auth) with SuperNodes 0-2 and 4 registered; key 3 never is."""
    workdir = tmp_path_factory.mktemp("deployment")
    make_credentials(out=workdir / "creds", hosts=["localhost", "127.0.0.1"])
    rows = make_texts(200, seed=1)
    for site in range(SITES):  # each institution's own file, with its own column names
        write_csv(workdir / f"site-{site}.csv", rows[site * 150:(site + 1) * 150], header=("note", "topic"))
    write_csv(workdir / "coordinator-test.csv", rows[SITES * 150:])
    fed = LoopbackFederation(workdir=workdir, credentials=workdir / "creds")
    for index in range(5):  # each institution makes its own key; the coordinator gets only the .pub
        fed.make_node_key(index)
    # Each institution's identity (ledger) key, and the roster they all pin, built from the .pubs.
    members = []
    for site in (*range(SITES), 9):
        create_ledger_keys(_ledger_dir(workdir, site))
        members += ["--member", f"site-{site}={_ledger_dir(workdir, site) / 'ledger.pub'}"]
    built = fedtune("roster", "build", *members, "--out", str(workdir / "roster.json"), "--federation", "test")
    assert built.returncode == 0 and "fingerprint" in built.stdout, built.stderr
    make_operator_keys(workdir / "operator")
    try:
        fed.start_superlink()
        fed.register(0, 1, 2, 4)
        yield fed
    finally:
        fed.close()


def _pin(fed: LoopbackFederation) -> str:
    return f" operator-key='{fed.workdir / 'operator' / 'operator.pub'}'"


def _ledger_dir(workdir: Path, site: int) -> Path:
    return workdir / "run" / "ledgers" / f"site-{site}"


@pytest.fixture(scope="module")
def refused_nodes(federation):
    """Two SuperNodes started at once, both bound to fail: key 3 (never registered) with our CA, and
    key 4 (registered) without it."""
    return {"unregistered": federation.start_supernode(3, "client-id='x' data='/nonexistent.csv' ledger-dir='/tmp/x'",
                                                       root_certificates=federation.credentials / "ca.crt"),
            "no CA": federation.start_supernode(4, "client-id='x' data='/nonexistent.csv' ledger-dir='/tmp/x'",
                                                root_certificates=None)}  # the system CAs do not know ours


def test_a_node_whose_key_is_not_registered_is_refused(refused_nodes):
    node = refused_nodes["unregistered"]
    wait_for(lambda: node.popen.poll() is not None, timeout=120, what="the unregistered SuperNode to exit")
    assert node.popen.returncode != 0 and "Failed to activate SuperNode" in node.text()


def test_a_node_without_the_federation_ca_cannot_connect(refused_nodes):
    node = refused_nodes["no CA"]
    wait_for(lambda: node.popen.poll() is not None, timeout=120, what="the SuperNode without our CA to exit")
    assert node.popen.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in node.text()


def _check_node(fed: LoopbackFederation, *, ca: Path, node_config: str, address: str | None = None):
    return fedtune("check-node", "--superlink", address or fed.address, "--root-certificates", str(ca),
                   "--auth-supernode-private-key", str(fed.node_key(0)), "--node-config", node_config)


def test_check_node_passes_a_good_setup_and_says_what_to_fix_in_a_bad_one(federation, tmp_path):
    fed = federation
    ca = fed.credentials / "ca.crt"
    good = f"client-id='site-0' data='{fed.workdir / 'site-0.csv'}' text-column='note' label-column='topic' " \
           f"ledger-dir='{_ledger_dir(fed.workdir, 0)}' roster='{fed.workdir / 'roster.json'}'" + _pin(fed)
    ok = _check_node(fed, ca=ca, node_config=good)
    assert ok.returncode == 0 and "speaks TLS" in ok.stdout, ok.stdout + ok.stderr
    assert "roster: site-0 among 4 institutions" in ok.stdout and "fingerprint" in ok.stdout
    assert "pins: runs only the installed app" in ok.stdout and "for jobs signed by operator key" in ok.stdout
    assert "execution profile: device cpu" in ok.stdout and "(trainables float32)" in ok.stdout
    gpu = _check_node(fed, ca=ca, node_config=good + " device='cuda' base-dtype='float32'")
    if not gpu_present():  # a node asking for a GPU it lacks hears it before a job arrives
        assert gpu.returncode == 3 and "torch sees no CUDA GPU" in gpu.stderr

    unpinned = _check_node(fed, ca=ca, node_config=good.replace(_pin(fed), ""))
    assert unpinned.returncode == 3 and "no operator-key: pin the operator's public key" in unpinned.stderr
    foreign_pin = _check_node(fed, ca=ca, node_config=good + " app-sha256='" + "0" * 64 + "'")
    assert foreign_pin.returncode == 3 and "install the audited version, or pin what is installed" in foreign_pin.stderr

    foreign = make_credentials(out=tmp_path / "other", hosts=["localhost"]).ca_certificate
    wrong_ca = _check_node(fed, ca=foreign, node_config=good)
    assert wrong_ca.returncode == 3 and "not signed by" in wrong_ca.stderr and "federation's ca.crt" in wrong_ca.stderr

    closed = _check_node(fed, ca=ca, node_config=good, address="127.0.0.1:1")
    assert "nothing answers at 127.0.0.1:1" in closed.stderr and "address and port" in closed.stderr

    no_data = _check_node(fed, ca=ca, node_config=f"client-id='site-0' ledger-dir='{tmp_path}'")
    assert no_data.returncode == 3 and "node config needs 'data'" in no_data.stderr
    wrong_column = _check_node(fed, ca=ca, node_config=good.replace("text-column='note'", "text-column='body'"))
    assert wrong_column.returncode == 3 and "body" in wrong_column.stderr

    expired = tmp_path / "expired.crt"
    expired.write_bytes(_expired_certificate())
    old = _check_node(fed, ca=expired, node_config=good)
    assert old.returncode == 3 and "expired on" in old.stderr


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _expired_certificate() -> bytes:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    past = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(past).not_valid_after(past + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_run_node_says_an_unregistered_key_must_be_registered_by_the_coordinator(federation, tmp_path):
    fed = federation
    node = (f"client-id='site-9' data='{fed.workdir / 'site-0.csv'}' text-column='note' label-column='topic' "
            f"ledger-dir='{_ledger_dir(fed.workdir, 9)}' roster='{fed.workdir / 'roster.json'}'" + _pin(fed))
    result = run_fedtune("run-node", "--superlink", fed.address, "--root-certificates", str(fed.credentials / "ca.crt"),
                         "--auth-supernode-private-key", str(fed.node_key(3)),
                         "--node-config", node, "--max-retries", "1", "--host", "127.0.0.1", "--port",
                         str(free_port()), timeout=180)
    assert result.returncode != 0
    assert "Failed to activate SuperNode" in result.stdout
    assert "flwr supernode register" in result.stderr


def test_a_missing_malformed_expired_or_foreign_roster_is_named_in_one_line(federation, tmp_path):
    """check-node (and run-node, which runs it first) says what to fix before the node starts."""
    fed = federation
    ca = fed.credentials / "ca.crt"
    base = (f"client-id='site-0' data='{fed.workdir / 'site-0.csv'}' text-column='note' label-column='topic' "
            f"ledger-dir='{_ledger_dir(fed.workdir, 0)}'" + _pin(fed))
    roster = json.loads((fed.workdir / "roster.json").read_text())
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "expired.json").write_text(json.dumps({**roster, "expires": "2020-01-01"}))
    others = {k: v for k, v in roster["members"].items() if k != "site-0"}
    (tmp_path / "foreign.json").write_text(json.dumps({**roster, "members": others}))
    cases = {"": "this node has no roster: set node config roster='PATH'",
             f" roster='{tmp_path / 'absent.json'}'": "not found: ask the federation for its roster file",
             f" roster='{tmp_path / 'broken.json'}'": "is not a readable JSON file; rebuild it with `fedtune roster",
             f" roster='{tmp_path / 'expired.json'}'": "the roster expired on 2020-01-01",
             f" roster='{tmp_path / 'foreign.json'}'": "the roster does not list this node (site-0)"}
    for extra, says in cases.items():
        result = _check_node(fed, ca=ca, node_config=base + extra)
        problems = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 3 and len(problems) == 1 and says in problems[0], (extra, result.stderr)
    started = fedtune("run-node", "--superlink", fed.address, "--root-certificates", str(ca),  # refused before it starts
                      "--auth-supernode-private-key", str(fed.node_key(0)), "--node-config", base)
    assert started.returncode == 3 and "no roster" in started.stderr and "roster='PATH'" in started.stderr
