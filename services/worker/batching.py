"""Calls to Postgres and Redis gathered into batches: one round trip for many images.

A worker's tasks each end with the same few calls (is the image still Pending, record it Done,
acknowledge its entry, tell the watchers). One at a time they cost more than the image's
encode at `effort=fast` (docs/performance.md, "Where a worker's time goes"). A `Batcher`
gathers the calls that arrive within `linger` seconds of the first (or until `max_size`), runs
them as one `run(items)` and hands each caller its own result. Calls that arrive while a batch
runs wait for the next one, so a slow backend makes batches larger, not queues longer.

With `linger=0` a batch is what arrives before the event loop's next turn: the tasks a
recorded batch wakes all acknowledge together, at no added latency.

A batcher given `Expected` lingers only while a call may still come: each task that will call
it holds a `Ticket` until it calls (or knows it will not), and when no ticket is out the batch
runs at once. A lone image is recorded without waiting; a busy worker's are gathered.

A `KeyedBatcher` keeps a Batcher per key (the worker's records: per request). A key's
batches run one at a time, different keys' side by side, so a batch that waits for its key's
rows (a retry holds its request's row for seconds) holds up that key's calls only. The keys
still start together, as their calls did in one batch: when one key's batch starts (full, or
its linger over), or all keys' waiting calls together fill a batch, every key's waiting
calls start too. A small request's record does not linger beside a big one's full batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        linger: float = 0.0,
        max_size: int = 64,
        expected: Expected | None = None,
        observe: Callable[[int], None] | None = None,
        group: _Group | None = None,
    ) -> None:
        """`run` takes a batch and returns one result per item, in order; what it raises is
        raised to every caller of that batch. `expected`: the calls that may still come (a
        batch stops lingering when there are none). `observe` is called with each batch's
        size. `group`: the KeyedBatcher's batchers, which start together."""
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, not {max_size}")
        self._run = run
        self.linger = linger
        self.max_size = max_size
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._oldest = 0.0  # when the oldest waiting call arrived (monotonic)
        self._check = asyncio.Event()  # set: see whether the batch should stop lingering
        self._drainer: asyncio.Task[None] | None = None
        self._expected = expected
        self._observe = observe
        self._group = group
        self._flush = False  # another batcher of the group started: start now too
        if expected is not None:
            expected.batchers.add(self)
        if group is not None:
            group.batchers.add(self)

    def close(self) -> None:
        """No longer poked by its `expected` nor its group (a KeyedBatcher dropping an idle
        key's batcher)."""
        if self._expected is not None:
            self._expected.batchers.discard(self)
        if self._group is not None:
            self._group.batchers.discard(self)

    def flush(self) -> None:
        """Start the waiting calls' batch now, whatever its linger."""
        self._flush = True
        self._check.set()

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        if not self._waiting:
            self._oldest = time.monotonic()
        self._waiting.append((item, future))
        if self._group is not None:
            self._group.added(1)
        self.poke()
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        # A caller cancelled while it waits cancels only its own future: it leaves the batch
        # (or, when the batch already runs, its result is dropped).
        return await future

    @property
    def waiting(self) -> int:
        """Calls waiting for a batch to start (not those of a batch running now)."""
        return len(self._waiting)

    def poke(self) -> None:
        """End the linger now if the batch is full or no call is expected any more."""
        if self._ready():
            self._check.set()

    def _ready(self) -> bool:
        return (
            self._flush
            or len(self._waiting) >= self.max_size
            or (self._expected is not None and self._expected.count == 0)
        )

    async def _drain(self) -> None:
        try:
            while self._waiting:
                await self._gather()
                flushed, self._flush = self._flush, False
                batch = self._waiting[: self.max_size]
                del self._waiting[: self.max_size]
                if self._waiting:
                    self._oldest = time.monotonic()
                if self._group is not None:
                    self._group.added(-len(batch))
                    if not flushed:  # it starts on its own: the others' calls go with it
                        self._group.start_all()
                live = [(item, future) for item, future in batch if not future.done()]
                if live:
                    await self._run_batch(live)
        finally:
            self._drainer = None
            for _, future in self._waiting:  # only when the drainer itself was cancelled
                future.cancel()
            if self._group is not None:
                self._group.added(-len(self._waiting))
            self._waiting.clear()

    async def _gather(self) -> None:
        """Wait until the oldest call has lingered long enough, the batch is full, or no
        other call is expected."""
        await asyncio.sleep(0)  # at least the calls of this turn of the loop join
        while not self._ready():
            remaining = self._oldest + self.linger - time.monotonic()
            if remaining <= 0:
                return
            self._check.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._check.wait()

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        if self._observe is not None:
            self._observe(len(batch))
        try:
            results = await self._run([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            self._fail(batch, exc)
            return
        if len(results) != len(batch):
            self._fail(batch, RuntimeError(f"{len(results)} results for {len(batch)} calls"))
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[tuple[T, asyncio.Future[R]]], exc: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)


class KeyedBatcher(Generic[K, T, R]):
    """A Batcher per key, made at the key's first call and dropped when none of its calls is
    left, so there are never more batchers than calls in flight. `run(key, items)` runs one
    key's batch; the other options are each Batcher's."""

    def __init__(
        self,
        run: Callable[[K, Sequence[T]], Awaitable[Sequence[R]]],
        *,
        linger: float = 0.0,
        max_size: int = 64,
        expected: Expected | None = None,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self._group = _Group(max_size)
        self._options: dict[str, Any] = {
            "linger": linger,
            "max_size": max_size,
            "expected": expected,
            "observe": observe,
            "group": self._group,
        }
        self._batchers: dict[K, tuple[Batcher[T, R], int]] = {}  # with its calls in flight

    async def __call__(self, key: K, item: T) -> R:
        batcher, calls = self._batchers.get(key) or (self._batcher(key), 0)
        self._batchers[key] = batcher, calls + 1
        try:
            return await batcher(item)
        finally:
            batcher, calls = self._batchers[key]
            if calls > 1:
                self._batchers[key] = batcher, calls - 1
            else:
                del self._batchers[key]
                batcher.close()

    def _batcher(self, key: K) -> Batcher[T, R]:
        async def run(items: Sequence[T]) -> Sequence[R]:
            return await self._run(key, items)

        return Batcher(run, **self._options)

    @property
    def keys(self) -> int:
        """Keys with a call in flight: each has a batcher."""
        return len(self._batchers)


class _Group:
    """A KeyedBatcher's batchers, which start together, and their calls waiting to start."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.waiting = 0
        self.batchers: set[Batcher[Any, Any]] = set()

    def added(self, count: int) -> None:
        self.waiting += count
        if count > 0 and self.waiting >= self.max_size:  # together, a full batch
            self.start_all()

    def start_all(self) -> None:
        for batcher in self.batchers:
            if batcher.waiting:
                batcher.flush()


class Expected:
    """The calls a lingering Batcher may still get: one `Ticket` per caller-to-be."""

    def __init__(self) -> None:
        self.count = 0
        self.batchers: set[Batcher[Any, Any]] = set()

    def ticket(self, on_done: Callable[[], None] | None = None) -> Ticket:
        self.count += 1
        return Ticket(self, on_done)


class Ticket:
    """A call that may still come. `done()` (once is enough; more calls do nothing) when it
    is made, or will not be; `on_done` runs then too."""

    __slots__ = ("_expected", "_on_done")

    def __init__(self, expected: Expected, on_done: Callable[[], None] | None) -> None:
        self._expected: Expected | None = expected
        self._on_done = on_done

    def done(self) -> None:
        expected, self._expected = self._expected, None
        if expected is None:
            return
        expected.count -= 1
        for batcher in expected.batchers:
            batcher.poke()
        if self._on_done is not None:
            self._on_done()
