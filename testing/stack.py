"""The whole stack as real processes, started through `python -m services.local` (`make run`).

Used by the end-to-end tests and by the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
import redis

from testing.databases import delete_keys
from testing.polling import wait_until
from testing.ports import free_port_block
from testing.processes import process_exited

ROOT = Path(__file__).resolve().parents[1]


def free_grpc_base(workers: int) -> int:
    """A base port whose ingest, status and worker ports (base, +1, +10, +11...) are free."""
    return free_port_block((0, 1, *range(10, 10 + workers)))


@dataclass
class Stack:
    base_url: str
    process: subprocess.Popen[bytes]
    log: Path
    data_dir: Path
    # (Redis URL, key pattern): the keys of a prefix launch_stack made up on a server given by
    # URL, deleted once the stack has stopped. An embedded Redis goes with the stack; a prefix
    # the caller chose is the caller's (a test may start a stack on it again).
    own_keys: tuple[str, str] | None = None

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop_and_reap(self) -> int:
        """stop(), then wait until the launcher's pid is gone (for module-scoped stacks);
        returns the launcher's exit code."""
        code = self.stop()
        wait_until(
            functools.partial(process_exited, self.process.pid),
            timeout=10,
            message="launcher gone",
        )
        return code

    def stop(self) -> int:
        """SIGTERM the launcher, which drains and stops every service; returns its exit code.
        Then the keys of its own Redis prefix go (`own_keys`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            raise AssertionError(f"the stack did not stop in time:\n{self.log_tail()}") from None
        if self.own_keys is not None:
            url, pattern = self.own_keys
            self.own_keys = None  # once, however often stop() is called
            # A test that stopped the server itself leaves nothing to delete.
            with contextlib.suppress(redis.RedisError, OSError):
                delete_keys(url, pattern)
        return code


def stack_command(extra_env: dict[str, str]) -> list[str]:
    """`python -m services.local`, or with IMGPIPE_TEST_IMAGE=IMAGE (`make image-test`) the same
    stack from that container image (scripts/image_stack.py), which needs servers by URL."""
    image = os.environ.get("IMGPIPE_TEST_IMAGE")
    if not image:
        return [sys.executable, "-m", "services.local"]
    if not (extra_env.get("IMGPIPE_DATABASE_URL") and extra_env.get("IMGPIPE_REDIS_URL")):
        pytest.skip("the stack from the image needs Postgres and Redis by URL, not embedded")
    return [sys.executable, str(ROOT / "scripts" / "image_stack.py"), image]


def start_stack(tmp_path: Path, extra_env: dict[str, str], log_name: str = "stack.log") -> Stack:
    """launch_stack(), then wait until it says it is ready (stopping it if it does not)."""
    stack = launch_stack(tmp_path, extra_env, log_name)

    def ready() -> bool:
        if stack.process.poll() is not None:
            raise AssertionError(
                f"the stack exited with {stack.process.returncode}:\n{stack.log_tail()}"
            )
        return "imgpipe is ready" in stack.log.read_text(errors="replace")

    try:
        wait_until(ready, timeout=90, interval=0.2, message="the stack to be ready")
    except BaseException:
        stack.stop()
        raise
    return stack


def launch_stack(tmp_path: Path, extra_env: dict[str, str], log_name: str = "stack.log") -> Stack:
    """`python -m services.local` on the data folder tmp_path/data, its output in
    tmp_path/log_name; free ports and a Redis prefix of its own unless extra_env sets them."""
    command = stack_command(extra_env)
    port = free_port_block((0,))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")},
        "IMGPIPE_DATA_DIR": str(tmp_path / "data"),
        "IMGPIPE_HTTP_LISTEN": f"127.0.0.1:{port}",
        "IMGPIPE_DEV_GRPC_BASE_PORT": str(
            free_grpc_base(int(extra_env.get("IMGPIPE_DEV_WORKERS", "2")))
        ),
        "IMGPIPE_REDIS_PREFIX": f"imgpipe-e2e-{secrets.token_hex(4)}",
        "IMGPIPE_GRACE_SECONDS": "10",
        **extra_env,
    }
    log = tmp_path / log_name
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a stuck stack can be killed as one process group
        )
    own_keys = None
    if "IMGPIPE_REDIS_PREFIX" not in extra_env and env.get("IMGPIPE_REDIS_URL"):
        own_keys = (env["IMGPIPE_REDIS_URL"], f"{env['IMGPIPE_REDIS_PREFIX']}:*")
    return Stack(f"http://{env['IMGPIPE_HTTP_LISTEN']}", process, log, tmp_path / "data", own_keys)


async def run_cli(base_url: str, *argv: str, key: str | None) -> tuple[int, str]:
    """`python -m imgpipe ARGV` with IMGPIPE_URL and IMGPIPE_API_KEY (when given): its exit
    code and its output (stdout and stderr together)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
    env["IMGPIPE_URL"] = base_url
    if key is not None:
        env["IMGPIPE_API_KEY"] = key
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imgpipe",
        *argv,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return process.returncode, out.decode()


def public_address() -> dict[str, str]:
    """A free gateway address, as IMGPIPE_HTTP_LISTEN and as IMGPIPE_PUBLIC_API_URL: for a
    stack whose outgoing URLs (webhook payloads, links) must name where it listens."""
    listen = f"127.0.0.1:{free_port_block((0,))}"
    return {"IMGPIPE_HTTP_LISTEN": listen, "IMGPIPE_PUBLIC_API_URL": f"http://{listen}"}


class StartStack(Protocol):
    """live_stack() with the database, Redis and list of stacks already given (the e2e
    fixture start_live_stack)."""

    def __call__(self, *origins: int, **extra: str) -> Stack: ...


def live_stack(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    stacks: list[Stack],
    *origins: int,
    **extra: str,
) -> Stack:
    """start_stack() on the given Postgres and Redis, allowed to fetch from `origins` (ports on
    127.0.0.1), with `extra` variables; added to `stacks` (stack_factory) to be stopped."""
    env = {"IMGPIPE_DATABASE_URL": database_url, "IMGPIPE_REDIS_URL": redis_server_url}
    if origins:
        env["IMGPIPE_FETCH_ALLOW"] = ",".join(f"127.0.0.1:{port}" for port in origins)
    stack = start_stack(tmp_path, env | extra)
    stacks.append(stack)
    return stack


@contextlib.contextmanager
def stack_running(
    tmp_path: Path, database_url: str, redis_server_url: str, *origins: int, **extra: str
) -> Iterator[Stack]:
    """live_stack() for a with-block, such as a fixture that outlives one test: stopped and
    reaped when the block ends, and then it must have exited with 0."""
    stack = live_stack(tmp_path, database_url, redis_server_url, [], *origins, **extra)
    try:
        yield stack
    finally:
        code = stack.stop_and_reap()
    assert code == 0, f"the stack exited with {code}:\n{stack.log_tail()}"
