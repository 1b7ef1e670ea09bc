# Quick start: `make demo` runs the worker on local defaults; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit lint typecheck schema bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ingest.tools.demo

test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

lint: $(STAMP)
	$(BIN)/ruff check ingest tests
	$(BIN)/ruff format --check ingest tests
	$(BIN)/mypy

typecheck: lint

bench: $(STAMP)
	$(BIN)/ingest bench $(BENCH_ARGS)

schema: $(STAMP)
	$(BIN)/ingest schema --output schema/call_event.schema.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
