"""How `make run` keeps its children running, as a kubelet keeps a pod's containers running.

A child that exits is started again after a delay: 1 s, doubled at each exit up to 30 s, and
back to 1 s once a run has lasted HEALTHY_RUN seconds. A child that exits within FAST_CRASH
seconds of its start CRASH_LOOP times in a row is in a crash loop: restarting it again would
only hide the error, so the launcher stops everything and says which child and why.

`Restarts` is that policy alone, with no clock and no processes. `Supervisor` applies it to
real processes; the launcher (services/local/launcher.py) calls `check()` from its main loop.
"""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

FIRST_DELAY = 1.0
MAX_DELAY = 30.0
HEALTHY_RUN = 60.0  # a run this long resets the delay to FIRST_DELAY
FAST_CRASH = 10.0  # an exit this soon after the start counts towards a crash loop
CRASH_LOOP = 5  # this many fast exits in a row: give up


@dataclass
class Restarts:
    """The restart bookkeeping of one child: the next delay, and the fast exits in a row."""

    first_delay: float = FIRST_DELAY
    max_delay: float = MAX_DELAY
    healthy_run: float = HEALTHY_RUN
    fast_crash: float = FAST_CRASH
    crash_loop: int = CRASH_LOOP
    delay: float = 0.0  # the last delay given; 0 before the first exit
    fast_exits: int = 0

    def after_exit(self, ran_for: float) -> float | None:
        """The delay before starting the child again after a run of `ran_for` seconds, or
        None when this exit completes a crash loop."""
        self.fast_exits = self.fast_exits + 1 if ran_for < self.fast_crash else 0
        if self.fast_exits >= self.crash_loop:
            return None
        if ran_for >= self.healthy_run or self.delay == 0.0:
            self.delay = self.first_delay
        else:
            self.delay = min(self.delay * 2, self.max_delay)
        return self.delay


@dataclass
class Child:
    """One supervised process: `spawn` starts it (again) and returns the new process."""

    name: str
    spawn: Callable[[], subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None  # set while waiting out a delay
    restarts: Restarts = field(default_factory=Restarts)
    last_exit: str = ""

    def describe_exit(self) -> str:
        assert self.process is not None
        code = self.process.returncode
        if code is not None and code < 0:
            return f"{self.name} (pid {self.process.pid}) was killed by signal {-code}"
        return f"{self.name} (pid {self.process.pid}) exited with code {code}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class CrashLoop(Exception):
    """A child exited too often too soon; the message says which and how."""


class Supervisor:
    """Starts children, restarts them per `Restarts`, and raises CrashLoop when one loops."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.children: list[Child] = []
        self._clock = clock

    def start(self, name: str, spawn: Callable[[], subprocess.Popen[bytes]]) -> Child:
        """Start a child now; OSError (and whatever `spawn` raises) reaches the caller."""
        child = Child(name, spawn)
        self._spawn(child)
        self.children.append(child)
        return child

    def adopt(
        self,
        name: str,
        process: subprocess.Popen[bytes],
        spawn: Callable[[], subprocess.Popen[bytes]],
    ) -> Child:
        """Supervise a process started elsewhere (an embedded server), restarted by `spawn`."""
        child = Child(name, spawn, process, self._clock())
        self.children.append(child)
        return child

    def check(self) -> None:
        """Notice exits, start children whose delay is over; raises CrashLoop."""
        now = self._clock()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child)
            elif child.process is not None and child.process.poll() is not None:
                child.last_exit = child.describe_exit()
                self._schedule(child, now - child.started, child.last_exit)

    def _schedule(self, child: Child, ran_for: float, what: str) -> None:
        delay = child.restarts.after_exit(ran_for)
        if delay is None:
            raise CrashLoop(
                f"{what}; it failed {child.restarts.crash_loop} times in a row, each within"
                f" {child.restarts.fast_crash:g} s of its start (a crash loop): stopping"
                " everything. Its last log lines above say why."
            )
        say(f"{what} after {ran_for:.1f} s; restarting it in {delay:g} s")
        child.restart_at = self._clock() + delay

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        try:
            self._spawn(child)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            child.last_exit = f"{child.name} could not be started: {exc}"
            self._schedule(child, 0.0, child.last_exit)
            return
        assert child.process is not None
        say(f"restarted {child.name} (pid {child.process.pid})")

    def _spawn(self, child: Child) -> None:
        child.process = child.spawn()
        child.started = self._clock()


class Signals:
    """Records SIGINT/SIGTERM and wakes a waiting select() through a self-pipe."""

    def __init__(self) -> None:
        self.received = 0
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous = {
            signum: signal.signal(signum, self._handle)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        if self.received > 1:
            say("second signal: stopping without waiting for the grace period")

    def wait(self, timeout: float) -> None:
        """Return after `timeout` seconds, or at once when a signal arrives."""
        readable, _, _ = select.select([self._reader], [], [], max(timeout, 0.0))
        if readable:
            try:
                while self._reader.recv(256):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()


def stop_stage(children: list[Child], signals: Signals, grace: float) -> None:
    """SIGTERM every running child of one stage, wait up to `grace` seconds (less after a
    second Ctrl-C), SIGKILL what is left; pending restarts are dropped."""
    alive = [child for child in children if child.running()]
    for child in children:
        child.restart_at = None
    for child in alive:
        assert child.process is not None
        say(f"stopping {child.name} (pid {child.process.pid})")
        child.process.terminate()
    deadline = time.monotonic() + grace
    while any(child.running() for child in alive):
        if time.monotonic() >= deadline or signals.received > 1:
            break
        signals.wait(0.1)
    for child in alive:
        assert child.process is not None
        if child.process.poll() is None:
            say(f"{child.name} (pid {child.process.pid}) did not stop: SIGKILL")
            child.process.kill()
        child.process.wait()
        if child.process.returncode != 0:
            say(child.describe_exit())


def say(message: str) -> None:
    # stderr: stdout carries the children's JSON log lines, which people pipe into jq.
    print(f"imgpipe dev: {message}", file=sys.stderr, flush=True)
