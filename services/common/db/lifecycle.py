"""The SQL of a request's lifecycle after acceptance: listing, cancelling, deleting, retention
(docs/lifecycle.md).

A delete marks the request `deleting_at` first and removes its rows last, so a delete that is
interrupted (a crash between the stored objects and the rows) is found and finished again; the
request is gone for its owner from the first step on.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from services.common import failpoints
from services.common.db.queries import (
    _REQUEST_COLUMNS,
    CANCELLED_CODE,
    Connection,
    RequestRow,
    _request,
)

FINAL = ("Completed", "Failed", "Cancelled")
OPEN = ("Pending", "Processing")
# What a cancelled image's row says, with its code CANCELLED_CODE.
CANCELLED_MESSAGE = "the request was cancelled before this image was processed"


async def visible_request(conn: Connection, request_id: uuid.UUID, owner: str) -> RequestRow | None:
    """The request if `owner` owns it and no delete has started on it."""
    row = await conn.fetchrow(
        f"""SELECT {_REQUEST_COLUMNS} FROM requests
             WHERE id = $1 AND owner = $2 AND deleting_at IS NULL""",
        request_id,
        owner,
    )
    return _request(row) if row else None


async def list_requests(
    conn: Connection,
    owner: str,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    status: str | None,
    limit: int,
) -> list[RequestRow]:
    """`owner`'s requests newest first, after the keyset position `after` (created_at, id),
    only those in `status` when given; requests being deleted are left out."""
    rows = await conn.fetch(
        f"""SELECT {_REQUEST_COLUMNS} FROM requests
             WHERE owner = $1 AND deleting_at IS NULL
               AND ($2::text IS NULL OR status = $2)
               AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
             ORDER BY created_at DESC, id DESC
             LIMIT $5""",
        owner,
        status,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [_request(r) for r in rows]


@dataclass(frozen=True, slots=True)
class Cancelled:
    request: RequestRow
    changed: bool  # False: it was Cancelled already (the same state is returned)


# A cancel in three steps, so that no statement holds many of a request's rows: a worker
# recording one of its images, or the feeder claiming one, waits for one chunk at most, not for
# the whole request (a cancel of 300,000 images in one statement held them 5 s, and every
# worker and the feeder with them). bench/statements.py times each step.
#
# 1. _MARK_CANCEL: the request row only. From then on the feeder releases none of its images,
#    workers start none, a retry is refused, and no worker finishes it.
# 2. _CANCEL_CHUNK, until it finds nothing: the next CANCEL_CHUNK images not final, in id order,
#    fail with CANCELLED, and the request's counter moves with them; each chunk commits alone.
# 3. _CANCEL: the request, Cancelled, with its output CSV's key and its event to publish; and,
#    for safety, any image after the last chunk's that is not final (none: only a retry makes
#    an image Pending again, and a retry is refused while the request is marked).
#
# Whatever the kind of an image (waiting for the feeder, on the stream, being processed, a
# dedup follower), it ends as CANCELLED. A cancel that dies after step 1 leaves the request
# marked and open: the reconciler finishes it (finish_cancel), and so does a cancel again.
#
# Lock order: the images in id order, then the request row, in each chunk as in step 3. Every
# other writer of several of a request's images (a worker's record_images_done, a release's
# claim_releases and record_releases) takes them in id order too, so whoever waits for another
# holds only lower ids than the row it waits for, and no cycle can form. Without the ORDER BY,
# a big request's update runs as a bitmap scan and locks in the rows' physical order, which
# releases and deferrals (new row versions, enqueued_at being indexed) move away from id order.
CANCEL_CHUNK = 2_000

_MARK_CANCEL = """
UPDATE requests SET cancel_requested_at = COALESCE(cancel_requested_at, now()), updated_at = now()
 WHERE id = $1 AND status IN ('Pending', 'Processing') AND deleting_at IS NULL
RETURNING 1"""

_CANCELLING = """EXISTS (SELECT 1 FROM requests
                    WHERE id = $1 AND status IN ('Pending', 'Processing')
                      AND cancel_requested_at IS NOT NULL)"""

_FAIL_LOCKED = """
img AS (
    UPDATE images
       SET status = 'Failed', error_code = $2, error_message = $3, updated_at = now()
      FROM locked
     WHERE images.id = locked.id AND images.status = 'Pending'
 RETURNING images.id)"""

_CANCEL_CHUNK = f"""
WITH locked AS (
    SELECT id FROM images
     WHERE request_id = $1 AND status = 'Pending' AND id > $4 AND {_CANCELLING}
     ORDER BY id
     LIMIT $5
       FOR UPDATE),
{_FAIL_LOCKED},
counted AS (
    UPDATE requests
       SET images_failed = images_failed + (SELECT count(*) FROM img), updated_at = now()
     WHERE id = $1 AND EXISTS (SELECT 1 FROM img)
 RETURNING 1)
SELECT max(id) AS last FROM locked"""

_CANCEL = f"""
WITH locked AS (
    SELECT id FROM images
     WHERE request_id = $1 AND status = 'Pending' AND id > $5 AND {_CANCELLING}
     ORDER BY id
       FOR UPDATE),
{_FAIL_LOCKED}
UPDATE requests
   SET status = 'Cancelled', images_failed = images_failed + (SELECT count(*) FROM img),
       output_csv_key = $4, completed_at = now(), updated_at = now(), finished_event_at = NULL,
       published_at = COALESCE(published_at, now()), publish_lease_until = NULL
 WHERE id = $1 AND status IN ('Pending', 'Processing') AND cancel_requested_at IS NOT NULL
RETURNING {_REQUEST_COLUMNS}"""


async def cancel_request(
    conn: Connection,
    request_id: uuid.UUID,
    owner: str,
    *,
    output_csv_key: str,
    chunk: int = CANCEL_CHUNK,
) -> Cancelled | RequestRow | None:
    """Cancel an open request of `owner`. Returns Cancelled (changed or not), the request
    itself when it is final in another status (the caller's conflict), None when `owner` has
    no such request."""
    found = await visible_request(conn, request_id, owner)
    if found is None:
        return None
    if found.status == "Cancelled":
        return Cancelled(found, changed=False)
    if found.status in FINAL:
        return found
    if not await mark_cancel(conn, request_id):  # final meanwhile
        return await cancel_request(
            conn, request_id, owner, output_csv_key=output_csv_key, chunk=chunk
        )
    row = await finish_cancel(conn, request_id, output_csv_key=output_csv_key, chunk=chunk)
    if row is None:  # another cancel finished it meanwhile
        return await cancel_request(
            conn, request_id, owner, output_csv_key=output_csv_key, chunk=chunk
        )
    return Cancelled(row, changed=True)


async def mark_cancel(conn: Connection, request_id: uuid.UUID) -> bool:
    """Step 1 of a cancel; False when the request is not open (or is being deleted)."""
    return await conn.fetchval(_MARK_CANCEL, request_id) is not None


async def finish_cancel(
    conn: Connection,
    request_id: uuid.UUID,
    *,
    output_csv_key: str,
    chunk: int = CANCEL_CHUNK,
) -> RequestRow | None:
    """Steps 2 and 3 of a cancel of a marked request: the request, now Cancelled; None when it
    is not marked and open (another cancel finished it, or it is gone)."""
    after = 0
    while True:
        swept = await conn.fetchrow(
            _CANCEL_CHUNK, request_id, CANCELLED_CODE, CANCELLED_MESSAGE, after, chunk
        )
        assert swept is not None, "the SELECT returns one row"
        if swept["last"] is None:
            break
        after = swept["last"]
        failpoints.crash_here("cancel.after_chunk")
    row = await conn.fetchrow(
        _CANCEL, request_id, CANCELLED_CODE, CANCELLED_MESSAGE, output_csv_key, after
    )
    return _request(row) if row else None


async def cancels_left_half_done(
    conn: Connection, *, min_age_seconds: float, limit: int
) -> list[uuid.UUID]:
    """Marked, still open requests whose cancel has not moved for `min_age_seconds`: the
    process cancelling them died (finish_cancel finishes them)."""
    rows = await conn.fetch(
        """SELECT id FROM requests
            WHERE cancel_requested_at IS NOT NULL AND status IN ('Pending', 'Processing')
              AND updated_at < now() - make_interval(secs => $1)
            ORDER BY updated_at LIMIT $2""",
        min_age_seconds,
        limit,
    )
    return [r["id"] for r in rows]


# ---------------------------------------------------------------- delete


@dataclass(frozen=True, slots=True)
class Deletable:
    id: uuid.UUID
    owner: str
    status: str
    deleting: bool


async def deletable(conn: Connection, request_id: uuid.UUID) -> Deletable | None:
    """The request whatever its state, a delete under way included (a retry finishes it)."""
    row = await conn.fetchrow(
        "SELECT id, owner, status, deleting_at IS NOT NULL AS deleting FROM requests WHERE id = $1",
        request_id,
    )
    return Deletable(**dict(row)) if row else None


async def lock_output_csv(conn: Connection, request_id: uuid.UUID) -> bool:
    """Take the request's output-CSV lock until the end of the caller's transaction; True when
    the request is still there and not being deleted, so its CSV may be written.

    Everyone who writes a final request's CSV (a cancel, a result that arrives after it) renders
    and stores it holding this lock, so the last one stored was rendered last, after every
    outcome committed before; a delete marks the request holding it, so no CSV is stored under
    the request's prefix once the delete has started listing it."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"output.csv:{request_id}"
    )
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM requests WHERE id = $1 AND deleting_at IS NULL", request_id
        )
    )


async def mark_deleting(conn: Connection, request_id: uuid.UUID) -> bool:
    """The first step of a delete; False when the request is gone or not final."""
    async with conn.transaction():
        await lock_output_csv(conn, request_id)
        result = await conn.execute(
            """UPDATE requests SET deleting_at = COALESCE(deleting_at, now())
                WHERE id = $1 AND status IN ('Completed', 'Failed', 'Cancelled')""",
            request_id,
        )
    return result.split()[-1] != "0"


async def output_unwanted(conn: Connection, image_id: int) -> bool:
    """True when the image is gone or its request is being deleted: an output stored for it
    now may have been missed by the delete's listing of the store, so its writer removes it."""
    return not await conn.fetchval(
        """SELECT 1 FROM images i JOIN requests r ON r.id = i.request_id
            WHERE i.id = $1 AND r.deleting_at IS NULL""",
        image_id,
    )


async def stream_entries(conn: Connection, request_id: uuid.UUID) -> list[str]:
    """The task-stream entries recorded for the request's images."""
    rows = await conn.fetch(
        "SELECT stream_entry_id FROM images WHERE request_id = $1 AND stream_entry_id IS NOT NULL",
        request_id,
    )
    return [r["stream_entry_id"] for r in rows]


@dataclass(frozen=True, slots=True)
class EventWindow:
    """When the request's events can have been published: from its creation to its last
    finish's event, or to no end while that event is not known to be published."""

    since: datetime
    until: datetime | None


async def event_window(conn: Connection, request_id: uuid.UUID) -> EventWindow | None:
    row = await conn.fetchrow(
        """SELECT created_at,
                  CASE WHEN finished_event_at IS NOT NULL
                       THEN GREATEST(completed_at, finished_event_at) END AS until
             FROM requests WHERE id = $1""",
        request_id,
    )
    return EventWindow(row["created_at"], row["until"]) if row else None


async def delete_rows(conn: Connection, request_id: uuid.UUID) -> None:
    """The last step: the request row; its products, images, webhook deliveries and any other
    table referencing it go with it (ON DELETE CASCADE).

    Two of those tables go first, each locked in the order its other writers take it, since
    the cascade, which holds the request row, takes them in its indexes' order:
    - the owner's reusable outputs the request holds, in key order: a worker recording another
      request of the owner takes the same rows over in that order (record_images_done);
    - its webhook deliveries, before the request row: a sender recording a failed attempt
      holds the delivery and then needs the request row for the next attempt's row
      (webhooks.record_attempt).
    A failure between the statements leaves the request marked deleting, and the next try
    finishes it."""
    await conn.execute(
        """WITH held AS (
               SELECT owner, source_sha256, options_sha256 FROM reusable_outputs
                WHERE request_id = $1
                  AND EXISTS (SELECT 1 FROM requests
                               WHERE id = $1 AND deleting_at IS NOT NULL)
                ORDER BY owner, source_sha256, options_sha256
                  FOR UPDATE)
           DELETE FROM reusable_outputs r USING held
            WHERE (r.owner, r.source_sha256, r.options_sha256)
                  = (held.owner, held.source_sha256, held.options_sha256)
              AND r.request_id = $1""",
        request_id,
    )
    await conn.execute(
        """DELETE FROM webhook_deliveries
            WHERE id IN (SELECT id FROM webhook_deliveries
                          WHERE request_id = $1
                            AND EXISTS (SELECT 1 FROM requests
                                         WHERE id = $1 AND deleting_at IS NOT NULL)
                          ORDER BY id
                            FOR UPDATE)""",
        request_id,
    )
    await conn.execute("DELETE FROM requests WHERE id = $1 AND deleting_at IS NOT NULL", request_id)


async def expired_requests(
    conn: Connection, *, completed_before: datetime, limit: int
) -> list[uuid.UUID]:
    """Deletes left half done first, then final requests completed before `completed_before`,
    oldest first; at most `limit`."""
    rows = await conn.fetch(
        """(SELECT id FROM requests WHERE deleting_at IS NOT NULL ORDER BY deleting_at LIMIT $2)
           UNION ALL
           (SELECT id FROM requests
             WHERE status IN ('Completed', 'Failed', 'Cancelled') AND deleting_at IS NULL
               AND completed_at < $1
             ORDER BY completed_at LIMIT $2)
           LIMIT $2""",
        completed_before,
        limit,
    )
    return [r["id"] for r in rows]
