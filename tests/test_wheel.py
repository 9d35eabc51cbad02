"""The installed distribution: one top-level package, `fedtune`, that runs on its own.

`pip wheel .` builds the wheel from a copy of the checkout. The test lists the wheel's top level,
installs it alone (no dependencies, no index) into a fresh virtualenv, and runs `fedtune --version`
and a one-round federation of the tiny test model there, from a folder outside the checkout. The
fresh virtualenv borrows its dependencies (torch, Flower, ...) from this one's site-packages through
a path line: nothing is downloaded, and this venv's editable fedtune is not on that path (an
editable install is a .pth hook, which a path line does not run), so only the wheel provides fedtune.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

NOT_THE_PROJECT = (".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", "ledgers",
                   "results", ".cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """fedtune's wheel, built by `pip wheel` from a copy of the checkout (the build writes build/ and
    egg-info beside the sources; the checkout other tests read stays as it is)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_THE_PROJECT))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--quiet", "--wheel-dir", str(root / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (found,) = (root / "dist").glob("fedtune-*.whl")
    return found


def test_the_wheel_holds_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"fedtune", f"{wheel.name.split('-py3')[0]}.dist-info"}, top_level
    for module in ("fedtune/common/storage.py", "fedtune/client/app.py", "fedtune/server/app.py",
                   "fedtune/simulations/simulate.py", "fedtune/common/models/setfit_format.py", "fedtune/main.py"):
        assert module in names, module
    assert not [name for name in names if "/tests/" in name or "/benchmarks/" in name]


def fresh_venv(root: Path, wheel: Path) -> Path:
    """A new virtualenv holding the wheel alone; its dependencies are this venv's, by a path line."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "--quiet", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_installed_alone_runs_a_federation(wheel, tmp_path, tiny_model_dir, tiny_csv):
    venv = fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"  # not the checkout: its folders must not be importable by accident
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="120")

    def run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)

    version = run(str(venv / "bin" / "fedtune"), "--version")
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.startswith("fedtune 0.1.0"), version.stdout

    where = run(str(venv / "bin" / "python"), "-c", "import importlib.util as u, fedtune.common.storage as s; "
                "print(s.__file__); print([n for n in ('common', 'client', 'server', 'simulations') if u.find_spec(n)])")
    assert where.returncode == 0, where.stderr[-2000:]
    module_file, bare_names = where.stdout.splitlines()
    assert Path(module_file).is_relative_to(venv), module_file
    assert bare_names == "[]"

    run_dir = tmp_path / "run"
    keys = dict(model=tiny_model_dir, data=tiny_csv, num_clients=2, clients_per_round=2, num_rounds=1,
                batch_size=16, max_length=24, learning_rate=0.01, lora_rank=4, target_epsilon=4.0,
                lora_variant="lora", training_mode="adapter")
    overrides = [arg for key, value in keys.items() for arg in ("--set", f"{key.replace('_', '-')}={value}")]
    federation = run(str(venv / "bin" / "fedtune"), "simulate", "--engine", "in-process", "--quiet",
                     "--out", str(run_dir), *overrides, timeout=600)
    assert federation.returncode == 0, federation.stdout[-3000:] + federation.stderr[-3000:]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    audit = run(str(venv / "bin" / "fedtune"), "audit", str(run_dir))
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
