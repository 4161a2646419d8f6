# The two set-up commands of the README. Each creates .venv on first use.
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3
# Where `make install` links the commands: PREFIX/bin, on the PATH of most login shells.
PREFIX ?= $(HOME)/.local
COMMANDS := tufa tufa-agent tufa-server

.PHONY: demo test run install uninstall clean

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

## Link tufa, tufa-agent and tufa-server into PREFIX/bin (default ~/.local/bin).
## The links point into this checkout's .venv: keep it where it is, or install again.
install: $(BIN)/.installed
	mkdir -p "$(PREFIX)/bin"
	for command in $(COMMANDS); do ln -sfn "$(abspath $(BIN))/$$command" "$(PREFIX)/bin/$$command"; done
	@case ":$$PATH:" in *":$(PREFIX)/bin:"*) ;; \
	  *) echo "$(PREFIX)/bin is not on your PATH; add it, e.g. export PATH=\"$(PREFIX)/bin:\$$PATH\"";; esac

## Remove the links `make install` made (only those pointing into this checkout).
uninstall:
	for command in $(COMMANDS); do \
	  if [ "$$(readlink "$(PREFIX)/bin/$$command")" = "$(abspath $(BIN))/$$command" ]; then \
	    rm "$(PREFIX)/bin/$$command"; fi; done

## Lint, type-check and run the whole test suite (SQLite and PostgreSQL).
test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) tufa-data .mypy_cache .pytest_cache .ruff_cache
