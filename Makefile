# The two set-up commands of the README. Each creates .venv on first use.
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: demo test run clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

## Run the end-to-end demo (starts tufa-server on SQLite, then walks the product story).
demo: $(BIN)/.installed
	$(BIN)/tufa demo

## Run the server on SQLite in ./tufa-data (Ctrl-C to stop).
run: $(BIN)/.installed
	$(BIN)/tufa-server run --data-dir tufa-data

## Lint, type-check and run the whole test suite (SQLite and PostgreSQL).
test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) tufa-data .mypy_cache .pytest_cache .ruff_cache
