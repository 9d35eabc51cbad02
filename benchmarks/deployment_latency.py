"""What a real deployment adds to a round: the same job on three `fedtune run-node` SuperNodes
(TLS on loopback, the coordinator's pinned `fedtune run-superlink`, a signed job) and in
`fedtune simulate`, side by side in one run.

    python -m benchmarks.deployment_latency [--quick] [--out DIR] [--node-threads N]

Data: the demo's own per-client shares. The default corpus (BBC News) is split exactly as `make
demo` splits it (5 IID clients, test-fraction 0.1, seed 0); clients 0, 1 and 2 become three
institutions, each with its own CSV (its demo share, train and validation: the node keeps 10 % for
validation as a simulated client does). The simulation reads one file, the union of the three
shares and the demo's test split, with num-clients 3 and a test-fraction that holds out exactly
the demo's test-split size, so each simulated client gets as many records as an institution and
the coordinator tests on as many. The deployed coordinator reads that same file with the same
test-fraction, so both coordinators evaluate on the identical test split (a real coordinator
would hold its own test file; only its size matters to the timing).

Job: `make demo`'s (all-MiniLM-L6-v2, max-length 128, FFA-LoRA r=8, batch 64, DP-SGD at epsilon 8,
SecAgg+) on those 3 institutions, 3 rounds, every institution in every round; round-timeout and
max-client-examples are set to the same values in both. Node configs follow
tests/test_pinned_deployment.py (target-epsilon 8, the federation roster, the pinned operator key;
secagg-min-contributors stays at its default 3). --quick: the tiny BERT of benchmarks/tiny_model.py
(max-length 32, plain LoRA r=4) and 2 rounds.

What is measured:
- round seconds from each coordinator's metrics.jsonl (the same code times the round in both):
  round 1 (model loads, tokenizing, privacy calibration) apart from the steady-state mean of
  rounds 2..N, and their ratio (the goal: a deployed round at most 1.5x a simulated one);
- on the nodes, from `fedtune run-node --timings`: seconds from a message's inputs pulled to its
  reply pushed, per SecAgg+ stage (setup, share_keys, collect_masked_vectors = local training,
  unmask), median and max over nodes and steady-state rounds (the goal: non-training stages at
  most 0.2 s), and how often each node read the base model from disk in the run (the goal: 1);
- what is left of a deployed round once the slowest node's handling (its stages summed) and the
  coordinator's test-set evaluation are taken out: polling (the pinned ServerApp pulls replies
  every 0.25 s, where Flower's HttpGrid waits 3 s; a SuperNode that finds no message sleeps 3 s
  and looks for its runtime's reply every 0.5 s, hard-coded in Flower 1.41), TLS transport, and
  the coordinator's SecAgg+ work, not separated;
- a deployed round's timeline: the SuperLink's log (the ServerApp's lines included) and the nodes'
  timings files are read while the run goes, each new line stamped as it appears (every 0.05 s),
  which places every stage's messages, the waits between stages and the evaluation in the round.

Messages are assigned to rounds by their order on each node: a round starts at its SecAgg+ setup.
The three institutions' nodes and the coordinator share this machine's cores, where each would have
its own machine. The simulation's Ray gives each client one core and runs it with one torch thread
(OMP_NUM_THREADS=1); each node process gets the same (--node-threads, default 1), so both spend the
same compute per client. --node-threads 0 leaves torch's default (a thread per core in each of the
three nodes): the cores are then oversubscribed and local training is much slower (on 2 cores it
took more than twice as long), which measures this machine, not the deployment.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.harness import default_out, log, machine, markdown_table, publish, simulate, write_result

NAME = "deployment_latency"
SITES = 3
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
ROUND_TIMEOUT = 900  # seconds a SecAgg+ stage may wait for replies; the same in both
FLWR_RUN_TIMEOUT = 3600
NON_TRAINING_GOAL_S = 0.2
TAIL_INTERVAL_S = 0.05  # resolution of the timeline's stamps
RATIO_GOAL = 1.5


# -- data ---------------------------------------------------------------------------------------

def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("text", "label"))
        writer.writerows(rows)
    return path


def demo_data(folder: Path) -> dict:
    """The demo's 5-client IID split of the default corpus; clients 0..2 become site-N.csv, and
    union.csv holds their shares and the demo's test split (for the simulation and the coordinator)."""
    from fedtune.common.config import RunConfig
    from fedtune.common.run_data import federated_splits

    demo = RunConfig()  # `make demo`: the default corpus, 5 IID clients, test-fraction 0.1, seed 0
    splits = federated_splits(demo)
    names = splits.label_names

    def rows(part) -> list[tuple[str, str]]:
        return [(text, names[label]) for text, label in zip(part.texts, part.labels)]

    shares = [rows(client.train) + rows(client.validation) for client in splits.clients[:SITES]]
    sites = [write_rows(folder / f"site-{index}.csv", share) for index, share in enumerate(shares)]
    test = rows(splits.test)
    union = write_rows(folder / "union.csv", [row for share in shares for row in share] + test)
    total = sum(len(share) for share in shares) + len(test)
    test_fraction = len(test) / total
    assert round(total * test_fraction) == len(test)
    train_sizes = [len(share) - int(len(share) * demo.validation_fraction) for share in shares]
    log(f"demo split: {splits.report}; institutions get {[len(s) for s in shares]} records "
        f"({train_sizes} to train), the coordinator tests on {len(test)}")
    return {"sites": sites, "union": union, "test_fraction": test_fraction, "share_sizes": [len(s) for s in shares],
            "train_sizes": train_sizes, "test_size": len(test), "max_client_examples": max(train_sizes)}


def job_keys(*, model: str, data: dict, rounds: int, quick: bool) -> dict[str, object]:
    """The run-config keys both runs share (the rest are the defaults, i.e. `make demo`'s)."""
    keys: dict[str, object] = {"model": model, "data": str(data["union"]), "num-clients": SITES,
                               "clients-per-round": SITES, "num-rounds": rounds,
                               "test-fraction": repr(data["test_fraction"]),
                               "max-client-examples": data["max_client_examples"], "round-timeout": ROUND_TIMEOUT,
                               "training-mode": "adapter"}  # what it measures: the FFA-LoRA job, measured before probing
    if quick:
        keys.update({"max-length": 32, "lora-rank": 4, "lora-variant": "lora"})
    return keys


def run_config_string(keys: dict[str, object]) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (int, float)) or (isinstance(v, str) and _is_number(v)):
            return str(v)
        return f"'{v}'"

    return " ".join(f"{key}={value(v)}" for key, v in keys.items())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- the deployment -----------------------------------------------------------------------------

def deploy(*, workdir: Path, keys: dict[str, object], model: str, data: dict, node_threads: int | None) -> dict:
    """Three institutions' run-node, the pinned coordinator, one signed job; returns its records."""
    from fedtune.common.ledger.chain import create_ledger_keys
    from fedtune.common.trust.job_signature import make_operator_keys
    from fedtune.certs import make_credentials
    from tests.deployment import LoopbackFederation, wait_for
    from tests.helpers import run_fedtune

    workdir.mkdir(parents=True, exist_ok=True)
    make_credentials(out=workdir / "creds", hosts=["localhost"])
    ledgers = [workdir / "ledgers" / f"site-{site}" for site in range(SITES)]
    members = []
    for site, ledger in enumerate(ledgers):
        create_ledger_keys(ledger)
        members += ["--member", f"site-{site}={ledger / 'ledger.pub'}"]
    built = run_fedtune("roster", "build", *members, "--out", str(workdir / "roster.json"), "--federation", "bench")
    if built.returncode != 0:
        raise RuntimeError(f"fedtune roster build failed:\n{built.stderr[-2000:]}")
    operator_pub = make_operator_keys(workdir / "operator")
    run_dir = workdir / "run"
    job = run_config_string({**keys, "output-dir": str(run_dir)})
    signed = run_fedtune("sign-job", "--key", str(workdir / "operator" / "operator.key"), "--roster",
                         str(workdir / "roster.json"), "--run-config", job)
    if signed.returncode != 0:
        raise RuntimeError(f"fedtune sign-job failed:\n{signed.stderr[-2000:]}")

    fed = LoopbackFederation(workdir=workdir / "federation", credentials=workdir / "creds")
    timings = [fed.workdir / f"timings-{site}.jsonl" for site in range(SITES)]
    started = time.perf_counter()
    try:
        log("deployment: starting fedtune run-superlink (pinned coordinator, TLS)")
        fed.start_superlink(operator_key=operator_pub)
        for site in range(SITES):
            fed.make_node_key(site)
            fed.register(site)
        saved = os.environ.get("OMP_NUM_THREADS")
        if node_threads:
            os.environ["OMP_NUM_THREADS"] = str(node_threads)
        try:
            nodes = [fed.start_supernode(site, node_config(workdir, site, model=model, data=data["sites"][site],
                                                           ledger=ledgers[site], operator_pub=operator_pub),
                                         runtime=True, root_certificates=workdir / "creds" / "ca.crt",
                                         timings=timings[site]) for site in range(SITES)]
        finally:
            if node_threads:
                os.environ.pop("OMP_NUM_THREADS", None) if saved is None else os.environ.update(OMP_NUM_THREADS=saved)
        wait_for(lambda: all("node runtime: serving" in n.text() for n in nodes)
                 or any(n.popen.poll() is not None for n in nodes), timeout=300, what="the node runtimes")
        if any(n.popen.poll() is not None for n in nodes):
            raise RuntimeError("a node stopped:\n" + "\n".join(n.text()[-2000:] for n in nodes))
        ready = time.perf_counter() - started
        log(f"deployment: 3 nodes serving after {ready:.0f} s; flwr run (signed job)")
        submitted = time.perf_counter()
        tailed = {"superlink": fed.processes[0].log, **{f"node-{site}": timings[site] for site in range(SITES)}}
        with Tailer(tailed, since=submitted) as tailer:
            flwr = fed.flwr_run_async(signed.stdout.strip())
            stream = fed.workdir / "logs" / "flwr-run.log"
            reader = threading.Thread(target=_stamp_lines, args=(flwr, stream, submitted), daemon=True)
            reader.start()
            deadline = time.monotonic() + FLWR_RUN_TIMEOUT
            seen = 0
            while flwr.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flwr run ran past {FLWR_RUN_TIMEOUT} s; see {stream}")
                if any(n.popen.poll() is not None for n in nodes):
                    raise RuntimeError(f"a node stopped during the run; see {fed.workdir / 'logs'}")
                done = _read_jsonl(run_dir / "metrics.jsonl")
                for record in done[seen:]:
                    log(f"deployment: round {record['round']} took {record['seconds']:.1f} s")
                seen = len(done)
                time.sleep(1)
            reader.join(timeout=30)
        wall = time.perf_counter() - submitted
        if not (run_dir / "summary.json").exists():
            raise RuntimeError(f"the deployed run did not finish; see {stream} and {fed.workdir / 'logs'}:\n"
                               + stream.read_text(errors="replace")[-3000:])
        rounds = _read_jsonl(run_dir / "metrics.jsonl")
        node_lines = [_read_jsonl(path) for path in timings]
        log(f"deployment: done, {wall:.0f} s from flwr run to its end")
        return {"rounds": rounds, "timings": node_lines, "stamped": tailer.lines, "wall_seconds": wall,
                "startup_seconds": ready,
                "run_dir": str(run_dir), "logs": str(fed.workdir / "logs")}
    finally:
        fed.close()


def node_config(workdir: Path, site: int, *, model: str, data: Path, ledger: Path, operator_pub: Path) -> str:
    return (f"client-id='site-{site}' data='{data}' ledger-dir='{ledger}' model='{model}' target-epsilon=8.0 "
            f"roster='{workdir / 'roster.json'}' operator-key='{operator_pub}'")


def _stamp_lines(popen, path: Path, since: float) -> None:
    """`flwr run --stream`'s output, each line stamped with seconds since submission."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for line in popen.stdout:
            out.write(f"[{time.perf_counter() - since:8.2f}] {line}")
            out.flush()


class Tailer:
    """Stamps each new line of some growing files with the moment it appeared (polled every
    TAIL_INTERVAL_S): the SuperLink's log (the ServerApp's lines included) and the nodes' timings."""

    def __init__(self, files: dict[str, Path], *, since: float) -> None:
        self.files, self.since = files, since
        self.lines: dict[str, list[tuple[float, str]]] = {name: [] for name in files}
        self._offsets = {name: 0 for name in files}
        self._partial = {name: "" for name in files}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Tailer:
        for name, path in self.files.items():  # what is there already is not part of the run
            self._offsets[name] = path.stat().st_size if path.exists() else 0
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _run(self) -> None:
        while not self._stop.wait(TAIL_INTERVAL_S):
            self._poll()

    def _poll(self) -> None:
        now = time.perf_counter() - self.since
        for name, path in self.files.items():
            if not path.exists():
                continue
            with path.open("rb") as handle:
                handle.seek(self._offsets[name])
                chunk = handle.read()
            if not chunk:
                continue
            self._offsets[name] += len(chunk)
            text = self._partial[name] + chunk.decode("utf-8", errors="replace")
            *complete, self._partial[name] = text.split("\n")
            self.lines[name] += [(now, line) for line in complete]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- analysis -----------------------------------------------------------------------------------

def by_round(lines: list[dict]) -> list[list[dict]]:
    """One node's timing lines grouped into rounds: a round starts at its SecAgg+ setup."""
    rounds: list[list[dict]] = [[]]
    for line in lines:
        if line["stage"] == "setup" and any(seen["stage"] == "setup" for seen in rounds[-1]):
            rounds.append([])
        rounds[-1].append(line)
    return rounds if rounds[0] else []


def stamps_of(lines: list[tuple[float, str]], marker: str) -> list[float]:
    return [stamp for stamp, line in lines if marker in line]


def timeline(deployment: dict, n: int) -> list[dict]:
    """Each round's segments, in seconds, from the stamped SuperLink log and timings lines: the
    coordinator starts SecAgg+, each stage is handled on the nodes (first message pulled to last
    reply pushed), the waits between stages, then the coordinator unmasks and evaluates."""
    link = deployment["stamped"]["superlink"]
    started, aggregated, evaluated = (stamps_of(link, marker) for marker in (
        "Secure aggregation commencing", "Secure aggregation completed", "fit progress:"))
    if not len(started) == len(aggregated) == len(evaluated) == n:
        raise RuntimeError(f"the SuperLink's log marks {len(started)}, {len(aggregated)}, {len(evaluated)} rounds, "
                           f"metrics.jsonl {n}")
    nodes = []
    for site in range(SITES):
        lines = [{**json.loads(line), "pushed_at": stamp} for stamp, line in deployment["stamped"][f"node-{site}"]
                 if line.strip()]
        nodes.append(by_round(lines))
    rounds = []
    for index in range(n):
        def pulled(stage: str) -> float:
            return min(m["pushed_at"] - m["seconds"] for rounds_ in nodes for m in rounds_[index]
                       if m["stage"] == stage)

        def pushed(stage: str) -> float:
            return max(m["pushed_at"] for rounds_ in nodes for m in rounds_[index] if m["stage"] == stage)

        def last(stage: str) -> dict:
            return max((m for rounds_ in nodes for m in rounds_[index] if m["stage"] == stage),
                       key=lambda m: m["pushed_at"])

        segments = {"start": pulled(STAGES[0]) - started[index]}
        for position, stage in enumerate(STAGES):
            segments[stage] = last(stage)["seconds"]  # the node that replied last: the round waited on it
            segments[f"{stage} skew"] = pushed(stage) - pulled(stage) - last(stage)["seconds"]
            if position + 1 < len(STAGES):
                segments[f"{stage}->{STAGES[position + 1]}"] = pulled(STAGES[position + 1]) - pushed(stage)
        segments["unmask->aggregated"] = aggregated[index] - pushed(STAGES[-1])
        segments["evaluation"] = evaluated[index] - aggregated[index]
        segments["total"] = evaluated[index] - started[index]
        rounds.append(segments)
    return rounds


WAITS = ("start", "setup->share_keys", "share_keys->collect_masked_vectors", "collect_masked_vectors->unmask",
         "unmask->aggregated", *(f"{stage} skew" for stage in STAGES))


def analyse(deployment: dict, simulation) -> dict:
    dep_rounds = [r["seconds"] for r in deployment["rounds"]]
    sim_rounds = [r["seconds"] for r in simulation.rounds]
    n = len(dep_rounds)
    nodes = [by_round(lines) for lines in deployment["timings"]]
    if any(len(rounds) != n for rounds in nodes):
        raise RuntimeError(f"node timings hold {[len(r) for r in nodes]} rounds, the coordinator {n}")
    steady = slice(1, None) if n > 1 else slice(0, None)
    stages = {}
    for stage in STAGES:
        seconds = [line["seconds"] for rounds in nodes for messages in rounds[steady] for line in messages
                   if line["stage"] == stage]
        stages[stage] = {"median": statistics.median(seconds), "max": max(seconds), "count": len(seconds)}
    other = [line for rounds in nodes for messages in rounds for line in messages if line["stage"] not in STAGES]
    per_round = []
    for index in range(n):
        handling = [sum(line["seconds"] for line in rounds[index]) for rounds in nodes]
        training = [sum(line["seconds"] for line in rounds[index] if line["stage"] == "collect_masked_vectors")
                    for rounds in nodes]
        per_round.append({"round": index + 1, "deployment_s": dep_rounds[index], "simulation_s": sim_rounds[index],
                          "slowest_node_handling_s": max(handling), "slowest_node_training_s": max(training),
                          "rest_s": dep_rounds[index] - max(handling)})
    segments = timeline(deployment, n)
    for record, segment in zip(per_round, segments):
        record["evaluation_s"] = segment["evaluation"]
        record["rest_s"] = record["deployment_s"] - record["slowest_node_handling_s"] - segment["evaluation"]
        record["polling_s"] = sum(segment[key] for key in WAITS)
    steady_timeline = {key: statistics.mean(s[key] for s in segments[steady]) for key in segments[0]}
    dep_steady, sim_steady = statistics.mean(dep_rounds[steady]), statistics.mean(sim_rounds[steady])
    return {
        "deployment_round_seconds": dep_rounds, "simulation_round_seconds": sim_rounds,
        "deployment_steady_s": dep_steady, "simulation_steady_s": sim_steady, "ratio": dep_steady / sim_steady,
        "round1_ratio": dep_rounds[0] / sim_rounds[0],
        "stages": stages, "other_messages": len(other),
        "model_loads": [lines[-1]["model_loads"] for lines in deployment["timings"]],
        "messages": [len(lines) for lines in deployment["timings"]],
        "refused": [sum(1 for line in lines if line["refused"]) for lines in deployment["timings"]],
        "per_round": per_round, "timeline": segments, "steady_timeline": steady_timeline,
    }


TIMELINE = (
    ("start", "coordinator starts SecAgg+ -> first node pulls setup", "wait"),
    ("setup skew", "setup: the last node to reply pulled it this much after the first", "wait"),
    ("setup", "setup: the last node to reply, handling it", "nodes"),
    ("setup->share_keys", "last setup reply pushed -> first share_keys pulled", "wait"),
    ("share_keys skew", "share_keys: the last node to reply pulled it this much after the first", "wait"),
    ("share_keys", "share_keys: the last node to reply, handling it", "nodes"),
    ("share_keys->collect_masked_vectors", "last share_keys reply pushed -> first collect_masked_vectors pulled",
     "wait"),
    ("collect_masked_vectors skew", "collect_masked_vectors: the last node to reply pulled it this much after "
                                    "the first", "wait"),
    ("collect_masked_vectors", "collect_masked_vectors: the last node to reply, training (local DP-SGD)", "nodes"),
    ("collect_masked_vectors->unmask", "last masked vector pushed -> first unmask pulled", "wait"),
    ("unmask skew", "unmask: the last node to reply pulled it this much after the first", "wait"),
    ("unmask", "unmask: the last node to reply, handling it", "nodes"),
    ("unmask->aggregated", "last unmask reply pushed -> coordinator has the aggregate", "wait"),
    ("evaluation", "coordinator's test-set evaluation of the new adapter", "coordinator"),
)
KINDS = {"wait": "waiting: Flower's polling, transport, the coordinator's SecAgg+ work",
         "nodes": "nodes handling (the node each stage waited on)", "coordinator": "coordinator computing"}


def render(result: dict, *, quick: bool, command: str) -> str:
    a = result["analysis"]
    steady_label = "rounds 2.." + str(len(a["deployment_round_seconds"]))
    comparison = markdown_table(
        ["seconds", "deployment (3 run-node, TLS, pinned coordinator)", "simulation (fedtune simulate, 3 clients)",
         "deployment / simulation"],
        [["round 1 (model load, tokenizing, privacy calibration)", f"{a['deployment_round_seconds'][0]:.1f}",
          f"{a['simulation_round_seconds'][0]:.1f}", f"{a['round1_ratio']:.2f}x"],
         [f"steady-state round (mean of {steady_label})", f"{a['deployment_steady_s']:.1f}",
          f"{a['simulation_steady_s']:.1f}", f"**{a['ratio']:.2f}x** (goal <= {RATIO_GOAL}x)"],
         ["whole run: `flwr run` submitted to its end / `fedtune simulate` process",
          f"{result['deployment_wall_s']:.0f}", f"{result['simulation_wall_s']:.0f}", ""],
         ["start-up before the run (run-superlink, 3 nodes registered, 3 run-node serving)",
          f"{result['deployment_startup_s']:.0f}", "", ""]])
    stage_rows = []
    for stage in STAGES:
        st = a["stages"][stage]
        goal = "training" if stage == "collect_masked_vectors" else (
            f"<= {NON_TRAINING_GOAL_S} s: {'met' if st['max'] <= NON_TRAINING_GOAL_S else 'missed'}")
        label = "collect_masked_vectors (local DP training)" if stage == "collect_masked_vectors" else stage
        stage_rows.append([label, f"{st['median']:.3f}", f"{st['max']:.3f}", st["count"], goal])
    stages = markdown_table(["SecAgg+ stage on a node (inputs pulled to reply pushed)", "median s", "max s",
                             f"messages ({steady_label}, 3 nodes)", "goal"], stage_rows)
    steady = a["steady_timeline"]
    kinds = {kind: sum(steady[key] for key, _, k in TIMELINE if k == kind) for kind in KINDS}
    timeline_rows = [[label, KINDS[kind].split(":")[0].split(" (")[0], f"{steady[key]:.2f}"]
                     for key, label, kind in TIMELINE]
    timeline_rows += [[f"**{KINDS[kind]}**", "sum", f"**{kinds[kind]:.2f}**"] for kind in KINDS]
    timeline_rows.append(["coordinator's SecAgg+ start to evaluation logged (deployed round, "
                          f"{a['deployment_steady_s']:.2f} s in metrics.jsonl)", "total", f"{steady['total']:.2f}"])
    timeline = markdown_table([f"a deployed round, mean of {steady_label}", "kind", "s"], timeline_rows)
    round_rows = [[r["round"], f"{r['deployment_s']:.1f}", f"{r['slowest_node_handling_s']:.1f}",
                   f"{r['slowest_node_training_s']:.1f}", f"{r['evaluation_s']:.1f}", f"{r['rest_s']:.1f}",
                   f"{r['polling_s']:.1f}", f"{r['simulation_s']:.1f}"] for r in a["per_round"]]
    rounds = markdown_table(["round", "deployed round s", "slowest node's handling s (its 4 stages summed)",
                             "of which training s", "coordinator's test evaluation s",
                             "rest s (round - slowest node - evaluation): Flower's polling, transport, "
                             "coordinator's SecAgg+ work", "waiting s on the timeline below",
                             "simulated round s"], round_rows)
    threads = ("OMP_NUM_THREADS, as Ray sets it for a simulated client" if result["node_threads_set"]
               else "torch's default: --node-threads 0")
    loads = ", ".join(f"site-{i}: {n}" for i, n in enumerate(a["model_loads"]))
    messages = ", ".join(str(m) for m in a["messages"])
    return (f"Machine: {machine()}. Job: {result['job']}. Command: `{command}`. Benchmark wall time: "
            f"{result['benchmark_wall_s'] / 60:.1f} min.\n\n{comparison}\n\n{stages}\n\n"
            f"Base model reads from disk per node process for the whole run (goal: 1): {loads}. Messages "
            f"handled per node: {messages}; refused: {sum(a['refused'])}. Torch threads per node process: "
            f"{result['node_threads']} ({threads}); the 3 nodes share the machine's {os.cpu_count()} cores, and "
            f"the simulation's Ray runs at most one client per core, each with one torch thread."
            f"\n\n{rounds}\n\n"
            f"Where a deployed round's time goes, from the SuperLink's log and the nodes' timings lines as "
            f"they appeared (stamped every {TAIL_INTERVAL_S} s). The waits are polling: the pinned "
            f"ServerApp pulls replies every 0.25 s (`fedtune/serverapp_process.py`; Flower's HttpGrid waits "
            f"3 s), and Flower 1.41's SuperNode, when it finds no message, sleeps 3 s and looks for its "
            f"runtime's reply every 0.5 s "
            f"(`flwr/supernode/start_client_internal.py`); with TLS transport and the coordinator's own "
            f"SecAgg+ work between stages, which this does not separate. A stage's skew: each node pulls "
            f"when its own 3 s sleep ends, so the node a stage waits on may start it later than the first "
            f"node did.\n\n{timeline}\n\nLoad average (1 min) when the deployment started, when the "
            f"simulation started and at the end: {', '.join(f'{x:.2f}' for x in result['load_average'])}.")


# -- main ---------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--node-threads", type=int, default=1,
                        help="OMP_NUM_THREADS for each node process, as Ray sets it for a simulated client "
                             "(default 1; 0 leaves it unset: torch's default)")
    args = parser.parse_args()
    out = (args.out or default_out()) / NAME
    began = time.perf_counter()
    rounds = 2 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from benchmarks.tiny_model import save_tiny_bert

            model = str(save_tiny_bert(Path(tmp) / "tiny-bert"))
            description = (f"the tiny BERT (2 layers, 32 wide), max-length 32, LoRA r=4, {rounds} rounds")
        else:
            model = "default"
            description = f"`make demo`'s (all-MiniLM-L6-v2, max-length 128, FFA-LoRA r=8, batch 64), {rounds} rounds"
        data = demo_data(out / "data")
        keys = job_keys(model=model, data=data, rounds=rounds, quick=args.quick)
        log(f"job: {run_config_string(keys)}")
        load = [os.getloadavg()[0]]
        deployment = deploy(workdir=out / "deployment", keys=keys, model=model, data=data,
                            node_threads=args.node_threads)
        load.append(os.getloadavg()[0])
        simulation = simulate(keys, out=out / "simulation", label="simulation")
        load.append(os.getloadavg()[0])
    import torch

    analysis = analyse(deployment, simulation)
    command = f"python -m benchmarks.deployment_latency{' --quick' if args.quick else ''}" + (
        f" --node-threads {args.node_threads}" if args.node_threads != 1 else "")
    result = {
        "job": f"{description}; DP-SGD (epsilon 8), SecAgg+; 3 institutions each with one `make demo` client's "
               f"share of BBC News ({', '.join(map(str, data['share_sizes']))} records, "
               f"{', '.join(map(str, data['train_sizes']))} to train), {data['test_size']} test records",
        "command": command, "keys": {k: str(v) for k, v in keys.items()},
        "node_threads": args.node_threads or torch.get_num_threads(), "node_threads_set": bool(args.node_threads),
        "deployment_wall_s": deployment["wall_seconds"], "deployment_startup_s": deployment["startup_seconds"],
        "simulation_wall_s": simulation.wall_seconds, "deployment_run_dir": deployment["run_dir"],
        "simulation_run_dir": str(simulation.out), "analysis": analysis,
        "load_average": load, "node_timings": deployment["timings"], "benchmark_wall_s": time.perf_counter() - began,
    }
    write_result(NAME, result, quick=args.quick)
    publish(NAME, render(result, quick=args.quick, command=command), quick=args.quick)
    log(f"done in {result['benchmark_wall_s']:.0f} s; runs under {out}")


if __name__ == "__main__":
    main()
