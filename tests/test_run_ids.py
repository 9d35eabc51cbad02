"""Issue 34: the run id an institution needs, and what a deployment's audit rests on.

A node's log names fedtune's run id (the one its ledger keys records by, and `fedtune receipt`
takes) beside Flower's, once per run per process; `fedtune receipt` finds the run itself in a ledger
of one run, and otherwise lists the ledger's run ids (ids only, newest last) and says how to pass
one. A deployment's audit (institutions' keys pinned, their receipts given, only the coordinator's
own key in the run directory) says what its clean verdict rests on, never "a simulation".
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict, fitins_to_recorddict

from fedtune.client.app import app as deployed_client_app
from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.chain import Ledger, read_records
from fedtune.common.ledger.receipts import write_receipt
from fedtune.common.protocol import EvaluateInstructions, FitInstructions, SecAggWire
from fedtune.main import run_cli
from tests.conftest import FINISHED_CLIENTS as CLIENTS
from tests.conftest import make_texts, write_csv

FLOWER_RUN = 11
PLANTED = "900-12-"  # in every record of the node's file: no log line may carry it


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def run_log():
    """The lines the node's run logger emits in this test (whatever handlers others configured)."""
    handler, logger = _Lines(), logging.getLogger("fedtune.node.run")
    level = logger.level
    logger.setLevel(logging.INFO)  # not `logger.level = ...`: setLevel also clears the logger's cached answers
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def node(tmp_path, tiny_model_dir):
    """An institution's node config (its own file, ledger and model)."""
    rows = [(f"{text} ssn {PLANTED}{i:04d}", label) for i, (text, label) in enumerate(make_texts(4, seed=3))]
    data = write_csv(tmp_path / "site.csv", rows, header=("note", "topic"))
    return {"client-id": "hospital-a", "data": str(data), "text-column": "note", "label-column": "topic",
            "ledger-dir": str(tmp_path / "ledger"), "model": str(tiny_model_dir)}


def _send(node: dict, job, content: RecordDict, *, flower_run: int = FLOWER_RUN,
          message_type: str = MessageType.TRAIN):
    """One train message through the deployed ClientApp and its mods, as the SuperNode hands it over."""
    context = Context(run_id=flower_run, node_id=7, node_config=node, state=RecordDict(),
                      run_config=job.to_flower())
    metadata = Metadata(run_id=flower_run, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600, message_type=message_type)
    return deployed_client_app(make_message(metadata, content), context)


def _fit(node: dict, job, *, run_id: str, server_round: int = 1, flower_run: int = FLOWER_RUN):
    config = FitInstructions(server_round=server_round, run_id=run_id,
                             label_names=("markets", "politics", "sport")).to_config()
    return _send(node, job, fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(3)]), config),
                                                 keep_input=True), flower_run=flower_run)


def _run_ids(node: dict) -> list[str]:
    return [r["run_id"] for r in read_records(Path(node["ledger-dir"]) / "ledger.jsonl")]


def test_the_node_log_names_fedtunes_run_id_once_per_run_as_its_ledger_keys_it(node, tiny_config, run_log):
    """Refused train requests (dp=false against the node's policy): one line per run, not per round,
    with the very id the ledger recorded; an empty id stands in for Flower's, as the client reads it."""
    job = tiny_config(dp=False, secure_aggregation=False)
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    for run_id, server_round in ((first, 1), (first, 2), (second, 1)):
        assert not _fit(node, job, run_id=run_id, server_round=server_round).has_error()
    assert run_log == [f"fedtune run {first} (Flower run {FLOWER_RUN})", f"fedtune run {second} (Flower run "
                                                                        f"{FLOWER_RUN})"]
    assert _run_ids(node) == [first, first, second]
    run_log.clear()
    flower = uuid.uuid4().int >> 65  # a uint64, like Flower's, that no other test named
    _fit(node, job, run_id="", flower_run=flower)  # no fedtune id sent: the node keys the run by Flower's
    assert _run_ids(node)[-1] == str(flower) and run_log == [f"fedtune run {flower} (Flower run {flower})"]
    assert not any(PLANTED in line for line in run_log)


def test_an_evaluation_request_is_recorded_under_fedtunes_run_id_like_a_train_request(node, tiny_config, run_log):
    """Answered or refused (this node answers none: max-evaluations 0), an evaluation is keyed by the
    run id fedtune sent, so a run's records share one id and `fedtune receipt` covers them all."""
    run_id = uuid.uuid4().hex
    config = EvaluateInstructions(server_round=1, label_names=("markets", "politics", "sport"),
                                  run_id=run_id).to_config()
    content = evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters([np.zeros(3)]), config), keep_input=True)
    assert not _send(node, tiny_config(), content, message_type=MessageType.EVALUATE).has_error()
    [record] = read_records(Path(node["ledger-dir"]) / "ledger.jsonl")
    assert (record["run_id"], record["status"], record["request"]) == (run_id, "refused-policy", "evaluate")
    assert run_log == [f"fedtune run {run_id} (Flower run {FLOWER_RUN})"]


def test_a_secure_aggregation_refusal_names_the_run_too_and_a_hostile_id_prints_inert(node, tiny_config,
                                                                                       run_log):
    """A node without a roster refuses at the SecAgg+ setup, before any fit: the line still comes, and
    a coordinator's id with control characters is printed as a repr, not written to the terminal."""
    hostile = "x\x1b[31m\nINFO forged line " + uuid.uuid4().hex
    setup = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
        Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 500.0,
        SecAggWire.RUN_ID: hostile})})
    reply = _send(node, tiny_config(), setup)
    assert set(reply.content.config_records) == {SecAggWire.REFUSAL}
    assert _run_ids(node) == [hostile]
    [line] = run_log
    assert line == f"fedtune run {hostile!r} (Flower run {FLOWER_RUN})"
    assert "\n" not in line and "\x1b" not in line


def test_run_node_prints_the_line_in_the_nodes_log(capsys):
    """`fedtune run-node` configures the node runtime's logger: the run's line is under it."""
    from fedtune.client.app import name_run
    from fedtune.node_runtime import configure_logging

    loggers = [logging.getLogger(name) for name in ("fedtune.node", "fedtune.models", "flwr")]
    kept = [(logger.level, logger.propagate, list(logger.handlers)) for logger in loggers]
    try:  # configure_logging changes these loggers for the process: put them back after
        loggers[0].handlers.clear()
        configure_logging()
        run_id = uuid.uuid4().hex
        name_run(run_id, flower_run_id="42")
        assert f"INFO     fedtune.node.run: fedtune run {run_id} (Flower run 42)" in capsys.readouterr().err
    finally:
        for logger, (level, propagate, handlers) in zip(loggers, kept):
            logger.setLevel(level)
            logger.propagate = propagate
            logger.handlers[:] = handlers


# -- fedtune receipt ------------------------------------------------------------------------------

def _cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())


def _run_json(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["run_id"]


def test_receipt_takes_the_ledgers_only_run_when_none_is_given(finished_dp_run_copy, tmp_path, capsys):
    run = finished_dp_run_copy
    code, out, err = _cli(capsys, "receipt", run / "ledgers" / "client-0", "--out", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["receipt"]["run_id"] == _run_json(run)
    assert f"client-0, run {_run_json(run)}, 3 records, last round 3" in out


def test_receipt_lists_the_ledgers_run_ids_when_it_cannot_tell_which(finished_dp_run_copy, tmp_path, capsys):
    """Several runs and no --run-id, or Flower's run id given: the error lists the ledger's runs,
    newest last, ids only (no epsilon, count or reason from any record), and how to pass one."""
    run, folder = finished_dp_run_copy, finished_dp_run_copy / "ledgers" / "client-1"
    old = _run_json(run)
    record = read_records(folder / "ledger.jsonl")[-1]
    newer = uuid.uuid4().hex
    Ledger(folder).append({**{k: v for k, v in record.items() if k not in ("seq", "prev_hash", "signature")},
                           "run_id": newer, "round": 1, "status": "refused-policy", "reason": f"r {PLANTED}"})
    for given in ((), ("--run-id", str(FLOWER_RUN))):
        code, out, err = _cli(capsys, "receipt", folder, *given, "--out", tmp_path / "r.json")
        assert code == 3 and not (tmp_path / "r.json").exists(), (out, err)
        listed = err.split("its runs, newest last: ", 1)[1]
        assert listed.startswith(f"{old}, {newer}; pass one as --run-id RUN_ID (fedtune's run id"), err
        assert PLANTED not in err and str(record["epsilon"])[:6] not in err
    assert f"has no record of run {FLOWER_RUN} (a number: Flower's run id, not fedtune's)" in err
    code, _, err = _cli(capsys, "receipt", folder, "--out", tmp_path / "r.json")
    assert f"{folder} holds 2 runs; its runs, newest last" in err
    code, out, err = _cli(capsys, "receipt", folder, "--run-id", newer, "--out", tmp_path / "r.json")
    held = len(read_records(folder / "ledger.jsonl"))
    assert code == 0 and f"run {newer}, {held} records, last round 1" in out, (out, err)


# -- what the verdict rests on --------------------------------------------------------------------

def _audit(capsys, run: Path, *extra) -> dict:
    code, out, err = _cli(capsys, "audit", run, "--json", *extra)
    payload = json.loads(out)
    assert code == payload["exit_code"], err
    return payload


def test_a_deployments_clean_verdict_rests_on_pinned_keys_and_receipts_not_a_simulation(
        finished_dp_run, finished_dp_run_copy, tmp_path, capsys):
    """The deployment's shape: the institutions keep their private keys and hand over their public
    keys and receipts; only the coordinator's own key lies in the run directory (ledgers/server)."""
    simulated = " ".join(_audit(capsys, finished_dp_run.path)["trust"])
    assert "a simulation: one operator held every key" in simulated and "the verdict rests on" not in simulated
    run = finished_dp_run_copy
    pins, receipts = [], []
    for client in CLIENTS:
        home = tmp_path / "sites" / client
        home.mkdir(parents=True)
        receipts.append(home / "receipt.json")
        write_receipt(ledger_dir=run / "ledgers" / client, run_id=_run_json(run), out=receipts[-1])
        shutil.move(run / "ledgers" / client / "ledger.key", home / "ledger.key")
        pins.append(f"--public-key={client}={shutil.copy(run / 'ledgers' / client / 'ledger.pub', home)}")
    assert (run / "ledgers" / "server" / "ledger.key").is_file()  # the coordinator's own, as deployed
    payload = _audit(capsys, run, *pins, *(f"--receipt={r}" for r in receipts), "--report",
                     "--out", tmp_path / "report")
    trust = " ".join(payload["trust"])
    assert payload["verdict_text"] == "clean", payload["trust"]
    assert "simulation" not in trust and "one operator held every key" not in trust
    assert "every one is covered by the institution's own receipt: the verdict rests on the institutions' " \
           "keys and receipts" in trust
    report = " ".join((tmp_path / "report" / "report.md").read_text().split())
    assert "one operator held every key" not in report and "the verdict rests on the institutions' keys" in report
    partial = " ".join(_audit(capsys, run, *pins, f"--receipt={receipts[0]}")["trust"])
    assert "no receipt from client-1, client-2: the verdict rests on the institutions' keys" in partial
    assert "simulation" not in partial


def test_the_audit_matches_the_servers_round_with_the_training_record_not_the_evaluation_after_it():
    """Evaluation records share the run id (and round) of the training they follow: the server's
    record of a round is checked against the client's training record, and a round whose only
    client record is an evaluation is still a finding."""
    from types import SimpleNamespace

    from fedtune.common.ledger.audit import _cross_check
    from fedtune.common.ledger.chain import record_hash

    trained = {"client_id": "c", "run_id": "r", "round": 1, "epsilon": 1.5, "status": "trained", "steps": 4}
    evaluated = {"client_id": "c", "run_id": "r", "round": 1, "epsilon": None, "status": "evaluated",
                 "request": "evaluate"}
    server = [{"run_id": "r", "round": 1, "epsilon": {"c": 1.5}, "client_ledger_heads": {"c": record_hash(trained)}}]
    found = SimpleNamespace(problems=[], notes=[])
    _cross_check(server, {"c": [trained, evaluated]}, found)
    assert found.problems == [] and found.notes == []
    _cross_check(server, {"c": [evaluated]}, found)
    assert found.problems == ["server record 1 (round 1): lists c, but c's ledger has no record for that round"]


def test_a_run_id_too_long_to_be_one_is_refused_before_anything_is_recorded(node, tiny_config, run_log):
    """The node writes the run id into each ledger record: a coordinator that sends a huge one (to fill
    the node's disk, record by record) gets an error (Flower's reply carries its text), for a train
    and an evaluation request alike; nothing is recorded and the node's log does not repeat it."""
    huge = "r" * 100_000
    labels = ("markets", "politics", "sport")
    fit = fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(3)]), FitInstructions(
        server_round=1, run_id=huge, label_names=labels).to_config()), keep_input=True)
    evaluate = evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters([np.zeros(3)]), EvaluateInstructions(
        server_round=1, label_names=labels, run_id=huge).to_config()), keep_input=True)
    for content, kind in ((fit, MessageType.TRAIN), (evaluate, MessageType.EVALUATE)):
        with pytest.raises(FedtuneError, match="sent a fedtune-run-id longer than 128 characters") as raised:
            _send(node, tiny_config(), content, message_type=kind)
        assert huge not in str(raised.value) and PLANTED not in str(raised.value)
    assert not (Path(node["ledger-dir"]) / "ledger.jsonl").exists()
    assert not any(huge[:200] in line for line in run_log)
