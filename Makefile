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

# The browser tests drive Debian's Chromium: Playwright's own browser download is not reachable everywhere.
# Installing it needs root (as in CI); elsewhere the stamp stays missing and the browser tests skip.
$(VENV)/.browser: | $(BIN)/python
	@if command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium); \
	then touch $@; else echo "warning: chromium is not installed (sudo apt-get install chromium); the browser tests will skip"; fi

run: $(VENV)/.run-deps
	$(BIN)/python app.py $(ARGS)

test: $(VENV)/.test-deps $(VENV)/.browser
	$(BIN)/python -m pytest

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .tiny .pytest_cache test-results
