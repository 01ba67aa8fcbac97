"""A webhook signing secret per owner, derived from IMGPIPE_WEBHOOK_SECRET (the master secret).

With one secret for every owner, each tenant that verifies its webhooks could forge events to
every other tenant's receiver. So each owner's secret is

    whsec_ + base64(HKDF-SHA256(master key, salt=SALT, info="owner\\0NAME\\0generation\\0N"))

(RFC 5869), with N its generation. Nothing secret is stored: Postgres keeps only the
generation of each owner (`webhook_secrets`), and every status replica derives the same bytes.
Rotating moves the owner to the next generation; during the grace period the generation
before still signs too, so a receiver can switch secrets without dropping an event (Standard
Webhooks carries several space-separated signatures in `webhook-signature`).

Requests without an owner (authentication off: one tenant) are signed with the master secret
itself, exactly as before there were owners.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from standardwebhooks.webhooks import Webhook

from services.common.db import webhooks as db
from services.common.errors import Conflict, Unavailable

PREFIX = "whsec_"
SALT = b"imgpipe webhook signing secret"
DERIVED_BYTES = 32
NOT_CONFIGURED = "webhooks are not configured: set IMGPIPE_WEBHOOK_SECRET"
NEEDS_KEYS = (
    "webhook secrets per owner need API keys (IMGPIPE_API_KEYS); with authentication off every"
    " webhook is signed with IMGPIPE_WEBHOOK_SECRET, which the operator holds"
)


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF with SHA-256 (RFC 5869): extract a key from `ikm`, expand it to `length` bytes."""
    if not 0 < length <= 255 * hashlib.sha256().digest_size:
        raise ValueError(f"HKDF-SHA256 makes 1 to 8160 bytes, not {length}")
    prk = hmac.new(salt or bytes(hashlib.sha256().digest_size), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // hashlib.sha256().digest_size) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def master_key(secret: str) -> bytes:
    """The key bytes of a whsec_<base64> secret (validated by the settings)."""
    return base64.b64decode(secret.removeprefix(PREFIX))


def derive_secret(master: bytes, owner: str, generation: int) -> str:
    """The whsec_ secret of `owner` at `generation`."""
    info = b"\0".join((b"owner", owner.encode(), b"generation", str(generation).encode()))
    key = hkdf_sha256(master, salt=SALT, info=info, length=DERIVED_BYTES)
    return PREFIX + base64.b64encode(key).decode()


@dataclass(frozen=True, slots=True)
class OwnerSecret:
    """What signs an owner's webhooks now: `secret`, and `previous` while in its grace period."""

    owner: str
    generation: int
    secret: str
    previous: str | None = None
    previous_until: datetime | None = None
    rotated_at: datetime | None = None

    @property
    def signing(self) -> tuple[str, ...]:
        return (self.secret,) if self.previous is None else (self.secret, self.previous)


class WebhookSecrets:
    """The signing secrets of every owner, from the master secret ('' when not configured)."""

    def __init__(self, master: str, *, grace_seconds: float) -> None:
        self.master = master
        self.grace_seconds = grace_seconds
        self._key = master_key(master) if master else b""

    @property
    def configured(self) -> bool:
        return bool(self.master)

    def of(self, state: db.SecretGeneration) -> OwnerSecret:
        """The secrets of an owner at `state`; the master secret itself for no owner."""
        if not state.owner:
            return OwnerSecret("", 0, self.master)
        previous = None
        if state.in_grace and state.generation > 1:
            previous = derive_secret(self._key, state.owner, state.generation - 1)
        return OwnerSecret(
            owner=state.owner,
            generation=state.generation,
            secret=derive_secret(self._key, state.owner, state.generation),
            previous=previous,
            previous_until=state.previous_until if previous else None,
            rotated_at=state.rotated_at,
        )

    async def current(self, pool: asyncpg.Pool, owner: str) -> OwnerSecret:
        """The caller's secrets (Conflict without an owner, Unavailable when not configured)."""
        self._check(owner)
        async with pool.acquire() as conn:
            return self.of(await db.secret_generation(conn, owner))

    async def rotate(self, pool: asyncpg.Pool, owner: str) -> OwnerSecret:
        """Move the owner to a new secret; the old one signs for the grace period more."""
        self._check(owner)
        async with pool.acquire() as conn:
            state = await db.rotate_secret(conn, owner, grace_seconds=self.grace_seconds)
        return self.of(state)

    def _check(self, owner: str) -> None:
        if not self.configured:
            raise Unavailable(NOT_CONFIGURED)
        if not owner:
            raise Conflict(NEEDS_KEYS)


def signature_header(secrets: tuple[str, ...], msg_id: str, sent_at: datetime, body: str) -> str:
    """`webhook-signature`: one `v1,<base64>` per secret, space-separated, newest first."""
    return " ".join(Webhook(secret).sign(msg_id, sent_at, body) for secret in secrets)
