"""Browser sessions: what the web page's cookie holds instead of the API key.

A session is made with an API key (`SessionService.CreateSession`, served by the status
service, which owns the data) and stored in Postgres by the SHA-256 of its id, with the owner,
the SHA-256 of the key it was made with, and when it expires. Any service resolves a session
sent as `authorization: Session <id>` (`ApiKeyInterceptor`) to the principal of that key, so
the gateway stays stateless: it forwards the id, as it forwards a key.

A session ends when it expires (IMGPIPE_SESSION_TTL), when it is revoked (sign-out), or when
its key leaves IMGPIPE_API_KEYS. Each process keeps what it resolved for CACHE_SECONDS, so a
revocation takes effect everywhere within that time, at once in the process that revoked it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from services.common.auth import KeyRing, Principal
from services.common.db import queries
from services.common.session_ids import CACHE_SECONDS, is_session_id, new_session_id, session_hash

DEFAULT_LIFETIME = 12 * 3600.0
CACHE_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class Session:
    principal: Principal
    expires_at: datetime


class SessionStore:
    """Sessions in Postgres, with a short cache of the ones this process resolved."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        keys: KeyRing,
        lifetime: float = DEFAULT_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.keys = keys
        self.lifetime = lifetime
        self._clock = clock
        # id hash -> (the session or None, when this answer stops being used)
        self._cache: OrderedDict[bytes, tuple[Session | None, float]] = OrderedDict()

    async def create(self, principal: Principal, key_digest: bytes) -> tuple[str, datetime]:
        """A new session for the key with SHA-256 `key_digest`: its id and expiry."""
        session_id = new_session_id()
        async with self.pool.acquire() as conn:
            expires_at = await queries.create_session(
                conn, session_hash(session_id), principal.name, key_digest, self.lifetime
            )
        return session_id, expires_at

    async def find(self, session_id: str) -> Session | None:
        """The live session with this id, or None (unknown, expired, revoked, or its key is
        no longer configured)."""
        if not is_session_id(session_id):
            return None  # not worth a query
        digest = session_hash(session_id)
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > self._clock():
            session = cached[0]
            return session if session is None or session.expires_at > _now() else None
        async with self.pool.acquire() as conn:
            row = await queries.find_session(conn, digest)
        principal = self.keys.by_digest.get(row.key_hash) if row is not None else None
        session = (
            Session(principal, row.expires_at)
            if row is not None and principal is not None and principal.name == row.owner
            else None
        )
        self._remember(digest, session)
        return session

    async def resolve(self, session_id: str) -> Principal | None:
        """The principal a session acts for (for ApiKeyInterceptor)."""
        session = await self.find(session_id)
        return session.principal if session is not None else None

    async def revoke(self, session_id: str) -> None:
        digest = session_hash(session_id)
        async with self.pool.acquire() as conn:
            await queries.delete_session(conn, digest)
        self._remember(digest, None)

    def _remember(self, digest: bytes, session: Session | None) -> None:
        self._cache[digest] = (session, self._clock() + CACHE_SECONDS)
        self._cache.move_to_end(digest)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)


def _now() -> datetime:
    return datetime.now(UTC)
