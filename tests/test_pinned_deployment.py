"""Institutions run only the code they audited, for jobs the operator signed, over real processes
on loopback: a SuperLink behind the coordinator's pinned runtime (`fedtune run-superlink`), and
three institutions' `fedtune run-node` (each SuperNode beside its own long-lived runtime)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fedtune.common.ledger.chain import create_ledger_keys, read_records
from fedtune.common.trust.job_signature import make_operator_keys
from fedtune.certs import make_credentials
from tests.conftest import make_texts, write_csv
from fedtune.node_keys import make_node_keys
from tests.attacker_app import write_attacker_app
from tests.deployment import LoopbackFederation, wait_for
from tests.helpers import fedtune, read_metrics, saved_adapter_arrays

pytestmark = pytest.mark.slow

SITES = 3


def make_sites(workdir: Path) -> None:
    """Credentials, each institution's data, keys and ledger identity, the roster, and two operator
    keys: the coordinator's (which institutions pin) and a stranger's."""
    make_credentials(out=workdir / "creds", hosts=["localhost"])
    rows = make_texts(200, seed=1)
    for site in range(SITES):
        write_csv(workdir / f"site-{site}.csv", rows[site * 150:(site + 1) * 150], header=("note", "topic"))
    write_csv(workdir / "coordinator-test.csv", rows[SITES * 150:])
    members = []
    for site in range(SITES):
        create_ledger_keys(ledger_dir(workdir, site))
        members += ["--member", f"site-{site}={ledger_dir(workdir, site) / 'ledger.pub'}"]
    built = fedtune("roster", "build", *members, "--out", str(workdir / "roster.json"), "--federation", "test")
    assert built.returncode == 0, built.stderr
    for site in range(SITES):
        make_node_keys(out=workdir / "sites" / f"site-{site}" / "keys", name=f"site-{site}")
    make_operator_keys(workdir / "operator")
    make_operator_keys(workdir / "stranger")


def ledger_dir(workdir: Path, site: int) -> Path:
    return workdir / "run" / "ledgers" / f"site-{site}"  # the institutions' own; here beside the run, for the audit


def node_config(workdir: Path, site: int, model: Path) -> str:
    return (f"client-id='site-{site}' data='{workdir / f'site-{site}.csv'}' text-column='note' label-column='topic' "
            f"ledger-dir='{ledger_dir(workdir, site)}' model='{model}' target-epsilon=4.0 "
            f"roster='{workdir / 'roster.json'}' secagg-min-contributors=2 "
            f"operator-key='{workdir / 'operator' / 'operator.pub'}'")


def job(workdir: Path, model: Path, run: Path, *, rounds: int = 2, round_timeout: int = 60) -> str:
    return (f"model='{model}' data='{workdir / 'coordinator-test.csv'}' num-clients={SITES} "
            f"clients-per-round={SITES} num-rounds={rounds} batch-size=16 max-length=24 learning-rate=0.01 "
            f"lora-rank=4 target-epsilon=3.0 test-fraction=0.9 output-dir='{run}' max-client-examples=150 "
            f"round-timeout={round_timeout} training-mode='adapter'")


def signed(run_config: str, *, key: Path) -> str:
    result = fedtune("sign-job", "--key", str(key), "--roster", str(key.parents[1] / "roster.json"),
                     "--run-config", run_config)  # the federation's roster: make_sites writes it beside the keys
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def start_federation(workdir: Path, model: Path, *, pinned: bool) -> tuple[LoopbackFederation, list]:
    fed = LoopbackFederation(workdir=workdir / ("pinned" if pinned else "open"), credentials=workdir / "creds")
    fed.node_key = lambda site: workdir / "sites" / f"site-{site}" / "keys" / "supernode"  # one key per site, both links
    try:
        fed.start_superlink(operator_key=workdir / "operator" / "operator.pub" if pinned else None)
        fed.register(*range(SITES))
        nodes = [fed.start_supernode(site, node_config(workdir, site, model), runtime=True,
                                     root_certificates=workdir / "creds" / "ca.crt",
                                     timings=fed.workdir / f"timings-{site}.jsonl") for site in range(SITES)]
        wait_for(lambda: all("node runtime: serving" in n.text() for n in nodes)
                 or any(n.popen.poll() is not None for n in nodes), timeout=180, what="the node runtimes")
        assert all(n.popen.poll() is None for n in nodes), [n.text()[-2000:] for n in nodes]
    except BaseException:
        fed.close()  # what did start must not outlive a failed start
        raise
    return fed, nodes


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("pinned")
    make_sites(workdir)
    return workdir


class Coordinators:
    """At most one coordinator (and the three institutions' run-node beside it) up at a time: the
    pinned one for the tests that use it, then the hostile one. Each is started on first use and
    shared by the tests after it; switching closes the other (its processes would only take CPU)."""

    def __init__(self, sites: Path, model: Path) -> None:
        self.sites, self.model = sites, model
        self.kind: str | None = None
        self.up: tuple[LoopbackFederation, list] | None = None

    def get(self, kind: str) -> tuple[LoopbackFederation, list]:
        if self.kind != kind:
            self.close()
            self.up = start_federation(self.sites, self.model, pinned=kind == "pinned")
            self.kind = kind
        return self.up

    def close(self) -> None:
        if self.up is not None:
            self.up[0].close()
        self.kind, self.up = None, None


@pytest.fixture(scope="module")
def coordinators(sites, tiny_model_dir):
    links = Coordinators(sites, tiny_model_dir)
    try:
        yield links
    finally:
        links.close()


@pytest.fixture
def pinned(coordinators):
    """The coordinator's pinned runtime and three institutions' run-node."""
    return coordinators.get("pinned")


@pytest.fixture
def hostile(coordinators):
    """A coordinator whose operator runs whatever is submitted (plain flower-superlink), and the same
    three institutions' run-node: what the nodes alone guarantee."""
    return coordinators.get("hostile")


def ledger_state(workdir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(workdir)): path.read_bytes()
            for site in range(SITES) for path in sorted(ledger_dir(workdir, site).rglob("*")) if path.is_file()}


def finished(fed: LoopbackFederation, run_config: str, *, app: Path | None = None, timeout: float = 300) -> str:
    popen = fed.flwr_run_async(run_config, app=app)
    stdout, _ = popen.communicate(timeout=timeout)
    return stdout


def refusals(node) -> list[str]:
    return [line for line in node.text().splitlines() if "refused run" in line]


def test_a_stranger_who_registers_a_key_cannot_run_code_on_the_pinned_coordinator(sites, pinned, tiny_model_dir,
                                                                                  tmp_path):
    fed, nodes = pinned
    stranger_key = make_node_keys(out=tmp_path / "stranger-keys", name="stranger").supernode_public_key
    registered = fed.flwr("supernode", "register", str(stranger_key), "fedtune")  # a CLI holding only ca.crt
    assert registered.returncode == 0, registered.stdout + registered.stderr  # Flower 1.41 lets anyone register
    before = ledger_state(sites)
    coordinator_file, report = tmp_path / "coordinator-was-here", tmp_path / "replies.json"
    app = write_attacker_app(tmp_path / "innocent", coordinator_file=coordinator_file, report_file=report)
    # The stranger's app, and the genuine app unsigned or signed by the stranger, submitted at once:
    # the pinned ServerApp never starts for any of them.
    run = tmp_path / "run"
    stranger_signed = signed(job(sites, tiny_model_dir, run, rounds=1), key=sites / "stranger" / "operator.key")
    submitted = [fed.flwr_run_async("num-rounds=1", app=app), fed.flwr_run_async(job(sites, tiny_model_dir, run, rounds=1)),
                 fed.flwr_run_async(stranger_signed)]
    stdout, *genuine = [popen.communicate(timeout=300)[0] for popen in submitted]
    assert "refused by the coordinator" in stdout and "is not the app this party pinned" in stdout, stdout[-3000:]
    for stdout in genuine:
        assert "refused by the coordinator" in stdout and "Coordinating" not in stdout, stdout[-3000:]
    assert not coordinator_file.exists() and not report.exists()
    assert not any((sites / "run" / "ledgers").rglob("stranger-was-here"))
    assert ledger_state(sites) == before and not any(refusals(n) for n in nodes)  # nothing reached a node
    assert not run.exists()


def test_the_signed_pinned_job_runs_over_tls_survives_a_killed_node_and_audits_clean(sites, pinned, tiny_model_dir):
    fed, nodes = pinned
    run = sites / "run"
    # The round timeout is what the survivors wait for the dead node (its heartbeat would take 60 s to
    # lapse): 40 s, over twice what round 1's training takes on a loaded 2-core machine (17 s).
    flwr = fed.flwr_run_async(signed(job(sites, tiny_model_dir, run, round_timeout=40),
                                     key=sites / "operator" / "operator.key"))
    wait_for(lambda: bool((run / "metrics.jsonl").exists() and read_metrics(run)) or flwr.poll() is not None,
             timeout=600, what="round 1 to finish")
    nodes[2].kill()  # round 2's SecAgg+ setup is under way: site-2's node dies in it
    stdout, _ = flwr.communicate(timeout=600)
    assert (run / "summary.json").exists(), stdout[-4000:] + fed.processes[0].text()[-3000:]
    metrics = read_metrics(run)
    assert [m["round"] for m in metrics] == [1, 2] and all(m["update_applied"] for m in metrics)
    assert metrics[0]["clients_trained"] == SITES and metrics[1]["failures"] == 1
    for site in range(SITES):
        records = read_records(ledger_dir(sites, site) / "ledger.jsonl")
        assert [r["round"] for r in records] == ([1, 2] if site < 2 else [1])
        assert all(r["target_epsilon"] == 3.0 and r["epsilon"] <= 3.0 for r in records)
    assert all(np.isfinite(a).all() for a in saved_adapter_arrays(run, num_labels=3))
    keys = [arg for site in range(SITES)
            for arg in ("--public-key", f"site-{site}={ledger_dir(sites, site) / 'ledger.pub'}")]
    audit = fedtune("audit", str(run), "--json", *keys)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
    for site in range(2):  # the model was read from disk once per node for the whole run
        timings = [json.loads(line) for line in (fed.workdir / f"timings-{site}.jsonl").read_text().splitlines()]
        assert len(timings) >= 8 and not any(t["refused"] for t in timings)
        assert timings[-1]["model_loads"] == 1, timings
        assert "(load 1 in this process)" in nodes[site].text() and "(load 2 " not in nodes[site].text()


def test_a_hostile_coordinator_cannot_run_the_strangers_app_on_any_node(sites, hostile, tmp_path):
    fed, nodes = hostile
    before = ledger_state(sites)
    coordinator_file, report = tmp_path / "coordinator-was-here", tmp_path / "replies.json"
    app = write_attacker_app(tmp_path / "innocent", coordinator_file=coordinator_file, report_file=report)
    finished(fed, "num-rounds=1", app=app)
    assert coordinator_file.exists()  # this operator runs anything on its own machine: that is its choice
    replies = json.loads(report.read_text())
    assert len(replies) == SITES and all("refused by the node" in r.get("error", "") for r in replies), replies
    text = report.read_text()
    private = [(sites / f"site-{s}.csv").read_text()[:40] for s in range(SITES)] + ["PRIVATE KEY", str(sites)]
    assert not any(secret in text for secret in private)
    assert not any((sites / "run" / "ledgers").rglob("stranger-was-here")) and ledger_state(sites) == before
    app_hash = replies[0]["error"].split("the run's app ")[1].split()[0]
    assert all(any(app_hash in line for line in refusals(node)) for node in nodes)


def test_a_job_unsigned_signed_by_another_key_or_changed_after_signing_is_refused_by_every_node(
        sites, hostile, tiny_model_dir, tmp_path):
    fed, nodes = hostile
    before, seen = ledger_state(sites), [len(refusals(node)) for node in nodes]
    plain = [job(sites, tiny_model_dir, tmp_path / f"run-{case}", rounds=1) for case in range(3)]  # fresh outputs
    cases = {"not signed": plain[0],
             "does not verify": signed(plain[1], key=sites / "stranger" / "operator.key"),
             "changed after signing": signed(plain[2], key=sites / "operator" / "operator.key")
             .replace("target-epsilon=3.0", "target-epsilon=2.0")}
    submitted = {says: fed.flwr_run_async(run_config) for says, run_config in cases.items()}  # at once
    run_ids = {says: re.search(r"Successfully started run (\d+)", popen.communicate(timeout=300)[0]).group(1)
               for says, popen in submitted.items()}
    for index, node in enumerate(nodes):
        new = refusals(node)[seen[index]:]
        for says, run_id in run_ids.items():
            reason = "not signed" if says == "not signed" else "does not verify"
            mine = [line for line in new if f"refused run {run_id} " in line]
            assert mine and all(reason in line for line in mine), (says, new)
    for case in range(3):  # what the coordinator kept: a round nobody trained in, and nothing of a node's
        first = read_metrics(tmp_path / f"run-{case}")[0]
        assert first["clients_trained"] == 0 and not first["update_applied"], first
    kept = "".join(path.read_text(errors="replace") for path in tmp_path.rglob("*") if path.is_file())
    private = [(sites / f"site-{s}.csv").read_text()[:40] for s in range(SITES)] + [str(sites / "run")]
    private += [(ledger_dir(sites, s) / "ledger.key").read_text().splitlines()[1] for s in range(SITES)]  # key bodies
    assert not any(secret in kept for secret in private)
    assert ledger_state(sites) == before  # nothing was trained, spent or recorded
