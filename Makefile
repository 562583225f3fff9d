# One obvious command per chore. Every target sets up .venv itself from the pinned deps.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/dev.toml

.PHONY: run test bench check clean

$(BIN)/inflight: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/inflight
	$(BIN)/inflight serve --config $(CONFIG)

test: $(BIN)/inflight
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(BIN)/inflight
	$(BIN)/python -m bench.run

check: $(BIN)/inflight
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var *.egg-info
