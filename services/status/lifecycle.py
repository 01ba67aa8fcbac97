"""What the StatusService does for ListRequests, CancelRequest and DeleteRequest
(docs/lifecycle.md). Every one answers NOT_FOUND for another owner's request, exactly as for a
missing one."""

from __future__ import annotations

import logging

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import storage as keys
from services.common.db import lifecycle, queries
from services.common.deletion import Deleted, delete_request
from services.common.errors import Conflict, NotFound
from services.common.grpc_auth import caller_owner
from services.common.page_token import decode_request_token, encode_request_token
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.proto_convert import (
    FINAL_STATUSES,
    STATUS_FROM_PROTO,
    finished_event,
    parse_request_id,
    progress_event,
)
from services.common.storage import Storage
from services.common.stored_csv import store_output_csv
from services.common.streams import StreamNames, publish_event_once, publish_progress

log = logging.getLogger(__name__)


async def list_page(
    pool: asyncpg.Pool,
    *,
    page_size: int,
    page_token: str,
    status: request_pb2.RequestStatus.ValueType,
) -> tuple[list[queries.RequestRow], str]:
    """One page of the caller's requests, newest first, and the next page's token ('' on the
    last page)."""
    after = decode_request_token(page_token)
    async with pool.acquire() as conn:
        rows = await lifecycle.list_requests(
            conn,
            caller_owner(),
            after=after,
            status=STATUS_FROM_PROTO.get(status),
            limit=page_size + 1,
        )
    page = rows[:page_size]
    more = len(rows) > page_size
    return page, encode_request_token(page[-1].created_at, page[-1].id) if more else ""


async def cancel(
    pool: asyncpg.Pool,
    redis: aioredis.Redis | None,
    names: StreamNames,
    storage: Storage,
    raw_id: str,
) -> queries.RequestRow:
    """Cancel the caller's request and return it. The first cancel writes the output CSV of
    what is done, tells live watchers, and publishes request.cancelled through the outbox
    (the reconciler publishes it if this process dies first). A cancel again writes the CSV
    if the first one did not get to it (a store that failed, a crash)."""
    request_id = parse_request_id(raw_id)
    async with pool.acquire() as conn:
        outcome = await lifecycle.cancel_request(
            conn, request_id, caller_owner(), output_csv_key=keys.output_csv_key(request_id)
        )
    if outcome is None:
        raise NotFound(f"no request {raw_id}")
    if isinstance(outcome, queries.RequestRow):
        raise Conflict(f"request {raw_id} is {outcome.status}: only a running request is cancelled")
    row = outcome.request
    csv_key = keys.output_csv_key(row.id)
    if outcome.changed or await storage.missing(csv_key):
        # Under the request's lock: a worker storing the CSV again for an image that was in
        # flight (services/worker/processor.py) never has its newer CSV overwritten by this one.
        await store_output_csv(pool, storage, row.id)
    if outcome.changed:
        log.info("request cancelled", extra={"request_id": str(row.id)})
        if redis is not None:
            await _announce(redis, names, pool, row)
    return row


async def _announce(
    redis: aioredis.Redis, names: StreamNames, pool: asyncpg.Pool, row: queries.RequestRow
) -> None:
    try:
        await publish_progress(redis, names, [progress_event(queries.Counters.of(row))])
    except RedisError as exc:  # watchers re-read Postgres; losing this loses nothing
        log.warning("progress not published", extra={"error": repr(exc)})
    await publish_event_once(redis, names, finished_event(row))
    async with pool.acquire() as conn:
        await queries.mark_event_published(conn, row.id, row.finish_generation)


async def delete(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    names: StreamNames,
    storage: Storage,
    raw_id: str,
) -> Deleted:
    """Delete the caller's final request; a delete left half done is finished."""
    request_id = parse_request_id(raw_id)
    async with pool.acquire() as conn:
        found = await lifecycle.deletable(conn, request_id)
    if found is None or found.owner != caller_owner():
        raise NotFound(f"no request {raw_id}")
    if found.status not in FINAL_STATUSES:
        raise Conflict(
            f"request {raw_id} is {found.status}: only a final request is deleted (cancel it first)"
        )
    deleted = await delete_request(pool, redis, names, storage, request_id)
    if deleted is None:  # another delete finished it meanwhile
        raise NotFound(f"no request {raw_id}")
    return deleted
