"""The README's deployment walk-through, run as written: every command of steps 1 to 7 of "Deploy
across institutions", read from README.md itself, over real processes on loopback, with a
coordinator and three institutions (hospital-a, -b, -c).

What the test changes, and nothing else:
- each party's `/srv` is a folder of its own in the test's temporary directory;
- `coordinator.example.org:9092` and `--port 9092` become a free loopback port;
- a command the README shows for hospital-a runs once per institution, with its name;
- the coordinator types its commands in a copy of this checkout (`flwr run .`), and its `flwr`
  configuration (step 4's TOML) goes to its own FLWR_HOME;
- the files that travel between parties out of band (the CA certificate, public keys, the
  roster, receipts and ledgers) are copied between their folders by `MAIL` below;
- each institution's data file and its copy of the base model are put where its node config
  says (`/srv/notes.csv`, `/srv/models/all-MiniLM-L6-v2`), and the coordinator's test file where
  the job says.
It ends in the README's audit: every institution's key pinned and every receipt given, verdict clean.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtune.common.ledger.chain import read_records
from tests.conftest import make_texts, write_csv
from tests.deployment import BIN, Process, app_checkout, free_port, wait_for
from tests.helpers import ROOT, read_metrics

pytestmark = pytest.mark.slow

INSTITUTIONS = ("hospital-a", "hospital-b", "hospital-c")
AT_AN_INSTITUTION = ("fedtune node-keys", "fedtune roster check", "NODE=", "fedtune check-node", "fedtune run-node",
                     "fedtune receipt")
LONG_RUNNING = {"fedtune run-superlink": "Uvicorn running on https", "fedtune run-node": "node runtime: serving"}


@dataclass(frozen=True)
class Step:
    """One logical command of the README (continuation lines joined; a `for` loop whole), or a TOML block."""

    text: str
    party: str  # "coordinator" or "institution" (then run once per institution)
    toml: bool = False


def readme_steps() -> list[Step]:
    section = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Deploy across institutions", 1)[1]
    section = section.split("\n## ", 1)[0]
    steps = []
    for language, body in re.findall(r"```(bash|toml)\n(.*?)```", section, flags=re.S):
        if language == "toml":
            steps.append(Step(text=body, party="coordinator", toml=True))
            continue
        logical, pending = [], ""
        for line in body.splitlines():
            pending += line.rstrip("\\") if line.endswith("\\") else line
            if line.endswith("\\") or (pending.startswith("for ") and not line.strip().startswith("done")):
                pending += " " if line.endswith("\\") else "\n"
                continue
            logical.append(pending)
            pending = ""
        for command in filter(str.strip, logical):
            at_institution = command.lstrip().startswith(AT_AN_INSTITUTION)
            steps.append(Step(text=command, party="institution" if at_institution else "coordinator"))
    return steps


class Parties:
    """Each party's folder (its `/srv`), environment and working directory, and the mail between them."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.checkout = app_checkout(root / "coordinator" / "checkout")
        self.processes: list[Process] = []

    def srv(self, party: str) -> Path:
        return self.root / party / "srv"

    def cwd(self, party: str) -> Path:
        return self.checkout if party == "coordinator" else self.srv(party).parent

    def environment(self, party: str) -> dict[str, str]:
        return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    FLWR_HOME=str(self.root / party / "flwr-home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                    TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", COLUMNS="120")

    def concrete(self, text: str, party: str) -> str:
        """The README's text as `party` types it here."""
        text = text.replace("/srv/", f"{self.srv(party)}/")
        text = text.replace("coordinator.example.org:9092", f"127.0.0.1:{self.port}")
        text = text.replace("--port 9092", f"--port {self.port}")
        return text if party == "coordinator" else text.replace("hospital-a", party)

    def copy(self, source: Path, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, destination)


def mail_after(command: str, party: str, parties: Parties) -> None:
    """What travels out of band once `command` has run at `party`: public files only, and the ledger
    and receipt an institution hands the auditor (here on the coordinator's machine)."""
    coordinator = parties.srv("coordinator") / "fedtune"
    if command.startswith("fedtune certs"):
        for site in INSTITUTIONS:
            parties.copy(coordinator / "creds" / "ca.crt", parties.srv(site) / "fedtune" / "ca.crt")
    elif command.startswith("fedtune node-keys"):
        mine = parties.srv(party) / "fedtune"
        parties.copy(mine / "keys" / "supernode.pub", coordinator / "received" / f"{party}.supernode.pub")
        parties.copy(mine / "ledger" / "ledger.pub", coordinator / "received" / f"{party}.ledger.pub")
    elif command.startswith("fedtune roster build"):
        for site in INSTITUTIONS:
            parties.copy(coordinator / "roster.json", parties.srv(site) / "fedtune" / "roster.json")
    elif command.startswith("fedtune operator-key"):
        for site in INSTITUTIONS:
            parties.copy(coordinator / "operator" / "operator.pub",
                         parties.srv(site) / "fedtune" / "received" / "operator.pub")
    elif command.startswith("fedtune receipt"):
        mine = parties.srv(party) / "fedtune"
        parties.copy(mine / f"{party}.receipt.json", coordinator / "received" / f"{party}.receipt.json")
        parties.copy(mine / "ledger" / "ledger.jsonl", coordinator / "received" / f"{party}.ledger.jsonl")


def own_files(parties: Parties, model: Path) -> None:
    """Each institution's records and its copy of the base; the coordinator's labelled test file."""
    rows = make_texts(150, seed=3)
    for index, site in enumerate(INSTITUTIONS):
        (parties.srv(site) / "models").mkdir(parents=True)
        write_csv(parties.srv(site) / "notes.csv", rows[index * 120:(index + 1) * 120], header=("note", "topic"))
        (parties.srv(site) / "models" / "all-MiniLM-L6-v2").symlink_to(model, target_is_directory=True)
    (parties.srv("coordinator") / "coordinator").mkdir(parents=True)
    write_csv(parties.srv("coordinator") / "coordinator" / "test.csv", rows[360:], header=("note", "topic"))


def run_step(step: Step, party: str, parties: Parties, prelude: dict[str, list[str]]) -> str:
    """Run one command as `party`; returns what it printed. Long-running ones start and are waited
    for until ready; variable assignments (`NODE=...`) are kept for the party's later commands."""
    command = parties.concrete(step.text, party)
    if step.toml:
        home = parties.root / party / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(command)
        return ""
    if re.match(r"^[A-Z_]+=", command):
        prelude.setdefault(party, []).append(command)
        return ""
    script = "\n".join(["set -euo pipefail", *prelude.get(party, []), command])
    ready = next((marker for start, marker in LONG_RUNNING.items() if command.startswith(start)), None)
    if ready is None:
        result = subprocess.run(["bash", "-c", script], cwd=parties.cwd(party), env=parties.environment(party),
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (party, command, result.stdout[-3000:], result.stderr[-3000:])
        mail_after(command.lstrip(), party, parties)
        return result.stdout + result.stderr
    log = parties.root / "logs" / f"{party}-{command.split()[1]}.log"
    log.parent.mkdir(exist_ok=True)
    popen = subprocess.Popen(["bash", "-c", script.replace(command, f"exec {command}")], cwd=parties.cwd(party),
                             env=parties.environment(party), stdout=log.open("wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    process = Process(name=party, popen=popen, log=log)
    parties.processes.append(process)
    wait_for(lambda: ready in process.text() or popen.poll() is not None, timeout=300, what=f"{party}: {ready}")
    assert popen.poll() is None, process.text()[-3000:]
    return ""


def test_the_readme_deployment_runs_as_written_and_audits_clean(tmp_path):
    from fedtune.common.tasks import resolve_model_path

    steps = readme_steps()
    assert [s.party for s in steps].count("institution") >= 6 and any(s.toml for s in steps)
    parties = Parties(tmp_path)
    own_files(parties, Path(resolve_model_path("default")))
    printed, prelude = {}, {}
    try:
        with ThreadPoolExecutor(max_workers=len(INSTITUTIONS)) as institutions:  # each at its own desk, at once
            for step in steps:
                who = INSTITUTIONS if step.party == "institution" else ("coordinator",)
                said = list(institutions.map(lambda party: run_step(step, party, parties, prelude), who))
                printed.setdefault(step.text.split()[0:2][-1], []).extend(said)
    finally:
        for process in reversed(parties.processes):
            process.kill()
    run = parties.srv("coordinator") / "runs" / "r1"
    metrics = read_metrics(run)
    assert [m["round"] for m in metrics] == [1, 2, 3] and all(m["clients_trained"] == 3 for m in metrics), \
        (metrics, printed["run"][-1][-6000:])
    for site in INSTITUTIONS:
        records = read_records(parties.srv(site) / "fedtune" / "ledger" / "ledger.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3]
        assert all(r["target_epsilon"] == 3.0 and r["epsilon"] <= 3.0 for r in records)
    audit = printed["audit"][-1]
    assert "Verdict: clean" in audit, audit[-3000:]
    for site in INSTITUTIONS:
        assert re.search(rf"rests on: .*pinned.*{site}", audit) and re.search(rf"receipt.*{site}", audit), audit[-3000:]
    assert (run / "summary.json").is_file() and (run / "adapter").is_dir()
