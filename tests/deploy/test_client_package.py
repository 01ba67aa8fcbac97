"""The client SDK as pip users get it: clients/python builds a wheel of the `imgpipe` package
alone, which installs into a fresh virtualenv with aiohttp and rich and nothing of the server
(no grpc, asyncpg, redis, Pillow). Offline: the wheel from this tree, its dependencies at the
versions of requirements/client.txt from uv's cache (which `make install` filled)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from testing.ports import free_tcp_port
from tests.deploy.manifests import ROOT

pytestmark = pytest.mark.deploy

BIN = Path(sys.executable).parent
SERVER_MODULES = ("grpc", "asyncpg", "redis", "PIL", "google.protobuf", "numpy", "services")


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UV_NO_CONFIG": "1", "PIP_NO_INDEX": "1"}
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def locked_names(lock: Path) -> set[str]:
    return {
        match.group(1).lower()
        for match in re.finditer(r"^([A-Za-z0-9_.-]+)==", lock.read_text(), re.MULTILINE)
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the tree (a build writes into its source folder)."""
    tmp = tmp_path_factory.mktemp("client")
    shutil.copytree(ROOT / "imgpipe", tmp / "src" / "imgpipe")
    (tmp / "src" / "clients" / "python").mkdir(parents=True)
    shutil.copy(ROOT / "clients" / "python" / "pyproject.toml", tmp / "src" / "clients" / "python")
    built = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp / "dist", tmp / "src" / "clients" / "python",
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = (tmp / "dist").glob("imgpipe_client-*.whl")
    return found


def test_the_wheel_holds_the_client_and_asks_only_for_aiohttp_and_rich(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        headers = Parser().parsestr(archive.read(metadata).decode())
    assert {name.split("/")[0] for name in names if not name.startswith("imgpipe_client-")} == {
        "imgpipe"
    }
    assert "imgpipe/client.py" in names
    required = headers.get_all("Requires-Dist") or []
    assert {re.split(r"[ ><=;]", r)[0].lower() for r in required} == {"aiohttp", "rich"}
    # The same floors as the server's pyproject.toml: one tested range.
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(required) <= set(server)


def test_it_installs_and_works_in_a_fresh_venv_without_the_server(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    created = run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"
    lock = ROOT / "requirements" / "client.txt"
    installed = run(
        BIN / "uv", "pip", "install", "--offline", "--python", python, "-c", lock, wheel
    )
    assert installed.returncode == 0, installed.stderr

    listed = run(BIN / "uv", "pip", "list", "--python", python, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    names = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert names == locked_names(lock) | {"imgpipe-client"}

    probe = f"""
import importlib.util, json
from imgpipe.client import ApiError, AsyncClient, Client, UploadOptions
missing = [m for m in {SERVER_MODULES!r} if importlib.util.find_spec(m.split(".")[0]) is None]
try:
    with Client("http://127.0.0.1:{free_tcp_port()}", timeout=5) as api:
        api.status("3f1c2a4e-0000-4000-8000-000000000000")
except ApiError as exc:
    error = [exc.status, exc.code]
print(json.dumps({{"missing": missing, "error": error}}))
"""
    done = run(python, "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "missing": list(SERVER_MODULES),
        "error": [None, "unavailable"],
    }

    cli = venv / "bin" / "imgpipe"
    version = run(cli, "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == "imgpipe 0.1.0"
    serve = run(cli, "serve", "ingest", cwd=tmp_path)
    assert serve.returncode == 2
    assert "needs the server" in serve.stderr and "pip install imgpipe" in serve.stderr
