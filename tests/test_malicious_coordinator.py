"""A hostile coordinator against a real institution's node: one test per attack.

Each test sends the coordinator's malicious request to the deployed ClientApp (`client.app.app`,
the one `flwr-clientapp` loads) through Flower's message path, with an institution's node config
(its own data file, ledger and model), and asserts the refusal, what the node's ledger records,
that nothing of the node's data is in any reply, and what `fedtune audit` says. The node's
data file carries planted identifiers (PLANTED) that no reply may contain.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import (evaluateins_to_recorddict, fitins_to_recorddict,
                                                  recorddict_to_evaluateres, recorddict_to_fitres)

from fedtune.client.app import app as deployed_client_app
from fedtune.client.app import job_of, policy_of
from fedtune.client.fl_client import FedtuneClient
from fedtune.client.node_data import NodeData
from fedtune.client.policy_guard import note_transport, transport_of
from fedtune.common.ledger.audit import audit_run
from fedtune.common.ledger.chain import Ledger, read_records
from fedtune.common.models.adapter import adapter_to_arrays
from fedtune.common.models.classifier import build_lora_classifier
from fedtune.common.models.lora import LoraSettings
from fedtune.common.protocol import EvaluateInstructions, FitInstructions, SecAggRefusal, SecAggWire
from tests.conftest import make_texts, write_csv
from tests.helpers import fedtune

LABELS = ("markets", "politics", "sport")
PLANTED = "900-12-"  # the start of every planted social-security number in the node's file


@pytest.fixture
def site(tmp_path, tiny_model_dir):
    """An institution's node config: its own file (with planted SSNs), ledger and model copy."""
    rows = [(f"{text} ssn {PLANTED}{i:04d}", label) for i, (text, label) in enumerate(make_texts(12, seed=3))]
    data = write_csv(tmp_path / "site.csv", rows, header=("note", "topic"))

    def node_config(**policy) -> dict:
        return {"client-id": "hospital-a", "data": str(data), "text-column": "note", "label-column": "topic",
                "ledger-dir": str(tmp_path / "ledger"), "model": str(tiny_model_dir), **policy}

    return node_config


@pytest.fixture
def job(tiny_config):
    """The coordinator's run config; it names paths the node must never open."""

    def make(**changes):
        return tiny_config(**{"model": "/srv/coordinator/model", "data": "/srv/coordinator/test.csv",
                              "num_clients": 3, "clients_per_round": 3, "num_rounds": 2, **changes})

    return make


_ADAPTERS: dict[Path, list[np.ndarray]] = {}


def _adapter(model_dir: Path) -> list[np.ndarray]:
    """The round-1 global adapter (built once per model folder; each call gets its own copy)."""
    if model_dir not in _ADAPTERS:
        model = build_lora_classifier(model_path=model_dir, num_labels=len(LABELS),
                                      lora=LoraSettings(rank=4, variant="lora"), seed=0)
        _ADAPTERS[model_dir] = adapter_to_arrays(model)
    return [array.copy() for array in _ADAPTERS[model_dir]]


def _context(node_config: dict, job_config, state: RecordDict | None = None) -> Context:
    return Context(run_id=11, node_id=7, node_config=node_config, state=state or RecordDict(),
                   run_config=job_config.to_flower())


def _message(content: RecordDict, message_type: str) -> Message:
    """A message as the SuperNode hands it to the ClientApp (Flower's own constructor needs a runtime)."""
    return make_message(Metadata(run_id=11, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                                 group_id="1", created_at=time.time(), ttl=3600, message_type=message_type),
                        content)


def _fit(context: Context, parameters, *, server_round=1, run_id="run-1", extra: RecordDict | None = None,
         instructions: dict | None = None):
    """One train message through the deployed ClientApp and its mods; the reply as Flower's FitRes."""
    config = instructions if instructions is not None else FitInstructions(
        server_round=server_round, run_id=run_id, label_names=LABELS).to_config()
    content = fitins_to_recorddict(FitIns(ndarrays_to_parameters(parameters), config), keep_input=True)
    for name, record in (extra or {}).items():
        content[name] = record
    reply = deployed_client_app(_message(content, MessageType.TRAIN), context)
    return recorddict_to_fitres(reply.content, keep_input=False)


def _evaluate(context: Context, parameters, *, server_round=1):
    config = EvaluateInstructions(server_round=server_round, label_names=LABELS).to_config()
    content = evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(parameters), config), keep_input=True)
    reply = deployed_client_app(_message(content, MessageType.EVALUATE), context)
    return recorddict_to_evaluateres(reply.content)


def _ledger(node_config: dict) -> list[dict]:
    return read_records(Path(node_config["ledger-dir"]) / "ledger.jsonl")


def _audit(node_config: dict, *, command_line: bool = False) -> dict:
    """The audit of the node's ledger: audit_run, or with `command_line` the CLI's `fedtune audit --json`
    (its entry point, in this process), whose exit code must be the payload's."""
    if not command_line:
        return audit_run(target=Path(node_config["ledger-dir"])).to_json()
    result = fedtune("audit", node_config["ledger-dir"], "--json")
    payload = json.loads(result.stdout)
    assert result.returncode == payload["exit_code"]
    return payload


def _assert_refused(reply, *, because: str) -> None:
    assert reply.metrics["status"] == "refused-policy" and because in reply.metrics["reason"]
    assert reply.num_examples == 0 and all(not a.any() for a in parameters_to_ndarrays(reply.parameters))
    assert PLANTED not in json.dumps(dict(reply.metrics)) and "train_loss" not in reply.metrics


def _signed_round(node_config: dict, **fields) -> None:
    """A record as a node's key signs it: how an older client (or a forged one) left its ledger."""
    base = {"kind": "client", "client_id": "hospital-a", "run_id": "old", "round": 1, "status": "trained",
            "dp": True, "steps": 3, "local_examples": 30, "num_examples": 30, "sample_rate": 0.5,
            "noise_multiplier": 1.0, "steps_per_round": 3, "planned_rounds": 1, "accountant": "prv",
            "delta": 1e-5, "target_epsilon": 8.0, "epsilon": 2.0, "budget_remaining": 6.0, "time": 0.0}
    Ledger(Path(node_config["ledger-dir"])).append({**base, **fields})


# -- 1. dp=false secure-aggregation=false ------------------------------------------------------

def test_a_job_switching_off_dp_and_secure_aggregation_is_refused_and_signed(site, job, tiny_model_dir):
    node = site()
    reply = _fit(_context(node, job(dp=False, secure_aggregation=False)), _adapter(tiny_model_dir))
    _assert_refused(reply, because="dp=false asked, this node requires dp=true")
    assert "secure-aggregation=false asked" in reply.metrics["reason"]
    [record] = _ledger(node)
    assert record["status"] == "refused-policy" and record["steps"] == 0 and record["num_examples"] == 0
    assert record["policy"]["dp"] is True and record["policy"]["secure-aggregation"] is True
    audit = _audit(node, command_line=True)
    assert audit["verdict"] == "consistent" and audit["rows"][0]["status"] == "refused-policy"


def test_a_plain_request_is_refused_even_when_the_job_claims_secure_aggregation(site, job, tiny_model_dir):
    node = site()
    reply = _fit(_context(node, job(secure_aggregation=True)), _adapter(tiny_model_dir))  # no SecAgg+ record
    _assert_refused(reply, because="a plain (unmasked) train request arrived")
    assert [r["status"] for r in _ledger(node)] == ["refused-policy"]
    assert _audit(node)["verdict"] == "consistent"  # nothing was spent


def test_a_round_without_dp_is_never_free_in_the_ledger_or_the_audit(site, job, tiny_model_dir):
    """What the old client let a coordinator do: a round trained without DP, then DP rounds
    claiming a finite epsilon. The audit now flags it, and the node's guard counts it."""
    node = site(**{"secure-aggregation": False})
    _signed_round(node, dp=False, round=1, steps=3)  # trained without DP, no policy recorded
    _signed_round(node, round=2, epsilon=2.0)  # then claims a finite epsilon
    audit = _audit(node)
    assert audit["exit_code"] == 1 and any("claims epsilon 2.0" in p for p in audit["problems"])
    assert any("trained without DP (epsilon infinite)" in b for b in audit["policy_breaches"])
    reply = _fit(_context(node, job(secure_aggregation=False, target_epsilon=8.0)), _adapter(tiny_model_dir),
                 run_id="run-2")
    assert reply.metrics["status"] == "refused-budget" and reply.num_examples == 0  # epsilon is already infinite
    assert "epsilon" not in reply.metrics  # infinite: not a number a reply can carry


# -- 2. target-delta=0.5 -------------------------------------------------------------------------

def test_a_job_raising_delta_is_refused_and_delta_at_1_over_n_needs_the_node(site, job, tiny_model_dir):
    node = site()
    reply = _fit(_context(node, job(target_delta=0.5)), _adapter(tiny_model_dir))
    _assert_refused(reply, because="target-delta=0.5 asked, this node allows at most 1e-05")
    # Even the researcher's own simulation policy refuses a delta of 1/N or more.
    client = FedtuneClient(config=job(target_delta=0.5, model=str(tiny_model_dir)), ledger_dir=Path(node["ledger-dir"]),
                           run_id="sim", node=NodeData.from_node_config(node))
    _, weight, metrics = client.fit(_adapter(tiny_model_dir), FitInstructions(1, "sim", LABELS).to_config())
    assert weight == 0 and metrics["status"] == "refused-policy" and "not below 1/N" in metrics["reason"]
    assert [r["status"] for r in _ledger(node)] == ["refused-policy", "refused-policy"]
    _signed_round(node, delta=0.5)  # what the old client signed for that job
    audit = _audit(node, command_line=True)
    assert audit["verdict"] == "policy breached" and audit["exit_code"] == 2
    assert any("delta 0.5 is not below 1/N for its 30 training records" in b for b in audit["policy_breaches"])


# -- 3. a stale run id ---------------------------------------------------------------------------

def test_a_stale_run_id_cannot_revive_an_old_budget(site, job, tiny_model_dir):
    node = site(**{"target-epsilon": 8.0, "secure-aggregation": False})
    parameters = _adapter(tiny_model_dir)
    first = _fit(_context(node, job(target_epsilon=8.0, secure_aggregation=False)), parameters, run_id="old")
    assert first.metrics["status"] == "trained"
    spent = first.metrics["epsilon"]
    assert 4.5 < spent < 6.0  # round 1 of a 2-round plan for epsilon 8
    tightened = site(**{"target-epsilon": 6.0, "secure-aggregation": False})
    for run_id in ("old", "new"):  # the old run's plan, and a fresh plan: both checked against 6
        reply = _fit(_context(tightened, job(target_epsilon=6.0, secure_aggregation=False)), parameters,
                     server_round=2, run_id=run_id)
        assert reply.metrics["status"] == "refused-budget" and reply.num_examples == 0
        assert reply.metrics["target_epsilon"] == 6.0 and reply.metrics["epsilon"] == pytest.approx(spent)
    records = _ledger(tightened)
    assert [r["status"] for r in records] == ["trained", "refused-budget", "refused-budget"]
    assert [r["target_epsilon"] for r in records] == [8.0, 6.0, 6.0]
    assert _audit(tightened)["verdict"] == "consistent"
    # A noise floor the node raised since: the old run's plan (smaller sigma) is not reused.
    floor = site(**{"target-epsilon": 100.0, "noise-multiplier": 50.0, "secure-aggregation": False})
    reply = _fit(_context(floor, job(target_epsilon=100.0, noise_multiplier=60.0, secure_aggregation=False)),
                 parameters, server_round=3, run_id="old")
    _assert_refused(reply, because="below the 60 this node now requires; start a new run")


# -- 4. evaluation -------------------------------------------------------------------------------

def test_evaluation_is_off_by_default_and_counted_when_the_node_allows_it(site, job, tiny_model_dir):
    parameters = _adapter(tiny_model_dir)
    node = site()
    refused = _evaluate(_context(node, job(fraction_evaluate=1.0)), parameters)
    assert refused.num_examples == 0 and refused.metrics["status"] == "refused-policy"
    assert "at most 0 evaluation" in refused.metrics["reason"] and "accuracy" not in refused.metrics
    allowed = site(**{"max-evaluations": 2})
    # The coordinator's seed and validation-fraction do not pick the node's validation records.
    answers = [_evaluate(_context(allowed, job(seed=seed, validation_fraction=fraction)), parameters)
               for seed, fraction in ((0, 0.1), (5, 0.5))]
    assert answers[0].num_examples == answers[1].num_examples == 3 and answers[0].loss == answers[1].loss
    # Only the task's scores travel: how the node's predictions spread over its classes stays on the node.
    assert {"accuracy", "macro_f1"} <= set(answers[0].metrics), answers[0].metrics
    assert not {"largest_class_share", "predicted_classes"} & set(answers[0].metrics), answers[0].metrics
    third = _evaluate(_context(allowed, job()), parameters)
    assert third.num_examples == 0 and "has answered 2" in third.metrics["reason"]
    records = _ledger(allowed)
    assert [(r["status"], r.get("request")) for r in records] == [
        ("refused-policy", "evaluate"), ("evaluated", "evaluate"), ("evaluated", "evaluate"),
        ("refused-policy", "evaluate")]
    assert _audit(allowed)["verdict"] == "consistent"
    _signed_round(allowed, status="evaluated", request="evaluate", dp=False, policy={"max-evaluations": 2})
    assert any("evaluation 3 answered, its policy allows 2" in b for b in _audit(allowed)["policy_breaches"])


def test_the_train_loss_is_withheld_and_the_coordinators_model_path_never_opened(site, job, tiny_model_dir):
    node = site(**{"secure-aggregation": False})
    reply = _fit(_context(node, job(secure_aggregation=False)), _adapter(tiny_model_dir))  # job model: /srv/...
    assert reply.metrics["status"] == "trained" and reply.num_examples > 0
    assert "train_loss" not in reply.metrics and PLANTED not in json.dumps(dict(reply.metrics))
    assert _ledger(node)[0]["policy"]["share-train-loss"] is False


# -- 5. reading files ------------------------------------------------------------------------------

def test_a_node_opens_no_file_the_coordinator_names_and_quotes_no_value(site, job, tiny_model_dir, tmp_path):
    ssns = write_csv(tmp_path / "ssn.csv", [(f"person {i}", f"{PLANTED}{i:04d}") for i in range(10)],
                     header=("name", "ssn"))
    node = site(**{"secure-aggregation": False})
    spy = job(data=str(ssns), text_column="name", label_column="ssn", secure_aggregation=False)
    with pytest.raises(Exception) as refused:  # what Flower turns into the error reply
        _fit(_context(node, spy), _adapter(tiny_model_dir), instructions={"server-round": 1,
                                                                            "fedtune-run-id": "r"})
    assert "sent no label-names" in str(refused.value) and PLANTED not in str(refused.value)
    # A label list that misses the node's labels: the error says no more than that the data does
    # not fit (the detail goes to the node's own log), so it quotes and counts nothing.
    with pytest.raises(Exception) as mismatch:
        _fit(_context(node, spy), _adapter(tiny_model_dir), instructions=FitInstructions(
            1, "r", ("markets", "SECRET?")).to_config())
    assert "this node's data does not fit this job" in str(mismatch.value)
    assert not any(word in str(mismatch.value) for word in ("politics", "sport", "2 label", PLANTED))
    assert not Path(node["ledger-dir"], "ledger.jsonl").exists() or not _ledger(node)


def test_a_node_that_pins_its_label_set_cannot_be_probed_with_label_lists(site, job, tiny_model_dir):
    node = site(**{"label-set": json.dumps(LABELS), "secure-aggregation": False})
    probe = FitInstructions(1, "r", (*LABELS, "RARE-DISEASE-X")).to_config()
    reply = _fit(_context(node, job(secure_aggregation=False)), _adapter(tiny_model_dir), instructions=probe)
    _assert_refused(reply, because="label-names differ from the label set this node pinned")
    [record] = _ledger(node)
    assert record["status"] == "refused-policy" and record["local_examples"] == 0  # refused before reading
    # Pinned task and max-length: a job cannot switch columns or vary which records fit.
    pinned = site(**{"task": "classification", "max-length": 24, "secure-aggregation": False})
    for change, because in (({"max_length": 8}, "max-length=8 asked, this node takes only max-length=24"),
                            ({"task": "causal-lm"}, "task=causal-lm asked, this node takes only task=classification")):
        reply = _fit(_context(pinned, job(secure_aggregation=False, **change)), _adapter(tiny_model_dir))
        _assert_refused(reply, because=because)


# -- 6. keys: the coordinator's certificate folder holds no institution key (tests/test_node_keys.py,
# test_certs_writes_no_private_key_but_the_ca_and_superlink_ones, runs `fedtune certs` and checks it).

# -- 7. SecAgg+ weights -----------------------------------------------------------------------------

def test_a_secagg_max_weight_below_the_record_count_is_refused(site, job, tiny_model_dir):
    node = site()
    context = _context(node, job())
    note_transport(context, secure_aggregation=True, max_weight=5.0)  # as the SecAgg+ mod notes a round's
    transport = transport_of(context)
    assert transport.secure_aggregation and transport.max_weight == 5.0
    client = FedtuneClient(config=job_of(context, None), policy=policy_of(context, None), transport=transport,
                           node=NodeData.from_node_config(node), ledger_dir=Path(node["ledger-dir"]), run_id="11")
    _, weight, metrics = client.fit(_adapter(tiny_model_dir), FitInstructions(1, "run-1", LABELS).to_config())
    assert weight == 0 and metrics["status"] == "refused-policy"
    assert "max-weight 5 is below this node's training record count" in metrics["reason"]
    assert "33" not in metrics["reason"]  # N leaves only as the weight of an update actually sent
    [record] = _ledger(node)
    assert record["status"] == "refused-policy" and "max-weight" in record["reason"]
    audit = _audit(node)
    assert audit["verdict"] == "consistent" and [r["status"] for r in audit["rows"]] == ["refused-policy"]


def test_a_node_without_a_roster_refuses_secure_aggregation_in_one_line(site, job):
    """No roster pinned: the node cannot tell its peers from the coordinator, so it joins no round."""
    node = site()
    setup = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
        Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 500.0})})
    reply = deployed_client_app(_message(setup, MessageType.TRAIN), _context(node, job()))
    # the stage's reply is the refusal record alone (common/protocol.py SecAggRefusal): no keys, nothing else
    assert not reply.has_error() and set(reply.content.config_records) == {SecAggWire.REFUSAL}
    assert not reply.content.array_records and not reply.content.metric_records
    refusal = SecAggRefusal.from_record(reply.content.config_records[SecAggWire.REFUSAL])
    assert (refusal.institution, refusal.stage) == ("hospital-a", "setup")
    text = refusal.describe()
    assert text.startswith("stage setup: this node has no roster"), text
    assert "roster='PATH'" in text and "\n" not in text and PLANTED not in str(refusal.to_record())
    [record] = _ledger(node)
    assert record["status"] == "refused-secure-aggregation" and record["request"] == "secure-aggregation"
    assert record["round"] == 1 and record["reason"] == text  # what the node signed is what it sent
    assert _audit(node)["verdict"] == "consistent"
