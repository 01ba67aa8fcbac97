"""The test fixtures' servers and the embedded Postgres and Redis that `make run` uses."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.asyncio

from services.local.embedded import docker_available, start_postgres, start_redis
from testing.databases import create_database, delete_keys, drop_database, with_database
from testing.polling import wait_until
from testing.ports import free_tcp_port
from testing.processes import process_exited

pytestmark = pytest.mark.integration


async def test_database_url_is_a_database_of_its_own(
    database_url: str, postgres_server_url: str
) -> None:
    table = f"embedded_probe_{secrets.token_hex(4)}"
    test_db = await asyncpg.connect(database_url)
    server_db = await asyncpg.connect(postgres_server_url)
    try:
        name = await test_db.fetchval("SELECT current_database()")
        assert re.fullmatch(r"imgpipe_test_[0-9a-f]+", name)
        assert name != await server_db.fetchval("SELECT current_database()")

        await test_db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
        await test_db.execute(f"INSERT INTO {table} VALUES (1, 'here')")
        assert await test_db.fetchval(f"SELECT note FROM {table} WHERE id = 1") == "here"
        assert await server_db.fetchval("SELECT to_regclass($1)::text", table) is None
    finally:
        await test_db.execute(f"DROP TABLE IF EXISTS {table}")
        await test_db.close()
        await server_db.close()


async def test_new_test_database_is_empty_and_dropped_after(postgres_server_url: str) -> None:
    # database_url's own database is shared by the whole session (migrations may have run in it
    # by now), so the promise "fresh and empty" is checked on one made the same way.
    name = f"imgpipe_test_{secrets.token_hex(6)}"
    url = await create_database(postgres_server_url, name)
    try:
        connection = await asyncpg.connect(url)
        try:
            assert await connection.fetchval("SELECT current_database()") == name
            tables = await connection.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
            assert tables == []
        finally:
            await connection.close()
    finally:
        # Dropping works with a session still connected (WITH (FORCE)).
        lingering = await asyncpg.connect(url)
        await drop_database(postgres_server_url, name)
        await lingering.close()
    server = await asyncpg.connect(postgres_server_url)
    try:
        assert await server.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name) is None
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "postgresql://user:pw@127.0.0.1:5433/app?sslmode=disable",
            "postgresql://user:pw@127.0.0.1:5433/other?sslmode=disable",
        ),
        (
            "postgresql://postgres:@/postgres?host=/tmp/pg",
            "postgresql://postgres:@/other?host=/tmp/pg",
        ),
        (
            "postgresql://postgres@/postgres?host=/tmp/pg&port=5432",
            "postgresql://postgres@/other?host=/tmp/pg&port=5432",
        ),
        ("postgresql:///app?host=/tmp/pg&dbname=app", "postgresql:///other?host=/tmp/pg"),
        ("postgres://u@db.example:5432", "postgres://u@db.example:5432/other"),
    ],
)
def test_with_database_swaps_only_the_name(dsn: str, expected: str) -> None:
    assert with_database(dsn, "other") == expected


async def test_redis_stream_round_trip_under_the_prefix(
    redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    stream = f"{redis_prefix}:probe"
    await redis_client.xgroup_create(stream, "probe-group", id="0", mkstream=True)
    entry_id = await redis_client.xadd(stream, {"task": b"\x00payload"})

    reply = await redis_client.xreadgroup("probe-group", "c1", {stream: ">"}, count=1)

    assert reply == [[stream.encode(), [(entry_id, {b"task": b"\x00payload"})]]]
    assert await redis_client.xack(stream, "probe-group", entry_id) == 1


async def test_delete_keys_removes_only_the_pattern(
    redis_client: redis.asyncio.Redis, redis_server_url: str, redis_prefix: str
) -> None:
    doomed = [f"{redis_prefix}:doomed:{i}" for i in range(1200)]
    kept = f"{redis_prefix}:kept"
    await redis_client.mset(dict.fromkeys([*doomed, kept], b"x"))

    assert delete_keys(redis_server_url, f"{redis_prefix}:doomed:*") == len(doomed)

    assert await redis_client.exists(*doomed) == 0
    assert await redis_client.get(kept) == b"x"


def test_embedded_redis_keeps_data_across_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    first = start_redis(data_dir)
    try:
        with redis.Redis.from_url(first.url) as client:
            assert client.set("greeting", "hello")
    finally:
        first.stop()
    first.stop()  # idempotent
    wait_until(lambda: _gone(first.pid), timeout=10, message=f"redis pid {first.pid} to end")

    second = start_redis(data_dir)
    try:
        assert second.pid != first.pid
        with redis.Redis.from_url(second.url) as client:
            assert client.get("greeting") == b"hello"
    finally:
        second.stop()
    wait_until(lambda: _gone(second.pid), timeout=10, message=f"redis pid {second.pid} to end")
    assert (data_dir / "appendonly.aof").exists()


def test_embedded_redis_refuses_a_second_server_on_one_folder(tmp_path: Path) -> None:
    server = start_redis(tmp_path, appendonly=False)
    try:
        with pytest.raises(RuntimeError, match="still running"):
            start_redis(tmp_path, appendonly=False)
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
    finally:
        server.stop()


def test_embedded_redis_start_failure_shows_the_log(tmp_path: Path) -> None:
    (tmp_path / "appendonly.aof").write_bytes(b"this is not an append-only file\n")

    with pytest.raises(RuntimeError, match=r"exited with code \d+(.|\n)*append only file"):
        start_redis(tmp_path)


def test_embedded_redis_socket_moves_out_of_a_deep_folder(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 5)
    server = start_redis(deep, appendonly=False)
    try:
        socket_path = Path(server.url.removeprefix("unix://"))
        assert not socket_path.is_relative_to(deep)
        assert len(str(socket_path)) < 100
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
    finally:
        server.stop()
    assert not socket_path.parent.exists()


async def test_embedded_postgres_keeps_data_across_restart() -> None:
    # Not tmp_path: see postgres_server_url in conftest.py.
    with tempfile.TemporaryDirectory(prefix="imgpipe-test-pg-") as folder:
        await _restart_postgres_and_find_data(Path(folder) / "pg")


async def _restart_postgres_and_find_data(data_dir: Path) -> None:
    first = start_postgres(data_dir)
    try:
        connection = await asyncpg.connect(first.url)
        await connection.execute("CREATE TABLE kept (note text); INSERT INTO kept VALUES ('hi')")
        await connection.close()
    finally:
        first.stop()
    first.stop()  # idempotent
    assert not (data_dir / "postmaster.pid").exists()
    wait_until(lambda: process_exited(first.pid), timeout=10, message="postgres to end")

    second = start_postgres(data_dir)
    try:
        connection = await asyncpg.connect(second.url)
        assert await connection.fetchval("SELECT note FROM kept") == "hi"
        await connection.close()
    finally:
        second.stop()


def test_docker_available_answers_false_without_an_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_tcp_port()}")
    assert docker_available() is False
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/imgpipe-test/docker.sock")
    assert docker_available() is False


def _gone(pid: int) -> bool:
    # Redis is our child and stop() reaps it, so the pid must be gone entirely, not a zombie.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
