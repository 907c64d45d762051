# lorakit: `make lab` to learn, `make test` to check everything. The first use creates .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The versions CI tested (pip constraints; `make lock` rewrites it). Every install here uses it.
LOCK ?= lib/lorakit/tested.txt
# Extra pip arguments, e.g. PIP_ARGS="--index-url https://my.mirror/simple". Without a GPU, the install
# adds PyTorch's CPU index by itself when it answers within a few seconds (lib/lorakit/tooling/bootstrap.py).
PIP_ARGS ?=
PORT ?= 8888
# Jupyter refuses to run as root unless told (containers, Colab-like VMs, CI machines).
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
export TOKENIZERS_PARALLELISM ?= false
# Progress bars: when stderr is not a terminal (CI, benchmark logs) tqdm redraws every 30 s instead of ten
# times a second, so a log gets a few lines per bar instead of one per step (tqdm reads TQDM_* variables).
export TQDM_MININTERVAL ?= $(if $(shell test -t 2 && echo tty),0.1,30)
# Tests and CI never reach a model hub (everything they load ships with the kit); `make lab` may download
# the hub model a learner asks for, so it is set for the test commands only, not exported.
OFFLINE := HF_HUB_OFFLINE=1
FAST := not notebooks and not browser and not slow
# In `make test-fast`, a test that takes longer than this (setup and run) without the slow, notebooks or
# browser mark fails (tests/conftest.py): the quick loop stays the quick loop it promises (under 2 minutes on
# 2 cores). `make test` (CI) is not failed by a wall-clock time: CI's machine may be slower or busier than a
# contributor's (a 2 s test took 7 s on a loaded machine); it prints the 25 slowest tests instead.
SLOW_AFTER ?= 5

.PHONY: lab test test-fast course lessons grade bench env lock install clean

# One stamp per extra: `make lab` installs the kit for learners ([lab]: + JupyterLab), everything else the
# full set ([dev]: + nbgrader, pytest, playwright; it includes [lab], so it stamps that too). A stamp is
# written only after a whole, checked install: an interrupted or failed one leaves none, and the next make
# installs again.
$(VENV)/.installed-%: pyproject.toml $(LOCK)
	@$(PYTHON) lib/lorakit/tooling/bootstrap.py venv --venv $(VENV) --extra $* --lock $(LOCK) --python-name $(PYTHON) -- $(PIP_ARGS)
	@touch $@ $(if $(filter dev instructor,$*),$(VENV)/.installed-lab)

install: $(VENV)/.installed-$(or $(EXTRA),lab)  ## make install EXTRA=instructor: the kit with an extra, nothing started

lab: $(VENV)/.installed-lab
	$(BIN)/jupyter lab --no-browser --ip=127.0.0.1 --port=$(PORT) --notebook-dir=lessons \
		--ServerApp.open_browser=False $(ALLOW_ROOT)

test: $(VENV)/.installed-dev
	$(OFFLINE) $(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the notebook runs, the browser and the long grading cases: the contributor's quick loop.
test-fast: $(VENV)/.installed-dev
	$(OFFLINE) $(BIN)/python -m pytest -m "$(FAST)" --slow-after=$(SLOW_AFTER) $(PYTEST_ARGS)

course: $(VENV)/.installed-dev
	$(BIN)/lorakit run --params .ci/params.yml

lessons: $(VENV)/.installed-dev
	$(BIN)/lorakit lessons

grade: $(VENV)/.installed-dev
	@test -n "$(LESSON)" -a -n "$(SUBMISSIONS)" || { echo "usage: make grade LESSON=00_setup SUBMISSIONS=path/to/notebooks-or.zip"; exit 2; }
	$(BIN)/lorakit grade $(LESSON) $(SUBMISSIONS)

bench: $(VENV)/.installed-dev
	@failed=""; for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || failed="$$failed $$b"; done; \
	if [ -n "$$failed" ]; then echo "promises not met or benchmarks failed:$$failed"; exit 1; fi

env: $(VENV)/.installed-lab
	$(BIN)/lorakit env

# Re-resolve the stack in a scratch environment (build/lock), keeping the current pins except those UPGRADE
# names (UPGRADE=transformers, UPGRADE="peft accelerate", UPGRADE=all: all but torch), write $(LOCK) and
# environment.yml from it, and run LOCK_TEST there; when the tests fail, the previous files come back.
# CI's `make test` then runs on exactly these versions.
LOCK_TEST ?= test-fast
# Held back: newer releases need a newer Python than pyproject's requires-python (soupsieve 3+ needs 3.11.5;
# Debian 12's python3 is 3.11.2). `make lock` refuses a lock that the lowest supported Python cannot install.
HOLD ?= soupsieve<3
lock:
	rm -rf build/lock && mkdir -p build/lock
	cp $(LOCK) build/lock/previous.txt && cp environment.yml build/lock/previous.yml
	$(PYTHON) lib/lorakit/tooling/bootstrap.py keep --upgrade "$(UPGRADE)" --hold "$(HOLD)" > build/lock/keep.txt
	$(MAKE) --no-print-directory VENV=build/lock/venv LOCK=build/lock/keep.txt build/lock/venv/.installed-dev
	build/lock/venv/bin/python -m lorakit.tooling.bootstrap freeze --out $(LOCK)
	build/lock/venv/bin/python -m lorakit.tooling.bootstrap environment > environment.yml
	$(MAKE) --no-print-directory VENV=build/lock/venv $(LOCK_TEST) || { cp build/lock/previous.txt $(LOCK); \
		cp build/lock/previous.yml environment.yml; echo "make lock: the tests failed on the new versions: $(LOCK) is unchanged"; exit 1; }
	@git diff --stat -- $(LOCK) environment.yml 2>/dev/null || true
	@echo "wrote $(LOCK) and environment.yml; the next make reinstalls $(VENV) with them"

clean:
	rm -rf build nbgrader_course/work
