"""Turns at the compress threads, by request (docs/scheduling.md, "Turns at the codec and the
download buffer").

The feeder shares the workers' slots between owners, and between an owner's requests, by the
time their tasks hold them. Inside a worker the tasks in those slots then queue for a few
compress threads, and first come, first served there undoes the shares when images cost
different amounts: a request of small images (a few ms of codec each) waited behind every
24-megapixel photo (about 0.4 s) queued ahead of it (B16).

So a call waits for its turn: the next to run is the waiting call whose request has used the
least thread time in this worker. A request that arrives starts level with the least-served
of those active, with no credit for the time it was away, as FairShare does for slots. A
request with nothing waiting or running is forgotten, so the state is bounded by the slots.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


class CodecTurns:
    """Runs blocking calls on `executor`, at most `threads` at once, in turns by key."""

    def __init__(
        self,
        executor: Executor,
        threads: int,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if threads < 1:
            raise ValueError("turns need at least one thread")
        self.executor = executor
        self.threads = threads
        self.clock = clock
        self.running = 0  # calls holding a thread (or handed one and about to start)
        self._used: dict[str, float] = {}  # thread seconds, of keys with calls here
        self._calls: dict[str, int] = {}  # calls waiting or running, by key
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._order = 0  # ties go to the key whose first waiter came first
        self._since: dict[str, int] = {}

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @property
    def keys(self) -> int:
        """Keys with calls waiting or running: all the state kept."""
        return len(self._calls)

    async def run(self, key: str, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a thread, once it is `key`'s turn."""
        self._join(key)
        try:
            await self._turn(key)
            started = self.clock()
            try:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self.executor, fn, *args)
            finally:
                self._used[key] += self.clock() - started
                self.running -= 1
                self._hand_on()
        finally:
            self._leave(key)

    async def _turn(self, key: str) -> None:
        if self.running < self.threads and not self._waiting:
            self.running += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(key, deque())
        if not queue:
            self._order += 1
            self._since[key] = self._order
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed a thread as it was cancelled
                self.running -= 1
                self._hand_on()
            else:
                self._drop(key, turn)
            raise

    def _hand_on(self) -> None:
        """Give free threads to the waiting calls of the least-served keys."""
        while self.running < self.threads and self._waiting:
            key = min(self._waiting, key=lambda k: (self._used[k], self._since[k]))
            turn = self._waiting[key].popleft()
            if not self._waiting[key]:
                del self._waiting[key]
            self.running += 1
            turn.set_result(None)

    def _drop(self, key: str, turn: asyncio.Future[None]) -> None:
        queue = self._waiting.get(key)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self._waiting[key]

    def _join(self, key: str) -> None:
        if key not in self._calls:
            # Level with the least-served key here now: no credit for time away.
            self._used[key] = min(self._used.values(), default=0.0)
            self._calls[key] = 0
        self._calls[key] += 1

    def _leave(self, key: str) -> None:
        self._calls[key] -= 1
        if not self._calls[key]:
            del self._calls[key], self._used[key]
            self._since.pop(key, None)
