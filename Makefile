# Two commands on a fresh machine (Python 3.11+ and make): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HANDOFF_HOME ?= $(CURDIR)/.handoff
INSTALLED := $(VENV)/.installed

.PHONY: install demo test lint

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(INSTALLED)

# Seeds the embedded ERP (first time), starts the CRM sandbox and `dagster dev` on 127.0.0.1:3000.
demo: install
	scripts/demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole suite: lint, then every test (PostgreSQL ones skip only outside CI when it is absent).
test: lint
	$(BIN)/python -m pytest -n 2 --dist worksteal
