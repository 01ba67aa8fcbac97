"""The launcher's restart policy (services.local.supervise): backoff, its reset, the crash loop."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.local.supervise import CrashLoop, Restarts, Supervisor
from testing.polling import wait_until

pytestmark = pytest.mark.unit


def test_fast_exits_back_off_doubling_then_count_as_a_crash_loop() -> None:
    restarts = Restarts()

    delays = [restarts.after_exit(ran_for=0.5) for _ in range(4)]

    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert restarts.after_exit(ran_for=0.5) is None  # the fifth fast exit in a row


def test_slow_exits_never_give_up_and_the_delay_stops_at_30_seconds() -> None:
    restarts = Restarts()

    delays = [restarts.after_exit(ran_for=20.0) for _ in range(8)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_run_that_lasted_resets_the_delay_and_the_crash_count() -> None:
    restarts = Restarts()
    for _ in range(4):
        restarts.after_exit(ran_for=0.5)

    assert restarts.after_exit(ran_for=120.0) == 1.0
    assert [restarts.after_exit(ran_for=0.5) for _ in range(4)] == [2.0, 4.0, 8.0, 16.0]
    assert restarts.after_exit(ran_for=0.5) is None


def test_an_exit_after_a_while_breaks_a_series_of_fast_exits() -> None:
    restarts = Restarts()
    for _ in range(4):
        restarts.after_exit(ran_for=0.5)

    assert restarts.after_exit(ran_for=15.0) is not None
    assert all(restarts.after_exit(ran_for=0.5) is not None for _ in range(4))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exits_with(code: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])


def wait_exit(process: subprocess.Popen[bytes]) -> None:
    wait_until(lambda: process.poll() is not None, timeout=30, message="the child to exit")


def test_supervisor_restarts_an_exited_child_after_its_delay() -> None:
    clock = Clock()
    supervisor = Supervisor(clock)
    child = supervisor.start("job", lambda: exits_with(3))
    first = child.process
    assert first is not None
    wait_exit(first)

    clock.now += 30.0  # it ran long enough not to count as a fast crash
    supervisor.check()
    assert child.last_exit == f"job (pid {first.pid}) exited with code 3"
    assert child.process is first  # waiting out the 1 s delay

    clock.now += 1.0
    supervisor.check()
    assert child.process is not first
    assert child.process is not None
    child.process.wait(timeout=30)


def test_supervisor_gives_up_on_a_crash_loop_naming_the_child_and_its_exit() -> None:
    clock = Clock()
    supervisor = Supervisor(clock)
    child = supervisor.start("job", lambda: exits_with(2))

    def crash_until_it_gives_up() -> None:
        for _ in range(10):
            assert child.process is not None
            wait_exit(child.process)
            supervisor.check()  # notices the exit: no time has passed since the start
            clock.now += 60.0  # past any delay
            supervisor.check()  # restarts it

    with pytest.raises(CrashLoop, match=r"job \(pid \d+\) exited with code 2; .* 5 times in a row"):
        crash_until_it_gives_up()
