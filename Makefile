# Two commands a fresh clone needs: `make local` and `make test`. Both set up .venv (Python
# packages from PyPI) and ./node_modules (the Kinesis and DynamoDB emulators from npm) first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: setup local test lint bench outage replicas provision clean

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

test: setup promtool lint
	$(BIN)/pytest $(PYTEST_ARGS)

# promtool (from Debian's prometheus package) into $(BIN), for tests/deploy/test_deploy.py.
.PHONY: promtool image
promtool: $(PY_STAMP)
	sh scripts/install-promtool.sh $(BIN)

# The container image, with buildah (Debian package); not part of `make test`.
IMAGE ?= wildrydes-stream:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	@command -v buildah >/dev/null || { echo "make image needs buildah: apt-get install buildah (or: docker build -t $(IMAGE) .)" >&2; exit 1; }
	buildah build --layers -t $(IMAGE) --build-arg VERSION=$(lastword $(subst :, ,$(IMAGE))) \
		--build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) .

bench: setup
	$(BIN)/python -m bench $(ARGS)

# A 90 s DynamoDB outage under load, on the emulators (README "When AWS fails"); with
# ARGS='--app aggregate', a 240 s PutRecords outage under the aggregator: peak RSS, the byte
# budget, paused pollers, every window put after (README "The aggregation stage").
outage: setup
	$(BIN)/python -m bench.outage $(ARGS)

# Replicas sharing a stream: duplicate writes and pickup time per phase (README "Architecture").
replicas: setup
	$(BIN)/python -m bench.replicas $(ARGS)

provision: $(PY_STAMP)
	$(BIN)/python -m wildrydes_stream provision $(ARGS)

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
