"""What the SuperLink's open port allows (issue 29, findings 2 and 3), over real processes on loopback.

Flower 1.41 serves its Control API on the Fleet API's port without authentication: anyone who
reaches it can unregister an institution's node, and can register a node of their own. So:
- `fedtune run-superlink` refuses to bind that port beyond loopback unless the operator says an
  authenticating proxy sits in front of it;
- `fedtune run-node` comes back by itself once its key is registered again;
- the coordinator samples only nodes whose signed SecAgg+ keys prove a roster member: a stranger's
  registered node is never in a round past setup, and the round completes for the institutions.
One SuperLink (the pinned runtime), three institutions' run-node and a stranger's, one round. The
signature check and the replacement of a dropped node are driven in process too
(tests/test_roster_sampling.py), where the stranger's own ClientApp answers setup with keys.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedtune.common.ledger.chain import create_ledger_keys, read_records
from fedtune.main import run_cli
from fedtune.node_keys import make_node_keys
from tests.deployment import LoopbackFederation, wait_for
from tests.helpers import fedtune, read_metrics
from tests.test_pinned_deployment import SITES, job, ledger_dir, make_sites, node_config, signed

STRANGER = SITES  # the stranger's node is "site 3" to the harness; it claims to be site-0


def test_run_superlink_refuses_an_unauthenticated_control_api_beyond_loopback(tmp_path, capsys):
    for host in ("0.0.0.0", "10.0.0.5", "::"):
        code = run_cli(["run-superlink", "--operator-key", str(tmp_path / "operator.pub"), "--state-dir",
                        str(tmp_path / "state"), "--ssl-ca-certfile", str(tmp_path / "ca.crt"), "--host", host])
        err = capsys.readouterr().err
        assert code == 3 and err.startswith("error:") and len(err.strip().splitlines()) <= 4, err
        assert f"refuses --host {host}" in " ".join(err.split()) and "unregister" in err
        assert "--control-behind-authenticating-proxy" in " ".join(err.split())
    # Stated behind a proxy, or on loopback, it goes on to its next check (here: the missing operator key).
    for args in (["--host", "0.0.0.0", "--control-behind-authenticating-proxy"], ["--host", "127.0.0.1"]):
        code = run_cli(["run-superlink", "--operator-key", str(tmp_path / "operator.pub"), "--state-dir",
                        str(tmp_path / "state"), *args])
        err = capsys.readouterr().err
        assert code == 3 and "refuses --host" not in err and "operator" in err, err


@pytest.fixture(scope="module")
def open_port(tmp_path_factory, tiny_model_dir):
    """The pinned coordinator, three institutions' run-node, and a stranger's run-node whose key the
    stranger registered itself; it claims to be site-0 under a roster of its own."""
    workdir = tmp_path_factory.mktemp("open-port")
    make_sites(workdir)
    stranger = workdir / "stranger-node"
    create_ledger_keys(stranger / "ledger")
    built = fedtune("roster", "build", "--member", f"site-0={stranger / 'ledger' / 'ledger.pub'}",
                    "--member", f"site-1={ledger_dir(workdir, 1) / 'ledger.pub'}",  # a public key: padding
                    "--out", str(stranger / "roster.json"), "--federation", "test")
    assert built.returncode == 0, built.stderr
    make_node_keys(out=workdir / "sites" / f"site-{STRANGER}" / "keys", name="stranger")
    fed = LoopbackFederation(workdir=workdir / "fed", credentials=workdir / "creds")
    fed.node_key = lambda site: workdir / "sites" / f"site-{site}" / "keys" / "supernode"
    try:
        fed.start_superlink(operator_key=workdir / "operator" / "operator.pub")
        fed.register(*range(SITES + 1))  # the stranger's among them: nobody checks who calls
        configs = [node_config(workdir, site, tiny_model_dir) for site in range(SITES)]
        configs.append(node_config(workdir, 0, tiny_model_dir)  # site-0's name, with its own key and roster
                       .replace(str(ledger_dir(workdir, 0)), str(stranger / "ledger"))
                       .replace(str(workdir / "roster.json"), str(stranger / "roster.json")))
        nodes = [fed.start_supernode(index, configs[index], runtime=True, root_certificates=workdir / "creds" / "ca.crt",
                                     timings=fed.workdir / f"timings-{index}.jsonl") for index in range(SITES + 1)]
        wait_for(lambda: all("node runtime: serving" in n.text() for n in nodes)
                 or any(n.popen.poll() is not None for n in nodes), timeout=180, what="the node runtimes")
        assert all(n.popen.poll() is None for n in nodes), [n.text()[-2000:] for n in nodes]
        yield workdir, fed, nodes
    finally:
        fed.close()


def _node_ids(text: str) -> list[str]:
    return re.findall(r"SuperNode ID: (\d+)", text)


@pytest.mark.slow
def test_run_node_comes_back_by_itself_after_its_node_is_unregistered(open_port):
    workdir, fed, nodes = open_port
    wait_for(lambda: bool(_node_ids(nodes[0].text())), timeout=60, what="site-0's node id")
    [first] = _node_ids(nodes[0].text())
    listed = fed.flwr("supernode", "list", "fedtune")
    assert listed.returncode == 0 and first in listed.stdout, listed.stdout + listed.stderr
    # Anyone holding only ca.crt (the `flwr` CLI here has nothing else) unregisters it.
    gone = fed.flwr("supernode", "unregister", first, "fedtune")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    wait_for(lambda: "is not registered at the SuperLink" in nodes[0].text() or nodes[0].popen.poll() is not None,
             timeout=120, what="run-node to notice")
    assert nodes[0].popen.poll() is None, nodes[0].text()[-3000:]  # it did not exit
    line = next(l for l in nodes[0].text().splitlines() if "is not registered at the SuperLink" in l)
    assert "flwr supernode register" in line and "retries in" in line and "fedtune node-keys" in line
    # Flower 1.41 never registers an unregistered key again: the institution makes a new pair at the
    # same path, the coordinator registers its .pub, and the same run-node process picks it up.
    keys = fed.node_key(0).parent
    keys.rename(keys.with_name("keys-unregistered"))
    make_node_keys(out=keys, name="site-0")
    fed.register(0)
    wait_for(lambda: len(_node_ids(nodes[0].text())) >= 2 or nodes[0].popen.poll() is not None, timeout=180,
             what="site-0's node to come back")
    second = _node_ids(nodes[0].text())[-1]
    listed = fed.flwr("supernode", "list", "fedtune")
    assert re.search(rf"{second}\s.*online", listed.stdout), listed.stdout  # serving again, same run-node process


@pytest.mark.slow
def test_a_strangers_node_is_never_in_a_round_past_setup_and_the_round_completes(open_port, tiny_model_dir):
    workdir, fed, nodes = open_port
    run = workdir / "run"
    # Every registered node sampled (the stranger's too, whatever Flower's order): it is dropped at
    # setup, nobody can take its place, and the three institutions go on (threshold 3 of 4).
    every_node = job(workdir, tiny_model_dir, run, rounds=1).replace(
        f"num-clients={SITES} clients-per-round={SITES}", f"num-clients={SITES + 1} clients-per-round={SITES + 1}")
    flwr = fed.flwr_run_async(signed(every_node + f" roster='{workdir / 'roster.json'}'",
                                     key=workdir / "operator" / "operator.key"))
    stdout, _ = flwr.communicate(timeout=600)
    assert (run / "summary.json").exists(), stdout[-4000:] + fed.processes[0].text()[-3000:]
    [record] = read_metrics(run)
    assert record["update_applied"] and record["clients_trained"] == SITES, record
    assert record["clients_sampled"] == SITES + 1 and record["failures"] == 1, record  # the stranger's place
    assert "secagg_refusals" not in record  # no institution refused the key list
    server = [r for r in read_records(run / "ledgers" / "server" / "ledger.jsonl") if "update_applied" in r]
    assert server[0]["update_applied"] and sorted(server[0]["replied"]) == [f"site-{s}" for s in range(SITES)]
    for site in range(SITES):  # site-0 trains on the node that came back after its unregistration
        assert [r["round"] for r in read_records(ledger_dir(workdir, site) / "ledger.jsonl")] == [1]
    # The stranger got at most the setup request (public parameters): no peer's keys, no model, no fit.
    timings = fed.workdir / f"timings-{STRANGER}.jsonl"
    stages = [json.loads(line)["stage"] for line in timings.read_text().splitlines()]
    assert stages and set(stages) == {"setup"}, stages
    assert not (workdir / "stranger-node" / "ledger" / "ledger.jsonl").exists() or not [
        r for r in read_records(workdir / "stranger-node" / "ledger" / "ledger.jsonl") if r.get("status") == "trained"]
    # Nothing private in what the coordinator, or the stranger, saw.
    private = [(workdir / f"site-{s}.csv").read_text().splitlines()[1][:40] for s in range(SITES)]
    private += [(ledger_dir(workdir, s) / "ledger.key").read_text().splitlines()[1] for s in range(SITES)]
    seen = stdout + nodes[STRANGER].text() + "".join(p.read_text(errors="replace") for p in run.rglob("*")
                                                      if p.is_file() and p.suffix in (".json", ".jsonl", ".md"))
    assert not any(secret in seen for secret in private)
