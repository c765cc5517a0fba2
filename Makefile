# modelloop: `make up` runs the main job, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CLIENTS := .venv-clients
STAMP := $(VENV)/.installed
CLIENTS_STAMP := $(CLIENTS)/.installed
PYTEST_ARGS ?=
# Extra arguments of `modelloop up`, e.g. make up UP_ARGS='--repo /tmp/models --rest-port 0'.
UP_ARGS ?=

.PHONY: install up test bench lint audit format clean

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

up: install
	$(BIN)/modelloop up $(UP_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy training export serving monitoring modelloop
	$(MAKE) audit

# Known vulnerabilities of the locked dependencies (PyPI's advisory data; needs network).
audit: install
	$(BIN)/pip-audit -r requirements.lock --no-deps --disable-pip --progress-spinner off

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(CLIENTS) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
