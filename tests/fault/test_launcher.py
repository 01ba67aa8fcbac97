"""The launcher of `make run` (services.local) under hard faults (issue 15), with real processes:
a killed worker is restarted and its request completes; a killed launcher leaves no process
behind; after a power loss (every process SIGKILLed) the stack starts on the first try and the
request completes; a second launcher on a folder in use is refused; a crash loop stops it all.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from testing.origin import ImageOrigin, image_urls, serve_images
from testing.polling import wait_until, wait_until_async
from testing.ports import free_port_block
from testing.processes import descendants, process_exited
from testing.stack import ROOT, Stack, launch_stack, start_stack
from testing.uploads import csv_for
from tests.e2e.test_pipeline import upload_csv, wait_completed
from tests.fault.harness import TUNING

pytestmark = pytest.mark.timeout(240)

# Issue 15's "Done when": a 300-image request survives a killed worker, and a power loss.
IMAGES = 300


@pytest.fixture
def folder() -> Iterator[Path]:
    # Not tmp_path: as root, Postgres runs as the "pgserver" user, and a pytest session that
    # starts meanwhile makes /tmp/pytest-of-root private again (see tests/fault/conftest.py).
    path = Path(tempfile.mkdtemp(prefix="imgpipe-launcher-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def slow_origin() -> AsyncIterator[ImageOrigin]:
    # Small images, but a latency that spreads a request over a few seconds, so that a fault
    # lands in the middle of it.
    async with serve_images((160, 120), delay=0.25) as images:
        yield images


def stack_env(origin: ImageOrigin) -> dict[str, str]:
    """Fixed ports and Redis prefix, so that a stack started again is the same stack."""
    grpc_base = free_port_block((0, 1, 10, 11))
    return {
        **TUNING,
        "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}",
        "IMGPIPE_HTTP_LISTEN": f"127.0.0.1:{free_port_block((0,))}",
        "IMGPIPE_DEV_GRPC_BASE_PORT": str(grpc_base),
        "IMGPIPE_REDIS_PREFIX": f"imgpipe-launcher-{os.getpid()}-{grpc_base}",
    }


def child_pid(stack: Stack, name: str) -> int:
    """The pid the launcher last (re)started `name` with, from its log."""
    found = re.findall(rf"started {name} \(pid (\d+)\)", stack.log.read_text(errors="replace"))
    assert found, f"no {name} in the log:\n{stack.log_tail()}"
    return int(found[-1])


async def submit(http: aiohttp.ClientSession, stack: Stack, urls: list[str]) -> str:
    async with await upload_csv(http, stack.base_url, csv_for(urls)) as response:
        assert response.status == 202, await response.text()
        body: dict[str, Any] = await response.json()
    return str(body["request_id"])


async def wait_some_done(http: aiohttp.ClientSession, stack: Stack, request_id: str) -> int:
    """Wait until a few images are done, and fail if all are: the fault would come too late."""

    async def done() -> int | None:
        async with http.get(f"{stack.base_url}/status/{request_id}") as response:
            progress = (await response.json())["progress"]
        finished = int(progress["images_done"]) + int(progress["images_failed"])
        return finished if finished >= 10 else None

    finished = await wait_until_async(done, timeout=60, interval=0.05, message="10 images done")
    assert finished < IMAGES, "the request finished before the fault"
    return finished


def wait_all_exited(pids: list[int], within: float) -> None:
    def survivors() -> list[str]:
        return [f"{pid} {_cmdline(pid)}" for pid in pids if not process_exited(pid)]

    wait_until(lambda: not survivors(), timeout=within, interval=0.02, message="every child gone")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
    except OSError:
        return "?"


async def test_a_killed_worker_is_restarted_and_its_request_completes(
    folder: Path, slow_origin: ImageOrigin
) -> None:
    stack = await asyncio.to_thread(start_stack, folder, stack_env(slow_origin))
    try:
        urls = image_urls(slow_origin, IMAGES, "restart")
        async with aiohttp.ClientSession() as http:
            request_id = await submit(http, stack, urls)
            await wait_some_done(http, stack, request_id)
            victim = child_pid(stack, "worker-1")
            os.kill(victim, signal.SIGKILL)

            async def restarted() -> bool:
                return child_pid(stack, "worker-1") != victim

            await wait_until_async(restarted, timeout=60, message="worker-1 restarted")
            status = await wait_completed(http, stack.base_url, request_id)

        assert status["status"] == "Completed"
        assert status["progress"]["images_done"] == IMAGES
        log = stack.log.read_text(errors="replace")
        assert f"worker-1 (pid {victim}) was killed by signal 9 after" in log
        assert "restarting it in 1 s" in log
        assert stack.process.poll() is None, "the launcher stopped"
    finally:
        assert await asyncio.to_thread(stack.stop) == 0


async def test_after_a_power_loss_the_stack_starts_first_try_and_the_request_completes(
    folder: Path, slow_origin: ImageOrigin
) -> None:
    env = stack_env(slow_origin)
    stack = await asyncio.to_thread(start_stack, folder, env)
    urls = image_urls(slow_origin, IMAGES, "power")
    async with aiohttp.ClientSession() as http:
        request_id = await submit(http, stack, urls)
        await wait_some_done(http, stack, request_id)

        # Stopped first, so that nobody cleans up (not even on a parent-death signal).
        everyone = [stack.process.pid, *descendants(stack.process.pid)]
        for pid in everyone:
            os.kill(pid, signal.SIGSTOP)
        for pid in everyone:
            os.kill(pid, signal.SIGKILL)
        stack.process.wait()
        await asyncio.to_thread(wait_all_exited, everyone, 10.0)
        # As after a reboot, the pids in the files left behind now belong to someone else.
        for pid_file in (stack.data_dir / "pg/postmaster.pid", stack.data_dir / "redis/redis.pid"):
            lines = pid_file.read_text().splitlines()
            pid_file.write_text("\n".join([str(os.getpid()), *lines[1:]]) + "\n")

        again = await asyncio.to_thread(start_stack, folder, env, "stack-2.log")
        try:
            status = await wait_completed(http, again.base_url, request_id)
        finally:
            assert await asyncio.to_thread(again.stop) == 0

    assert status["status"] == "Completed"
    assert status["progress"]["images_done"] == IMAGES
    assert "removing" in again.log.read_text(errors="replace")  # the stale files were seen


def test_a_second_launcher_is_refused_and_a_killed_launcher_leaves_no_process(
    folder: Path,
) -> None:
    """Two scenarios on one stack (starting one, with its embedded servers, takes seconds): a
    second launcher on its folder is refused while it runs; then it is killed, and every
    process it started goes with it."""
    stack = start_stack(folder, {})
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
        second = subprocess.run(
            [sys.executable, "-m", "services.local"],
            cwd=ROOT,
            env={**env, "IMGPIPE_DATA_DIR": str(stack.data_dir)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert second.stdout == ""
        assert second.stderr.splitlines() == [
            f"imgpipe dev: the data folder {stack.data_dir} is in use by another launcher"
            f" (pid {stack.process.pid}): stop it, or set IMGPIPE_DATA_DIR to another folder"
        ]
        assert stack.process.poll() is None

        children = descendants(stack.process.pid)
        # A postmaster that daemonised would not be among them: found through its pid file too.
        postmaster = int((stack.data_dir / "pg/postmaster.pid").read_text().split()[0])
        children += [pid for pid in (postmaster, *descendants(postmaster)) if pid not in children]
        titles = [_cmdline(pid) for pid in children]
        # Five services, Redis, the postmaster and its backends (which are not our children).
        assert sum("redis-server" in title for title in titles) == 1, titles
        assert sum(title.startswith("postgres: ") for title in titles) >= 3, titles
        assert len(children) >= 10, titles

        stack.process.kill()
        stack.process.wait()
    finally:
        stack.stop()  # a no-op once the launcher is gone; SIGTERM if an assertion came first

    wait_all_exited(children, within=2.0)


def test_a_crash_loop_stops_everything_with_one_message(folder: Path) -> None:
    # Workers refuse this setting at start, every time.
    stack = launch_stack(folder, {"IMGPIPE_WORKER_CONCURRENCY": "0"})
    try:
        code = stack.process.wait(timeout=180)
    finally:
        stack.stop()
    log = stack.log.read_text(errors="replace")

    assert code == 1, log
    loops = re.findall(
        r"imgpipe dev: (worker-\d) \(pid \d+\) exited with code \d+; it failed 5"
        r" times in a row, each within 10 s of its start \(a crash loop\): stopping"
        r" everything",
        log,
    )
    assert len(loops) == 1, log
    assert "stopping embedded Postgres" in log
    assert "Traceback" not in log
