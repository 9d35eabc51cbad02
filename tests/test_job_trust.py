"""The gate in front of every run: the pinned app, the operator's signature, one run per job."""

from __future__ import annotations

import hashlib
import json
from datetime import date

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from fedtune.common.errors import FedtuneError
from fedtune.common.secure_aggregation.roster import Roster
from fedtune.common.trust.app_pin import installed_app, pin_problem
from fedtune.common.trust.gate import RunGate
from fedtune.common.trust.job_bindings import bind_problem
from fedtune.common.trust.job_signature import expiry_problem, job_problem, load_operator_public_key, make_operator_keys
from fedtune.common.trust.signing import signed_run_config
from tests.helpers import ROOT, run_fedtune

FEDERATION = "1234 5678 9abc def0 1234 5678 9abc def0"  # a roster fingerprint (common/secure_aggregation/roster.py)


@pytest.fixture(scope="module")
def operator(tmp_path_factory):
    directory = tmp_path_factory.mktemp("operator")
    make_operator_keys(directory)
    return directory


@pytest.fixture(scope="module")
def fab() -> bytes:
    """What `flwr run .` of this checkout submits (Flower's own build, walking the whole tree)."""
    return build_fab_from_disk(ROOT)


def _as_nodes_see_it(text: str) -> dict:
    """The run config a party acts on: the app's defaults fused with the `--run-config` text."""
    return get_fused_config_from_dir(ROOT, parse_config_args([text]))


def test_the_pinned_hash_is_the_bundle_flwr_run_submits(fab):
    assert installed_app().sha256 == hashlib.sha256(fab).hexdigest()
    assert pin_problem(installed_app().sha256, installed_app()) is None
    assert "install the audited version" in pin_problem("0" * 64, installed_app())
    assert "64 lowercase hex" in pin_problem("abc", installed_app())


def test_a_signed_job_passes_once_and_every_alteration_is_refused(operator, fab, tmp_path):
    text, job_id = signed_run_config(key=operator / "operator.key", run_config="num-rounds=2 model='/m x'",
                                     valid_days=3, federation=FEDERATION)
    gate = RunGate.from_pins(operator_key=operator / "operator.pub", bindings_dir=tmp_path, federation=FEDERATION)
    config = _as_nodes_see_it(text)
    assert config["num-rounds"] == 2 and config["model"] == "/m x" and config["job-id"] == job_id
    assert gate.refusal(fab_hash=hashlib.sha256(fab).hexdigest(), fab_content=fab, run_config=config, run_id=7) is None
    assert gate.refusal(fab_hash=hashlib.sha256(fab).hexdigest(), fab_content=fab, run_config=config, run_id=7) is None
    replay = gate.refusal(fab_hash=hashlib.sha256(fab).hexdigest(), fab_content=fab, run_config=config, run_id=8)
    assert "already ran as run 7" in replay  # the same signed job submitted again, by anyone

    other = fab + b"\0"
    assert "not the app this party pinned" in gate.refusal(
        fab_hash=hashlib.sha256(other).hexdigest(), fab_content=other, run_config=config, run_id=9)
    assert "does not match its own stated hash" in gate.refusal(
        fab_hash=hashlib.sha256(fab).hexdigest(), fab_content=other, run_config=config, run_id=9)
    public = load_operator_public_key(operator / "operator.pub")
    app = installed_app().sha256
    for key, value in (("num-rounds", 3), ("target-epsilon", 9.0), ("job-id", "f" * 16), ("job-expires", "2999-01-01"),
                       ("job-roster", "0000 0000")):
        assert "does not verify" in job_problem({**config, key: value}, app_sha256=app, operator=public), key
    assert "does not verify" in job_problem(config, app_sha256="1" * 64, operator=public)  # signed for another app
    assert "not signed" in job_problem({**config, "job-signature": ""}, app_sha256=app, operator=public)
    assert job_problem(config, app_sha256=app, operator=public) is None
    assert "expired on" in expiry_problem(config, today=date(2999, 1, 1))
    # An expired job may finish the run it is bound to; it starts no other.
    assert bind_problem(tmp_path, job_id=job_id, run_id=7, refuse_new="expired") is None
    assert bind_problem(tmp_path, job_id="unbound", run_id=11, refuse_new="expired") == "expired"


def test_two_processes_binding_one_job_at_once_cannot_both_win(tmp_path):
    """The coordinator gates each ServerApp in its own process: the binding is under a file lock.
    The race is forced: each process, about to write its binding, waits until the other has read
    the file too (both inside the read-modify-write) or is seen blocked on the lock; without the
    lock both read "unbound" and both win."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    at_lock, at_write = [fork.Event(), fork.Event()], [fork.Event(), fork.Event()]
    answers = fork.Queue()
    workers = [fork.Process(target=_bind_in_step, args=(tmp_path, index, at_lock, at_write, answers))
               for index in (0, 1)]
    for worker in workers:
        worker.start()
    results = dict(answers.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=10)
    assert sum(problem is None for problem in results.values()) == 1, results  # one binds, one is refused
    [winner] = [run_id for run_id, problem in results.items() if problem is None]
    [loser] = [run_id for run_id in results if run_id != winner]
    assert f"already ran as run {winner}" in results[loser], results
    assert json.loads((tmp_path / "jobs.json").read_text()) == {"job": winner}


def _bind_in_step(directory, index, at_lock, at_write, answers):
    """`bind_problem` in a worker process, with the step above hooked into its lock and its write."""
    import fcntl
    import time

    import fedtune.common.trust.job_bindings as bindings

    other, write = 1 - index, bindings.atomic_write

    class SpiedLock:
        LOCK_EX = fcntl.LOCK_EX

        @staticmethod
        def flock(fd, operation):
            at_lock[index].set()
            fcntl.flock(fd, operation)

    def write_when_both_are_inside(path, text):
        at_write[index].set()
        blocked_since, deadline = None, time.monotonic() + 20
        while not at_write[other].is_set() and time.monotonic() < deadline:
            if at_lock[other].is_set():  # the other reached the lock and has not read: it is blocked
                blocked_since = blocked_since or time.monotonic()
                if time.monotonic() - blocked_since > 0.3:
                    break
            time.sleep(0.005)
        write(path, text)

    bindings.fcntl, bindings.atomic_write = SpiedLock, write_when_both_are_inside
    answers.put((index + 1, bindings.bind_problem(directory, job_id="job", run_id=index + 1)))


def test_a_job_signed_by_another_key_is_refused(operator, tmp_path):
    make_operator_keys(tmp_path / "stranger")
    text, _ = signed_run_config(key=tmp_path / "stranger" / "operator.key", run_config="", valid_days=1,
                                federation=FEDERATION)
    public = load_operator_public_key(operator / "operator.pub")
    assert "does not verify" in job_problem(_as_nodes_see_it(text), app_sha256=installed_app().sha256, operator=public)


def test_setup_errors_name_the_fix_and_keys_are_never_replaced(operator, tmp_path):
    roster = tmp_path / "roster.json"
    Roster.of_members({"site-a": b"\1" * 32}, federation="test", expires=date(2999, 1, 1)).write(roster)
    with pytest.raises(FedtuneError, match="no operator-key: pin the operator's public key"):
        RunGate.from_node_config({"client-id": "a"}, federation=FEDERATION)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(FedtuneError, match="cannot read the operator's public key"):
        RunGate.from_pins(operator_key=tmp_path / "junk.pub", bindings_dir=None)
    with pytest.raises(FedtuneError, match="never replaced"):
        make_operator_keys(operator)
    assert (operator / "operator.key").stat().st_mode & 0o077 == 0
    signed = run_fedtune("sign-job", "--key", str(operator / "operator.key"), "--roster", str(roster),
                         "--run-config", "job-id='mine'")
    assert signed.returncode == 3 and "sign the plain overrides" in signed.stderr
    for flag in ("--iso", "--isolation", "--superexec-auth"):  # Flower takes abbreviations: none may override
        started = run_fedtune("run-superlink", "--operator-key", str(operator / "operator.pub"), "--state-dir",
                              str(tmp_path / "state"), flag, "subprocess")
        assert started.returncode == 3 and f"leave out {flag}" in started.stderr, started.stderr
    unknown = run_fedtune("sign-job", "--key", str(operator / "operator.key"), "--roster", str(roster),
                          "--run-config", "num-round=2")
    assert unknown.returncode == 3 and "num-round" in unknown.stderr and "pyproject.toml" in unknown.stderr
