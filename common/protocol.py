"""The wire contract between the coordinator and a client, in one place.

Each round the coordinator sends the global adapter with `FitInstructions` (a Flower fit
config) and, when clients evaluate, `EvaluateInstructions`. A client answers a fit with its
adapter update, masked under SecAgg+, and a `FitReport`: the only fields that travel in clear
beside the update. An evaluation is answered with its validation loss and an `EvaluateReport`.
No other module writes a wire key: they build and read these objects.

What a hostile coordinator can do with each field is the reason it is here or not: a client
never sends data values, only counts, its privacy parameters and hashes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Mapping

from fedtune.common.errors import FedtuneError


class Status(StrEnum):
    """What a client did with a round it was asked to train (also what its ledger records)."""

    TRAINED = "trained"
    REFUSED_BUDGET = "refused-budget"  # training would take it past its own budget
    ALREADY_SPENT = "refused-already-spent"  # asked again for a round it paid for, cannot re-send
    REFUSED_POLICY = "refused-policy"  # the request asks for less than the node's policy allows
    EVALUATED = "evaluated"  # answered an evaluation request (ledger only: it is not a fit status)
    REFUSED_REPLAY = "refused-replay"  # re-sending a paid round to other peers would let sums be differenced
    REFUSED_SECURE_AGGREGATION = "refused-secure-aggregation"  # a SecAgg+ stage broke the node's rules


REFUSALS = (Status.REFUSED_BUDGET, Status.REFUSED_POLICY, Status.REFUSED_REPLAY)
MAX_RUN_ID_CHARS = 128  # fedtune's ids are 32 hex digits, Flower's at most 20 digits


class SecAggWire:
    """The keys fedtune adds to Flower's SecAgg+ messages (common/secure_aggregation/statements.py
    says what is signed). The stage names are Flower's, plus the consistency check."""

    INSTITUTION = "fedtune-institution"  # setup reply: the roster id this node signs as
    KEY_SIGNATURE = "fedtune-key-signature"  # setup reply: the signed key statement
    CONSISTENCY_STAGE = "fedtune-consistency"  # between collect-masked-vectors and unmask
    SURVIVORS = "fedtune-survivors"  # consistency request: the nodes whose masked vectors were summed
    SURVIVOR_SIGNATURE = "fedtune-survivor-signature"  # consistency reply
    SIGNERS = "fedtune-signers"  # unmask request: who signed the survivor list,
    CONTRIBUTED = "fedtune-contributed"  # whether each signer said it contributed an update,
    SIGNATURES = "fedtune-signatures"  # and their signatures
    RUN_ID = "fedtune-run-id"  # setup request: the coordinator's run id, for the node's ledger records
    REFUSAL = "fedtune-refusal"  # a stage's reply: the node refuses it (`SecAggRefusal`), instead of its keys


# -- coordinator -> client ---------------------------------------------------------------------

@dataclass(frozen=True)
class FitInstructions:
    """Sent with the global adapter each round."""

    server_round: int
    run_id: str = ""  # fedtune's run id: survives a resume (Flower's does not); "" = use Flower's
    label_names: tuple[str, ...] | None = None  # the federation's label order (None: derive it)
    lora_a_sha256: str = ""  # FFA-LoRA: fingerprint of the frozen A every party must hold

    def to_config(self) -> dict[str, Any]:
        return {"server-round": self.server_round, "fedtune-run-id": self.run_id,
                "label-names": json.dumps(list(self.label_names or ())), "lora-a-sha256": self.lora_a_sha256}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FitInstructions:
        return cls(server_round=_round(config), run_id=_run_id(config),
                   label_names=_label_names(config), lora_a_sha256=str(config.get("lora-a-sha256", "")))


@dataclass(frozen=True)
class EvaluateInstructions:
    """Sent with the adapter a client is asked to score on its validation split."""

    server_round: int
    label_names: tuple[str, ...] | None = None
    run_id: str = ""  # fedtune's run id, as in FitInstructions: the node's ledger keys the answer by it

    def to_config(self) -> dict[str, Any]:
        return {"server-round": self.server_round, "fedtune-run-id": self.run_id,
                "label-names": json.dumps(list(self.label_names or ()))}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EvaluateInstructions:
        return cls(server_round=_round(config), label_names=_label_names(config),
                   run_id=_run_id(config))


def _run_id(config: Mapping[str, Any]) -> str:
    """fedtune's run id as the coordinator sent it ("" = none: the node uses Flower's). Bounded: the
    node writes it into every ledger record of the run, so a huge one would fill its disk."""
    value = str(config.get("fedtune-run-id") or "")
    if len(value) > MAX_RUN_ID_CHARS:
        raise FedtuneError(f"the coordinator sent a fedtune-run-id longer than {MAX_RUN_ID_CHARS} characters")
    return value


def _round(config: Mapping[str, Any]) -> int:
    value = config.get("server-round", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FedtuneError("the coordinator sent a server-round that is not a whole number")
    return value


def _label_names(config: Mapping[str, Any]) -> tuple[str, ...] | None:
    if "label-names" not in config:
        return None
    try:
        names = json.loads(str(config["label-names"]))
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FedtuneError("the coordinator sent label-names that are not a JSON list of strings")
    return tuple(names)


# -- client -> coordinator ---------------------------------------------------------------------

MAX_REASON_CHARS = 500  # a refusal's reason is a sentence; a client cannot fill the coordinator's records

@dataclass(frozen=True)
class FitReport:
    """Everything a fit reply carries in clear beside the (masked) update; nothing else leaves."""

    client_id: str
    server_round: int
    status: Status | str
    steps: int = 0
    train_loss: float | None = None  # only when the node's policy shares it (it is not private)
    update_max_abs: float = 0.0  # lets the coordinator warn when SecAgg+'s range clipped a value
    epsilon: float | None = None  # cumulative, as signed in the client's ledger
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    target_epsilon: float | None = None
    lora_a_sha256: str | None = None  # public: derived from the run seed
    ledger_head: str | None = None  # hash of the client's last ledger record (the auditor's anchor)
    resent: bool = False  # a re-sent update of a round already paid for
    reason: str | None = None  # why a node refused: policy key names and limits, never data

    def to_metrics(self) -> dict[str, Any]:
        """Flower metrics: absent values are left out (Flower has no null), `resent` only when true."""
        metrics = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is None or (spec.name == "resent" and not value):
                continue
            metrics[spec.name] = str(value) if spec.name == "status" else value
        return metrics

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> FitReport:
        """Read a reply (or a cached one); unknown keys are ignored, a missing id reads '?'."""
        known = {spec.name for spec in fields(cls)}
        values = {k: v for k, v in metrics.items() if k in known}
        status = str(values.get("status", ""))
        values["status"] = Status(status) if status in Status._value2member_map_ else status
        values.setdefault("client_id", "?")
        values["client_id"] = str(values["client_id"])
        values.setdefault("server_round", 0)
        if values.get("reason") is not None:  # a client's free text: bounded before any record holds it
            values["reason"] = str(values["reason"])[:MAX_REASON_CHARS]
        return cls(**values)


CLEAR_FIT_FIELDS = tuple(spec.name for spec in fields(FitReport))

REFUSAL_VERSION = 1
SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", SecAggWire.CONSISTENCY_STAGE, "unmask")
_INSTITUTION = re.compile(r"[A-Za-z0-9._@+-]{1,128}")  # a roster id: nothing a log line could be forged with


@dataclass(frozen=True)
class SecAggRefusal:
    """A node's refusal of a SecAgg+ stage: its reply carries this record in place of the stage's
    answer (the coordinator turns it into a failed reply for Flower's workflow). Fields, not an
    error text to parse: the coordinator records `describe()` in metrics.jsonl and its ledger. The
    reason names parameters and node ids, never a key or a data value; it is one bounded line."""

    institution: str
    stage: str  # one of SECAGG_STAGES, or "unknown" when the request named none of them
    reason: str

    @classmethod
    def of(cls, *, institution: str, stage: object, reason: str) -> SecAggRefusal:
        """The refusal a node sends: the stage as the protocol names it, the reason made one bounded line."""
        line = "".join(c if c.isprintable() else " " for c in reason)[:MAX_REASON_CHARS]
        return cls(institution=institution, stage=str(stage) if stage in SECAGG_STAGES else "unknown", reason=line)

    def describe(self) -> str:
        """What the node's ledger and the coordinator's records hold: `stage <name>: <reason>`."""
        return f"stage {self.stage}: {self.reason}"[:MAX_REASON_CHARS]

    def to_record(self) -> dict[str, Any]:
        return {"version": REFUSAL_VERSION, "institution": self.institution, "stage": self.stage,
                "reason": self.reason}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SecAggRefusal:
        """Read a refusal; anything an honest node would not send (another version, a missing or
        oversized field, a control character) is a FedtuneError, and nothing of it is kept."""
        version = record.get("version")
        if set(record) != {"version", "institution", "stage", "reason"} or type(version) is not int \
                or version != REFUSAL_VERSION:
            raise FedtuneError(f"a SecAgg+ refusal must be version {REFUSAL_VERSION} with institution, stage "
                               "and reason")
        institution, stage, reason = record["institution"], record["stage"], record["reason"]
        if not isinstance(institution, str) or not _INSTITUTION.fullmatch(institution):
            raise FedtuneError("a SecAgg+ refusal names no valid institution id")
        if stage not in (*SECAGG_STAGES, "unknown"):
            raise FedtuneError("a SecAgg+ refusal names no SecAgg+ stage")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS or not reason.isprintable():
            raise FedtuneError(f"a SecAgg+ refusal's reason must be one line of at most {MAX_REASON_CHARS} "
                               "printable characters")
        return cls(institution=institution, stage=stage, reason=reason)


@dataclass(frozen=True)
class EvaluateReport:
    """An evaluation reply's metrics: who answered and its validation scores (loss travels apart).
    A node whose policy allows no (more) evaluations answers with weight 0 and the reason."""

    client_id: str
    scores: dict[str, float] = field(default_factory=dict)
    reason: str | None = None  # set when the node refused

    def to_metrics(self) -> dict[str, Any]:
        if self.reason is not None:
            return {"client_id": self.client_id, "status": str(Status.REFUSED_POLICY), "reason": self.reason}
        return {"client_id": self.client_id, **self.scores}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], *, score_names: tuple[str, ...]) -> EvaluateReport:
        reason = metrics.get("reason")
        return cls(client_id=str(metrics.get("client_id", "?")),
                   scores={name: metrics[name] for name in score_names if name in metrics},
                   reason=None if reason is None else str(reason)[:MAX_REASON_CHARS])


class JobWire:
    """The run config keys of a signed job (`fedtune sign-job`; common/trust/job_signature.py).
    They are in pyproject.toml's defaults, empty, so Flower accepts them as overrides; a job's
    training settings never read them."""

    ID = "job-id"  # random, chosen by the signer: a node binds it to the first run that carries it
    EXPIRES = "job-expires"  # ISO date after which no node starts the job
    SIGNATURE = "job-signature"  # base64 Ed25519 over every other key and the app's hash
    ROSTER = "job-roster"  # the federation's roster fingerprint: a party runs only jobs for its own

    KEYS = (ID, EXPIRES, SIGNATURE, ROSTER)
