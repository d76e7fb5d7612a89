# The two commands: `make run` (the app) and `make test` (the CPU test suite). Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A stamp per requirements file: the venv is refreshed whenever a pin changes.
$(VENV)/.run-deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install -r requirements.txt
	touch $@

$(VENV)/.test-deps: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -r requirements-dev.txt
	touch $@

run: $(VENV)/.run-deps
	$(BIN)/python app.py $(ARGS)

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .tiny .pytest_cache
