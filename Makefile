# Two commands a fresh clone needs: `make local` and `make test`. Both set up .venv (Python
# packages from PyPI) and ./node_modules (the Kinesis and DynamoDB emulators from npm) first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: setup local test lint bench provision clean

setup: $(PY_STAMP) $(NODE_STAMP)

$(PY_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

local: setup
	$(BIN)/python -m wildrydes_stream local $(ARGS)

lint: $(PY_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench $(ARGS)

provision: $(PY_STAMP)
	$(BIN)/python -m wildrydes_stream provision $(ARGS)

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
