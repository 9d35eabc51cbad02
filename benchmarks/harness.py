"""What every benchmark shares: real `fedtune simulate` runs, peak memory of a process tree,
the machine line, and writing results (JSON under benchmarks/results/, tables in BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, CPU only"


def default_out() -> Path:
    """Where benchmark runs keep their run directories: runs/bench/<timestamp> in the repo."""
    return ROOT / "runs" / "bench" / time.strftime("%Y%m%d-%H%M%S")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class SimulationRun:
    """One finished `fedtune simulate`: its summary, per-round records and peak memory."""

    out: Path
    summary: dict
    rounds: list[dict]
    wall_seconds: float
    peak_pss_gib: float  # the whole process tree (TreePeakMemory)

    @property
    def mean_round_seconds(self) -> float:
        return sum(r["seconds"] for r in self.rounds) / len(self.rounds)

    @property
    def max_epsilon(self) -> float | None:
        values = [e for e in self.summary.get("epsilon", {}).values() if e is not None]
        return max(values) if values else None

    def mean_validation_accuracy(self) -> float:
        """Clients' own validation accuracy after the last round (fraction-evaluate = 1)."""
        scores = [c["val_accuracy"] for c in self.rounds[-1]["clients"].values() if "val_accuracy" in c]
        if not scores:
            raise RuntimeError(f"{self.out}: no client validation scores; run with fraction-evaluate=1")
        return sum(scores) / len(scores)


def simulate(keys: dict[str, object], *, out: Path, label: str, timeout: float = 1800,
             module: tuple[str, str] | None = None) -> SimulationRun:
    """A real `fedtune simulate` in its own process (its own Ray), with its tree's peak memory.
    `module` = (module, command) runs `python -m module command` instead (a benchmark's baseline)."""
    args = [sys.executable, "-m", *(module or ("fedtune", "simulate")), "--out", str(out)]
    for key, value in keys.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += ["--set", f"{key}={text}"]
    log(f"{label}: fedtune simulate {' '.join(a for a in args[5:] if a != '--set')}")
    started = time.perf_counter()
    process = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, **OFFLINE_ENV), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    with TreePeakMemory(process.pid) as memory:
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise RuntimeError(f"{label}: fedtune simulate ran past {timeout:.0f} s; killed") from None
    if process.returncode != 0:
        raise RuntimeError(f"{label}: fedtune simulate failed ({process.returncode}):\n{stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = SimulationRun(out=out, summary=summary, rounds=rounds, wall_seconds=time.perf_counter() - started,
                        peak_pss_gib=memory.peak_gib)
    log(f"{label}: done in {run.wall_seconds:.0f} s, peak {run.peak_pss_gib:.2f} GiB")
    return run


class ProcessSampler(ABC):
    """Calls `sample(root)` every `interval` seconds on a thread, from `with` until its end, with
    `root` the psutil process of `pid` (subclasses say what they record)."""

    def __init__(self, pid: int, *, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @abstractmethod
    def sample(self, root) -> None:
        """Record what this sampler watches, once (`root`: a psutil.Process)."""

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                self.sample(root)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)


class TreePeakMemory(ProcessSampler):
    """Samples the memory of a process and all its descendants (Ray workers included).

    It sums PSS (proportional set size): a page shared by k processes (torch's libraries, Ray's
    shared memory, pages shared after a fork) counts 1/k in each, so the total is what the tree
    really holds, not RSS summed with shared pages counted again per process. Sampled every
    `interval` seconds, so a peak shorter than that can be missed.
    """

    def __init__(self, pid: int, *, interval: float = 0.5) -> None:
        super().__init__(pid, interval=interval)
        self.peak_bytes = 0

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    def sample(self, root) -> None:
        import psutil

        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.peak_bytes = max(self.peak_bytes, total)


def write_result(name: str, result: dict, *, quick: bool) -> Path:
    """benchmarks/results/<name>.json (or <name>_quick.json), with the machine and the time."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'_quick' if quick else ''}.json"
    result = {"machine": machine(), "measured": time.strftime("%Y-%m-%d %H:%M"), **result}
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def read_result(name: str, *, quick: bool) -> dict:
    return json.loads((RESULTS / f"{name}{'_quick' if quick else ''}.json").read_text(encoding="utf-8"))


def update_benchmarks_md(table: str, *, name: str) -> None:
    """Replace the generated block `name` in BENCHMARKS.md (the prose around it is written by
    hand); a block not there yet is appended."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = BENCHMARKS_MD.read_text(encoding="utf-8") if BENCHMARKS_MD.exists() else ""
    block = f"{begin}\n{table}\n{end}"
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    BENCHMARKS_MD.write_text(text, encoding="utf-8")


def publish(name: str, table: str, *, quick: bool) -> None:
    """Print a table; a full run also writes it into BENCHMARKS.md (quick numbers never land there)."""
    if not quick:
        update_benchmarks_md(table, name=name)
    print(f"\n## {name}{' (quick)' if quick else ''}\n{table}\n", flush=True)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def line_plot(path: Path, *, x: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str,
              title: str) -> None:
    """A small PNG line chart (one line per series) for benchmarks/results/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, values in series.items():
        ax.plot(x, values, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(x)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
