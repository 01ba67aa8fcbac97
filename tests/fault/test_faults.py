"""Fault tests (issue 4, section 7): real processes, real Postgres and Redis, and a fault in
the middle of a request. After each one, assert_clean() checks that every image is final
exactly once, the counters equal the rows, nothing is left pending, the request is Completed,
request.finished was published once and nothing was dead-lettered."""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from typing import Any

import asyncpg
import grpc
import pytest
from redis.exceptions import RedisError

from services.common.streams import WORKER_GROUP
from testing.origin import ImageOrigin, image_urls, serve_images
from testing.polling import wait_until_async
from testing.services import NOT_SERVING, SERVING, Service, submit
from tests.fault.harness import (
    GRACE_SECONDS,
    Backends,
    Services,
    assert_clean,
    final_images,
    wait_some_final,
)

pytestmark = pytest.mark.timeout(180)

# The kill moments of the first test come from this seed, so a failure can be replayed.
KILL_SEED = 20240604
# The shortest Postgres outage of the fourth test.
OUTAGE_SECONDS = 3.0


async def test_kill_9_workers_at_random_moments(
    backends: Backends, services: Services, origin: ImageOrigin
) -> None:
    rng = random.Random(KILL_SEED)
    total = 500
    ingest = services.start_ingest()
    workers = [services.start_worker(f"worker-{i}") for i in range(3)]
    await services.wait_serving(ingest, *workers)
    request_id = await submit(ingest, image_urls(origin, total, "kill"))

    # Four kills, each when a random share of the images is final; each killed worker is
    # replaced by one with a new consumer name, like a restarted pod.
    for kill, threshold in enumerate(sorted(rng.sample(range(20, 400), 4)), start=1):
        await wait_some_final(backends, services, request_id, total, threshold)
        victim = rng.choice(workers)
        await services.kill(victim)
        workers.remove(victim)
        workers.append(services.start_worker(f"worker-replacement-{kill}"))

    await assert_clean(backends, services, request_id, images=total)


async def test_kill_9_ingest_between_commit_and_release(
    backends: Backends, services: Services, origin: ImageOrigin
) -> None:
    total = 40
    # Its feeder looks once at start-up, then only when woken, which the crash comes before: so
    # nothing is released between the commit and the crash.
    ingest = services.start_ingest(
        "ingest-dying", failpoints="ingest.after_commit", IMGPIPE_SCHEDULER_POLL="3600"
    )
    workers = [services.start_worker("worker-a"), services.start_worker("worker-b")]
    await services.wait_serving(ingest, *workers)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(ingest, image_urls(origin, total, "commit"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, services.report()
    assert await ingest.wait_exit(10) == -signal.SIGKILL, services.report()

    request_id = await only_request(backends)
    client = backends.redis_client()
    try:
        assert await client.xlen(backends.names.tasks) == 0, "a task was published"
    finally:
        await client.aclose()

    await services.wait_serving(services.start_ingest("ingest"))
    await assert_clean(backends, services, request_id, images=total)


@pytest.mark.parametrize("failpoint", ["release.after_claim", "release.after_xadd"])
async def test_kill_9_the_feeder_inside_a_release(
    backends: Backends, services: Services, origin: ImageOrigin, failpoint: str
) -> None:
    """Killed after claiming its first release (the images are released, with no task on the
    stream: the reconciler republishes them) or after putting the tasks on the stream (their
    entries are never recorded: the workers take them anyway)."""
    total = 40
    workers = [services.start_worker("worker-a"), services.start_worker("worker-b")]
    ingest = services.start_ingest("ingest-dying", failpoints=failpoint)
    await services.wait_serving(ingest, *workers)

    answer = grpc.StatusCode.OK
    try:  # the release may come before or after the answer
        await submit(ingest, image_urls(origin, total, "release"))
    except grpc.aio.AioRpcError as exc:
        answer = exc.code()
    assert answer in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), services.report()
    assert await ingest.wait_exit(10) == -signal.SIGKILL, services.report()

    request_id = await only_request(backends)
    await services.wait_serving(services.start_ingest("ingest"))
    await assert_clean(backends, services, request_id, images=total)


async def test_kill_9_a_worker_between_putting_an_image_back_and_acknowledging_it(
    backends: Backends, services: Services, origin: ImageOrigin
) -> None:
    total = 40
    urls = image_urls(origin, total, "defer")
    for url in urls[:5]:  # answered 503 with Retry-After first: their images wait in Postgres
        origin.unavailable[url.removeprefix(origin.url(""))] = [1]
    dying = services.start_worker("worker-dying", failpoints="worker.after_defer")
    ingest = services.start_ingest()
    await services.wait_serving(ingest, dying)

    request_id = await submit(ingest, urls)
    # Its first 503 puts the image back to wait, and it dies before acknowledging the entry.
    assert await dying.wait_exit(30) == -signal.SIGKILL, services.report()

    # Another worker takes over the dead one's entries after the visibility timeout; the one
    # whose image was put back is acknowledged without a download, and the feeder releases
    # the image again once it is due.
    await services.wait_serving(services.start_worker("worker-b"))
    await assert_clean(backends, services, request_id, images=total)


async def test_kill_9_a_worker_between_giving_a_busy_origins_image_back_and_acknowledging_it(
    backends: Backends, services: Services, origin: ImageOrigin
) -> None:
    total = 40
    async with serve_images((160, 120), delay=0.02) as other:
        # One connection per origin for 8 slots, and a wait for it of 50 ms: a task waiting
        # for one origin gives its slot back to a task of the other still on the stream.
        allow = {"IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port},127.0.0.1:{other.port}"}
        dying = services.start_worker(
            "worker-dying",
            failpoints="worker.after_defer",
            IMGPIPE_FETCH_PER_HOST="1",
            IMGPIPE_FETCH_CONNECTION_WAIT="0.05",
            **allow,
        )
        ingest = services.start_ingest(**allow)
        await services.wait_serving(ingest, dying)

        mine, others = image_urls(origin, total // 2, "busy"), image_urls(other, total // 2, "busy")
        request_id = await submit(
            ingest, [url for pair in zip(mine, others, strict=True) for url in pair]
        )
        assert await dying.wait_exit(30) == -signal.SIGKILL, services.report()

        # As for a retry: the entry of the image given back is acknowledged without a
        # download by the worker that takes it over, and the feeder releases the image again.
        await services.wait_serving(services.start_worker("worker-b", **allow))
        await assert_clean(backends, services, request_id, images=total)


@pytest.mark.own_servers
async def test_redis_restarts_and_loses_its_data(
    backends: Backends, services: Services, origin: ImageOrigin
) -> None:
    total = 300
    ingest = services.start_ingest()
    workers = [services.start_worker("worker-a"), services.start_worker("worker-b")]
    await services.wait_serving(ingest, *workers)
    request_id = await submit(ingest, image_urls(origin, total, "redis"))
    await wait_some_final(backends, services, request_id, total, at_least=total // 10)

    probe = f"{backends.names.prefix}:probe"
    client = backends.redis_client()
    try:
        await client.set(probe, b"here before the restart")
        await asyncio.to_thread(backends.restart_redis)
        assert await client.exists(probe) == 0, "redis kept its data across the restart"
    finally:
        await client.aclose()

    await assert_clean(backends, services, request_id, images=total)


@pytest.mark.own_servers
async def test_postgres_stops_for_a_few_seconds(
    backends: Backends, services: Services, origin: ImageOrigin
) -> None:
    total = 300
    ingest = services.start_ingest()
    workers = [services.start_worker("worker-a"), services.start_worker("worker-b")]
    await services.wait_serving(ingest, *workers)
    request_id = await submit(ingest, image_urls(origin, total, "postgres"))
    await wait_some_final(backends, services, request_id, total, at_least=total // 10)

    # Down for a few seconds: until every service says NOT_SERVING, and at least
    # OUTAGE_SECONDS, during which none of them may claim to be SERVING again.
    every = [ingest, *workers]
    stopped_at = time.monotonic()
    await asyncio.to_thread(backends.stop_postgres)
    try:

        async def all_not_serving() -> bool:
            return all(status == NOT_SERVING for status in await health_of(every))

        async def outage_over() -> bool:
            statuses = await health_of(every)
            serving = [
                s.name for s, status in zip(every, statuses, strict=True) if status == SERVING
            ]
            assert not serving, f"{serving} report SERVING while Postgres is down"
            return time.monotonic() - stopped_at >= OUTAGE_SECONDS

        await wait_until_async(
            all_not_serving,
            timeout=30,
            interval=0.1,
            message="every service to report NOT_SERVING while Postgres is down",
            ignore=(grpc.aio.AioRpcError,),
        )
        await wait_until_async(
            outage_over,
            timeout=OUTAGE_SECONDS + 30,
            interval=0.2,
            message="the outage to last its few seconds",
            ignore=(grpc.aio.AioRpcError,),
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{services.report()}") from None
    finally:
        await asyncio.to_thread(backends.start_postgres)

    await assert_clean(backends, services, request_id, images=total)
    await services.wait_serving(*every, within=30)


async def test_sigterm_drains_a_busy_worker(
    backends: Backends, services: Services, origin: ImageOrigin
) -> None:
    total = 200
    ingest = services.start_ingest()
    first = services.start_worker("worker-a")
    await services.wait_serving(ingest, first)
    request_id = await submit(ingest, image_urls(origin, total, "drain"))

    client = backends.redis_client()
    try:

        async def busy() -> bool:
            summary: Any = await client.xpending(backends.names.tasks, WORKER_GROUP)
            return int(summary["pending"]) > 0

        await wait_until_async(busy, timeout=30, message="images in flight", ignore=(RedisError,))
    finally:
        await client.aclose()
    first.process.send_signal(signal.SIGTERM)
    code = await first.wait_exit(GRACE_SECONDS + 10)
    assert code == 0, f"the drained worker exited with {code}\n{services.report()}"
    left = total - await final_images(backends, request_id)
    assert left > 0, "the first worker finished the whole request: nothing left to take over"

    services.start_worker("worker-b")
    await assert_clean(backends, services, request_id, images=total)


async def only_request(backends: Backends) -> str:
    connection = await asyncpg.connect(backends.database_url)
    try:
        ids: list[uuid.UUID] = [r["id"] for r in await connection.fetch("SELECT id FROM requests")]
    finally:
        await connection.close()
    assert len(ids) == 1, f"expected the one request committed before the crash, found {ids}"
    return str(ids[0])


async def health_of(services: list[Service]) -> list[int]:
    return list(await asyncio.gather(*(service.health() for service in services)))
