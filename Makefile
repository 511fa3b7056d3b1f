# Everything a fresh Debian machine needs, from one command each: `make demo`, `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv system-deps demo test test-fast lint format bench clean

all: test

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,demo,sim]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests and the demo use; installed when we are root with apt-get.
system-deps:
	@./scripts/system-deps.sh

test: venv system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The fast tier, while editing: the unit tests (no broker, no browser; PostgreSQL for the
# store's contract suite) on every core, under a minute on an idle 2-core machine. `make
# test` is still what CI runs and what a change must pass.
test-fast: venv system-deps
	$(PY) -m pytest -q -n auto tests/unit $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: venv system-deps
	@set -e; for b in bench/*.py; do echo "== $$b"; $(PY) $$b; done

# The demo falls back to an embedded broker where mosquitto cannot be installed.
# the console's port; PORT=0 picks a free one (a taken port stops the demo, saying so)
PORT ?= 8080
demo: venv
	-@./scripts/system-deps.sh
	$(VENV)/bin/ansimi -v demo --port $(PORT)

clean:
	rm -rf $(VENV) demo-state test-output bench-output .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
