"""The SQL of webhook delivery: one row of webhook_deliveries per attempt to deliver one event.

Rows in state 'scheduled' are the queue. A replica claims due rows with FOR UPDATE SKIP LOCKED
and leases them (`leased_until`) while it sends, so replicas never send the same attempt at
once and a replica that dies mid-send only delays it. Scheduling is idempotent: an event has
one row per attempt number (UNIQUE (event_id, attempt)), and inserts that would repeat one do
nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from services.common.db.queries import Connection

SCHEDULED, SUCCEEDED, FAILED, ABANDONED = "scheduled", "succeeded", "failed", "abandoned"


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: int
    request_id: uuid.UUID
    event_id: str
    event_type: str
    url: str
    payload: str  # the exact JSON text that is signed and sent
    attempt: int
    state: str
    status_code: int | None
    error: str | None
    created_at: datetime
    attempted_at: datetime | None
    next_attempt_at: datetime | None
    leased_until: datetime | None
    # The trace of the request's latest upload or retry (claim_due only): what an attempt
    # continues when the replica that scheduled it, and its memory of the event, is gone.
    traceparent: str = ""


_COLUMNS = """id, request_id, event_id, event_type, url, payload, attempt, state, status_code,
    error, created_at, attempted_at, next_attempt_at, leased_until"""


async def schedule_first_attempt(
    conn: Connection,
    *,
    request_id: uuid.UUID,
    event_id: str,
    event_type: str,
    url: str,
    payload: str,
) -> bool:
    """Schedule attempt 1 of an event, due now; False when it was already scheduled."""
    inserted = await conn.fetchval(
        """INSERT INTO webhook_deliveries
                  (request_id, event_id, attempt, event_type, url, payload, state,
                   next_attempt_at)
           VALUES ($1, $2, 1, $3, $4, $5, 'scheduled', now())
           ON CONFLICT (event_id, attempt) DO NOTHING
           RETURNING id""",
        request_id,
        event_id,
        event_type,
        url,
        payload,
    )
    return inserted is not None


async def claim_due(
    conn: Connection, *, limit: int, lease_seconds: float, per_owner: int
) -> list[DeliveryRow]:
    """Lease up to `limit` due scheduled attempts for `lease_seconds`, taking turns between
    owners: each owner's oldest due attempt first, then each one's second, and so on, and no
    owner more than `per_owner` attempts in flight across the replicas (leased and not yet
    recorded). So one owner's slow or hung receivers hold at most `per_owner` of the
    deliveries in flight, and another owner's attempt goes first whatever the first one's
    backlog (docs/webhooks.md).

    The returned row's `leased_until` is the lease: record_attempt takes it back as proof that
    the attempt is still this caller's.
    """
    rows = await conn.fetch(
        f"""WITH in_flight AS (
                 SELECT r.owner, count(*) AS n
                   FROM webhook_deliveries d JOIN requests r ON r.id = d.request_id
                  WHERE d.state = 'scheduled' AND d.leased_until > now()
                  GROUP BY r.owner),
             due AS (
                 SELECT d.id, d.next_attempt_at,
                        row_number() OVER (PARTITION BY r.owner
                                           ORDER BY d.next_attempt_at, d.id)
                            + COALESCE(f.n, 0) AS place
                   FROM webhook_deliveries d
                   JOIN requests r ON r.id = d.request_id
                   LEFT JOIN in_flight f ON f.owner = r.owner
                  WHERE d.state = 'scheduled' AND d.next_attempt_at <= now()
                    AND (d.leased_until IS NULL OR d.leased_until <= now())),
             chosen AS (
                 SELECT id FROM due WHERE place <= $3
                  ORDER BY place, next_attempt_at, id
                  LIMIT $1),
             locked AS (
                 SELECT id FROM webhook_deliveries
                  WHERE id IN (SELECT id FROM chosen)
                    AND state = 'scheduled' AND (leased_until IS NULL OR leased_until <= now())
                    FOR UPDATE SKIP LOCKED)
           UPDATE webhook_deliveries
              SET leased_until = now() + make_interval(secs => $2)
            WHERE id IN (SELECT id FROM locked)
        RETURNING {_COLUMNS},
                  COALESCE((SELECT r.traceparent FROM requests r
                             WHERE r.id = webhook_deliveries.request_id), '') AS traceparent""",
        limit,
        lease_seconds,
        per_owner,
    )
    return sorted((DeliveryRow(**dict(r)) for r in rows), key=lambda r: r.id)


async def seconds_until_due(conn: Connection) -> float | None:
    """Seconds until the next scheduled attempt may be claimed (≤ 0: now); None if none is."""
    value = await conn.fetchval(
        """SELECT EXTRACT(EPOCH FROM min(GREATEST(next_attempt_at,
                                                  COALESCE(leased_until, next_attempt_at)))
                                     - now())
             FROM webhook_deliveries WHERE state = 'scheduled'"""
    )
    return None if value is None else float(value)


async def record_attempt(
    conn: Connection,
    delivery: DeliveryRow,
    *,
    state: str,
    status_code: int | None,
    error: str | None,
    retry_in: float | None = None,
) -> bool:
    """Record the outcome of a leased attempt; with `retry_in` (state 'failed'), also schedule
    the next attempt that many seconds from now. False when the lease was lost (another replica
    took the attempt over): nothing is recorded."""
    async with conn.transaction():
        next_at = await conn.fetchrow(
            """UPDATE webhook_deliveries
                  SET state = $3, status_code = $4, error = $5, attempted_at = now(),
                      leased_until = NULL,
                      next_attempt_at = now() + make_interval(secs => $6::float8)
                WHERE id = $1 AND state = 'scheduled' AND leased_until = $2
            RETURNING next_attempt_at""",
            delivery.id,
            delivery.leased_until,
            state,
            status_code,
            error[:1000] if error else None,
            retry_in,
        )
        if next_at is None:
            return False
        if retry_in is not None:
            await conn.execute(
                """INSERT INTO webhook_deliveries
                          (request_id, event_id, attempt, event_type, url, payload, state,
                           next_attempt_at)
                   SELECT request_id, event_id, attempt + 1, event_type, url, payload,
                          'scheduled', next_attempt_at
                     FROM webhook_deliveries WHERE id = $1
                   ON CONFLICT (event_id, attempt) DO NOTHING""",
                delivery.id,
            )
        return True


async def redeliver(
    conn: Connection,
    *,
    request_id: uuid.UUID,
    event_id: str,
    event_type: str,
    url: str,
    payload: str,
) -> DeliveryRow | None:
    """Make an attempt of `event_id` due now: the one already scheduled, if any, else a new
    one numbered after the last, sending the body of the earlier attempts (`payload` only when
    there were none). None when a concurrent call got in first: call again."""
    async with conn.transaction():
        row = await conn.fetchrow(
            f"""UPDATE webhook_deliveries SET next_attempt_at = now()
                 WHERE event_id = $1 AND state = 'scheduled'
             RETURNING {_COLUMNS}""",
            event_id,
        )
        if row is None:
            row = await conn.fetchrow(
                f"""INSERT INTO webhook_deliveries
                           (request_id, event_id, attempt, event_type, url, payload, state,
                            next_attempt_at)
                    SELECT $1, $2, COALESCE(max(attempt), 0) + 1, $3, $4,
                           COALESCE((SELECT payload FROM webhook_deliveries
                                      WHERE event_id = $2 ORDER BY attempt DESC LIMIT 1), $5),
                           'scheduled', now()
                      FROM webhook_deliveries WHERE event_id = $2
                    ON CONFLICT (event_id, attempt) DO NOTHING
                 RETURNING {_COLUMNS}""",
                request_id,
                event_id,
                event_type,
                url,
                payload,
            )
        return DeliveryRow(**dict(row)) if row is not None else None


async def list_deliveries(conn: Connection, request_id: uuid.UUID) -> list[DeliveryRow]:
    """Every attempt for a request, oldest first."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM webhook_deliveries
             WHERE request_id = $1 ORDER BY id""",
        request_id,
    )
    return [DeliveryRow(**dict(r)) for r in rows]


# ---------------------------------------------------------------- signing secret generations


@dataclass(frozen=True, slots=True)
class SecretGeneration:
    """Where an owner's signing secret stands: its generation, and until when the generation
    before still signs (`previous_until`, None or past when it no longer does)."""

    owner: str
    generation: int
    previous_until: datetime | None
    in_grace: bool  # previous_until is still ahead, by the database's clock
    rotated_at: datetime | None


_GENERATION = """COALESCE(s.generation, 1) AS generation, s.previous_until,
    COALESCE(s.previous_until > now(), false) AS in_grace, s.rotated_at"""


async def secret_generation(conn: Connection, owner: str) -> SecretGeneration:
    """The owner's generation (1, never rotated, when it has no row)."""
    row = await conn.fetchrow(
        f"""SELECT o.owner, {_GENERATION}
              FROM (VALUES ($1::text)) AS o (owner)
              LEFT JOIN webhook_secrets s ON s.owner = o.owner""",
        owner,
    )
    assert row is not None  # one row, always
    return SecretGeneration(**dict(row))


async def rotate_secret(conn: Connection, owner: str, *, grace_seconds: float) -> SecretGeneration:
    """Move the owner to its next generation; the one before signs for `grace_seconds` more
    (a generation older than that stops at once)."""
    row = await conn.fetchrow(
        """INSERT INTO webhook_secrets AS s (owner, generation, previous_until, rotated_at)
           VALUES ($1, 2, now() + make_interval(secs => $2::float8), now())
           ON CONFLICT (owner) DO UPDATE
              SET generation = s.generation + 1,
                  previous_until = EXCLUDED.previous_until,
                  rotated_at = EXCLUDED.rotated_at
        RETURNING owner, generation, previous_until, previous_until > now() AS in_grace,
                  rotated_at""",
        owner,
        grace_seconds,
    )
    assert row is not None  # an upsert returns its row
    return SecretGeneration(**dict(row))


async def signing_generations(
    conn: Connection, request_ids: list[uuid.UUID]
) -> dict[uuid.UUID, SecretGeneration]:
    """The owner and secret generation of each request, to sign its webhooks."""
    rows = await conn.fetch(
        f"""SELECT r.id, r.owner, {_GENERATION}
              FROM requests r LEFT JOIN webhook_secrets s ON s.owner = r.owner
             WHERE r.id = ANY($1::uuid[])""",
        request_ids,
    )
    return {
        row["id"]: SecretGeneration(**{k: v for k, v in dict(row).items() if k != "id"})
        for row in rows
    }
