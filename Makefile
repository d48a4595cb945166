# giftstream: every entry point a developer or CI needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: install install-dev run test lint clean loadtest bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(DEVSTAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEVSTAMP)

install: $(STAMP)

install-dev: $(DEVSTAMP)

run: $(STAMP)
	$(BIN)/giftstream serve --demo

LTSTAMP := $(VENV)/.installed-loadtest
LOADTEST_ARGS ?=

$(LTSTAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[loadtest]'
	touch $(LTSTAMP)

# Load-test the server `make run` started (another terminal), then check its money:
#   make loadtest LOADTEST_ARGS="--viewers 2000 --gift-rate 300 --report /tmp/giftstream-run.json --plot /tmp/giftstream-run.png"
loadtest: $(LTSTAMP)
	$(BIN)/giftstream loadtest $(LOADTEST_ARGS)

# Start our own Redis and servers, run the scenarios of issue 5 against giftstream and the
# peers (installed into bench/.peers/, gitignored), write docs/benchmarks.md (~25 min).
# Subsets: BENCH_SCENARIOS=fanout,settle BENCH_RUNS=3 make bench; BENCH_SMOKE=1 make bench.
bench: $(LTSTAMP)
	$(BIN)/python -m bench.run

test: $(DEVSTAMP)
	$(BIN)/python -m pytest -q

# mypy checks the packages under their installed names (pyproject.toml's [tool.mypy]): it
# cannot see through the editable install's import hook, so .typecheck/ (gitignored) links them.
LINTED := protocol server loadtest bench tests
lint: $(DEVSTAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	mkdir -p .typecheck/giftstream
	for pkg in protocol server loadtest; do ln -sfn ../../$$pkg .typecheck/giftstream/$$pkg; done
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .typecheck
