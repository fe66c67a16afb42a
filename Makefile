# The two commands of README.md: `make run` (main job on bundled data) and `make test` (all tests).
# Each does its own set-up: a project-local Python venv (.venv) with the real components the tests
# start (S3-compatible server, pyarrow, ...), and the mold linker where apt-get can install it.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# PyTorch lives in its own venv: only the checkpoint interop test needs it, and it is large.
TORCH_VENV := .venv-torch
OUT ?= out
export LLAMAGEN_PYTHON := $(abspath $(PY))
export LLAMAGEN_TORCH_PYTHON := $(abspath $(TORCH_VENV)/bin/python)

.PHONY: run test setup setup-torch bench-catalog bench-train clean

run: setup
	cargo build -p llamagen-pipelines --bin llamagen
	OUT=$(OUT) ./scripts/main-job.sh

test: setup setup-torch
	cargo build -p llamagen-pipelines --bin llamagen
	cargo test --workspace --no-fail-fast
	# The T5 parity again with the AMX products off: the float32 path of CPUs without AMX.
	LLAMAGEN_AMX=0 cargo test -p llamagen-encode --test t5_parity
	# The vendored candle-core is the published crate plus its two patches; its gradient tests pass.
	./scripts/check-vendor.sh
	# The `cuda` feature must keep compiling: nvcc from PyPI, a stub libcuda, no GPU needed.
	./scripts/check-cuda.sh

setup: $(VENV)/.ready
	@command -v mold >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -q mold >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q mold >/dev/null 2>&1)) ; } || \
	  echo "note: mold not installed; linking with the default linker"

setup-torch: $(TORCH_VENV)/.ready

$(TORCH_VENV)/.ready: requirements-torch.txt
	python3 -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install -q -r requirements-torch.txt
	touch $@

$(VENV)/.ready: requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# On-demand benchmark of catalog SQL against DuckDB (10 million rows; see bench/catalog_sql.sh).
bench-catalog: setup
	./bench/catalog_sql.sh

# On-demand benchmark of a GPT-B training step and sampling against PyTorch (see bench/train_step.sh).
bench-train: setup
	./bench/train_step.sh

clean:
	rm -rf $(OUT) $(VENV) $(TORCH_VENV)
