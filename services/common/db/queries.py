"""Every SQL statement imgpipe runs. Nothing outside services/common/db writes SQL.

State changes are conditional on the previous state (`WHERE status = 'Pending'`) and counters
move in the same transaction as the image row, so delivering a task twice is harmless.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from services.common.csv_format import ProductRow
from services.common.db.pool import Connection as Connection
from services.common.db.pool import advisory_lock

# ---------------------------------------------------------------- ingest


@dataclass(frozen=True, slots=True)
class ExistingRequest:
    id: uuid.UUID
    content_hash: bytes | None
    status: str
    products_total: int
    images_total: int


async def find_idempotent(conn: Connection, owner: str, key: str) -> ExistingRequest | None:
    row = await conn.fetchrow(
        """SELECT id, content_hash, status, products_total, images_total
             FROM requests WHERE owner = $1 AND idempotency_key = $2""",
        owner,
        key,
    )
    return ExistingRequest(**dict(row)) if row else None


# How long a request accepted by ingest counts as being published (kept from before the
# feeder; nothing waits on it any more: mark_released clears it).
PUBLISH_LEASE_SECONDS = 60.0


@contextlib.asynccontextmanager
async def idempotency_lock(pool: asyncpg.Pool, owner: str, key: str) -> AsyncIterator[Connection]:
    """Hold a session advisory lock on (owner, key) for the block: uploads sharing a key
    take turns instead of racing to insert.

    The lock is a pair of 32-bit keys, the owner's hash and the key's: never one of the
    services' own locks, which take one 64-bit key (pool.AdvisoryKey), and another owner's only
    if the two owners' names hash alike, which no caller chooses."""
    async with pool.acquire() as conn:
        pair = await conn.fetchrow("SELECT hashtext($1), hashtext($2)", owner, key)
        assert pair is not None  # a SELECT without FROM has its one row
        async with advisory_lock(conn, (pair[0], pair[1])):
            yield conn


@contextlib.asynccontextmanager
async def leader_lock(pool: asyncpg.Pool, key: int) -> AsyncIterator[Connection | None]:
    """A connection holding the session advisory lock `key` for the block, or None when another
    process holds it: loops that run in every replica but one at a time (the reconciler, the
    feeder) do a pass only when they get it."""
    async with pool.acquire() as conn, advisory_lock(conn, key, wait=False) as taken:
        yield conn if taken else None


async def insert_request(
    conn: Connection,
    request_id: uuid.UUID,
    *,
    options: dict[str, Any],
    webhook_url: str | None,
    owner: str,
    idempotency_key: str | None,
    traceparent: str = "",
) -> None:
    """`traceparent`: the upload's trace, which the tasks the feeder releases later continue."""
    await conn.execute(
        """INSERT INTO requests (id, options, webhook_url, owner, idempotency_key,
                                 publish_lease_until, traceparent)
           VALUES ($1, $2::jsonb, $3, $4, $5, now() + make_interval(secs => $6), $7)""",
        request_id,
        json.dumps(options),
        webhook_url,
        owner,
        idempotency_key,
        PUBLISH_LEASE_SECONDS,
        traceparent or None,
    )


async def duplicate_serials(
    conn: Connection, request_id: uuid.UUID, *, limit: int
) -> list[tuple[int, str, int]]:
    """(row, serial number, first row) of every product whose serial number an earlier row of
    the request has, in row order, at most `limit`: the uniqueness check of an upload, done
    here so the reader's memory does not grow with the rows."""
    rows = await conn.fetch(
        """SELECT row_number, serial_number, first_row
             FROM (SELECT row_number, serial_number,
                          min(row_number) OVER (PARTITION BY serial_number) AS first_row
                     FROM products WHERE request_id = $1) p
            WHERE row_number <> first_row
            ORDER BY row_number
            LIMIT $2""",
        request_id,
        limit,
    )
    return [(r["row_number"], r["serial_number"], r["first_row"]) for r in rows]


async def insert_products(
    conn: Connection, request_id: uuid.UUID, products: Sequence[ProductRow]
) -> int:
    """Insert a batch of products and one Pending image row per URL; returns the image count."""
    if not products:
        return 0
    rows = await conn.fetch(
        """INSERT INTO products (request_id, row_number, serial_number, product_name)
           SELECT $1, * FROM unnest($2::int[], $3::text[], $4::text[])
           RETURNING id, row_number""",
        request_id,
        [p.row_number for p in products],
        [p.serial_number for p in products],
        [p.product_name for p in products],
    )
    product_ids = {r["row_number"]: r["id"] for r in rows}
    images = [
        (product_ids[p.row_number], request_id, position, url)
        for p in products
        for position, url in enumerate(p.image_urls)
    ]
    await conn.copy_records_to_table(
        "images", records=images, columns=("product_id", "request_id", "position", "input_url")
    )
    return len(images)


async def link_repeated_urls(conn: Connection, request_id: uuid.UUID) -> int:
    """Make every later image of a source URL that appears more than once in the request a
    follower of its first (lowest id): only that leader is fetched and compressed, and its
    outcome is recorded for its followers too. Returns how many followers there are."""
    result = await conn.execute(
        """UPDATE images i SET leader_id = d.leader
             FROM (SELECT id, min(id) OVER (PARTITION BY input_url) AS leader
                     FROM images WHERE request_id = $1) d
            WHERE i.id = d.id AND d.id <> d.leader""",
        request_id,
    )
    return int(result.split()[-1])


async def refresh_statistics(conn: Connection) -> None:
    await conn.execute("ANALYZE products; ANALYZE images")


async def complete_request_insert(
    conn: Connection,
    request_id: uuid.UUID,
    *,
    products_total: int,
    images_total: int,
    content_hash: bytes,
) -> None:
    await conn.execute(
        """UPDATE requests SET products_total = $2, images_total = $3, content_hash = $4
            WHERE id = $1""",
        request_id,
        products_total,
        images_total,
        content_hash,
    )


@dataclass(frozen=True, slots=True)
class Claim:
    """Images claimed for release by one statement, and the token that claimed them: their
    enqueued_at, which only that claim wrote."""

    image_ids: frozenset[int]
    token: datetime | None  # None when nothing was claimed


async def claim_releases(conn: Connection, images: Sequence[tuple[int, datetime | None]]) -> Claim:
    """Claim images for release before their tasks go on the stream: each (image_id, seen)
    whose enqueued_at is still `seen` (None: waiting for its first release; a time: released
    then, its entry lost), Pending and due. Its enqueued_at becomes the claim's token.

    The entry is recorded afterwards only where the token is still there (record_releases), so
    a recording that comes late never marks an image released that a worker failed and a retry
    put back to wait in the meantime: that image is claimed and released again.

    The rows are locked in id order, as a cancel and a worker's record take them
    (lifecycle._CANCEL), whatever order the tasks were released in."""
    rows = await conn.fetch(
        """WITH c AS (SELECT * FROM unnest($1::bigint[], $2::timestamptz[]) AS c(id, seen)),
                locked AS (
                  SELECT i.id FROM images i JOIN c ON c.id = i.id
                   WHERE i.status = 'Pending' AND i.leader_id IS NULL
                     AND i.enqueued_at IS NOT DISTINCT FROM c.seen
                     AND COALESCE(i.not_before, '-infinity') <= now()
                   ORDER BY i.id
                     FOR UPDATE OF i),
                token AS MATERIALIZED (SELECT clock_timestamp() AS at)
           UPDATE images SET enqueued_at = token.at, stream_entry_id = NULL
             FROM c, locked, token
            WHERE images.id = c.id AND images.id = locked.id
              AND images.status = 'Pending'
              AND images.enqueued_at IS NOT DISTINCT FROM c.seen
              AND COALESCE(images.not_before, '-infinity') <= now()
        RETURNING images.id, images.enqueued_at""",
        [image_id for image_id, _ in images],
        [seen for _, seen in images],
    )
    return Claim(frozenset(r["id"] for r in rows), rows[0]["enqueued_at"] if rows else None)


async def record_releases(
    conn: Connection, claim: Claim, image_ids: Sequence[int], entry_ids: Sequence[str]
) -> int:
    """Remember where each claimed image's task is on the stream (see the reconciler), where
    the claim still holds: an image a worker made final, put back to wait, or that was claimed
    again meanwhile keeps what it has. Returns how many were recorded.

    An image a worker made final is never waited for: its row may be locked by a retry that
    holds its request's row, while a worker holds another of the request's images and waits
    for that request row. Waiting for it here closed that cycle (a deadlock, seen in CI);
    skipping it, this statement only ever waits for Pending images. The rows are locked in id
    order, as in claim_releases."""
    result = await conn.execute(
        """WITH locked AS (
               SELECT id FROM images
                WHERE id = ANY($1::bigint[]) AND status = 'Pending' AND enqueued_at = $3
                ORDER BY id
                  FOR UPDATE)
           UPDATE images SET stream_entry_id = e.entry_id
             FROM unnest($1::bigint[], $2::text[]) AS e(image_id, entry_id), locked
            WHERE images.id = e.image_id AND images.id = locked.id
              AND images.status = 'Pending' AND images.enqueued_at = $3""",
        list(image_ids),
        list(entry_ids),
        claim.token,
    )
    return int(result.split()[-1])


async def unclaim_releases(conn: Connection, claim: Claim) -> None:
    """Put images back to waiting whose claim holds and whose tasks never went on the stream
    (the XADD failed), so the feeder's next pass releases them."""
    await conn.execute(
        """WITH locked AS (
               SELECT id FROM images
                WHERE id = ANY($1::bigint[]) AND status = 'Pending' AND enqueued_at = $2
                  AND stream_entry_id IS NULL
                ORDER BY id
                  FOR UPDATE)
           UPDATE images SET enqueued_at = NULL
             FROM locked
            WHERE images.id = locked.id AND images.status = 'Pending'
              AND images.enqueued_at = $2 AND images.stream_entry_id IS NULL""",
        sorted(claim.image_ids),
        claim.token,
    )


# ---------------------------------------------------------------- scheduler (the feeder)
# An image is released when its task goes on the stream (enqueued_at set); Pending images not
# yet released are the backlog that Postgres holds (docs/scheduling.md). Followers of a
# repeated URL (leader_id set) are never released: their leader's outcome becomes theirs.


@dataclass(frozen=True, slots=True)
class InUse:
    """A request's part of the window in use: its images released and not yet final."""

    request_id: uuid.UUID
    owner: str
    released: int
    held: int  # of those, delivered to a worker (stream entry up to the last delivered id)
    on_stream: int  # of those, still waiting on the stream (entry past it)


async def window_in_use(conn: Connection, last_delivered: tuple[int, int]) -> list[InUse]:
    """The window in use, by request. Entry ids compare as (milliseconds, sequence), as the
    stream orders them; an image with no entry recorded counts in neither part."""
    rows = await conn.fetch(
        """WITH w AS (
               SELECT i.request_id,
                      (split_part(i.stream_entry_id, '-', 1)::bigint,
                       split_part(i.stream_entry_id, '-', 2)::bigint) <= ($1::bigint, $2::bigint)
                          AS delivered
                 FROM images i
                WHERE i.status = 'Pending' AND i.enqueued_at IS NOT NULL)
           SELECT w.request_id, r.owner, count(*) AS released,
                  count(*) FILTER (WHERE w.delivered) AS held,
                  count(*) FILTER (WHERE NOT w.delivered) AS on_stream
             FROM w JOIN requests r ON r.id = w.request_id
            GROUP BY w.request_id, r.owner""",
        *last_delivered,
    )
    return [
        InUse(r["request_id"], r["owner"], r["released"], r["held"], r["on_stream"]) for r in rows
    ]


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    request_id: uuid.UUID
    owner: str
    waiting: int  # images not yet released, counted up to the `up_to` asked for


async def waiting_requests(conn: Connection, *, up_to: int, limit: int) -> list[WaitingRequest]:
    """Open requests with images due for release, oldest first, at most `limit`; none being
    cancelled."""
    rows = await conn.fetch(
        """SELECT r.id, r.owner, w.n
             FROM requests r
            CROSS JOIN LATERAL (
                  SELECT count(*) AS n FROM (
                         SELECT 1 FROM images
                          WHERE request_id = r.id AND status = 'Pending' AND enqueued_at IS NULL
                            AND leader_id IS NULL AND COALESCE(not_before, '-infinity') <= now()
                          LIMIT $1) s) w
            WHERE r.status IN ('Pending', 'Processing') AND r.cancel_requested_at IS NULL
              AND w.n > 0
            ORDER BY r.created_at
            LIMIT $2""",
        up_to,
        limit,
    )
    return [WaitingRequest(r["id"], r["owner"], r["n"]) for r in rows]


@dataclass(frozen=True, slots=True)
class Release:
    """The next images of one request to release, with the request's options."""

    request_id: uuid.UUID
    options: dict[str, Any]
    images: list[tuple[int, str]]  # (image_id, input_url)
    traceparent: str = ""  # the trace of the upload (or retry) that made these images wait


async def next_waiting_images(conn: Connection, counts: dict[uuid.UUID, int]) -> list[Release]:
    """For each request, its next `counts[request]` images due for release: those never
    deferred in id order, then the deferred ones in the order they came due (images_waiting)."""
    rows = await conn.fetch(
        """SELECT c.request_id, r.options, r.traceparent, i.id, i.input_url
             FROM unnest($1::uuid[], $2::int[]) AS c(request_id, n)
             JOIN requests r ON r.id = c.request_id
            CROSS JOIN LATERAL (
                  SELECT id, input_url FROM images
                   WHERE request_id = c.request_id AND status = 'Pending'
                     AND enqueued_at IS NULL AND leader_id IS NULL
                     AND COALESCE(not_before, '-infinity') <= now()
                   ORDER BY COALESCE(not_before, '-infinity'), id LIMIT c.n) i
            ORDER BY c.request_id, i.id""",
        list(counts),
        list(counts.values()),
    )
    releases: dict[uuid.UUID, Release] = {}
    for r in rows:
        release = releases.get(r["request_id"])
        if release is None:
            release = Release(r["request_id"], json.loads(r["options"]), [], r["traceparent"] or "")
            releases[r["request_id"]] = release
        release.images.append((r["id"], r["input_url"]))
    return list(releases.values())


async def mark_started(conn: Connection, request_ids: Sequence[uuid.UUID]) -> None:
    """Remember when each request's first task was released (its rate counts from then)."""
    await conn.execute(
        "UPDATE requests SET started_at = now() WHERE id = ANY($1::uuid[]) AND started_at IS NULL",
        list(request_ids),
    )


async def mark_released(conn: Connection) -> int:
    """Mark open requests that have nothing left to release as published; returns how many."""
    result = await conn.execute(
        """UPDATE requests r SET published_at = now(), publish_lease_until = NULL
            WHERE published_at IS NULL AND status IN ('Pending', 'Processing')
              AND NOT EXISTS (SELECT 1 FROM images i
                               WHERE i.request_id = r.id AND i.status = 'Pending'
                                 AND i.enqueued_at IS NULL AND i.leader_id IS NULL)"""
    )
    return int(result.split()[-1])


async def next_due(conn: Connection) -> float | None:
    """Seconds until the earliest deferred image is due for release; None if none is deferred."""
    due = await conn.fetchval(
        """SELECT extract(epoch FROM min(not_before) - now())::float8 FROM images
            WHERE status = 'Pending' AND enqueued_at IS NULL AND not_before IS NOT NULL
              AND not_before > now()"""
    )
    return None if due is None else float(due)


@dataclass(frozen=True, slots=True)
class OwnerBacklog:
    owner: str
    requests: int  # open requests
    waiting: int  # images not yet released
    released: int  # images on the task stream, not yet final


async def backlog_by_owner(conn: Connection) -> list[OwnerBacklog]:
    """The backlog of every owner with open requests, from the requests' counters and the
    (small) window, so it costs the same behind a 100,000-image request as behind none."""
    rows = await conn.fetch(
        """SELECT r.owner, count(*) AS requests,
                  sum(r.images_total - r.images_done - r.images_failed)::bigint AS pending,
                  COALESCE(sum(w.n), 0)::bigint AS released
             FROM requests r
             LEFT JOIN (SELECT request_id, count(*) AS n FROM images
                         WHERE status = 'Pending' AND enqueued_at IS NOT NULL
                         GROUP BY request_id) w ON w.request_id = r.id
            WHERE r.status IN ('Pending', 'Processing')
            GROUP BY r.owner
            ORDER BY r.owner"""
    )
    return [
        OwnerBacklog(r["owner"], r["requests"], max(0, r["pending"] - r["released"]), r["released"])
        for r in rows
    ]


# ---------------------------------------------------------------- worker


@dataclass(frozen=True, slots=True)
class Counters:
    request_id: uuid.UUID
    images_total: int
    images_done: int
    images_failed: int
    status: str = "Processing"
    bytes_in: int = 0
    bytes_out: int = 0
    ssim_sum: float = 0.0  # over the ssim_count done images whose SSIM was measured
    ssim_count: int = 0

    @classmethod
    def of(cls, request: RequestRow) -> Counters:
        return cls(
            request.id,
            request.images_total,
            request.images_done,
            request.images_failed,
            request.status,
            request.bytes_in,
            request.bytes_out,
            request.ssim_sum,
            request.ssim_count,
        )

    @property
    def mean_ssim(self) -> float | None:
        return self.ssim_sum / self.ssim_count if self.ssim_count else None

    @property
    def all_final(self) -> bool:
        return self.images_done + self.images_failed >= self.images_total


@dataclass(frozen=True, slots=True)
class ImageState:
    status: str
    deferred: bool  # back to waiting until a later time (defer_image): a task of it is stale
    busy_waits: int = 0  # times it was put back because its origin's connections were busy
    cancelling: bool = False  # its request is being cancelled (lifecycle.cancel_request)

    @property
    def startable(self) -> bool:
        """A delivered task of this image may download it now."""
        return self.status == "Pending" and not self.deferred and not self.cancelling


async def image_states(conn: Connection, image_ids: Sequence[int]) -> dict[int, ImageState]:
    """The state of each image, in one query; an image that is gone is absent."""
    rows = await conn.fetch(
        """SELECT i.id, i.status, i.busy_waits,
                  i.enqueued_at IS NULL AND COALESCE(i.not_before > now(), false) AS deferred,
                  r.cancel_requested_at IS NOT NULL AND r.status IN ('Pending', 'Processing')
                      AS cancelling
             FROM images i JOIN requests r ON r.id = i.request_id
            WHERE i.id = ANY($1::bigint[])""",
        list(image_ids),
    )
    return {
        row["id"]: ImageState(
            row["status"], bool(row["deferred"]), row["busy_waits"], bool(row["cancelling"])
        )
        for row in rows
    }


async def record_attempt(
    conn: Connection, image_id: int, *, code: str | None = None, message: str | None = None
) -> int:
    """Count one fetch attempt; a failed one leaves its error on the still-Pending row."""
    attempts = await conn.fetchval(
        """UPDATE images
              SET attempts = attempts + 1,
                  error_code = COALESCE($2, error_code),
                  error_message = COALESCE($3, error_message),
                  updated_at = now()
            WHERE id = $1 AND status = 'Pending'
        RETURNING attempts""",
        image_id,
        code,
        message[:1000] if message else None,
    )
    return int(attempts or 0)


async def defer_image(
    conn: Connection,
    image_id: int,
    seconds: float,
    *,
    wait: Literal["retry", "cooldown", "busy"] = "retry",
    most: int | None = None,
) -> bool:
    """Put a released image back to waiting, not to be released again for `seconds`, so its
    task gives its worker slot back while it waits (docs/scheduling.md). A wait for an
    origin's cooldown or for a connection to a busy origin spends no attempt: it counts in the
    image's cooldown_waits or busy_waits, of which there may be at most `most`. False when the
    image is final (its request was cancelled) or has waited so `most` times already."""
    deferred = await conn.fetchval(
        """UPDATE images
              SET enqueued_at = NULL, stream_entry_id = NULL,
                  not_before = now() + make_interval(secs => $2),
                  cooldown_waits = cooldown_waits + ($3 = 'cooldown')::int,
                  busy_waits = busy_waits + ($3 = 'busy')::int,
                  updated_at = now()
            WHERE id = $1 AND status = 'Pending'
              AND ($4::int IS NULL
                   OR CASE $3 WHEN 'cooldown' THEN cooldown_waits
                              WHEN 'busy' THEN busy_waits END < $4)
        RETURNING id""",
        image_id,
        seconds,
        wait,
        most,
    )
    return deferred is not None


# One statement per outcome: the image's conditional state change, the same outcome for its
# followers (images of the same URL later in the request) and the request's counters move
# atomically in a single round trip (the hot path of every worker). When the image was already
# final, the CTEs update nothing and neither does the request. `revived` marks an image that was
# counted failed (CANCELLED) before this outcome: it leaves images_failed as it joins images_done.
_FOLLOWERS_AND_COUNTERS = """,
img AS (
    SELECT request_id, count(*) FILTER (WHERE done) AS done,
           count(*) FILTER (WHERE NOT done) AS failed,
           count(*) FILTER (WHERE revived) AS revived,
           COALESCE(sum(bytes_in), 0) AS bytes_in, COALESCE(sum(bytes_out), 0) AS bytes_out,
           COALESCE(sum(ssim::double precision), 0) AS ssim_sum, count(ssim) AS ssim_count
      FROM (SELECT request_id, bytes_in, bytes_out, ssim, done, revived FROM leader
            UNION ALL
            SELECT request_id, bytes_in, bytes_out, ssim, done, revived FROM followers) outcomes
     GROUP BY request_id),
counted AS (
UPDATE requests
   SET images_done = images_done + img.done,
       images_failed = images_failed + img.failed - img.revived,
       bytes_in = requests.bytes_in + img.bytes_in,
       bytes_out = requests.bytes_out + img.bytes_out,
       ssim_sum = requests.ssim_sum + img.ssim_sum,
       ssim_count = requests.ssim_count + img.ssim_count,
       status = CASE WHEN status = 'Pending' THEN 'Processing' ELSE status END,
       updated_at = now()
  FROM img
 WHERE requests.id = img.request_id
RETURNING requests.id, images_total, images_done, images_failed, status,
          requests.bytes_in, requests.bytes_out, requests.ssim_sum, requests.ssim_count)"""

# What a cancelled image's row says (its code is services.common.outcome CANCELLED).
CANCELLED_CODE = "CANCELLED"

# The outcomes of one or more images, one row each, from arrays ($1 to $13, in DoneImage's
# order): the image, its output key, bytes in and out, width, height, kept_source, SSIM, quality,
# note, the image whose stored output was copied (another request's, else NULL) and the
# source's and the options' digests (services/worker/dedup.py). When both digests are given, the
# output is remembered for the owner's later requests (the newest copy wins, so deleting an older
# request keeps the output reusable; of two in one statement, the later image). {leader} and
# {follower}: the state an image must be in to take this outcome; {revived}: whether it was
# counted failed until now; {locked}: a CTE that locks the images first, or nothing. The
# statement returns one row per image it recorded, with its request's counters after the
# whole statement.
_DONE_TEMPLATE = """
WITH v AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::integer[], $4::integer[], $5::integer[],
                         $6::integer[], $7::boolean[], $8::real[], $9::smallint[], $10::text[],
                         $11::bigint[], $12::bytea[], $13::bytea[])
        AS v(id, output_key, bytes_in, bytes_out, width, height, kept_source, ssim, quality,
             note, reused_from, source_sha256, options_sha256)),{locked}
leader AS (
    UPDATE images
       SET status = 'Done', output_key = v.output_key, bytes_in = v.bytes_in,
           bytes_out = v.bytes_out, width = v.width, height = v.height,
           kept_source = v.kept_source, ssim = v.ssim, quality = v.quality, note = v.note,
           reused_from = v.reused_from, attempts = images.attempts + 1, error_code = NULL,
           error_message = NULL, updated_at = now()
      FROM v
     WHERE images.id = v.id AND {leader}
 RETURNING images.id, images.request_id, images.output_key, images.bytes_in, images.bytes_out,
           images.width, images.height, images.kept_source, images.ssim, images.quality,
           images.note, v.source_sha256, v.options_sha256, true AS done, {revived} AS revived),
followers AS (
    UPDATE images f
       SET status = 'Done', output_key = l.output_key, bytes_in = l.bytes_in,
           bytes_out = l.bytes_out, width = l.width, height = l.height,
           kept_source = l.kept_source, ssim = l.ssim, quality = l.quality, note = l.note,
           error_code = NULL, error_message = NULL, updated_at = now()
      FROM leader l
     WHERE f.leader_id = l.id AND {follower}
 RETURNING f.request_id, f.bytes_in, f.bytes_out, f.ssim, true AS done, {revived} AS revived),
remembered AS (
    INSERT INTO reusable_outputs (owner, source_sha256, options_sha256, request_id, image_id,
                                  output_key, bytes_out, width, height, kept_source, ssim,
                                  quality, note)
    SELECT DISTINCT ON (r.owner, l.source_sha256, l.options_sha256)
           r.owner, l.source_sha256, l.options_sha256, l.request_id, l.id, l.output_key,
           l.bytes_out, l.width, l.height, l.kept_source, l.ssim, l.quality, l.note
      FROM leader l JOIN requests r ON r.id = l.request_id
     WHERE l.source_sha256 IS NOT NULL AND l.options_sha256 IS NOT NULL
     ORDER BY r.owner, l.source_sha256, l.options_sha256, l.id DESC
        ON CONFLICT (owner, source_sha256, options_sha256) DO UPDATE
       SET request_id = excluded.request_id, image_id = excluded.image_id,
           output_key = excluded.output_key, bytes_out = excluded.bytes_out,
           width = excluded.width, height = excluded.height,
           kept_source = excluded.kept_source, ssim = excluded.ssim,
           quality = excluded.quality, note = excluded.note, created_at = now())"""

_RECORDED = """
SELECT l.id AS image_id, c.*
  FROM leader l JOIN counted c ON c.id = l.request_id"""

# The images are locked in id order before the update, whatever the plan's join order: a
# nested loop over the arrays would take them in array order (sorted, _done_arrays), but a hash
# join, the plan of a small table, in the order it scans the table. A cancel and the feeder take
# them in id order too (lifecycle._CANCEL).
_IMAGES_DONE = (
    _DONE_TEMPLATE.format(
        locked="""
locked AS (
    SELECT id FROM images WHERE id = ANY($1::bigint[]) AND status = 'Pending'
     ORDER BY id
       FOR UPDATE),""",
        leader="images.status = 'Pending' AND images.id IN (SELECT id FROM locked)",
        follower="f.status = 'Pending'",
        revived="false",
    )
    + _FOLLOWERS_AND_COUNTERS
    + _RECORDED
)

# The same outcome arriving after the image's request was cancelled while it was in flight
# (docs/lifecycle.md): the image and its followers, failed CANCELLED by the cancel, turn Done,
# and the request stays Cancelled (or marked, while the cancel's chunks run). The request row
# is locked first (FOR UPDATE), the order a retry takes, and re-read at its newest version: a
# request retried or being deleted meanwhile is left alone.
_LATE_IMAGES_DONE = (
    _DONE_TEMPLATE.format(
        locked="",
        leader=f"""images.status = 'Failed' AND images.error_code = '{CANCELLED_CODE}'
           AND EXISTS (SELECT 1 FROM requests r
                        WHERE r.id = images.request_id
                          AND (r.status = 'Cancelled' OR r.cancel_requested_at IS NOT NULL)
                          AND r.deleting_at IS NULL
                          FOR UPDATE)""",
        follower=f"f.status = 'Failed' AND f.error_code = '{CANCELLED_CODE}'",
        revived="true",
    )
    + _FOLLOWERS_AND_COUNTERS
    + _RECORDED
)

_IMAGE_FAILED = (
    """
WITH leader AS (
    UPDATE images
       SET status = 'Failed', error_code = $2, error_message = $3, updated_at = now()
     WHERE id = $1 AND status = 'Pending'
 RETURNING id, request_id, NULL::integer AS bytes_in, NULL::integer AS bytes_out,
           NULL::real AS ssim, false AS done, false AS revived),
followers AS (
    UPDATE images f
       SET status = 'Failed', error_code = $2, error_message = $3, updated_at = now()
      FROM leader l
     WHERE f.leader_id = l.id AND f.status = 'Pending'
 RETURNING f.request_id, NULL::integer AS bytes_in, NULL::integer AS bytes_out,
           NULL::real AS ssim, false AS done, false AS revived)"""
    + _FOLLOWERS_AND_COUNTERS
    + "\nSELECT * FROM counted"
)


@dataclass(frozen=True, slots=True)
class SourceDigests:
    """What identifies an output across an owner's requests: the sha256 of the source's bytes
    and the digest of the options that change the output (services/worker/dedup.py)."""

    source: bytes
    options: bytes


@dataclass(frozen=True, slots=True)
class StoredOutput:
    """An image's output as stored under `output_key`, and what it kept."""

    image_id: int
    output_key: str
    bytes_out: int
    width: int
    height: int
    kept_source: bool
    ssim: float | None
    quality: int | None
    note: str | None


@dataclass(frozen=True, slots=True)
class DoneImage:
    """An image's outcome Done: its output, stored under its key, and what identifies it."""

    output: StoredOutput  # output.image_id is the image
    bytes_in: int
    digests: SourceDigests | None = None  # given: remembered for the owner's later requests
    reused_from: int | None = None  # the image whose stored output was copied for this one


async def record_images_done(conn: Connection, images: Sequence[DoneImage]) -> dict[int, Counters]:
    """Mark Pending images Done (counting each one's successful attempt), give their followers
    the same outcome and move the counters, in one statement; returns each recorded image's
    request counters after it, by image id. An image that was final already is absent.

    Give it the images of one request at a time: each statement then locks one request row,
    after its images, the order a cancel takes them too, so statements of several workers can
    never wait for each other in a cycle.

    An image that was in flight when its request was cancelled (failed CANCELLED, the request
    Cancelled) is recorded Done too, it and its followers leaving images_failed for
    images_done; its Counters then have the status Cancelled."""
    if not images:
        return {}
    recorded = _recorded(await conn.fetch(_IMAGES_DONE, *_done_arrays(images)))
    late = [image for image in images if image.output.image_id not in recorded]
    if late:
        # A second statement, so it reads the cancel as committed even when the cancel
        # committed while the first one waited for the image rows (rare: not the hot path).
        recorded |= _recorded(await conn.fetch(_LATE_IMAGES_DONE, *_done_arrays(late)))
    return recorded


def _done_arrays(images: Sequence[DoneImage]) -> list[list[Any]]:
    """The thirteen arrays of _DONE_TEMPLATE, an element per image, in image id order. The
    first statement locks its images in id order whatever its plan (_IMAGES_DONE); the late
    one, with a nested loop over the arrays, in their order. So two batches holding the same
    images (a redelivered task) lock them in one order and never wait for each other in a
    cycle."""
    images = sorted(images, key=lambda image: image.output.image_id)
    rows = [
        (
            image.output.image_id,
            image.output.output_key,
            image.bytes_in,
            image.output.bytes_out,
            image.output.width,
            image.output.height,
            image.output.kept_source,
            image.output.ssim,
            image.output.quality,
            image.output.note or None,  # an empty note is stored as NULL
            image.reused_from,
            image.digests.source if image.digests else None,
            image.digests.options if image.digests else None,
        )
        for image in images
    ]
    return [list(column) for column in zip(*rows, strict=True)]


def _recorded(rows: list[asyncpg.Record]) -> dict[int, Counters]:
    return {row["image_id"]: _counters(row) for row in rows}


async def record_image_done(
    conn: Connection,
    image_id: int,
    *,
    output_key: str,
    bytes_in: int,
    bytes_out: int,
    width: int,
    height: int,
    kept_source: bool,
    ssim: float | None = None,
    quality: int | None = None,
    note: str = "",
    digests: SourceDigests | None = None,
    reused_from: int | None = None,
) -> Counters | None:
    """record_images_done for one image: its request's counters, or None if it was final
    already. `ssim`, `quality` and `note` are what the output kept (services/worker/tuning.py)."""
    output = StoredOutput(
        image_id, output_key, bytes_out, width, height, kept_source, ssim, quality, note
    )
    recorded = await record_images_done(conn, [DoneImage(output, bytes_in, digests, reused_from)])
    return recorded.get(image_id)


async def record_image_failed(
    conn: Connection, image_id: int, *, code: str, message: str
) -> Counters | None:
    """Mark a Pending image and its followers Failed with its reason and move the counters."""
    row = await conn.fetchrow(_IMAGE_FAILED, image_id, code, message[:1000])
    return _counters(row) if row else None


async def find_reusable_outputs(
    conn: Connection, lookups: Sequence[tuple[uuid.UUID, SourceDigests]]
) -> list[StoredOutput | None]:
    """For each (request, digests), the output the request's owner stored for the same source
    and options, or None; one query for the whole batch, answers in the order asked."""
    if not lookups:
        return []
    rows = await conn.fetch(
        """SELECT l.i, o.image_id, o.output_key, o.bytes_out, o.width, o.height, o.kept_source,
                  o.ssim, o.quality, o.note
             FROM unnest($1::uuid[], $2::bytea[], $3::bytea[])
                  WITH ORDINALITY AS l (request_id, source_sha256, options_sha256, i)
             JOIN requests r ON r.id = l.request_id
             JOIN reusable_outputs o ON o.owner = r.owner
                                    AND o.source_sha256 = l.source_sha256
                                    AND o.options_sha256 = l.options_sha256""",
        [request_id for request_id, _ in lookups],
        [digests.source for _, digests in lookups],
        [digests.options for _, digests in lookups],
    )
    found = {
        row["i"]: StoredOutput(**{name: value for name, value in row.items() if name != "i"})
        for row in rows
    }
    return [found.get(i) for i in range(1, len(lookups) + 1)]


def _counters(row: asyncpg.Record | None) -> Counters:
    assert row is not None, "the image row references its request"
    return Counters(
        row["id"],
        row["images_total"],
        row["images_done"],
        row["images_failed"],
        row["status"],
        row["bytes_in"],
        row["bytes_out"],
        row["ssim_sum"],
        row["ssim_count"],
    )


async def counters(conn: Connection, request_id: uuid.UUID) -> Counters | None:
    row = await conn.fetchrow(
        """SELECT id, images_total, images_done, images_failed, status, bytes_in, bytes_out,
                  ssim_sum, ssim_count
             FROM requests WHERE id = $1""",
        request_id,
    )
    return _counters(row) if row else None


async def counters_of(conn: Connection, request_ids: Sequence[uuid.UUID]) -> list[Counters]:
    """The counters of several requests in one query (the progress hub's safety net)."""
    rows = await conn.fetch(
        """SELECT id, images_total, images_done, images_failed, status, bytes_in, bytes_out,
                  ssim_sum, ssim_count
             FROM requests WHERE id = ANY($1::uuid[])""",
        list(request_ids),
    )
    return [_counters(row) for row in rows]


async def is_final(conn: Connection, request_id: uuid.UUID) -> bool:
    status = await conn.fetchval("SELECT status FROM requests WHERE id = $1", request_id)
    return status in ("Completed", "Failed", "Cancelled")


async def last_error(conn: Connection, image_id: int) -> tuple[str | None, str | None]:
    row = await conn.fetchrow(
        "SELECT error_code, error_message FROM images WHERE id = $1", image_id
    )
    return (row["error_code"], row["error_message"]) if row else (None, None)


async def finish_request(
    conn: Connection, request_id: uuid.UUID, *, output_csv_key: str
) -> RequestRow | None:
    """Move a request whose images are all final to Completed or Failed, exactly once.

    Returns the finished request, or None when it was already final (another worker won) or
    is being cancelled (the cancel finishes it: lifecycle.finish_cancel).
    """
    row = await conn.fetchrow(
        f"""UPDATE requests
               SET status = CASE WHEN images_done > 0 THEN 'Completed' ELSE 'Failed' END,
                   output_csv_key = $2, completed_at = now(), updated_at = now(),
                   finished_event_at = NULL
             WHERE id = $1 AND status IN ('Pending', 'Processing')
               AND images_done + images_failed = images_total AND cancel_requested_at IS NULL
         RETURNING {_REQUEST_COLUMNS}""",
        request_id,
        output_csv_key,
    )
    return _request(row) if row else None


async def mark_event_published(conn: Connection, request_id: uuid.UUID, generation: int) -> None:
    await conn.execute(
        """UPDATE requests SET finished_event_at = now()
            WHERE id = $1 AND finish_generation = $2
              AND status IN ('Completed', 'Failed', 'Cancelled')""",
        request_id,
        generation,
    )


@dataclass(frozen=True, slots=True)
class RetryBatch:
    request: RequestRow
    retried: int  # images now Pending again, waiting for the feeder


async def failed_images(conn: Connection, request_id: uuid.UUID, *, owner: str) -> int | None:
    """How many of the request's images are Failed (its counter); None as retry_failed_images
    would answer None."""
    count = await conn.fetchval(
        """SELECT images_failed FROM requests
            WHERE id = $1 AND owner = $2 AND deleting_at IS NULL""",
        request_id,
        owner,
    )
    return None if count is None else int(count)


@dataclass(frozen=True, slots=True)
class MoreFailed:
    """The request had more Failed images than the retry was allowed (`most`): nothing was
    changed."""

    failed: int


@dataclass(frozen=True, slots=True)
class BeingCancelled:
    """A cancel of the request is under way (lifecycle.cancel_request): nothing was changed."""


async def retry_failed_images(
    conn: Connection,
    request_id: uuid.UUID,
    *,
    owner: str,
    traceparent: str = "",
    most: int | None = None,
) -> RetryBatch | MoreFailed | BeingCancelled | None:
    """Put a request's failed images back to Pending and waiting for the feeder, and reopen
    it (its next tasks continue `traceparent`, the retry's trace); None if `owner` has no such
    request, or it is being deleted (a delete left half done is finished by the janitor, and
    reopening it would put images back to work under a request whose rows are about to go).

    With `most`, MoreFailed when more than that many are Failed, read under the request's lock
    (so the count cannot change before the update): a caller that charged for the images it
    counted before learns that more failed since. Every Failed image is retried or none is, so
    a dedup leader and its followers, which fail together, are retried together.

    BeingCancelled while a cancel of the request is under way: its chunks would fail the images
    again. A retry of a Cancelled request clears the cancel's mark."""
    async with conn.transaction():
        found = await conn.fetchrow(
            """SELECT images_failed, cancel_requested_at IS NOT NULL
                       AND status IN ('Pending', 'Processing') AS cancelling
                 FROM requests
                WHERE id = $1 AND owner = $2 AND deleting_at IS NULL
                  FOR UPDATE""",
            request_id,
            owner,
        )
        if found is None:
            return None
        if found["cancelling"]:
            return BeingCancelled()
        failed = found["images_failed"]
        if most is not None and failed > most:
            return MoreFailed(failed)
        # A count, not the rows: 300,000 (id, URL) pairs at the size limit were some 30 MB
        # for ingest to receive and hold, and the feeder reads the images from Postgres anyway.
        updated = await conn.execute(
            """UPDATE images
                  SET status = 'Pending', error_code = NULL, error_message = NULL, attempts = 0,
                      stream_entry_id = NULL, enqueued_at = NULL, not_before = NULL,
                      cooldown_waits = 0, busy_waits = 0, updated_at = now()
                WHERE request_id = $1 AND status = 'Failed'""",
            request_id,
        )
        retried = int(updated.split()[-1])
        row = await conn.fetchrow(
            f"""UPDATE requests
                   SET images_failed = images_failed - $2,
                       status = CASE WHEN $2 = 0 THEN status
                                     WHEN images_done > 0 THEN 'Processing' ELSE 'Pending' END,
                       completed_at = CASE WHEN $2 = 0 THEN completed_at END,
                       output_csv_key = CASE WHEN $2 = 0 THEN output_csv_key END,
                       finish_generation = finish_generation + CASE WHEN $2 = 0 THEN 0 ELSE 1 END,
                       finished_event_at = CASE WHEN $2 = 0 THEN finished_event_at END,
                       traceparent = COALESCE($3, traceparent),
                       cancel_requested_at = CASE WHEN $2 = 0 THEN cancel_requested_at END,
                       updated_at = now()
                 WHERE id = $1
             RETURNING {_REQUEST_COLUMNS}""",
            request_id,
            retried,
            traceparent or None,
        )
        assert row is not None, "locked above"
        return RetryBatch(_request(row), retried)


# ---------------------------------------------------------------- reconciler


@dataclass(frozen=True, slots=True)
class StaleImage:
    image_id: int
    request_id: uuid.UUID
    input_url: str
    stream_entry_id: str | None
    options: dict[str, Any]
    enqueued_at: datetime  # when it was released (claimed): a republish claims it from then


async def stale_pending_images(
    conn: Connection, *, min_age_seconds: float, limit: int
) -> list[StaleImage]:
    """Pending images released to the stream more than `min_age_seconds` ago (the window;
    images still waiting for their turn are the feeder's, not lost)."""
    rows = await conn.fetch(
        """SELECT i.id, i.request_id, i.input_url, i.stream_entry_id, r.options, i.enqueued_at
             FROM images i JOIN requests r ON r.id = i.request_id
            WHERE i.status = 'Pending' AND i.enqueued_at IS NOT NULL
              AND i.enqueued_at < now() - make_interval(secs => $1)
              AND r.cancel_requested_at IS NULL
            ORDER BY i.enqueued_at, i.id
            LIMIT $2""",
        min_age_seconds,
        limit,
    )
    return [
        StaleImage(
            r["id"],
            r["request_id"],
            r["input_url"],
            r["stream_entry_id"],
            json.loads(r["options"]),
            r["enqueued_at"],
        )
        for r in rows
    ]


async def unfinished_complete_requests(
    conn: Connection, *, min_age_seconds: float, limit: int
) -> list[uuid.UUID]:
    """Open requests whose images are all final, untouched for `min_age_seconds`."""
    rows = await conn.fetch(
        """SELECT id FROM requests
            WHERE status IN ('Pending', 'Processing') AND cancel_requested_at IS NULL
              AND images_done + images_failed = images_total AND published_at IS NOT NULL
              AND updated_at < now() - make_interval(secs => $1)
            ORDER BY updated_at LIMIT $2""",
        min_age_seconds,
        limit,
    )
    return [r["id"] for r in rows]


async def unpublished_finished_requests(
    conn: Connection, *, min_age_seconds: float, limit: int
) -> list[RequestRow]:
    """Final requests whose request.finished is not known to be on the events stream."""
    rows = await conn.fetch(
        f"""SELECT {_REQUEST_COLUMNS} FROM requests
             WHERE status IN ('Completed', 'Failed', 'Cancelled') AND finished_event_at IS NULL
               AND deleting_at IS NULL
               AND completed_at < now() - make_interval(secs => $1)
             ORDER BY completed_at LIMIT $2""",
        min_age_seconds,
        limit,
    )
    return [_request(r) for r in rows]


async def backlog(conn: Connection) -> int:
    """Images accepted and not yet final, across all requests: the true queue length. From the
    open requests' counters (moved with every image), not by counting image rows."""
    return int(
        await conn.fetchval(
            """SELECT COALESCE(sum(images_total - images_done - images_failed), 0)
                 FROM requests WHERE status IN ('Pending', 'Processing')"""
        )
    )


# ---------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class RequestRow:
    id: uuid.UUID
    status: str
    options: dict[str, Any]
    webhook_url: str | None
    owner: str
    products_total: int
    images_total: int
    images_done: int
    images_failed: int
    bytes_in: int
    bytes_out: int
    output_csv_key: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    finish_generation: int
    started_at: datetime | None = None  # when its first task was released (the feeder)
    ssim_sum: float = 0.0
    ssim_count: int = 0

    @property
    def finished_event_id(self) -> str:
        """One id per finish, the same however often it is published, so receivers dedupe."""
        return f"evt_{self.id.hex}_{self.finish_generation}"


_REQUEST_COLUMNS = """id, status, options, webhook_url, owner, products_total, images_total,
    images_done, images_failed, bytes_in, bytes_out, output_csv_key, created_at, updated_at,
    completed_at, finish_generation, started_at, ssim_sum, ssim_count"""


def _request(row: asyncpg.Record) -> RequestRow:
    values = dict(row)
    values["options"] = json.loads(values["options"])
    return RequestRow(**values)


async def get_request(conn: Connection, request_id: uuid.UUID) -> RequestRow | None:
    row = await conn.fetchrow(f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE id = $1", request_id)
    return _request(row) if row else None


async def request_statuses(
    conn: Connection, request_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, str]:
    """The status of each of `request_ids` that exists (the concurrency limit's bookkeeping)."""
    rows = await conn.fetch(
        "SELECT id, status FROM requests WHERE id = ANY($1::uuid[])", list(request_ids)
    )
    return {r["id"]: r["status"] for r in rows}


async def owned_request_ids(
    conn: Connection, request_ids: Sequence[uuid.UUID], owner: str
) -> set[uuid.UUID]:
    """Those of `request_ids` that belong to `owner`."""
    rows = await conn.fetch(
        "SELECT id FROM requests WHERE id = ANY($1::uuid[]) AND owner = $2",
        list(request_ids),
        owner,
    )
    return {r["id"] for r in rows}


@dataclass(frozen=True, slots=True)
class ImageRow:
    input_url: str
    status: str
    output_key: str | None
    error_code: str | None
    error_message: str | None
    bytes_in: int | None  # all five set once the image is Done (ssim and quality: since 0009)
    bytes_out: int | None
    ssim: float | None = None
    quality: int | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class ProductWithImages:
    row_number: int
    serial_number: str
    product_name: str
    images: list[ImageRow]


# The page of products is chosen first through the (request_id, row_number) index, then each
# product's images are gathered through the (product_id, position) index: a page costs the
# same on the first page of a 100,000-product request as on its last.
_PRODUCT_PAGE = """
    SELECT p.row_number, p.serial_number, p.product_name, i.*
      FROM (SELECT id, row_number, serial_number, product_name
              FROM products
             WHERE request_id = $1 AND row_number > $2
             ORDER BY row_number
             LIMIT $3) p
     CROSS JOIN LATERAL (
           SELECT array_agg(input_url ORDER BY position) AS input_urls,
                  array_agg(status ORDER BY position) AS statuses,
                  array_agg(output_key ORDER BY position) AS output_keys,
                  array_agg(error_code ORDER BY position) AS error_codes,
                  array_agg(error_message ORDER BY position) AS error_messages,
                  array_agg(bytes_in ORDER BY position) AS bytes_in,
                  array_agg(bytes_out ORDER BY position) AS bytes_out,
                  array_agg(ssim ORDER BY position) AS ssims,
                  array_agg(quality ORDER BY position) AS qualities,
                  array_agg(note ORDER BY position) AS notes
             FROM images WHERE product_id = p.id) i
     ORDER BY p.row_number"""


async def list_products(
    conn: Connection, request_id: uuid.UUID, *, after_row: int, limit: int
) -> list[ProductWithImages]:
    """One page of products in CSV order, by keyset on row_number (no OFFSET scans)."""
    rows = await conn.fetch(_PRODUCT_PAGE, request_id, after_row, limit)
    return [_product(r) for r in rows]


def _product(row: asyncpg.Record) -> ProductWithImages:
    images = [
        ImageRow(*values)
        for values in zip(
            row["input_urls"],
            row["statuses"],
            row["output_keys"],
            row["error_codes"],
            row["error_messages"],
            row["bytes_in"],
            row["bytes_out"],
            row["ssims"],
            row["qualities"],
            row["notes"],
            strict=True,
        )
    ]
    return ProductWithImages(row["row_number"], row["serial_number"], row["product_name"], images)


async def iter_products(
    conn: Connection, request_id: uuid.UUID, *, batch: int = 1000
) -> AsyncIterator[ProductWithImages]:
    """Every product of a request in CSV order, fetched a page at a time."""
    after = 0
    while True:
        page = await list_products(conn, request_id, after_row=after, limit=batch)
        for product in page:
            yield product
        if len(page) < batch:
            return
        after = page[-1].row_number


# ---------------------------------------------------------------- browser sessions


@dataclass(frozen=True, slots=True)
class SessionRow:
    owner: str
    key_hash: bytes
    expires_at: datetime


async def create_session(
    conn: Connection, id_hash: bytes, owner: str, key_hash: bytes, lifetime_seconds: float
) -> datetime:
    """Store a session (by the hash of its id); returns when it expires. Sessions that have
    expired are deleted on the way, so the table holds live sessions only."""
    await conn.execute("DELETE FROM sessions WHERE expires_at < now()")
    expires_at: datetime = await conn.fetchval(
        """INSERT INTO sessions (id_hash, owner, key_hash, expires_at)
           VALUES ($1, $2, $3, now() + make_interval(secs => $4))
           RETURNING expires_at""",
        id_hash,
        owner,
        key_hash,
        lifetime_seconds,
    )
    return expires_at


async def find_session(conn: Connection, id_hash: bytes) -> SessionRow | None:
    """The session with this id hash, unless it has expired."""
    row = await conn.fetchrow(
        """SELECT owner, key_hash, expires_at FROM sessions
            WHERE id_hash = $1 AND expires_at > now()""",
        id_hash,
    )
    return SessionRow(row["owner"], bytes(row["key_hash"]), row["expires_at"]) if row else None


async def delete_session(conn: Connection, id_hash: bytes) -> None:
    await conn.execute("DELETE FROM sessions WHERE id_hash = $1", id_hash)
