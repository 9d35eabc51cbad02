"""Running the real `fedtune` command line: in this process (`fedtune`, what most tests need), or
in a subprocess where the process is the subject (`run_fedtune`: exit status, imports, signals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_fedtune(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "fedtune", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def fedtune(*args: str) -> subprocess.CompletedProcess:
    """`fedtune ARGS` run by the CLI's own entry point in this process, its output captured: the
    same exit code, stdout and stderr as the subprocess, without a new interpreter's imports."""
    import contextlib
    import io
    import logging

    import opacus  # noqa: F401  (`fedtune plan` would otherwise put a torch-free stand-in in its place)

    from fedtune import shell
    from fedtune.main import run_cli

    out, err = io.StringIO(), io.StringIO()
    shell.log_dir_hint.clear()
    flwr_log = logging.getLogger("flwr")  # `simulate` quiets it; the next test gets it back as it was
    level, filters = flwr_log.level, list(flwr_log.filters)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(ROOT):
            code = run_cli(list(args))
    finally:
        flwr_log.setLevel(level)
        flwr_log.filters[:] = filters
    return subprocess.CompletedProcess(["fedtune", *args], code, out.getvalue(), err.getvalue())


def set_args(**keys) -> list[str]:
    """--set arguments from snake_case keywords."""
    out = []
    for key, value in keys.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out += ["--set", f"{key.replace('_', '-')}={text}"]
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def saved_adapter_arrays(run_dir: Path, *, num_labels: int) -> list:
    """The run's saved adapter as arrays in parameter order, loaded the way a user loads it."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedtune.common.config import RunConfig
    from fedtune.common.models.adapter import adapter_to_arrays

    config = RunConfig.load(path=run_dir / "config.toml")
    base = AutoModelForSequenceClassification.from_pretrained(config.model, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"), is_trainable=True)
    return adapter_to_arrays(model)


def progress_table(config):
    """`fedtune simulate`'s round table, printed into a buffer: (table, buffer)."""
    import io

    from rich.console import Console

    from fedtune.common.tasks import get_task
    from fedtune.server.round_table import RoundTable

    buffer = io.StringIO()
    return RoundTable(get_task(config.task), Console(file=buffer, width=200)), buffer
