"""The longest statements of one request at the size limit (100,000 rows, 300,000 images), each
timed once on a Postgres you name: what IMGPIPE_DB_COMMAND_TIMEOUT must stay above
(docs/operations.md, "Postgres timeouts").

    python -m bench.statements postgresql://postgres@127.0.0.1:5432/postgres [rows]

It works in a database of its own, dropped afterwards, and prints one line per statement,
longest first. Not part of `make bench`: it needs no stack, and it measures Postgres, not the
pipeline.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

from services.common.csv_format import ProductRow
from services.common.db import lifecycle, queries
from services.common.db.pool import Connection
from testing.databases import own_database

T = TypeVar("T")
BATCH = 1000  # rows per insert, as ingest's spool hands them out


class Timings(dict[str, float]):
    async def __call__(self, name: str, statement: Awaitable[T]) -> T:
        started = time.perf_counter()
        result = await statement
        self[name] = max(self.get(name, 0.0), time.perf_counter() - started)
        return result


class LongestStatement:
    """A connection that notes its longest statement: for a call made of many statements (a
    cancel, a chunk at a time), what a writer of the rows it holds waits at most."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.longest = 0.0

    async def _timed(self, statement: Awaitable[T]) -> T:
        started = time.perf_counter()
        result = await statement
        self.longest = max(self.longest, time.perf_counter() - started)
        return result

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        return await self._timed(self.conn.fetchrow(*args, **kwargs))

    async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
        return await self._timed(self.conn.fetchval(*args, **kwargs))

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        return await self._timed(self.conn.fetch(*args, **kwargs))

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return await self._timed(self.conn.execute(*args, **kwargs))


async def measure(server_url: str, rows: int) -> Timings:
    timed = Timings()
    async with (
        own_database(server_url, "imgpipe_statements") as pool,
        pool.acquire() as conn,
    ):
        request_id = uuid.uuid4()
        async with conn.transaction():
            await queries.insert_request(
                conn, request_id, options={}, webhook_url=None, owner="o", idempotency_key=None
            )
            started = time.perf_counter()
            for first in range(0, rows, BATCH):
                batch = [
                    ProductRow(
                        i + 2,
                        str(i),
                        f"p{i}",
                        tuple(f"http://a.example/{i}/{k}.jpg" for k in range(3)),
                    )
                    for i in range(first, min(rows, first + BATCH))
                ]
                await timed(
                    f"insert_products ({BATCH} rows)",
                    queries.insert_products(conn, request_id, batch),
                )
            timed["an upload's inserts, all batches (an idempotent twin waits this long)"] = (
                time.perf_counter() - started
            )
            await timed("duplicate_serials", queries.duplicate_serials(conn, request_id, limit=101))
            await timed("link_repeated_urls", queries.link_repeated_urls(conn, request_id))
            await timed(
                "complete_request_insert",
                queries.complete_request_insert(
                    conn, request_id, products_total=rows, images_total=3 * rows, content_hash=b""
                ),
            )
        await timed("refresh_statistics", queries.refresh_statistics(conn))
        await timed("waiting_requests", queries.waiting_requests(conn, up_to=64, limit=100))
        (release,) = await timed(
            "next_waiting_images (64)", queries.next_waiting_images(conn, {request_id: 64})
        )
        ids = [image_id for image_id, _ in release.images]
        claim = await timed(
            "claim_releases (64)", queries.claim_releases(conn, [(i, None) for i in ids])
        )
        entries = [f"1-{n}" for n in range(len(ids))]
        await timed("record_releases (64)", queries.record_releases(conn, claim, ids, entries))
        await timed("window_in_use", queries.window_in_use(conn, (1, 0)))
        await timed("mark_released", queries.mark_released(conn))
        await timed("backlog_by_owner", queries.backlog_by_owner(conn))
        await timed(
            "stale_pending_images", queries.stale_pending_images(conn, min_age_seconds=0, limit=500)
        )
        await timed(
            "list_products (a page of 1,000)",
            queries.list_products(conn, request_id, after_row=rows // 2, limit=1000),
        )
        # A request at work with one failed image: what a retry of it costs, and holds its
        # request's row for (a worker recording another of its images waits that long).
        await queries.record_image_failed(conn, ids[0], code="HTTP_404", message="gone")
        await timed(
            "retry_failed_images (one failed image of the request)",
            queries.retry_failed_images(conn, request_id, owner="o"),
        )
        clock = LongestStatement(conn)
        await timed(
            "cancel_request (every image)",
            lifecycle.cancel_request(cast(Connection, clock), request_id, "o", output_csv_key="k"),
        )
        timed["cancel_request's longest statement (a writer of its rows waits this long)"] = (
            clock.longest
        )
        await timed(
            "retry_failed_images (every image)",
            queries.retry_failed_images(conn, request_id, owner="o"),
        )
        await lifecycle.cancel_request(conn, request_id, "o", output_csv_key="k")
        await timed("mark_deleting", lifecycle.mark_deleting(conn, request_id))
        await timed("delete_rows (the whole request)", lifecycle.delete_rows(conn, request_id))
    return timed


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    rows = int(argv[1]) if len(argv) > 1 else 100_000
    timings = asyncio.run(measure(argv[0], rows))
    print(f"{rows:,} rows, {3 * rows:,} images; seconds, longest first")
    for name, seconds in sorted(timings.items(), key=lambda item: -item[1]):
        print(f"{seconds:8.3f}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
