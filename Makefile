# lorakit: `make lab` to learn, `make test` to check everything. The first use creates .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# No NVIDIA GPU here -> pin the CPU build of torch (constraints/cpu.txt); a GPU machine gets pip's normal CUDA torch.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints/cpu.txt)
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" on a laptop.
PIP_ARGS ?=
PORT ?= 8888
# Jupyter refuses to run as root unless told (containers, Colab-like VMs, CI machines).
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: lab test course lessons grade bench env clean

$(BIN)/.installed: pyproject.toml constraints/cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) $(PIP_ARGS) -e ".[dev]"
	@touch $@

lab: $(BIN)/.installed
	$(BIN)/jupyter lab --no-browser --ip=127.0.0.1 --port=$(PORT) --notebook-dir=lessons \
		--ServerApp.open_browser=False $(ALLOW_ROOT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

course: $(BIN)/.installed
	$(BIN)/lorakit run --params grading/ci_params.yml

lessons: $(BIN)/.installed
	$(BIN)/lorakit lessons

grade: $(BIN)/.installed
	@test -n "$(LESSON)" -a -n "$(SUBMISSIONS)" || { echo "usage: make grade LESSON=00_setup SUBMISSIONS=path/to/notebooks-or.zip"; exit 2; }
	$(BIN)/lorakit grade $(LESSON) $(SUBMISSIONS)

bench: $(BIN)/.installed
	@failed=""; for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || failed="$$failed $$b"; done; \
	if [ -n "$$failed" ]; then echo "promises not met or benchmarks failed:$$failed"; exit 1; fi

env: $(BIN)/.installed
	$(BIN)/lorakit env

clean:
	rm -rf build grading/work
