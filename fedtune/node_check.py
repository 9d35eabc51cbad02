"""`fedtune check-node`: what an institution checks before starting its SuperNode.

Flower's own errors for a wrong address, a foreign or expired certificate or a bad node
config surface late (a retry loop, an SSL trace, a failed ClientApp in the middle of a round).
This runs the same steps up front and says, for each one, what to fix.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.common.config import parse_config_args

from fedtune.client.node_data import NodeData, check_node_keys
from fedtune.common.data.instructions import load_instruction_pairs
from fedtune.common.data.labelled import load_labelled_texts
from fedtune.common.errors import FedtuneError
from fedtune.common.execution import ExecutionProfile
from fedtune.common.ledger.chain import LEDGER_FILE, PUBLIC_KEY_FILE, Ledger
from fedtune.common.models.loading import check_model_folder
from fedtune.common.privacy.policy import NodePolicy
from fedtune.common.secure_aggregation.roster import NO_ROSTER, Roster, public_key_file


@dataclass
class NodeCheck:
    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def run(self, label: str, step) -> bool:
        try:
            note = step()
            self.passed.append(f"{label}: {note}" if note else label)
            return True
        except (FedtuneError, OSError, ValueError) as exc:
            self.problems.append(f"{label}: {exc}")
            return False


def check_node(*, superlink: str, root_certificates: Path, private_key: Path, node_config: str,
               timeout: float = 5.0) -> NodeCheck:
    check = NodeCheck()
    check.run("node config", lambda: _check_node_config(node_config))
    if _keys_readable(node_config):  # else the steps below read the same keys and would repeat its error
        check.run("privacy policy", lambda: _describe_policy(node_config))
        check.run("execution profile", lambda: _describe_profile(node_config))
        if check.run("roster", lambda: _check_roster(node_config)):
            check.run("pins", lambda: _check_pins(node_config))  # they name the roster's federation
    check.run("CA certificate", lambda: _check_ca(root_certificates))
    check.run("authentication key", lambda: _check_private_key(private_key))
    check.run("SuperLink", lambda: _check_superlink(superlink, root_certificates, timeout))
    return check


def _keys_readable(text: str) -> bool:
    """The node config parses and names only known keys (a misspelt key is reported once, by "node config")."""
    try:
        check_node_keys(parse_config_args([text]))
    except Exception:  # noqa: BLE001 - click's format error or FedtuneError: "node config" says which
        return False
    return True


def _check_node_config(text: str) -> str:
    try:
        node = parse_config_args([text])
    except Exception as exc:  # click.ClickException: Flower's message says what the format is
        raise FedtuneError(str(getattr(exc, "message", exc))) from None
    data = NodeData.from_node_config(node)
    if data.path is None:
        raise FedtuneError("a real node needs data='/path/to/records.csv'; 'partition-id' is for simulations")
    if "ledger-dir" not in node:
        raise FedtuneError("node config needs ledger-dir='/path' (where this institution's privacy ledger lives)")
    examples = _node_examples(node, data)
    ledger_dir = Path(str(node["ledger-dir"]))
    if (ledger_dir / LEDGER_FILE).exists():
        Ledger(ledger_dir)  # verifies the chain, the signatures and the head marker
    return f"{data.client_id}: {examples.cleaning_report()}; ledger {ledger_dir}"


def _describe_policy(text: str) -> str:
    """What this node will refuse, in one line, so the institution sees its own limits."""
    node = parse_config_args([text])
    policy, model = NodePolicy.from_node_config(node), NodeData.from_node_config(node).model
    if model != "default":
        check_model_folder(Path(model))
    required = {True: "required", False: "optional"}
    return (f"DP {required[policy.dp]}, SecAgg+ {required[policy.secure_aggregation]}, "
            f"epsilon <= {policy.target_epsilon:g}, delta <= {policy.target_delta:g}, "
            f"clip <= {policy.max_grad_norm:g}, {policy.accountant} accountant, {policy.max_evaluations} "
            f"evaluation(s), train loss {'shared' if policy.share_train_loss else 'withheld'}; model {model}")


def _describe_profile(text: str) -> str:
    """Where this node will train, resolved here: a GPU it asks for and lacks fails now, not mid-run."""
    profile = ExecutionProfile().overridden_by(parse_config_args([text]))
    batch = profile.physical_batch_size or "the task's default"
    profile.pretrained_kwargs()  # a quantized base needs bitsandbytes: say so here, not at round 1
    quantized = f", {profile.quantization} weights" if profile.quantized else ""
    checkpointing = ", layers recomputed in backward" if profile.activation_checkpointing else ""
    return (f"device {profile.torch_device()}, base {str(profile.torch_dtype()).removeprefix('torch.')}{quantized} "
            f"(trainables float32){checkpointing}, {profile.threads or 'all given'} thread(s), physical batch {batch}")


def _check_pins(text: str) -> str:
    """The app this node runs and the operator whose signed jobs it accepts (fedtune/node_runtime.py)."""
    from fedtune.common.ledger.chain import public_key_fingerprint
    from fedtune.job_commands import node_gate

    gate = node_gate(parse_config_args([text]))
    return (f"runs only the installed app {gate.app.sha256[:16]}... (fedtune app-hash), for jobs signed by "
            f"operator key {public_key_fingerprint(gate.operator)} for the federation {gate.federation}")


def _check_roster(text: str) -> str:
    """The roster this node pinned lists it with its own identity (ledger) key and has not expired."""
    node = parse_config_args([text])
    policy = NodePolicy.from_node_config(node)
    if "roster" not in node:  # SecAgg+ checks peers against it, and a signed job names it
        raise FedtuneError(NO_ROSTER)
    roster = Roster.load(str(node["roster"]))
    institution = NodeData.from_node_config(node).client_id
    own = Path(str(node.get("ledger-dir", ""))) / PUBLIC_KEY_FILE
    if not own.is_file():
        raise FedtuneError(f"{own} does not exist: make this node's identity (ledger) key with `fedtune node-keys "
                           f"--ledger-dir DIR` and have its ledger.pub put in the roster")
    problem = roster.problem_for(institution=institution, own_key=public_key_file(own))
    if problem:
        raise FedtuneError(problem)
    return (f"{institution} among {len(roster.members)} institutions, expires {roster.expires.isoformat()}, "
            f"fingerprint {roster.fingerprint}; SecAgg+ rounds of at least {policy.secagg_min_contributors}")


def _node_examples(node: dict, data):
    """The node's file read as labelled texts or, for a causal-lm federation, as prompt/response
    pairs (named by prompt-column/response-column, or recognised by their columns)."""

    def pairs():
        return load_instruction_pairs(data=data.path, prompt_column=data.prompt_column,
                                      response_column=data.response_column)

    if "prompt-column" in node or "response-column" in node:
        return pairs()
    try:
        return load_labelled_texts(data=data.path, text_column=data.text_column, label_column=data.label_column)
    except FedtuneError as as_labelled:
        try:
            return pairs()
        except FedtuneError as as_pairs:
            raise FedtuneError(f"{data.path} is neither labelled texts for classification ({as_labelled}) nor "
                               f"prompt/response pairs for causal-lm ({as_pairs})") from None


def _check_ca(path: Path) -> str:
    if not Path(path).is_file():
        raise FedtuneError(f"{path} does not exist; use the federation's ca.crt from the coordinator")
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise FedtuneError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; ask the coordinator for "
                           f"new certificates (`fedtune certs`)")
    return f"valid until {cert.not_valid_after_utc:%Y-%m-%d}"


def _check_private_key(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FedtuneError(f"{path} does not exist; it is this institution's private key from `fedtune node-keys`")
    try:
        serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise FedtuneError(f"{path} is not an OpenSSH private key (the .pub is for the coordinator; this "
                           f"node needs the file without .pub)") from None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise FedtuneError(f"{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")
    return f"{path.name} (register {path.name}.pub with the coordinator: flwr supernode register)"


def _check_superlink(address: str, ca: Path, timeout: float) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise FedtuneError(f"'{address}' is not HOST:PORT (e.g. coordinator.example.org:9092)")
    try:
        raw = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except socket.gaierror:
        raise FedtuneError(f"cannot resolve '{host}'; check the SuperLink host name") from None
    except (ConnectionRefusedError, TimeoutError, OSError) as exc:
        raise FedtuneError(f"nothing answers at {address} ({exc.strerror or exc}); is the SuperLink running, "
                           f"and is the address and port right?") from None
    context = ssl.create_default_context(cafile=str(ca)) if Path(ca).is_file() else ssl.create_default_context()
    try:
        with context.wrap_socket(raw, server_hostname=host.strip("[]")) as tls:
            return f"{address} speaks TLS {tls.version()} with a certificate our CA signed"
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or str(exc)
        if "expired" in reason:
            hint = "the SuperLink's certificate has expired; the coordinator must issue new ones (`fedtune certs`)"
        elif "mismatch" in reason or "match" in reason:
            hint = (f"the SuperLink's certificate does not name '{host}'; dial a host it names or re-issue it "
                    f"with `fedtune certs --hosts` including '{host}'")
        else:
            hint = f"the SuperLink's certificate is not signed by {ca}; use the federation's ca.crt"
        raise FedtuneError(f"TLS verification failed ({reason}): {hint}") from None
    except ssl.SSLError as exc:
        raise FedtuneError(f"{address} does not speak TLS ({exc.reason}); is it the SuperLink, started with "
                           f"--ssl-certfile?") from None
    finally:
        raw.close()


# Flower's messages for what a node cannot fix by itself, and what to do about each.
FLOWER_HINTS = {
    "Failed to activate SuperNode": "the SuperLink does not accept this node's key: the coordinator must "
                                    "register it (`flwr supernode register` with this node's supernode.pub), "
                                    "and no other running node may use the same key",
    "SuperNode authentication is enabled": "start the node with --auth-supernode-private-key (its key from "
                                           "`fedtune node-keys`)",
    "CERTIFICATE_VERIFY_FAILED": "pass the federation's ca.crt with --root-certificates",
}


def hint_for(line: str) -> str | None:
    return next((hint for mark, hint in FLOWER_HINTS.items() if mark in line), None)
