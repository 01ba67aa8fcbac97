"""The services' pool releases connections without asyncpg's reset query (PooledConnection), so
nothing a connection holds may go back to the pool with it: the session advisory locks of
`advisory_lock` (the feeder's, the reconciler's, the janitor's, an upload's idempotency key,
the migrations') are released by their helper, or end with the connection."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from services.common.db.pool import Connection, advisory_lock, create_pool
from services.common.db.queries import idempotency_lock, leader_lock
from services.ingest.feeder import LEADER_LOCK_KEY as FEEDER_LOCK_KEY
from testing.polling import wait_until_async

pytestmark = pytest.mark.integration

KEY = int.from_bytes(b"pooltest", "big")


async def _advisory_locks_held(conn: Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
    )


async def _free_elsewhere(database_url: str, key: int) -> bool:
    """Whether another session can take `key` at once (it then lets it go)."""
    other = await asyncpg.connect(database_url)
    try:
        taken = bool(await other.fetchval("SELECT pg_try_advisory_lock($1)", key))
        if taken:
            await other.execute("SELECT pg_advisory_unlock($1)", key)
        return taken
    finally:
        await other.close()


async def test_the_lock_helpers_return_their_connection_holding_nothing(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1)  # always the same connection
    try:
        async with leader_lock(pool, KEY) as conn:
            assert conn is not None
            assert await _advisory_locks_held(conn) == 1

        async def fail_while_holding_it() -> None:
            async with idempotency_lock(pool, "owner", "key") as conn:
                assert await _advisory_locks_held(conn) == 1
                raise RuntimeError("the block failed")

        with pytest.raises(RuntimeError):
            await fail_while_holding_it()
        async with pool.acquire() as conn:
            assert await _advisory_locks_held(conn) == 0
        assert await _free_elsewhere(database_url, KEY)
    finally:
        await pool.close()


async def test_leader_lock_yields_none_while_another_session_holds_it(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1)
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", KEY)
        async with leader_lock(pool, KEY) as conn:
            assert conn is None
        async with pool.acquire() as conn:
            assert await _advisory_locks_held(conn) == 0
    finally:
        await holder.close()
        await pool.close()


async def test_a_failed_unlock_ends_the_connection_and_with_it_the_lock(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1)
    killer = await asyncpg.connect(database_url)
    pid = 0

    async def lose_the_connection_while_holding_it() -> None:
        nonlocal pid
        async with pool.acquire() as conn, advisory_lock(conn, KEY):
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            # The unlock at the end of the block cannot be sent on this connection.
            await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
            await wait_until_async(
                lambda: _gone(killer, pid), timeout=10, message="backend terminated"
            )

    try:
        # Which error the unlock meets depends on when asyncpg reads the server's FATAL: a
        # closed connection, or (when the FATAL arrives while the unlock is being prepared)
        # InternalClientError, as one CI run against Postgres 17 in a container saw.
        lost = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
        with pytest.raises(lost):
            await lose_the_connection_while_holding_it()
        assert await _free_elsewhere(database_url, KEY)
        async with pool.acquire() as conn:  # the pool replaced the connection
            assert await conn.fetchval("SELECT pg_backend_pid()") != pid
            assert await _advisory_locks_held(conn) == 0
    finally:
        await killer.close()
        await pool.close()


async def _gone(conn: asyncpg.Connection, pid: int) -> bool:
    return not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)


async def test_a_cancel_while_waiting_for_the_lock_leaves_the_pool_clean(
    database_url: str,
) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1)
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", KEY)

        async def wait_for_it() -> None:
            async with pool.acquire() as conn, advisory_lock(conn, KEY):
                raise AssertionError("the lock is held elsewhere")

        waiter = asyncio.create_task(wait_for_it())
        await wait_until_async(
            lambda: _waiting_for_advisory_lock(holder), timeout=10, message="waiter blocked"
        )
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        await holder.execute("SELECT pg_advisory_unlock($1)", KEY)
        async with pool.acquire() as conn:
            assert await _advisory_locks_held(conn) == 0
        assert await _free_elsewhere(database_url, KEY)
    finally:
        await holder.close()
        await pool.close()


async def _waiting_for_advisory_lock(conn: Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
    )


async def _application_name(pool: asyncpg.Pool) -> str:
    async with pool.acquire() as conn:
        name: str = await conn.fetchval(
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        return name


async def test_connections_name_their_service_unless_the_dsn_does(database_url: str) -> None:
    """What pg_stat_activity shows an operator counting who holds the connections
    (docs/operations.md, "Postgres connections"); a name the DSN gives wins."""
    pool = await create_pool(database_url, max_size=1, application_name="imgpipe-worker")
    try:
        assert await _application_name(pool) == "imgpipe-worker"
    finally:
        await pool.close()
    separator = "&" if "?" in database_url else "?"
    named = f"{database_url}{separator}application_name=reporting"
    pool = await create_pool(named, max_size=1, application_name="imgpipe-worker")
    try:
        assert await _application_name(pool) == "reporting"
    finally:
        await pool.close()


# An Idempotency-Key that the lock before two key spaces (one 64-bit key, hashtextextended of
# "<length of owner>:<owner><key>") put onto the feeder's lock. Found by running Postgres's
# hash backwards, in seconds of Python; the owner's name is what GET /webhook-secret shows.
COLLIDING_OWNER, COLLIDING_KEY = "tenant-a", "kkS(;Yqb+7(x@<"


async def test_no_idempotency_key_can_take_a_services_lock(database_url: str) -> None:
    """Uploads sharing a key take turns, but no key a caller chooses holds the feeder (or any
    other service's one-at-a-time lock): that stopped every tenant's releases for as long as
    the upload lasted, and two uploads could hand it to each other for good."""
    pool = await create_pool(database_url, min_size=1, max_size=3)
    try:
        hashed = await pool.fetchval(
            "SELECT hashtextextended($1, 0)",
            f"{len(COLLIDING_OWNER)}:{COLLIDING_OWNER}{COLLIDING_KEY}",
        )
        assert hashed == FEEDER_LOCK_KEY  # the collision the old lock met
        async with idempotency_lock(pool, COLLIDING_OWNER, COLLIDING_KEY) as holder:
            async with leader_lock(pool, FEEDER_LOCK_KEY) as feeder:
                assert feeder is not None
            assert await _free_elsewhere(database_url, FEEDER_LOCK_KEY)

            async def same_key(owner: str) -> None:
                async with idempotency_lock(pool, owner, COLLIDING_KEY):
                    pass

            # Another owner's upload with the same key goes ahead; the same owner's waits.
            await asyncio.wait_for(same_key("tenant-b"), 10)
            twin = asyncio.create_task(same_key(COLLIDING_OWNER))
            await wait_until_async(
                lambda: _waiting_for_advisory_lock(holder), timeout=10, message="twin waits"
            )
        await asyncio.wait_for(twin, 10)  # and goes ahead once the first one is done
    finally:
        await pool.close()
