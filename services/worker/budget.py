"""Memory budgets for a worker: what its images may hold at once, so big ones cannot blow it.

A worker keeps many tasks in flight to hide origin latency, but memory is spent in two places
that must not scale with that number:

- `ByteBudget` (asyncio): downloaded bodies until their images are compressed. A download
  reserves its Content-Length before reading the body, and more, in doubling steps, before it
  keeps bytes beyond that (a body without Content-Length, or gzip that decodes larger), so
  only a bounded amount of input sits in memory however fast or hostile the origin is.
- `PixelBudget` (threads): images being decoded and encoded. A decoded RGB pixel costs 4
  bytes, and a progressive JPEG encode keeps the whole image's coefficients (about 3 bytes
  per pixel more), so pixels in flight, not images, are what bound the peak.

Both grant any single request when nothing else holds the budget, so an item larger than the
whole budget still runs (alone), and neither can deadlock: the two are always taken in the
same order (bytes, then pixels), a pixel holder never waits for pixels again, and when every
byte holder waits for more bytes, ByteBudget lets one of them past the capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

# About nine of B5's 24-megapixel JPEGs (3.5 MB at q95), and a hundred 1200 px photos: more
# than the codec threads can use, behind an origin's latency too. At 64 MiB, B5's worker peaked
# at 397-407 MB against 356-364 here, in the same time (docs/benchmarks.md).
DEFAULT_BUFFER_BYTES = 32 * 1024 * 1024
DEFAULT_PIXEL_BUDGET = 32_000_000  # one 24 MP photo, or two 16 MP ones: about 225 MB at work

Waited = Callable[[float], None]  # told the seconds each acquisition waited (metrics)


def _ignore(_: float) -> None:
    pass


class ByteBudget:
    """Bytes held by downloads, granted in order: leases growing a body they are reading first,
    first come, first served; then new ones, those of the request (`key`) holding the fewest
    bytes first, so that a small image's download does not wait for the bodies another
    request's images hold while they queue for the codec (docs/scheduling.md). The next in
    that order waits until it fits: none is overtaken by a smaller one behind it.

    A lease may wait for more while it holds bytes (a body longer than it said, or of no stated
    length). Two such leases could each wait for the other's bytes; so when every byte held
    belongs to a waiting lease, the one holding the most, the likeliest to be near its end, is
    granted beyond the capacity. It keeps that priority until its body ends, so the bytes held
    stay under the capacity plus one body (FetchLimits.max_bytes).
    """

    def __init__(self, capacity: int, waited: Waited = _ignore) -> None:
        if capacity < 1:
            raise ValueError("a byte budget needs a capacity of at least 1")
        self.capacity = capacity
        self.used = 0
        self.waited = waited
        self._waiters: deque[_Waiter] = deque()
        self._held_by_waiters = 0
        self._held: dict[str, int] = {}  # bytes held, by key (a request); none kept at 0
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        """How many acquisitions are queued for bytes."""
        return len(self._waiters)

    def held_by(self, key: str) -> int:
        return self._held.get(key, 0)

    async def acquire(self, amount: int, holding: int = 0, key: str = "") -> None:
        """Add `amount` to the `holding` bytes the caller already holds (and keeps meanwhile),
        for `key`."""
        if not self._waiters and self._fits(amount, holding):
            self._take(amount, key)
            self.waited(0.0)
            return
        started = time.perf_counter()
        future = asyncio.get_running_loop().create_future()
        waiter = _Waiter(amount, holding, future, key, next(self._arrivals))
        if holding:  # behind the other growing leases, ahead of the new ones
            growing = sum(1 for w in self._waiters if w.holding)
            self._waiters.insert(growing, waiter)
        else:
            self._waiters.append(waiter)
        self._held_by_waiters += holding
        self._wake()  # this wait may leave every holder waiting
        try:
            await waiter.future
            self.waited(time.perf_counter() - started)
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(amount, key)  # granted just as we were cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
                self._held_by_waiters -= holding
                self._wake()  # a large waiter leaving may unblock smaller ones behind it
            raise

    def release(self, amount: int, key: str = "") -> None:
        self.used -= amount
        left = self._held.get(key, 0) - amount
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)
        self._wake()

    def _take(self, amount: int, key: str) -> None:
        self.used += amount
        self._held[key] = self._held.get(key, 0) + amount

    def _fits(self, amount: int, holding: int) -> bool:
        return self.used == holding or self.used + amount <= self.capacity

    def _next(self) -> _Waiter:
        """The first growing lease; else the new one whose key holds the fewest bytes."""
        head = self._waiters[0]
        if head.holding:
            return head
        return min(self._waiters, key=lambda w: (self._held.get(w.key, 0), w.arrival))

    def _wake(self) -> None:
        while self._waiters:
            head = self._next()
            if self._fits(head.amount, head.holding):
                self._grant(head)
            elif self.used and self._held_by_waiters == self.used:
                # Nobody will release: grow the lease holding the most, beyond the capacity.
                self._grant(max(self._waiters, key=lambda w: w.holding))
            else:
                return

    def _grant(self, waiter: _Waiter) -> None:
        self._waiters.remove(waiter)
        self._held_by_waiters -= waiter.holding
        if not waiter.future.done():  # a cancelled one is on its way out
            self._take(waiter.amount, waiter.key)
            waiter.future.set_result(None)

    @contextlib.asynccontextmanager
    async def lease(self, key: str = "") -> AsyncIterator[Lease]:
        """A holder for `key` (a request) that reserves as it learns sizes and gives
        everything back at the end."""
        lease = Lease(self, key)
        try:
            yield lease
        finally:
            lease.release()


@dataclass(eq=False, slots=True)
class _Waiter:
    amount: int  # wanted on top of what it holds
    holding: int  # held already, counted in the budget's `used`
    future: asyncio.Future[None]
    key: str
    arrival: int  # first come, first served among equals


class Lease:
    def __init__(self, budget: ByteBudget, key: str = "") -> None:
        self._budget = budget
        self.key = key
        self.held = 0
        self.waited = 0.0  # seconds spent waiting for the budget, so timings can leave it out

    async def reserve(self, amount: int) -> None:
        """Hold at least `amount` bytes (a retry of the same download reuses what it holds);
        what is held is kept while waiting for the rest."""
        if amount <= self.held:
            return
        started = time.perf_counter()
        await self._budget.acquire(amount - self.held, self.held, self.key)
        self.waited += time.perf_counter() - started
        self.held = amount

    async def settle(self, amount: int) -> None:
        """Hold exactly `amount` bytes: what a body turned out to be, once read."""
        if amount > self.held:
            await self.reserve(amount)
        elif amount < self.held:
            self._budget.release(self.held - amount, self.key)
            self.held = amount

    def release(self) -> None:
        if self.held:
            self._budget.release(self.held, self.key)
            self.held = 0


class PixelBudget:
    """Pixels being decoded and encoded at once, across the compress threads."""

    def __init__(self, capacity: int, waited: Waited = _ignore) -> None:
        if capacity < 1:
            raise ValueError("a pixel budget needs a capacity of at least 1")
        self.capacity = capacity
        self.used = 0
        self.waiting = 0  # threads waiting for pixels
        self.waited = waited
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        amount = min(pixels, self.capacity)
        started = time.perf_counter()
        with self._changed:
            self.waiting += 1
            self._changed.wait_for(lambda: self.used + amount <= self.capacity)
            self.waiting -= 1
            self.used += amount
        self.waited(time.perf_counter() - started)
        try:
            yield
        finally:
            with self._changed:
                self.used -= amount
                self._changed.notify_all()


# mallopt's parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Pillow holds an image in blocks of up to 16 MiB: those of big images (above 8 MiB) go to
# mmap and back to the OS when freed; a 1200x1200 photo's (5.5 MiB) stay on the heap for the
# next image. The heap keeps up to 8 MiB of free space at its top instead of trimming it.
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 8 << 20


def return_big_images_to_the_os() -> bool:
    """Make glibc give the blocks of big images back to the OS when they are freed, and keep
    the blocks of ordinary ones for reuse; True when it took effect.

    By default glibc raises its mmap threshold (up to 32 MiB) after freeing an mmapped block, so
    Pillow's 16 MiB blocks soon come from the heap and stay with the process: B5's worker peaked
    at 493 MB on 24-megapixel photos. A fixed threshold alone (tried first, at 1 MiB) also fixes
    glibc's trim threshold at 128 KiB, so every freed photo was handed back and faulted in again
    for the next: 2.2 ms of system time per 1200x1200 photo, 40 % of the codec's rate. These two
    thresholds keep both: B5's peak and B1's rate (docs/performance.md).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, say): nothing to tune
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
