"""The shape of the code, checked: import layers, no cycles in common/, rooms of a readable size.

The layer contracts live in pyproject.toml ([tool.importlinter]) and run through import-linter,
which reads every import statement, also those inside functions. The cycle and size checks
walk the source with `ast`, so they need nothing installed.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PRODUCT = ("common", "client", "server")
LAYERED = ("common", "client", "server", "simulations")  # fedtune.X for each; fedtune's own modules sit above
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60


def _modules(package: str) -> dict[str, Path]:
    """Dotted module name (as imported: `fedtune.common.storage`) -> file, for every module under the
    top-level folder `package`."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name if package == "fedtune" else f"fedtune.{name}"] = path
    return found


def _imported(path: Path, module: str) -> set[str]:
    """Every project module `module` imports, at any depth of its code (functions included)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph`, as the list of modules on it, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_import_layers_hold():
    """import-linter over the contracts in pyproject.toml: fedtune (the CLI) > simulations > server | client
    > common, and inside common/ each concern imports only the ones below it."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a dev dependency: run `make setup`"
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_layer_contract_fails_on_a_violation(tmp_path):
    """The contract is not vacuous: a copy of the tree where common/ imports the client is refused."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    for name in ("fedtune", *LAYERED):
        shutil.copytree(ROOT / name, tmp_path / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    storage = tmp_path / "common" / "storage.py"
    storage.write_text(storage.read_text() + "\n\ndef _upward():\n    from fedtune.client.app import app  # noqa\n")
    result = subprocess.run([lint, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)})
    assert result.returncode != 0
    assert "fedtune.common.storage -> fedtune.client.app" in result.stdout


def test_nothing_below_the_cli_imports_it():
    """fedtune's own modules (the CLI, the runtimes) are the top layer: no module of the four layers
    imports them. import-linter's layers name only the four, so this walk holds the top."""
    own = set(_modules("fedtune"))
    upward = [f"{name} -> {imported}" for package in LAYERED for name, path in _modules(package).items()
              for imported in _imported(path, name) if imported in own]
    assert not upward, upward


def test_everything_imports_one_namespace():
    """No file imports the top-level folders by their bare names (`common.x`): in a checkout those
    would load a second copy of each module beside `fedtune.common.x`, and a wheel has no such names."""
    bare = []
    for folder in ("fedtune", *LAYERED, "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                bare += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names
                         if name.split(".")[0] in LAYERED]
    assert not bare, bare


def test_no_import_cycle_inside_common():
    modules = _modules("common")
    graph = {name: {m for m in _imported(path, name) if m in modules and m != name}
             for name, path in modules.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", PRODUCT)
def test_modules_and_functions_stay_readable(package):
    """No module over 300 lines and no function over 60 in common/, client/ and server/."""
    too_long = []
    for name, path in _modules(package).items():
        source = path.read_text(encoding="utf-8")
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long


def test_wire_keys_are_written_only_in_the_protocol_module():
    """The coordinator's instructions are keyed in common/protocol.py alone, and a reply's metrics
    are read only through FitReport / EvaluateReport, never by key."""
    instruction_keys = {"server-round", "fedtune-run-id", "label-names", "lora-a-sha256"}
    found = []
    for package in (*PRODUCT, "simulations", "fedtune"):
        for name, path in _modules(package).items():
            if name == "fedtune.common.protocol":
                continue
            source = path.read_text(encoding="utf-8")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Constant) and node.value in instruction_keys:
                    found.append(f"{name}:{node.lineno} {node.value!r}")
            found += [f"{name}: reads metrics by key" for mark in (".metrics.get(", ".metrics[") if mark in source]
    assert not found, found
