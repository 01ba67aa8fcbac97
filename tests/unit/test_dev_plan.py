"""plan_stack(): what `make run` starts, decided from the environment alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.local.launcher import PlanError, StackPlan, plan_stack

pytestmark = pytest.mark.unit

PYTHON = "/opt/py/bin/python3"


def plan(tmp_path: Path, **environ: str) -> StackPlan:
    return plan_stack(environ, cwd=tmp_path, python=PYTHON)


def by_name(stack: StackPlan) -> dict[str, dict[str, str]]:
    return {
        child.name: stack.child_env(child, database_url="postgresql://db", redis_url="unix:///r")
        for child in stack.children
    }


def test_defaults_start_embedded_servers_under_dot_imgpipe(tmp_path: Path) -> None:
    stack = plan(tmp_path)

    data = tmp_path.resolve() / ".imgpipe"
    assert stack.data_dir == data
    assert stack.database_url is None
    assert stack.redis_url is None
    assert stack.postgres_dir == data / "pg"
    assert stack.redis_dir == data / "redis"
    assert stack.storage_url == f"file://{data}/store"
    assert stack.http_listen == "127.0.0.1:8080"
    assert stack.gateway_url == "http://127.0.0.1:8080"
    assert stack.public_base_url == "http://127.0.0.1:8080/files/"
    assert stack.ingest_addr == "127.0.0.1:50051"
    assert stack.status_addr == "127.0.0.1:50052"


def test_children_start_in_order_with_their_own_commands(tmp_path: Path) -> None:
    stack = plan(tmp_path)

    assert [(c.name, c.argv) for c in stack.children] == [
        ("ingest", (PYTHON, "-m", "services.ingest")),
        ("status", (PYTHON, "-m", "services.status")),
        ("worker-1", (PYTHON, "-m", "services.worker")),
        ("worker-2", (PYTHON, "-m", "services.worker")),
        ("gateway", (PYTHON, "-m", "gateway")),
    ]
    assert [[c.name for c in stage] for stage in stack.stop_stages()] == [
        ["gateway"],
        ["worker-1", "worker-2"],
        ["ingest", "status"],
    ]


def test_each_child_gets_its_addresses(tmp_path: Path) -> None:
    envs = by_name(plan(tmp_path))

    assert envs["ingest"]["IMGPIPE_GRPC_LISTEN"] == "127.0.0.1:50051"
    assert envs["status"]["IMGPIPE_GRPC_LISTEN"] == "127.0.0.1:50052"
    assert envs["worker-1"]["IMGPIPE_GRPC_LISTEN"] == "127.0.0.1:50061"
    assert envs["worker-2"]["IMGPIPE_GRPC_LISTEN"] == "127.0.0.1:50062"
    assert envs["worker-1"]["IMGPIPE_CONSUMER_NAME"] == "worker-1"
    assert envs["worker-2"]["IMGPIPE_CONSUMER_NAME"] == "worker-2"
    assert "IMGPIPE_GRPC_LISTEN" not in envs["gateway"]
    assert "IMGPIPE_CONSUMER_NAME" not in envs["ingest"]
    for env in envs.values():
        assert env["IMGPIPE_DATABASE_URL"] == "postgresql://db"
        assert env["IMGPIPE_REDIS_URL"] == "unix:///r"
        assert env["IMGPIPE_INGEST_ADDR"] == "127.0.0.1:50051"
        assert env["IMGPIPE_STATUS_ADDR"] == "127.0.0.1:50052"
        assert env["IMGPIPE_HTTP_LISTEN"] == "127.0.0.1:8080"
        assert env["IMGPIPE_PUBLIC_BASE_URL"] == "http://127.0.0.1:8080/files/"


def test_given_urls_are_used_as_they_are(tmp_path: Path) -> None:
    stack = plan(
        tmp_path,
        IMGPIPE_DATABASE_URL="postgresql://u:p@127.0.0.1:5432/imgpipe",
        IMGPIPE_REDIS_URL="redis://127.0.0.1:6379/2",
        IMGPIPE_STORAGE_URL="s3://bucket",
        IMGPIPE_PUBLIC_BASE_URL="https://cdn.example/img/",
    )

    assert stack.database_url == "postgresql://u:p@127.0.0.1:5432/imgpipe"
    assert stack.redis_url == "redis://127.0.0.1:6379/2"
    assert stack.storage_url == "s3://bucket"
    assert stack.public_base_url == "https://cdn.example/img/"


def test_empty_values_count_as_unset(tmp_path: Path) -> None:
    stack = plan(tmp_path, IMGPIPE_DATABASE_URL="", IMGPIPE_REDIS_URL="  ")

    assert stack.database_url is None
    assert stack.redis_url is None


def test_child_env_keeps_the_parent_env_but_not_per_child_values(tmp_path: Path) -> None:
    stack = plan(
        tmp_path,
        PATH="/usr/bin",
        IMGPIPE_API_KEYS="k1",
        IMGPIPE_GRPC_LISTEN="0.0.0.0:1",
        IMGPIPE_CONSUMER_NAME="someone",
    )
    envs = by_name(stack)

    assert envs["gateway"]["PATH"] == "/usr/bin"
    assert envs["ingest"]["IMGPIPE_API_KEYS"] == "k1"
    assert "IMGPIPE_GRPC_LISTEN" not in envs["gateway"]
    assert "IMGPIPE_CONSUMER_NAME" not in envs["status"]
    assert envs["ingest"]["IMGPIPE_GRPC_LISTEN"] == "127.0.0.1:50051"


def test_data_dir_relative_to_cwd_or_absolute(tmp_path: Path) -> None:
    assert plan(tmp_path, IMGPIPE_DATA_DIR="var/data").data_dir == tmp_path.resolve() / "var/data"
    elsewhere = tmp_path / "abs"
    stack = plan(tmp_path / "cwd", IMGPIPE_DATA_DIR=str(elsewhere))
    assert stack.data_dir == elsewhere.resolve()
    assert stack.postgres_dir == elsewhere.resolve() / "pg"


def test_ports_and_worker_count_can_move(tmp_path: Path) -> None:
    stack = plan(
        tmp_path,
        IMGPIPE_DEV_GRPC_BASE_PORT="6000",
        IMGPIPE_DEV_WORKERS="3",
        IMGPIPE_HTTP_LISTEN="0.0.0.0:9000",
    )
    envs = by_name(stack)

    assert stack.ingest_addr == "127.0.0.1:6000"
    assert stack.status_addr == "127.0.0.1:6001"
    assert [envs[f"worker-{i}"]["IMGPIPE_GRPC_LISTEN"] for i in (1, 2, 3)] == [
        "127.0.0.1:6010",
        "127.0.0.1:6011",
        "127.0.0.1:6012",
    ]
    # The gateway listens on every address; people and the probe reach it on loopback.
    assert envs["gateway"]["IMGPIPE_HTTP_LISTEN"] == "0.0.0.0:9000"
    assert stack.gateway_url == "http://127.0.0.1:9000"
    assert stack.public_base_url == "http://127.0.0.1:9000/files/"


def test_ingests_window_covers_the_slots_of_the_workers_it_starts(tmp_path: Path) -> None:
    def window(**environ: str) -> str | None:
        return by_name(plan(tmp_path, **environ))["ingest"].get("IMGPIPE_SCHEDULER_WINDOW")

    assert window() == str(2 * 64 + 64)
    assert window(IMGPIPE_DEV_WORKERS="4") == str(4 * 64 + 64)
    assert window(IMGPIPE_DEV_WORKERS="3", IMGPIPE_WORKER_CONCURRENCY="8") == str(3 * 8 + 64)
    assert window(IMGPIPE_DEV_WORKERS="4", IMGPIPE_SCHEDULER_WINDOW="50") == "50"  # as given
    others = [c for c in plan(tmp_path, IMGPIPE_DEV_WORKERS="4").children if c.name != "ingest"]
    assert all("IMGPIPE_SCHEDULER_WINDOW" not in c.env for c in others)
    # A bad concurrency is the workers' to refuse (a crash loop, tests/fault/test_launcher.py).
    assert window(IMGPIPE_WORKER_CONCURRENCY="0") == str(2 * 64 + 64)


def test_ipv6_listen_address_is_bracketed_in_urls(tmp_path: Path) -> None:
    stack = plan(tmp_path, IMGPIPE_HTTP_LISTEN="[::1]:8081")

    assert stack.gateway_url == "http://[::1]:8081"


def test_every_bad_value_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as caught:
        plan(
            tmp_path,
            IMGPIPE_DEV_WORKERS="two",
            IMGPIPE_DEV_GRPC_BASE_PORT="70000",
            IMGPIPE_HTTP_LISTEN="8080",
        )

    assert [problem.split("=")[0] for problem in caught.value.problems] == [
        "IMGPIPE_DEV_WORKERS",
        "IMGPIPE_DEV_GRPC_BASE_PORT",
        "IMGPIPE_HTTP_LISTEN",
    ]


def test_workers_must_fit_below_the_last_port(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="beyond port 65535"):
        plan(tmp_path, IMGPIPE_DEV_GRPC_BASE_PORT="65530")


def test_plan_does_not_touch_the_filesystem(tmp_path: Path) -> None:
    plan(tmp_path)

    assert list(tmp_path.iterdir()) == []
