"""What the execution profile (device, base-dtype, threads) buys, measured side by side in one run:
the demo job before and after it, the demo's compute floor, and a SmolLM2-135M causal-LM client
with an fp32 and a bf16 base.

    git worktree add /tmp/base31 a30e66c   # the code before the profile
    python -m benchmarks.execution_profile [--quick] [--base /tmp/base31] [--out DIR] [--parts demo lm]

Every measured workload runs in a fresh process of the tree it measures: `python -m fedtune ...` or
this file's child modes (loaded by path, with cwd and PYTHONPATH set to that tree, so `common`,
`client` and `server` are that tree's; Ray's workers inherit the PYTHONPATH).

(a) The demo job: `fedtune simulate` with every default (5 clients, 3 rounds, probe training,
DP-SGD at epsilon 8, SecAgg+, Ray engine), once in the base tree (before) and once here (after:
the defaults, i.e. base-dtype auto). Figures: each round's seconds from metrics.jsonl (timed by
server/rounds.py from the round's start to after the coordinator's test-set evaluation: the SecAgg+
stages with the clients' training, and the evaluation); the federation's seconds from summary.json
(server/federation.py's run_federation: the data split, the coordinator's model, the round-0
evaluation, every round, the adapter's export); the whole command's wall time (interpreter start,
imports, Ray's start and shutdown included); test accuracy from summary.json. The compute floor: one
pass of the packaged all-MiniLM-L6-v2 (AutoModel, no head, torch.no_grad, batch 64, 2 torch threads)
over all 2,127 records of the demo's corpus, tokenized by the demo's encode (max-length 128), in
fp32 and in bf16, after one warm-up batch; tokenizing and loading are not in it. Goals: rounds 2
and 3 under 5 s each, the federation within 2x the bf16 floor.

(b) A SmolLM2-135M-Instruct causal-LM client (the task's defaults: LoRA r=8 on its default
targets). DP-SGD step: two worker processes, one with an fp32 base and one with a bf16 base, each
holding its model; the parent asks them in turn for one step at a time (fp32/bf16, then bf16/fp32,
...), so a change in the machine's load falls on both. A step is `client.trainer.train_locally`
with a one-step PrivacyPlan (sample rate 1, batch 8 of 128 random tokens, every token learned,
physical batch 8), Opacus hooks, clipping and noise included; each worker's first step is a
discarded warm-up. Goal: bf16 at least 1.6x faster. Round: `fedtune simulate --engine in-process
--set task=causal-lm --set num-rounds=1 --set samples=0 --set clients-per-round=1 --set
secure-aggregation=false --set num-clients=8` (SecAgg+ needs two clients; one client's round is
what is compared), with base-dtype float32 or bfloat16, alternately, each twice: DP noise comes
from the OS, so two runs of one mode show the run-to-run spread of the held-out loss (the
coordinator's test loss in summary.json). The size was chosen by measuring: with the task's 3
clients the sampled client (client-1) trains 284 records, and one fp32 round took 465 s (a whole
command 554 s) on this 2-core machine under load, so four would not fit; with 8 clients the
sampled client-6 trains 85 records in 2 DP steps, and an fp32 round took 48-53 s (a command 87-92
s), so the four rounds and the steps take about 7 minutes. The round's seconds include the
coordinator's test-set evaluation (104 records).

(c) Peak resident memory (ru_maxrss) of client processes, each its own process: the demo client
(client-0's `FedtuneClient.fit` for every round of the demo, with the coordinator's initial
adapter, in a process of its own; before and after), each causal-LM step worker (its model and all
its steps), and each in-process causal-LM round (coordinator and client in one process, so both
models). During the demo simulations the Ray client actors' resident sets are also sampled every
0.5 s (an actor hosts several clients in turn; a shorter peak can be missed).

--quick: 1 demo round, a 320-record floor, 2 steps a mode, one causal-LM round a mode on 12 clients'
shares (about 7 minutes), to check the script, never for numbers. Where this checkout has no
common/execution.py (or with --before-only) only what needs no profile runs, all in the base tree:
its demo, the floor, the fp32 causal-LM halves. A full run takes about 17 minutes on a quiet
2-core machine (the base's demo alone about 4.5). Results: benchmarks/results/execution_profile.json
and its block in BENCHMARKS.md, from a complete run (both trees, both parts); any other run writes
execution_profile_partial[_quick].json and only prints its tables.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from benchmarks.harness import (OFFLINE_ENV, ROOT, ProcessSampler, default_out, log, machine, markdown_table, publish,
                                write_result)

NAME = "execution_profile"
DEFAULT_BASE = Path("/tmp/base31")
MARK = "@@execution_profile "  # prefixes a child's answer lines on stdout (libraries may print too)
ROUND_GOAL_S, FLOOR_GOAL, BF16_GOAL = 5.0, 2.0, 1.6
FLOOR_BATCH, THREADS, MAX_LENGTH = 64, 2, 128  # THREADS: the floor's and the step workers'
STEP_BATCH, STEP_LENGTH = 8, 128
# One causal-LM client's round (b); SecAgg+ needs two clients, so one client trains with plain FedAvg.
LM_ROUND_KEYS: dict[str, object] = {"task": "causal-lm", "num-rounds": 1, "samples": 0, "clients-per-round": 1,
                                    "secure-aggregation": False}
# num-clients: the task's 3 give the sampled client 284 records and a 465 s fp32 round here (a loaded
# machine), too long for four runs; 8 give it (client-6, seed 0) 85 records; --quick: 12 (47 records).
LM_ROUND_CLIENTS = {False: 8, True: 12}
GIB = 2**30


# -- child processes: each measured workload in a fresh process of the tree it measures ------------

BOOT = ("import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('execution_profile_child', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "module.child_main(sys.argv[2], json.loads(sys.argv[3]))\n")


def tree_env(tree: Path) -> dict[str, str]:
    """Offline, and the tree's own packages first (for Ray's workers too, which inherit it)."""
    return dict(os.environ, **OFFLINE_ENV, PYTHONPATH=str(tree))


def has_profile(tree: Path) -> bool:
    return (tree / "common" / "execution.py").exists()


def child_command(kind: str, args: dict) -> list[str]:
    return [sys.executable, "-c", BOOT, str(Path(__file__).resolve()), kind, json.dumps(args)]


def answer(payload: dict) -> None:
    print(MARK + json.dumps(payload), flush=True)


def read_answer(stream: IO[str]) -> dict:
    """The next answer line of a child (other lines on its stdout are skipped)."""
    for line in stream:
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError("the child process ended without answering; see its log")


def run_child(tree: Path, kind: str, args: dict, *, log_path: Path, timeout: float = 1800) -> dict:
    """A child mode in a fresh process of `tree`; its last answer."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as stderr:
        done = subprocess.run(child_command(kind, args), cwd=tree, env=tree_env(tree), stdout=subprocess.PIPE,
                              stderr=stderr, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} in {tree} failed ({done.returncode}); see {log_path}:\n"
                           f"{log_path.read_text()[-2000:]}")
    answers = [json.loads(line[len(MARK):]) for line in done.stdout.splitlines() if line.startswith(MARK)]
    return answers[-1]


def child_main(kind: str, args: dict) -> None:
    """Entry point of a child process (see BOOT)."""
    if kind == "lm-worker":
        lm_worker(args)
    else:
        answer({"floor": floor_pass, "demo-prep": demo_prep, "demo-client": demo_client}[kind](args))


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def floor_pass(args: dict) -> dict:
    """The compute floor: one no-grad pass of the base encoder over every record, per dtype."""
    import torch
    from transformers import AutoModel

    from fedtune.common.data.labelled import Split, load_labelled_texts
    from fedtune.common.models.loading import load_tokenizer
    from fedtune.common.tasks import get_task
    from fedtune.common.tasks.classification import encode

    torch.set_num_threads(args["threads"])
    path = get_task("classification").default_model_folder()
    examples = load_labelled_texts(data="default")
    count = args["records"] or len(examples.texts)
    data = encode(tokenizer=load_tokenizer(path), split=Split(texts=examples.texts[:count],
                                                                 labels=examples.labels[:count]),
                  max_length=args["max_length"])
    ids, mask = data.tensors[0], data.tensors[1]
    seconds = {}
    for name in args["dtypes"]:
        model = AutoModel.from_pretrained(str(path), dtype=getattr(torch, name)).eval()
        batch = args["batch"]
        with torch.no_grad():
            model(input_ids=ids[:batch], attention_mask=mask[:batch])  # warm-up: kernels, allocator
            started = time.perf_counter()
            for start in range(0, len(ids), batch):
                model(input_ids=ids[start:start + batch], attention_mask=mask[start:start + batch])
            seconds[name] = time.perf_counter() - started
        del model
    return {"records": len(ids), "all_records": len(examples.texts), "shape": list(ids.shape),
            "tokens": int(mask.sum()), "seconds": seconds, "threads": torch.get_num_threads()}


def demo_prep(args: dict) -> dict:
    """The coordinator's initial adapter for the demo job (saved for the demo client), its label
    order and the FFA-LoRA A fingerprint the coordinator sends."""
    import numpy as np

    from fedtune.common.config import RunConfig
    from fedtune.common.models.adapter import adapter_to_arrays
    from fedtune.common.models.lora import LoraSettings, lora_a_sha256
    from fedtune.common.models.pooled_classifier import HeadSettings
    from fedtune.common.run_data import federated_splits
    from fedtune.common.tasks import get_task

    config = RunConfig.load(overrides=args["overrides"])
    task = get_task(config.task)
    labels = list(federated_splits(config).label_names)
    model = task.build_model(model_path=task.model_path(config.model), num_labels=len(labels),
                             lora=LoraSettings.from_config(config), seed=config.seed,
                             head=HeadSettings.from_config(config, label_names=labels))
    arrays = adapter_to_arrays(model)
    np.savez(args["out"], *arrays)
    return {"labels": labels, "arrays": len(arrays),
            "lora_a_sha256": lora_a_sha256(model) if config.lora_variant == "ffa" else ""}


def demo_client(args: dict) -> dict:
    """client-0 of the demo, alone in this process: `FedtuneClient.fit` for every round, each
    round from the previous global plus its own update (one client's part of the demo)."""
    import numpy as np

    from fedtune.client.fl_client import FedtuneClient
    from fedtune.common.config import RunConfig

    config = RunConfig.load(overrides=args["overrides"])
    with np.load(args["params"]) as saved:
        parameters = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    client = FedtuneClient(config=config, partition_id=0, ledger_dir=Path(args["ledger_dir"]), run_id="bench")
    seconds = []
    for server_round in range(1, args["rounds"] + 1):
        started = time.perf_counter()
        update, _, metrics = client.fit([p.copy() for p in parameters],
                                        {"server-round": server_round, "fedtune-run-id": "bench",
                                         "label-names": json.dumps(args["labels"]),
                                         "lora-a-sha256": args["lora_a_sha256"]})
        seconds.append(time.perf_counter() - started)
        if metrics.get("status") != "trained":
            raise RuntimeError(f"round {server_round}: the client did not train: {metrics}")
        parameters = [p + u for p, u in zip(parameters, update)]
    return {"round_seconds": seconds, "peak_rss_gib": peak_rss_gib(), "profile": _ledger_profile(args["ledger_dir"])}


def _ledger_profile(folder: str) -> dict | None:
    """The execution profile a ledger record names (a tree with the profile records it), if any."""
    for path in sorted(Path(folder).rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            found = _find_key(record, "profile")
            if isinstance(found, dict):
                return found
    return None


def _find_key(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        if key in value:
            return value[key]
        for item in value.values():
            found = _find_key(item, key)
            if found is not None:
                return found
    return None


def lm_worker(args: dict) -> None:
    """One causal-LM client model (fp32 or bf16 base) that takes a DP-SGD step each time the parent
    writes `step`; `stop` answers its peak resident set size and ends it."""
    import torch

    from fedtune.client.trainer import train_locally
    from fedtune.common.config import RunConfig
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.privacy.plan import PrivacyPlan
    from fedtune.common.tasks import get_task

    torch.set_num_threads(args["threads"])
    task = get_task("causal-lm")
    config = RunConfig(task="causal-lm")  # the task's LoRA defaults: r=8 on the default targets
    build: dict[str, Any] = {}
    train: dict[str, Any] = {}
    if args["base_dtype"]:  # a tree with the execution profile
        from fedtune.common.execution import ExecutionProfile

        profile = ExecutionProfile(base_dtype=args["base_dtype"])
        build["profile"] = profile
        if "profile" in inspect.signature(train_locally).parameters:
            train["profile"] = profile
    task.prepare_training_process()  # as a causal-LM client does before training
    started = time.perf_counter()
    model = task.build_model(model_path=task.model_path("default"), num_labels=0,
                             lora=LoraSettings.from_config(config), seed=config.seed, **build)
    built = time.perf_counter() - started
    frozen = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad}
    trained = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (STEP_BATCH, STEP_LENGTH), generator=generator)
    dataset = torch.utils.data.TensorDataset(ids, torch.ones_like(ids), ids.clone())  # every token learned
    plan = PrivacyPlan(num_examples=STEP_BATCH, sample_rate=1.0, steps_per_round=1, noise_multiplier=1.0,
                       planned_rounds=1, target_epsilon=1e9, target_delta=1e-5, accountant="rdp")
    answer({"ready": True, "build_seconds": built, "base_dtypes": sorted(frozen), "trained_dtypes": sorted(trained),
            "threads": torch.get_num_threads()})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        started = time.perf_counter()
        train_locally(model=model, dataset=dataset, loss=task.loss, learning_rate=config.learning_rate,
                      batch_size=STEP_BATCH, local_epochs=1, max_grad_norm=1.0, plan=plan, history=[], seed=0,
                      physical_batch_size=STEP_BATCH, **train)
        answer({"seconds": time.perf_counter() - started})
    answer({"peak_rss_gib": peak_rss_gib()})


# -- the parent: runs, samples, tables --------------------------------------------------------------

class ActorPeaks(ProcessSampler):
    """Peak RSS of each process under `pid` whose command line starts with `prefix` (Ray names an
    actor's process `ray::ClassName...`), sampled every `interval` seconds."""

    def __init__(self, pid: int, *, prefix: str = "ray::ClientAppActor", interval: float = 0.5) -> None:
        super().__init__(pid, interval=interval)
        self.prefix = prefix
        self.peaks: dict[int, int] = {}
        self._names: dict[int, bool] = {}

    def sample(self, root) -> None:
        import psutil

        for proc in root.children(recursive=True):
            try:
                if not self._names.get(proc.pid):  # an idle worker may become an actor
                    self._names[proc.pid] = " ".join(proc.cmdline()).startswith(self.prefix)
                if self._names[proc.pid]:
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


def simulate(tree: Path, keys: dict[str, object], *, out: Path, label: str, engine: str = "ray",
             timeout: float = 1800) -> dict:
    """`fedtune simulate` in `tree` (cwd and PYTHONPATH); its rounds, summary and memory."""
    args = [sys.executable, "-m", "fedtune", "simulate", "--out", str(out), "--engine", engine]
    for key, value in keys.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    log(f"{label}: fedtune simulate {' '.join(a for a in args[4:] if a != '--set')} (in {tree})")
    log_path = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("w") as output:
        process = subprocess.Popen(args, cwd=tree, env=tree_env(tree), stdout=output, stderr=subprocess.STDOUT)
        with ActorPeaks(process.pid) as actors:
            killer = threading.Timer(timeout, process.kill)
            killer.start()
            _, status, usage = os.wait4(process.pid, 0)  # rusage of this command's process (and its waited children)
            killer.cancel()
            process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{label}: fedtune simulate failed ({process.returncode}); see {log_path}:\n"
                           f"{log_path.read_text()[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = {"label": label, "tree": str(tree), "keys": keys, "engine": engine, "out": str(out), "log": str(log_path),
           "round_seconds": [r["seconds"] for r in rounds], "federation_seconds": summary["seconds"],
           "trained": {cid: {k: c.get(k) for k in ("num_examples", "steps")} for r in rounds[:1]
                       for cid, c in r["clients"].items()},
           "command_seconds": wall, "summary": summary,
           "command_peak_rss_gib": usage.ru_maxrss * 1024 / GIB,
           "actor_peak_rss_gib": sorted((v / GIB for v in actors.peaks.values()), reverse=True),
           "profile": _ledger_profile(str(out / "ledgers"))}
    log(f"{label}: rounds {', '.join(f'{s:.1f}' for s in run['round_seconds'])} s; federation "
        f"{run['federation_seconds']:.1f} s; command {wall:.1f} s")
    return run


def part_demo(*, base: Path | None, after: bool, quick: bool, out: Path) -> dict:
    """(a) and the demo's half of (c): before/after simulations, the floor, the lone demo client."""
    keys: dict[str, object] = {"num-rounds": 1} if quick else {}
    overrides = [f"{k}={v}" for k, v in keys.items()]
    rounds = 1 if quick else 3
    result: dict[str, Any] = {"keys": keys, "runs": {}, "client": {}}
    trees = ([("before", base)] if base else []) + ([("after", ROOT)] if after else [])
    for label, tree in trees:  # the simulations first: nothing of theirs is warmed by another run
        result["runs"][label] = simulate(tree, keys, out=out / f"demo-{label}", label=f"demo {label}")
    dtypes = ["float32", "bfloat16"]
    log(f"compute floor: MiniLM over the demo's records, {', '.join(dtypes)}")
    result["floor"] = run_child(ROOT if after else (base or ROOT), "floor",
                                {"dtypes": dtypes, "threads": THREADS, "max_length": MAX_LENGTH,
                                 "batch": FLOOR_BATCH, "records": 320 if quick else 0}, log_path=out / "floor.log")
    log(f"compute floor: {result['floor']['records']} records, "
        + ", ".join(f"{k} {v:.1f} s" for k, v in result["floor"]["seconds"].items()))
    for label, tree in trees:
        prep = run_child(tree, "demo-prep", {"overrides": overrides, "out": str(out / f"demo-{label}-initial.npz")},
                         log_path=out / f"demo-{label}-prep.log")
        log(f"demo client {label}: client-0's fit for {rounds} round(s), alone in a process")
        result["client"][label] = run_child(
            tree, "demo-client", {"overrides": overrides, "params": str(out / f"demo-{label}-initial.npz"),
                                  "ledger_dir": str(out / f"demo-{label}-client-ledger"), "rounds": rounds,
                                  "labels": prep["labels"], "lora_a_sha256": prep["lora_a_sha256"]},
            log_path=out / f"demo-{label}-client.log")
        log(f"demo client {label}: rounds "
            + ", ".join(f"{s:.1f}" for s in result["client"][label]["round_seconds"])
            + f" s, peak RSS {result['client'][label]['peak_rss_gib']:.2f} GiB")
    return result


def part_lm(*, tree: Path, after: bool, quick: bool, out: Path) -> dict:
    """(b) and the causal-LM half of (c): alternating DP steps, then in-process rounds, in `tree`
    (this checkout; the base's fp32 alone where the profile is not measured)."""
    fp32 = "float32" if has_profile(tree) else ""  # "": a tree without the profile keys (fp32 is all it does)
    modes = {"fp32": fp32, "bf16": "bfloat16"} if after else {"fp32": fp32}
    steps = 2 if quick else 5
    workers: dict[str, subprocess.Popen] = {}
    for mode, dtype in modes.items():
        log(f"causal-LM step worker {mode}: building SmolLM2-135M with LoRA")
        workers[mode] = subprocess.Popen(
            child_command("lm-worker", {"base_dtype": dtype, "threads": THREADS}), cwd=tree, env=tree_env(tree),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(out / f"lm-worker-{mode}.log").open("w"),
            text=True, bufsize=1)
    ready = {mode: read_answer(worker.stdout) for mode, worker in workers.items()}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    order = list(modes)
    for index in range(1 + steps):  # the first step of each worker is a warm-up
        for mode in order if index % 2 == 0 else order[::-1]:
            workers[mode].stdin.write("step\n")
            workers[mode].stdin.flush()
            seconds[mode].append(read_answer(workers[mode].stdout)["seconds"])
        log(f"causal-LM step {index}{' (warm-up)' if index == 0 else ''}: "
            + ", ".join(f"{mode} {seconds[mode][-1]:.2f} s" for mode in order))
    memory = {}
    for mode, worker in workers.items():
        worker.stdin.write("stop\n")
        worker.stdin.flush()
        memory[mode] = read_answer(worker.stdout)["peak_rss_gib"]
        worker.wait(timeout=120)
    step = {mode: {"warmup_seconds": values[0], "seconds": values[1:], "mean_seconds": statistics.mean(values[1:]),
                   "peak_rss_gib": memory[mode], **ready[mode]} for mode, values in seconds.items()}
    keys = {**LM_ROUND_KEYS, "num-clients": LM_ROUND_CLIENTS[quick]}
    rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(1 if quick else 2):
        for mode, dtype in (modes.items() if repeat % 2 == 0 else list(modes.items())[::-1]):
            run_keys = {**keys, **({"base-dtype": dtype} if dtype else {})}
            rounds[mode].append(simulate(tree, run_keys, out=out / f"lm-round-{mode}-{repeat + 1}",
                                         label=f"causal-LM round {mode} #{repeat + 1}", engine="in-process",
                                         timeout=1200))
    return {"tree": str(tree), "commit": git_commit(tree), "modes": modes, "steps_per_mode": steps, "step": step,
            "round_keys": keys, "rounds": rounds}


# -- report ---------------------------------------------------------------------------------------

def _s(value: float | None, pattern: str = ".1f") -> str:
    return "-" if value is None else format(value, pattern)


def render(result: dict) -> str:
    lines = [f"Measured {result['measured']} on {machine()}; load average {result['load_before']} before, "
             f"{result['load_after']} after. Before: {result['base_commit']}; after: {result['this_commit']}. "
             f"Command: `{result['command']}`."]
    if result.get("demo"):
        lines += ["", *render_demo(result["demo"])]
    if result.get("lm"):
        lines += ["", *render_lm(result["lm"])]
    if result.get("notes"):
        lines += ["", *[f"Note: {note}" for note in result["notes"]]]
    return "\n".join(lines)


def render_demo(demo: dict) -> list[str]:
    floor = demo["floor"]["seconds"]
    # A ratio only against a floor over every record (--quick's floor covers 320 of them).
    bf16 = floor.get("bfloat16") if demo["floor"]["records"] == demo["floor"]["all_records"] else None
    rounds = max((len(run["round_seconds"]) for run in demo["runs"].values()), default=0)
    header = ["demo job", *[f"round {i + 1} (s)" for i in range(rounds)], "federation (s)", "whole command (s)",
              "federation / bf16 floor", "test accuracy", "client process peak RSS (GiB)",
              "Ray client actors' peak RSS (GiB)"]
    rows = []
    for label, run in demo["runs"].items():
        client = demo["client"].get(label, {})
        rows.append([label, *[_s(s) for s in run["round_seconds"]], _s(run["federation_seconds"]),
                     _s(run["command_seconds"]), _s(run["federation_seconds"] / bf16 if bf16 else None, ".2f"),
                     _s(run["summary"].get("test_accuracy"), ".3f"), _s(client.get("peak_rss_gib"), ".2f"),
                     _s(max(run["actor_peak_rss_gib"], default=None), ".2f")])
    lines = [markdown_table(header, rows), "",
             f"Compute floor (all-MiniLM-L6-v2, one no-grad pass over {demo['floor']['records']} records, "
             f"{demo['floor']['shape'][1]} tokens each, batch {FLOOR_BATCH}, {demo['floor']['threads']} threads): "
             + ", ".join(f"{k} {v:.1f} s" for k, v in floor.items()) + "."]
    client_rows = [[label, ", ".join(f"{s:.1f}" for s in c["round_seconds"]), f"{c['peak_rss_gib']:.2f}",
                    json.dumps(c.get("profile")) if c.get("profile") else "-"] for label, c in demo["client"].items()]
    lines += ["", markdown_table(["demo client-0 alone in a process", "fit seconds by round", "peak RSS (GiB)",
                                  "profile in its ledger"], client_rows)]
    after = demo["runs"].get("after")
    if after and after.get("profile"):
        lines += ["", f"The after run's clients trained with {json.dumps(after['profile'])} (their ledger records)."]
    if after and bf16:
        later = after["round_seconds"][1:]
        goal_rounds = ("yes" if later and all(s < ROUND_GOAL_S for s in later) else "no") if later else "not measured"
        ratio = after["federation_seconds"] / bf16
        lines += ["", f"Goals (after): rounds 2 and 3 under {ROUND_GOAL_S:g} s: {goal_rounds} "
                      f"({', '.join(f'{s:.1f}' for s in later) or '-'} s); federation within {FLOOR_GOAL:g}x the "
                      f"bf16 floor: {'yes' if ratio <= FLOOR_GOAL else 'no'} ({ratio:.2f}x)."]
    return lines


def render_lm(lm: dict) -> list[str]:
    step = lm["step"]
    rows = [[mode, ", ".join(s["base_dtypes"]), f"{s['mean_seconds']:.2f}",
             ", ".join(f"{v:.2f}" for v in s["seconds"]), f"{s['warmup_seconds']:.2f}", f"{s['peak_rss_gib']:.2f}"]
            for mode, s in step.items()]
    lines = [f"Causal-LM client measured in {lm['tree']} ({lm['commit']}).", "",
             markdown_table(["SmolLM2-135M base", "frozen weights",
                             f"mean DP step (s), batch {STEP_BATCH}x{STEP_LENGTH}", "steps (s)", "warm-up (s)",
                             "step worker peak RSS (GiB)"], rows)]
    if "bf16" in step:
        speedup = step["fp32"]["mean_seconds"] / step["bf16"]["mean_seconds"]
        lines += ["", f"bf16 step speed-up: {speedup:.2f}x (goal: at least {BF16_GOAL:g}x: "
                      f"{'met' if speedup >= BF16_GOAL else 'not met'})."]
    keys = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in lm["round_keys"].items())
    rows = []
    for mode, runs in lm["rounds"].items():
        for index, run in enumerate(runs):
            summary = run["summary"]
            trained = ", ".join(f"{cid} ({c['num_examples']} records, {c['steps']} steps)"
                                for cid, c in run["trained"].items())
            rows.append([mode, index + 1, trained, _s(run["round_seconds"][0]), _s(run["federation_seconds"]),
                         _s(run["command_seconds"]), _s(summary.get("test_loss"), ".4f"),
                         _s(summary.get("test_perplexity"), ".2f"), _s(summary.get("base_loss"), ".4f"),
                         _s(run["command_peak_rss_gib"], ".2f")])
    dtypes = " or ".join(f"`--set base-dtype={d}`" for d in lm["modes"].values() if d)
    lines += ["", f"One causal-LM client round: `fedtune simulate --engine in-process {keys}`"
                  + (f", with {dtypes}" if dtypes else "") + ".", "",
              markdown_table(["base", "run", "client trained", "round (s)", "federation (s)", "whole command (s)",
                              "held-out loss", "perplexity", "base model's loss", "process peak RSS (GiB)"], rows)]
    if "bf16" in lm["rounds"] and len(lm["rounds"]["fp32"]) > 1:
        fp32 = [run["summary"]["test_loss"] for run in lm["rounds"]["fp32"]]
        bf16 = [run["summary"]["test_loss"] for run in lm["rounds"]["bf16"]]
        # DP noise is OS-seeded: each mode's runs differ by their noise; the modes' means should differ by
        # no more than one mode's runs differ among themselves.
        spread = max(max(fp32) - min(fp32), max(bf16) - min(bf16))
        difference = abs(statistics.mean(bf16) - statistics.mean(fp32))
        base = {mode: runs[0]["summary"]["base_loss"] for mode, runs in lm["rounds"].items()}
        gain = base["fp32"] - statistics.mean(fp32)
        lines += ["", f"bf16 held-out loss {', '.join(f'{v:.4f}' for v in bf16)} against fp32's "
                      f"{', '.join(f'{v:.4f}' for v in fp32)}: the means differ by {difference:.4f}, "
                      f"{'within' if difference <= spread else 'outside'} the run-to-run spread ({spread:.4f}, "
                      f"the larger range of one mode's runs). "
                      f"For scale: the round lowers fp32's loss by {gain:.4f} from the base model's "
                      f"{base['fp32']:.4f}; bf16's mean differs from fp32's by "
                      f"{statistics.mean(bf16) - statistics.mean(fp32):+.4f}, and the untrained base scored in bf16 "
                      f"by {base['bf16'] - base['fp32']:+.4f} (the coordinator evaluates in the run's precision)."]
    return lines


def git_commit(tree: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()

    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{git('rev-parse', '--short', 'HEAD')}{dirty}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="minutes: checks the script, not numbers")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="a checkout of the commit before the profile")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--parts", nargs="*", choices=("demo", "lm"), default=["demo", "lm"])
    parser.add_argument("--before-only", action="store_true",
                        help="only what needs no execution profile: the base's demo, the floor, the fp32 halves")
    args = parser.parse_args()
    out = (args.out or default_out()) / NAME
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    after = not args.before_only and has_profile(ROOT)
    if not after:
        notes.append("--before-only" if args.before_only else f"{ROOT} has no common/execution.py")
        notes[-1] += ": only the halves without a profile ran (the demo before, the floor, the fp32 causal-LM client)"
    base = args.base if args.base and (args.base / "fedtune").is_dir() else None
    if base is None:
        notes.append(f"no base checkout at {args.base}: the demo's 'before' did not run")
    if "lm" in args.parts:
        notes.append("causal-LM rounds: clients-per-round=1 of num-clients "
                     f"{LM_ROUND_CLIENTS[args.quick]}, secure-aggregation=false (SecAgg+ needs two clients)")
    started = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join(["python -m benchmarks.execution_profile", *sys.argv[1:]]),
                              "measured": time.strftime("%Y-%m-%d %H:%M"), "out": str(out),
                              "base_commit": git_commit(base) if base else "-", "this_commit": git_commit(ROOT),
                              "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    if "demo" in args.parts:
        result["demo"] = part_demo(base=base, after=after, quick=args.quick, out=out)
    if "lm" in args.parts:
        result["lm"] = part_lm(tree=ROOT if after or base is None else base, after=after, quick=args.quick, out=out)
    result["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    result["benchmark_minutes"] = (time.perf_counter() - started) / 60
    result["notes"] = notes
    complete = after and base is not None and set(args.parts) == {"demo", "lm"}
    name = NAME if complete else f"{NAME}_partial"
    path = write_result(name, result, quick=args.quick)
    log(f"results: {path}; benchmark wall time {result['benchmark_minutes']:.1f} min")
    table = render(result)
    if complete:
        publish(NAME, table, quick=args.quick)
    else:
        print(f"\n## {NAME} (partial{', quick' if args.quick else ''})\n{table}\n", flush=True)


if __name__ == "__main__":
    main()
