# giftstream: every entry point a developer or CI needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: install install-dev browser run test lint clean loadtest bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(DEVSTAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	@$(MAKE) --no-print-directory browser
	touch $(DEVSTAMP)

# The browser tests (tests/web) drive Debian's Chromium through Playwright; installed here with
# apt-get when missing (as root, or through sudo). When it cannot be installed this says so
# and goes on: the browser tests then fail, naming the browser they did not find.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x "$(CHROMIUM)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "WARNING: $(CHROMIUM) is missing and installing it needs root:" \
	  "run 'apt-get install chromium' as root; until then the browser tests (tests/web) fail." >&2; \
	  exit 0; fi; \
	echo "installing Debian's chromium for the browser tests (apt-get)"; \
	if ! { $$sudo apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends chromium fonts-noto-color-emoji; }; then \
	  echo "WARNING: apt-get could not install chromium; the browser tests (tests/web) fail" \
	    "until $(CHROMIUM) exists." >&2; fi

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
