# modelloop: `make up` runs the main job, `make test` runs the whole suite. Each target first
# installs the Debian/Ubuntu packages it needs (scripts/system-packages.sh: as root or through
# sudo; otherwise it names what is missing), then the pinned Python environment.
SHELL := /bin/bash
# Expanded where it is used, so a Python 3.11 that system-packages just installed is found.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CLIENTS := .venv-clients
STAMP := $(VENV)/.installed
CLIENTS_STAMP := $(CLIENTS)/.installed
PYTEST_ARGS ?=
# Extra arguments of `python -m bench`, e.g. make bench BENCH_ARGS=--profile (the per-request
# budget, docs/performance.md) or BENCH_ARGS='--quick --only ours,ceiling --profile'.
BENCH_ARGS ?=
# Extra arguments of `modelloop up`, e.g. make up UP_ARGS='--repo /tmp/models --rest-port 0'.
UP_ARGS ?=
# Line and branch coverage of the packages, subprocesses (servers, retrains) included; the
# settings are [tool.coverage.*] in pyproject.toml.
COVERAGE_ARGS ?= --cov --cov-report=term:skip-covered
# `make test` runs the modules on two pytest-xdist workers, each module whole on one (its
# servers are module fixtures), in the collected order: `--no-loadscope-reorder` keeps the
# random module order of `--random-order-bucket=module`. The trained runs are shared between
# the workers (tests/conftest.py). `make test WORKERS=0` runs in one process.
WORKERS ?= 2
XDIST_ARGS ?= $(if $(filter 0,$(WORKERS)),-p no:xdist,-n $(WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: install up test test-fast bench lint audit format clean screenshots system-up system-test system-bench

install: $(STAMP) $(CLIENTS_STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev,postgres]'
	touch $@

# tritonclient pins protobuf < 7 while TensorFlow 2.21 needs 7: it gets its own
# environment, and the tests run it in a subprocess.
$(CLIENTS_STAMP): requirements-clients.lock
	test -x $(CLIENTS)/bin/python || $(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/python -m pip install --quiet --upgrade pip==25.3
	$(CLIENTS)/bin/python -m pip install --quiet -r requirements-clients.lock
	touch $@

system-up system-test system-bench: system-%:
	@PYTHON="$(PYTHON)" bash scripts/system-packages.sh $*

up: system-up install
	$(BIN)/modelloop up $(UP_ARGS)

test: system-test install
	$(BIN)/python -m pytest $(COVERAGE_ARGS) $(XDIST_ARGS) $(PYTEST_ARGS)

# The development loop: the unit and edge tests, no model trained (a test that needs a trained
# model carries the `trains` marker, set in tests/conftest.py), no real-server end-to-end
# modules, no coverage, on the same two workers as `make test`. About a minute and a half
# here; `make test` before pushing.
FAST_ARGS ?= tests --ignore=tests/e2e --ignore=tests/bench --ignore=tests/deploy -m "not slow and not trains"
test-fast: install
	$(BIN)/python -m pytest $(XDIST_ARGS) $(FAST_ARGS) $(PYTEST_ARGS)

bench: system-bench install
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.points
	$(BIN)/python -m bench.control_plane --no-drop 180

# The docs' pictures, from a real run: docs/images/health-page.png (make up, modelloop simulate
# --drift, the status page in headless Chromium: tests/e2e/test_health_page_e2e.py) and
# docs/images/grafana-dashboard.png (the Grafana dashboard's own queries against a real
# Prometheus that scraped a real server, drawn by scripts/render_dashboard.py:
# tests/monitoring/test_dashboard.py). Models, stores and browser profiles live in a
# temporary directory, removed afterwards.
screenshots: system-test install
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	MODELLOOP_DOCS_IMAGES=$(CURDIR)/docs/images MODELLOOP_ARTIFACTS=$$tmp/artifacts \
	$(BIN)/python -m pytest -p no:randomly -p no:cacheprovider --basetemp=$$tmp/pytest -q -s \
		tests/e2e/test_health_page_e2e.py tests/monitoring/test_dashboard.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy training export serving monitoring control modelloop
	$(MAKE) audit

# Known vulnerabilities of the locked dependencies (PyPI's advisory data; needs network).
audit: install
	$(BIN)/pip-audit -r requirements.lock --no-deps --disable-pip --progress-spinner off

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(CLIENTS) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .coverage .coverage.* htmlcov
