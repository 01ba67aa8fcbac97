"""The worker's memory budgets: bounded, in a fair order, and never deadlocked."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import Iterator

import pytest
from PIL import Image

from services.common.image_options import ImageOptions
from services.worker.budget import ByteBudget, PixelBudget, return_big_images_to_the_os
from services.worker.imaging import compress
from testing.imagegen import photo_like
from testing.polling import wait_until, wait_until_async

pytestmark = pytest.mark.unit


async def queued(budget: ByteBudget, count: int) -> None:
    """Until `count` acquisitions are blocked in the budget's queue (polled, with a deadline)."""

    async def reached() -> bool:
        return budget.waiting == count

    await wait_until_async(reached, timeout=5, interval=0.001, message=f"{count} queued")


async def test_byte_budget_grants_within_capacity_and_queues_the_rest_in_order() -> None:
    budget = ByteBudget(100)
    await budget.acquire(60)
    order: list[str] = []

    async def take(name: str, amount: int) -> None:
        await budget.acquire(amount)
        order.append(name)

    big = asyncio.create_task(take("big", 50))
    small = asyncio.create_task(take("small", 10))  # would fit, but waits its turn
    await queued(budget, 2)
    assert order == [] and budget.used == 60

    budget.release(60)
    await asyncio.gather(big, small)
    assert order == ["big", "small"] and budget.used == 60


async def test_byte_budget_grants_an_oversized_request_when_it_is_empty() -> None:
    budget = ByteBudget(10)
    await budget.acquire(5)
    oversized = asyncio.create_task(budget.acquire(1000))
    await queued(budget, 1)
    assert not oversized.done()
    budget.release(5)
    await oversized
    assert budget.used == 1000


async def test_a_cancelled_waiter_leaves_the_queue_and_lets_smaller_ones_through() -> None:
    budget = ByteBudget(100)
    await budget.acquire(90)
    big = asyncio.create_task(budget.acquire(50))
    small = asyncio.create_task(budget.acquire(10))
    await queued(budget, 2)
    assert not small.done()  # behind the big one

    big.cancel()
    await asyncio.gather(big, return_exceptions=True)
    await small
    assert budget.used == 100


async def test_a_waiter_cancelled_as_the_budget_frees_leaves_quietly() -> None:
    budget = ByteBudget(10)
    await budget.acquire(10)
    waiter = asyncio.create_task(budget.acquire(5))
    await queued(budget, 1)

    waiter.cancel()  # its future is cancelled now; its cleanup runs on the next turn...
    budget.release(10)  # ... after the budget has already dropped it from the queue

    with pytest.raises(asyncio.CancelledError):  # not ValueError from its cleanup
        await waiter
    assert (budget.used, budget.waiting) == (0, 0)


async def test_a_lease_counts_the_time_it_waited_for_the_budget() -> None:
    budget = ByteBudget(100)
    await budget.acquire(100)
    async with budget.lease() as lease:
        waiting = asyncio.create_task(lease.reserve(10))
        await queued(budget, 1)
        asyncio.get_running_loop().call_later(0.05, budget.release, 100)  # busy for 50 ms
        await waiting
        waited = lease.waited
        assert waited >= 0.04  # (two clocks: a little slack)
        await lease.reserve(10)  # already held: nothing to wait for
        assert lease.waited == waited


async def test_a_lease_reuses_what_it_holds_and_gives_everything_back() -> None:
    budget = ByteBudget(100)
    async with budget.lease() as lease:
        await lease.reserve(40)
        await lease.reserve(30)  # a retry of the same download: already covered
        assert budget.used == 40
        await lease.reserve(70)  # a larger body after all
        assert (budget.used, lease.held) == (70, 70)
    assert budget.used == 0


async def test_a_growing_lease_keeps_what_it_holds_and_goes_before_new_leases() -> None:
    budget = ByteBudget(100)
    async with budget.lease() as reading:
        await reading.reserve(40)
        newcomer = asyncio.create_task(budget.acquire(70))  # 40 + 70 > 100: queued
        await queued(budget, 1)

        await reading.reserve(60)  # the body turned out longer: served before the newcomer
        assert (reading.held, budget.used) == (60, 60) and not newcomer.done()

        await reading.settle(25)  # what it was in the end: the rest goes to the newcomer
        await newcomer
        assert (reading.held, budget.used) == (25, 95)
    assert budget.used == 70


async def test_a_new_lease_of_a_request_holding_less_goes_first() -> None:
    budget = ByteBudget(100)
    async with budget.lease("heavy") as waiting_for_the_codec:
        await waiting_for_the_codec.reserve(90)
        heavy = asyncio.create_task(budget.acquire(50, key="heavy"))  # 140 > 100: queued
        await queued(budget, 1)
        light = asyncio.create_task(budget.acquire(5, key="light"))

        # First come, first served, the small download would wait behind the heavy request's;
        # its request holds nothing, so it goes first, and it fits.
        await asyncio.wait_for(light, 5)
        assert not heavy.done()
        assert (budget.held_by("light"), budget.held_by("heavy"), budget.used) == (5, 90, 95)
    await asyncio.wait_for(heavy, 5)  # compressed: the heavy request's next download goes on
    budget.release(5, "light")
    budget.release(50, "heavy")
    assert budget.used == 0 and budget.held_by("heavy") == 0  # nothing kept per request


async def test_when_every_holder_waits_the_one_holding_most_grows_past_the_capacity() -> None:
    budget = ByteBudget(100)
    async with budget.lease() as first, budget.lease() as second:
        await first.reserve(50)
        await second.reserve(50)
        first_grows = asyncio.create_task(first.reserve(80))  # waits for second's bytes
        await queued(budget, 1)
        assert not first_grows.done()

        second_grows = asyncio.create_task(second.reserve(90))  # ... and second for first's
        await first_grows  # a tie: the first to wait
        assert (first.held, budget.used) == (80, 130) and not second_grows.done()

        # It keeps the lead until its body ends, so only one lease is ever past the capacity.
        await first.reserve(120)
        assert (first.held, budget.used) == (120, 170) and not second_grows.done()

        first.release()  # compressed: the second goes on
        await second_grows
        assert (second.held, budget.used) == (90, 90)
    assert budget.used == 0


async def test_a_growing_lease_cancelled_in_the_queue_still_holds_until_it_ends() -> None:
    budget = ByteBudget(100)
    await budget.acquire(60)  # held by someone compressing
    async with budget.lease() as reading:
        await reading.reserve(30)
        growing = asyncio.create_task(reading.reserve(50))
        await queued(budget, 1)
        growing.cancel()
        await asyncio.gather(growing, return_exceptions=True)
        assert (budget.waiting, reading.held, budget.used) == (0, 30, 90)
    assert budget.used == 60


def test_pixel_budget_makes_the_second_image_wait_for_the_first() -> None:
    budget = PixelBudget(1000)
    entered = threading.Event()

    def second() -> None:
        with budget.reserve(800):
            entered.set()

    with budget.reserve(600):
        thread = threading.Thread(target=second)
        thread.start()
        wait_until(lambda: budget.waiting == 1, timeout=5, message="second thread waits")
        assert not entered.is_set() and budget.used == 600
    thread.join(timeout=5)
    assert entered.is_set() and budget.used == 0


def test_pixel_budget_lets_an_image_larger_than_itself_run_alone() -> None:
    budget = PixelBudget(1000)
    with budget.reserve(10**9):
        assert budget.used == 1000
    assert budget.used == 0


class Recording(PixelBudget):
    def __init__(self) -> None:
        super().__init__(10**9)
        self.asked: list[int] = []

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        self.asked.append(pixels)
        with super().reserve(pixels):
            yield


def test_compress_reserves_the_pixels_it_decodes_after_shrink_on_load() -> None:
    source = photo_like(1200, 1200)
    budget = Recording()

    full = compress(source, ImageOptions(), budget=budget)
    small = compress(source, ImageOptions(max_width=300, max_height=300), budget=budget)

    assert (full.width, small.width) == (1200, 300)
    # The JPEG decoder scales by 1/4 on load for a 300-pixel target: 16× fewer pixels held.
    assert budget.asked == [1200 * 1200, 300 * 300]
    assert budget.used == 0
    with Image.open(io.BytesIO(small.data)) as image:
        assert image.size == (300, 300)


@pytest.mark.parametrize(
    ("size", "options", "decoded", "output"),
    [
        # An odd side: 1/2 decodes 801 rows as 401, the target. Pillow's own rule
        # (801 // 401 = 1) would decode all of them and resample.
        ((1200, 801), ImageOptions(scale=0.5), (600, 401), (600, 401)),
        ((801, 1200), ImageOptions(scale=0.5), (401, 600), (401, 600)),
        ((1201, 803), ImageOptions(scale=0.25), (301, 201), (300, 201)),
        ((1201, 803), ImageOptions(max_width=301), (301, 201), (301, 201)),
        # Never below the target: 1/4 would give 201 rows for a target of 202.
        ((1201, 803), ImageOptions(max_width=302), (601, 402), (302, 202)),
    ],
)
def test_shrink_on_load_takes_the_largest_scale_that_still_decodes_the_target(
    size: tuple[int, int],
    options: ImageOptions,
    decoded: tuple[int, int],
    output: tuple[int, int],
) -> None:
    budget = Recording()

    result = compress(photo_like(*size), options, budget=budget)

    assert budget.asked == [decoded[0] * decoded[1]]
    assert (result.width, result.height) == output


class Clock:
    """perf_counter for compress: still, except while a budget makes the caller wait."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Waiting(PixelBudget):
    """A budget whose every reservation waits 100 (fake) seconds."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(10**9)
        self.clock = clock

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        self.clock.now += 100.0
        with super().reserve(pixels):
            yield


@pytest.mark.parametrize(
    ("options", "decoded_at", "output"),
    [
        (ImageOptions(scale=0.5), (800, 600), (800, 600)),
        (ImageOptions(max_width=400), (400, 300), (400, 300)),
        (ImageOptions(max_height=250), (400, 300), (333, 250)),
        (ImageOptions(scale=0.9), (1600, 1200), (1440, 1080)),  # no DCT scale fits: full size
    ],
)
def test_every_downscale_option_decodes_at_the_dct_scale_that_still_covers_it(
    options: ImageOptions, decoded_at: tuple[int, int], output: tuple[int, int]
) -> None:
    budget = Recording()
    result = compress(photo_like(1600, 1200), options, budget=budget)
    assert budget.asked == [decoded_at[0] * decoded_at[1]]
    assert (result.width, result.height) == output


def test_compress_reports_decode_and_encode_time_without_the_budget_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = photo_like(400, 300)
    real = compress(source, ImageOptions(max_width=200))
    assert real.decode_seconds > 0 and real.encode_seconds > 0

    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)  # the module imaging times with
    waited = compress(source, ImageOptions(max_width=200), budget=Waiting(clock))
    assert (waited.decode_seconds, waited.encode_seconds) == (0.0, 0.0)
    assert waited.data == real.data  # timing changes nothing else


def test_glibc_takes_the_workers_memory_thresholds() -> None:
    # This machine and the container image use glibc: the tuning must take effect there.
    assert return_big_images_to_the_os() is True
