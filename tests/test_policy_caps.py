"""A node's caps on a run's size, and a signed job bound to its federation (issue 29, items 4, 6, 8).

A job too large for the node's caps (`max-rounds`, `max-dp-steps`) is refused through the deployed
ClientApp before anything is calibrated, with the refusal in the node's ledger and no record count
in the reply; `fedtune plan` and `fedtune sign-job` answer one `error:` line and exit 3, fast, for
what a node would refuse; the PRV accountant never allocates a grid past its bound; and a job
signed for one federation is refused by the nodes of another that pins the same operator key.
"""

from __future__ import annotations

import json
import re
import resource
import time
from datetime import date
from pathlib import Path

import pytest

from fedtune.common.errors import FedtuneError
from fedtune.common.privacy import plan as plan_module
from fedtune.common.privacy.accounting import MAX_PRV_POINTS, epsilon_of
from fedtune.common.privacy.plan import DEFAULT_MAX_DP_STEPS, DEFAULT_MAX_ROUNDS, planned_steps
from fedtune.common.privacy.policy import NodePolicy
from fedtune.common.secure_aggregation.roster import Roster
from fedtune.common.trust.job_signature import MAX_VALID_DAYS, make_operator_keys
from tests.test_malicious_coordinator import (PLANTED, _adapter, _assert_refused, _context, _fit,  # noqa: F401
                                              _ledger, job, site)


@pytest.fixture
def no_calibration(monkeypatch):
    """Any call of the calibration fails the test: the caps are checked before it."""

    def forbidden(*args, **kwargs):
        raise AssertionError("calibrated a plan the node's caps refuse")

    monkeypatch.setattr(plan_module, "calibrate_sigma", forbidden)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- item 4: the node's caps, before any calibration ---------------------------------------------

def test_a_job_over_the_default_round_cap_is_refused_before_data_or_calibration(site, job, tiny_model_dir,
                                                                               no_calibration):
    node = site(**{"secure-aggregation": False})
    reply = _fit(_context(node, job(num_rounds=DEFAULT_MAX_ROUNDS + 1, secure_aggregation=False)),
                 _adapter(tiny_model_dir))
    _assert_refused(reply, because=f"num-rounds={DEFAULT_MAX_ROUNDS + 1} asked, this node plans at most "
                                   f"{DEFAULT_MAX_ROUNDS} rounds (policy max-rounds)")
    [record] = _ledger(node)
    assert record["status"] == "refused-policy" and "policy max-rounds" in record["reason"]
    assert record["local_examples"] == 0  # refused before the node's file was read
    assert record["policy"]["max-rounds"] == DEFAULT_MAX_ROUNDS
    assert record["policy"]["max-dp-steps"] == DEFAULT_MAX_DP_STEPS


def test_a_job_over_the_nodes_step_cap_is_refused_before_calibration_without_stating_n(site, job, tiny_model_dir,
                                                                                       no_calibration):
    node = site(**{"secure-aggregation": False, "max-dp-steps": 10})
    asked = job(num_rounds=2, local_epochs=3, batch_size=8, secure_aggregation=False)
    reply = _fit(_context(node, asked), _adapter(tiny_model_dir))
    _assert_refused(reply, because="more DP steps over the run than the 10 this node plans at most "
                                   "(policy max-dp-steps); lower num-rounds or local-epochs, or raise batch-size")
    [record] = _ledger(node)
    assert record["status"] == "refused-policy" and record["policy"]["max-dp-steps"] == 10
    n = record["local_examples"]  # the node knows N; its reply must not
    assert n > 0
    steps = planned_steps(asked, num_examples=n)
    assert steps > 10
    assert re.findall(r"\d+", reply.metrics["reason"]) == ["10"]  # the node's cap, nothing derived from N
    numbers = [v for v in reply.metrics.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert n not in numbers and steps not in numbers and PLANTED not in json.dumps(dict(reply.metrics))


def test_a_job_within_the_caps_trains(site, job, tiny_model_dir):
    node = site(**{"secure-aggregation": False, "max-rounds": 2, "max-dp-steps": 1000})
    reply = _fit(_context(node, job(num_rounds=2, secure_aggregation=False)), _adapter(tiny_model_dir))
    assert reply.metrics["status"] == "trained" and reply.num_examples > 0
    assert _ledger(node)[-1]["policy"]["max-rounds"] == 2


def test_the_caps_are_node_config_keys_with_checked_values():
    policy = NodePolicy.from_node_config({"max-rounds": "50", "max-dp-steps": 2000})
    assert (policy.max_rounds, policy.max_dp_steps) == (50, 2000)
    for key, value in (("max-rounds", 0), ("max-dp-steps", -1)):
        with pytest.raises(FedtuneError, match="'max-rounds' and 'max-dp-steps' must be positive"):
            NodePolicy.from_node_config({key: value})
    with pytest.raises(FedtuneError, match="max-rounds"):
        NodePolicy.from_node_config({"max-rounds": "many"})


def test_plan_of_config_refuses_past_the_caps_before_calibrating(tiny_config, no_calibration):
    with pytest.raises(FedtuneError, match="policy max-dp-steps"):
        plan_module.plan_of_config(tiny_config(num_rounds=1000, local_epochs=100), num_examples=1000)
    with pytest.raises(FedtuneError, match="policy max-rounds"):
        plan_module.plan_of_config(tiny_config(num_rounds=3), num_examples=1000, max_rounds=2)
    two_stage = tiny_config(training_mode="two-stage", num_rounds=3, probe_rounds=1, probe_steps=16,
                            local_epochs=2, batch_size=10)
    assert planned_steps(two_stage, num_examples=100) == 16 + 2 * 2 * 10
    assert planned_steps(two_stage, num_examples=None) == 16 + 2 * 2  # an epoch is at least one step


def test_the_prv_accountant_refuses_a_grid_past_its_bound_instead_of_exhausting_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    # sigma 1, q 0.1 over 100,000 steps: a grid of about 200 million points (killed at 20 GB before).
    assert epsilon_of([(1.0, 0.1, 100_000)], delta=1e-5) == float("inf")
    assert time.monotonic() - started < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000  # KB: under 1 GB more
    assert MAX_PRV_POINTS == 12_000_000
    assert epsilon_of([(1.0, 0.1, 100)], delta=1e-5) < 10  # an ordinary history is still computed


# -- item 8: `fedtune plan` and `fedtune sign-job` answer bad sizes with one line --------------

@pytest.mark.parametrize("args, says", [
    (["--rounds", "1000000"], "num-rounds=1000000 asked, a node by default plans at most 1000 rounds"),
    (["--rounds", "500", "--local-epochs", "100000", "--mode", "adapter"],
     "more DP steps over the run than the 100000 a node by default plans at most"),
    (["--rounds", "10", "--probe-steps", "1000000000", "--mode", "probe"],
     "more DP steps over the run than the 100000 a node by default plans at most"),
])
def test_plan_past_the_caps_is_one_error_line_fast(args, says, capsys, no_calibration):
    from fedtune.main import run_cli

    started = time.monotonic()
    code = run_cli(["plan", "--dataset-size", "1000", *args])
    captured = capsys.readouterr()
    assert code == 3 and time.monotonic() - started < 10
    lines = _error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], captured.err
    assert captured.out == ""


@pytest.fixture(scope="module")
def federations(tmp_path_factory):
    """One operator key pinned by two federations, each with its own roster."""
    directory = tmp_path_factory.mktemp("federations")
    make_operator_keys(directory / "operator")
    for name, key in (("alpha", b"\1"), ("beta", b"\2")):
        Roster.of_members({"site-a": key * 32}, federation=name, expires=date(2999, 1, 1)).write(
            directory / f"{name}.json")
    return directory


def _sign_job(directory: Path, *extra: str, roster: str = "alpha.json") -> list[str]:
    return ["sign-job", "--key", str(directory / "operator" / "operator.key"), "--roster", str(directory / roster),
            *extra]


@pytest.mark.parametrize("extra, says", [
    (["--run-config", "num-rounds=abc"], "The provided configuration string is in an invalid format"),
    (["--run-config", "num-rounds='abc'"], "num-rounds"),
    (["--run-config", "num-rounds=-1"], "config key 'num-rounds' must be at least 1"),
    (["--run-config", "num-rounds=2000"], "num-rounds=2000 asked, a node with the default policy plans at most 1000"),
    (["--run-config", "num-rounds=1000 local-epochs=101 training-mode='adapter'"],
     "than the 100000 a node with the default policy plans at most (policy max-dp-steps)"),
    (["--valid-days", "99999999"], f"--valid-days must lie between 1 and {MAX_VALID_DAYS}"),
    (["--valid-days", "0"], f"--valid-days must lie between 1 and {MAX_VALID_DAYS}"),
])
def test_sign_job_refuses_what_every_party_would_refuse(federations, extra, says, capsys):
    from fedtune.main import run_cli

    code = run_cli(_sign_job(federations, *extra))
    captured = capsys.readouterr()
    lines = _error_lines(captured.err)
    assert code == 3 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], captured.err
    assert captured.out == ""  # nothing signed


def test_sign_job_needs_a_readable_roster(federations, capsys):
    from fedtune.main import run_cli

    code = run_cli(_sign_job(federations, roster="absent.json"))
    captured = capsys.readouterr()
    assert code == 3 and "roster" in captured.err and "not found" in captured.err and captured.out == ""


# -- item 6: a signed job names its federation ---------------------------------------------------

def _node(directory: Path, roster: str | None) -> dict:
    node = {"client-id": "site-a", "ledger-dir": str(directory / f"ledger-{roster}"),
            "operator-key": str(directory / "operator" / "operator.pub")}
    return {**node, "roster": str(directory / roster)} if roster else node


def test_a_job_signed_for_one_federation_is_refused_by_another_that_pins_the_same_operator(federations, capsys,
                                                                                            monkeypatch):
    import fedtune.common.trust.gate as gate_module
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    from fedtune.common.trust.app_pin import installed_app
    from fedtune.common.trust.job_signature import job_problem
    from fedtune.job_commands import node_gate
    from fedtune.main import run_cli

    assert run_cli(_sign_job(federations, "--run-config", "num-rounds=2")) == 0
    captured = capsys.readouterr()
    alpha = Roster.load(federations / "alpha.json").fingerprint
    beta = Roster.load(federations / "beta.json").fingerprint
    assert alpha != beta and f"federation {alpha}" in captured.err
    app = installed_app()
    config = get_fused_config_from_dir(app.root, parse_config_args([captured.out.strip()]))
    assert config["job-roster"] == alpha
    monkeypatch.setattr(gate_module, "fab_problem", lambda **kwargs: None)  # the app pin: test_job_trust's subject

    def refusal(node: dict, run_id: int) -> str | None:
        return node_gate(node).refusal(fab_hash="", fab_content=b"", run_config=config, run_id=run_id)

    assert refusal(_node(federations, "alpha.json"), 1) is None  # its own federation runs it
    refused = refusal(_node(federations, "beta.json"), 1)  # a verbatim copy, the same operator key pinned
    assert refused.startswith(f"the signed job is for the federation whose roster fingerprint is {alpha}, not "
                              f"this party's ({beta})"), refused
    assert not (Path(_node(federations, "beta.json")["ledger-dir"]) / "jobs.json").exists()  # refused before binding
    assert (Path(_node(federations, "alpha.json")["ledger-dir"]) / "jobs.json").exists()
    with pytest.raises(FedtuneError, match="no roster: a signed job names its federation"):
        node_gate(_node(federations, None))
    # The federation is signed with the rest: changed or removed after signing, the job verifies nowhere.
    operator = node_gate(_node(federations, "beta.json")).operator
    for forged in ({**config, "job-roster": beta}, {**config, "job-roster": ""}):
        assert "does not verify" in job_problem(forged, app_sha256=app.sha256, operator=operator)
    assert job_problem(config, app_sha256=app.sha256, operator=operator) is None
