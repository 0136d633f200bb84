# rlhf_jax developer commands. Each target installs what it needs into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Tests run in parallel over pytest-xdist workers; each worker sees 8 fake CPU devices. Work
# stealing: each worker takes a contiguous half of the tests (so a module's shared fixtures are
# built once) and an idle worker takes over the rest of the other's queue, so the end-to-end
# runs at the end of the collection do not leave one worker running alone.
WORKERS ?= 2
DIST    ?= worksteal

.PHONY: install lint test test-slow demo demo-full frontier frontier-quick rlaif rlaif-quick bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check rlhf_jax tests experiments

test: lint
	$(BIN)/pytest -n $(WORKERS) --dist $(DIST) -m "not slow" -q --durations=20 tests

test-slow: $(STAMP)
	$(BIN)/pytest -n $(WORKERS) --dist $(DIST) -m slow -q tests

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

# ReST and HIR on the reward-vs-KL frontier next to PPO, DPO and best-of-n (runs/frontier-*:
# report.md, results.json, frontier.png); three seeds, <= 15 min on 2 cores.
frontier: $(STAMP)
	$(BIN)/python -m experiments.frontier

frontier-quick: $(STAMP)
	$(BIN)/python -m experiments.frontier --quick

# RLAIF findings at small scale (runs/rlaif: report.md, results.json, PNGs); ~15 min on 2 cores.
rlaif: $(STAMP)
	$(BIN)/python -m experiments.rlaif

rlaif-quick: $(STAMP)
	$(BIN)/python -m experiments.rlaif --quick

bench: $(STAMP)
	$(BIN)/python -m rlhf_jax.bench all

clean:
	rm -rf $(VENV) .pytest_cache runs
