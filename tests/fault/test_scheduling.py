"""Fair scheduling with real processes (docs/scheduling.md): an ingest whose feeder releases a
small window, and workers that consume it. What is asserted is order and shares, never time."""

from __future__ import annotations

import pytest

from services.common.auth import key_hash, new_key
from testing.origin import ImageOrigin, image_urls
from testing.polling import wait_until_async
from testing.services import submit
from tests.fault.harness import (
    COMPLETION_TIMEOUT,
    Backends,
    Services,
    assert_clean,
    final_images,
    take_snapshot,
    wait_some_final,
)

pytestmark = pytest.mark.timeout(180)

# Small against the requests below, so that who gets the free places is what decides.
WINDOW = "16"


async def test_a_small_request_overtakes_a_big_one(
    backends: Backends, services: Services, origin: ImageOrigin
) -> None:
    # In one FIFO stream the small request would finish after every image of the big one; a
    # big request of 300 leaves room for a clear margin (the assertion below) at half the time.
    big_total, small_total = 300, 8
    ingest = services.start_ingest(IMGPIPE_SCHEDULER_WINDOW=WINDOW)
    worker = services.start_worker("worker-a")
    await services.wait_serving(ingest, worker)
    big = await submit(ingest, image_urls(origin, big_total, "big"))
    await wait_some_final(backends, services, big, big_total, at_least=20)

    small = await submit(ingest, image_urls(origin, small_total, "small"))

    async def small_done() -> int | None:
        return await final_images(backends, big) if await _all_final(backends, small) else None

    big_when_small_done = await wait_until_async(
        small_done, timeout=COMPLETION_TIMEOUT, message="the small request's images final"
    )
    # In one FIFO stream the small request would wait for every task of the big one.
    assert big_when_small_done < big_total - 100, services.report()
    # The checks look at the whole stream: the big request first, then both are done.
    await assert_clean(backends, services, big, images=big_total)
    await assert_clean(backends, services, small, images=small_total)


async def test_two_owners_share_the_workers_by_weight(
    backends: Backends, services: Services, origin: ImageOrigin
) -> None:
    # Enough that both still have images waiting when 200 are final (acme's 3/4 share of
    # them, plus a window released ahead, stays under 250).
    total = 250
    heavy, light = new_key(), new_key()
    keys = f"acme:{key_hash(heavy)} weight=3, globex:{key_hash(light)}"
    ingest = services.start_ingest(IMGPIPE_SCHEDULER_WINDOW=WINDOW, IMGPIPE_API_KEYS=keys)
    await services.wait_serving(ingest)
    # Both requests wait in Postgres before any worker starts: the shares are the feeder's alone.
    acme = await submit(ingest, image_urls(origin, total, "acme"), api_key=heavy)
    globex = await submit(ingest, image_urls(origin, total, "globex"), api_key=light)
    worker = services.start_worker("worker-a")
    await services.wait_serving(worker)

    async def both_counted() -> tuple[int, int] | None:
        done = (await final_images(backends, acme), await final_images(backends, globex))
        return done if sum(done) >= 200 else None

    acme_done, globex_done = await wait_until_async(
        both_counted, timeout=COMPLETION_TIMEOUT, message="200 images final"
    )
    # 3:1 by weight. Slack of two windows either way: a window is released ahead of what is
    # final, and the counts are read while the records land a batch at a time per request
    # (up to a window of one owner's at once). As a ratio that slack swings widely (a CI run
    # under load read 172 against 32); equal shares (100 each) or first come, first served
    # (200 of acme's) are well outside it.
    expected = 0.75 * (acme_done + globex_done)
    assert abs(acme_done - expected) <= 2 * int(WINDOW), (acme_done, globex_done)
    # The checks look at the whole stream: both requests final first.
    await wait_until_async(
        lambda: _all_final(backends, acme, globex),
        timeout=COMPLETION_TIMEOUT,
        message="both requests final",
    )
    await assert_clean(backends, services, acme, images=total)
    await assert_clean(backends, services, globex, images=total)


async def _all_final(backends: Backends, *request_ids: str) -> bool:
    for request_id in request_ids:
        snapshot = await take_snapshot(backends, request_id)
        if snapshot.request_status not in ("Completed", "Failed"):
            return False
    return True
