"""Memory budgets for a worker: what its images may hold at once, so big ones cannot blow it.

A worker keeps many tasks in flight to hide origin latency, but memory is spent in two places
that must not scale with that number:

- `ByteBudget` (asyncio): downloaded bodies waiting for a compress thread. A download reserves
  its Content-Length before reading the body, so only a bounded amount of input sits in
  memory however fast the origin is.
- `PixelBudget` (threads): images being decoded and encoded. A decoded RGB pixel costs 4
  bytes, and a progressive JPEG encode keeps the whole image's coefficients (about 3 bytes
  per pixel more), so pixels in flight, not images, are what bound the peak.

Both grant any single request when nothing else holds the budget, so an item larger than the
whole budget still runs (alone) and neither can deadlock: a holder never waits on its own
budget again, and the two are always taken in the same order (bytes, then pixels).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

# About nine of B5's 24-megapixel JPEGs (3.5 MB at q95), and a hundred 1200 px photos: more
# than the codec threads can use, behind an origin's latency too. At 64 MiB, B5's worker peaked
# at 397-407 MB against 356-364 here, in the same time (docs/benchmarks.md).
DEFAULT_BUFFER_BYTES = 32 * 1024 * 1024
DEFAULT_PIXEL_BUDGET = 32_000_000  # one 24 MP photo, or two 16 MP ones: about 225 MB at work

Waited = Callable[[float], None]  # told the seconds each acquisition waited (metrics)


def _ignore(_: float) -> None:
    pass


class ByteBudget:
    """Bytes held by downloads, granted first come, first served."""

    def __init__(self, capacity: int, waited: Waited = _ignore) -> None:
        if capacity < 1:
            raise ValueError("a byte budget needs a capacity of at least 1")
        self.capacity = capacity
        self.used = 0
        self.waited = waited
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """How many acquisitions are queued for bytes."""
        return len(self._waiters)

    async def acquire(self, amount: int) -> None:
        if not self._waiters and self._fits(amount):
            self.used += amount
            self.waited(0.0)
            return
        started = time.perf_counter()
        future = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        self._waiters.append(entry)
        try:
            await future
            self.waited(time.perf_counter() - started)
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(amount)  # granted just as we were cancelled
            else:
                self._waiters.remove(entry)
                self._wake()  # a large waiter leaving may unblock smaller ones behind it
            raise

    def release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    def _fits(self, amount: int) -> bool:
        return self.used == 0 or self.used + amount <= self.capacity

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            amount, future = self._waiters.popleft()
            if not future.done():
                self.used += amount
                future.set_result(None)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Lease]:
        """A holder that reserves as it learns sizes and gives everything back at the end."""
        lease = Lease(self)
        try:
            yield lease
        finally:
            lease.release()


class Lease:
    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held = 0
        self.waited = 0.0  # seconds spent waiting for the budget, so timings can leave it out

    async def reserve(self, amount: int) -> None:
        """Hold at least `amount` bytes (a retry of the same download reuses what it holds)."""
        if amount > self.held:
            if self.held:
                self.release()  # never wait while holding: that is how budgets deadlock
            started = time.perf_counter()
            await self._budget.acquire(amount)
            self.waited += time.perf_counter() - started
            self.held = amount

    def release(self) -> None:
        if self.held:
            self._budget.release(self.held)
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
