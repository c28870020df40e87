# Two commands a fresh clone needs: `make local` and `make test`. Both set up .venv (Python
# packages from PyPI) and ./node_modules (the Kinesis and DynamoDB emulators from npm) first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

# Two stamps: the service and its locked dependencies (all `make local` needs), then the test
# toolchain on top (`make test`); a change to pyproject.toml or the lock redoes both.
PY_STAMP := $(VENV)/.installed-runtime
TEST_STAMP := $(VENV)/.installed-test
NODE_STAMP := node_modules/.installed
PIP := $(BIN)/pip --disable-pip-version-check
# Tools installed on demand by `make lock` and `make audit`, not by local or test.
UV_REQUIREMENT ?= uv>=0.5,<1
AUDIT_REQUIREMENT ?= pip-audit>=2.7,<3

.PHONY: setup local emulators test lint bench outage replicas provision clean lock audit

setup: $(PY_STAMP) $(NODE_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Exactly the versions and files of requirements.lock (pip checks every hash), then the package.
$(PY_STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(PIP) install --quiet --require-hashes --no-deps -r requirements.lock
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(TEST_STAMP): $(PY_STAMP)
	$(PIP) install --quiet -e '.[test]'
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Ctrl-C reaches make too: `local` drains, checks and exits 0, but make then ends with status
# 130 (an interrupted make always does); the verdict is the last line `local` prints.
local: setup
	$(BIN)/python -m wildrydes_stream local $(ARGS)

# The emulators only, left running until Ctrl-C, with the exports to use them by hand.
emulators: setup
	$(BIN)/python -m wildrydes_stream.local $(ARGS)

# requirements.lock and requirements-build.lock from pyproject.toml (scripts/lock.sh);
# ARGS='--upgrade' moves every pin to the newest release allowed.
lock: | $(BIN)/python
	@test -x $(BIN)/uv || $(PIP) install --quiet '$(UV_REQUIREMENT)'
	UV=$(BIN)/uv sh scripts/lock.sh . $(ARGS)

# Known vulnerabilities in the locked versions (pip-audit). Needs an advisory source (PyPI's
# JSON API, or OSV with ARGS='--service osv'): where none answers it says so and exits 0;
# AUDIT_STRICT=1 makes that an error (for CI with internet).
audit: | $(BIN)/python
	@test -x $(BIN)/pip-audit || $(PIP) install --quiet '$(AUDIT_REQUIREMENT)'
	$(BIN)/python scripts/audit.py $(if $(AUDIT_STRICT),--strict) requirements.lock requirements-build.lock $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: setup $(TEST_STAMP) promtool lint
	$(BIN)/pytest $(PYTEST_ARGS)

# promtool (from Debian's prometheus package) into $(BIN), for tests/deploy/test_deploy.py.
.PHONY: promtool image
promtool: $(PY_STAMP)
	sh scripts/install-promtool.sh $(BIN)

# The container image, with buildah (Debian package), then scripts/check-image.py on it (labels,
# entrypoint, user, contents, the CLI answering); not part of `make test`. PYTHON_IMAGE: another
# base (default the Dockerfile's python:3.11-slim); BUILDAH_FLAGS: more `buildah build` options.
# The version label is always pyproject.toml's, whatever the tag.
PACKAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= wildrydes-stream:$(PACKAGE_VERSION)
PYTHON_IMAGE ?=
BUILDAH_FLAGS ?=
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
image:
	@command -v buildah >/dev/null || { echo "make image needs buildah: apt-get install buildah (or: docker build -t $(IMAGE) .)" >&2; exit 1; }
	buildah build --layers -t $(IMAGE) --build-arg VERSION=$(PACKAGE_VERSION) \
		--build-arg REVISION=$(REVISION) \
		$(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) $(BUILDAH_FLAGS) .
	$(PYTHON) scripts/check-image.py $(IMAGE) --revision $(REVISION) \
		$(if $(PYTHON_IMAGE),--base $(PYTHON_IMAGE))

bench: setup $(TEST_STAMP)
	$(BIN)/python -m bench $(ARGS)

# A 90 s DynamoDB outage under load, on the emulators (docs/performance.md "An outage under load"); with
# ARGS='--app aggregate', a 240 s PutRecords outage under the aggregator: peak RSS, the byte
# budget, paused pollers, every window put after (docs/how-it-works.md "The aggregation stage").
outage: setup $(TEST_STAMP)
	$(BIN)/python -m bench.outage $(ARGS)

# Replicas sharing a stream: duplicate writes and pickup time per phase (docs/performance.md "Replicas").
replicas: setup $(TEST_STAMP)
	$(BIN)/python -m bench.replicas $(ARGS)

provision: $(PY_STAMP)
	$(BIN)/python -m wildrydes_stream provision $(ARGS)

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
