"""API keys: the IMGPIPE_API_KEYS format, checking a presented key, and who is calling.

A key is `imgpipe_` + 32 random bytes (urlsafe base64), made by `imgpipe keygen NAME`. The
configuration holds only each key's SHA-256, so a leaked configuration (an environment dump, a
manifest in a repository) gives away no key. A plain SHA-256 is the right hash here: slow
functions (bcrypt, scrypt, Argon2) exist to make guessing low-entropy passwords expensive, and
nobody guesses 256 random bits, whatever the hash costs; a fast hash lets every call be checked
without a cache.

    IMGPIPE_API_KEYS="acme:<sha256 hex> rate=50/s concurrent=20, globex:<sha256 hex>"

Entries are separated by commas (or newlines); each is `NAME:SHA256HEX`, then optional
space-separated limits (`rate`, `burst`, `concurrent`, `images_per_day`, `uploads`, `streams`,
`weight`) that override the
IMGPIPE_LIMIT_* defaults for that name. NAME is the owner recorded on the caller's requests.
Several entries may share a name (a key being rotated): they are one owner with one set of
limits. An empty IMGPIPE_API_KEYS turns authentication off.

gRPC services authenticate every call in `ApiKeyInterceptor` (services/common/grpc_auth.py);
the gateway reads the same keys. A call authenticates with `authorization: Bearer <key>`, or
with `authorization: Session <id>` for a browser's session (services/common/sessions.py).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

VARIABLE = "IMGPIPE_API_KEYS"
KEY_PREFIX = "imgpipe_"
KEY_BYTES = 32
# Longer than any key we make; anything longer is refused without hashing it.
MAX_KEY_LENGTH = 256
NAME_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_ENTRY_SEPARATOR = re.compile(r"[,\n]")
_RATE = re.compile(r"(\d+(?:\.\d+)?)(?:/(s|sec|second|m|min|minute|h|hour))?")
_PER_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_PER_SECONDS |= {"h": 3600, "hour": 3600}

AUTH_OFF_WARNING = (
    "auth is OFF: IMGPIPE_API_KEYS is empty; anyone who reaches this port can upload and read"
    " every request (make a key with `imgpipe keygen NAME`)"
)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one API key (one owner) may do. 0 means no limit."""

    rate: float = 20.0  # API calls per second, sustained
    burst: int = 40  # API calls at once, after a quiet period
    concurrent: int = 10  # unfinished requests at a time
    images_per_day: int = 1_000_000  # images accepted per UTC day
    uploads: int = 2  # uploads being received at a time
    streams: int = 20  # live progress streams (SSE, WatchRequest) open at a time
    weight: int = 1  # share of the workers' time against other owners (docs/scheduling.md)


# The gRPC metadata key that carries a call's rate quota to the gateway (RateLimit-* headers).
QUOTA_METADATA = "imgpipe-ratelimit"


@dataclass(frozen=True, slots=True)
class Quota:
    """A key's call-rate bucket right after a call was charged (or refused): `limit` calls at
    once (the burst), `remaining` of them left, full again in `reset` seconds; it refills one
    call every `1 / rate` seconds, so `window` (burst / rate) is the time a full burst takes."""

    limit: int
    remaining: int
    reset: int
    window: int

    def metadata(self) -> str:
        return f"{self.limit},{self.remaining},{self.reset},{self.window}"

    @classmethod
    def parse(cls, value: str) -> Quota | None:
        try:
            limit, remaining, reset, window = (int(part) for part in value.split(","))
        except ValueError:
            return None
        return cls(limit, remaining, reset, window)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: `name` is the owner recorded on its requests."""

    name: str
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class KeyRing:
    """The configured keys, by the SHA-256 digest of each key. Empty: authentication is off."""

    by_digest: Mapping[bytes, Principal] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.by_digest)

    @property
    def owners(self) -> list[str]:
        return sorted({p.name for p in self.by_digest.values()})

    @property
    def weights(self) -> dict[str, int]:
        """Each owner's `weight=` (its share of the workers, docs/scheduling.md)."""
        return {p.name: p.limits.weight for p in self.by_digest.values()}

    def authenticate(self, key: str) -> Principal | None:
        """The principal a presented key belongs to, or None.

        A lookup by digest, not a comparison of secrets: how long the lookup takes depends only
        on the SHA-256 of what the caller sent, which tells an attacker nothing about any
        configured key (finding a key from its hash is a preimage attack on SHA-256).
        """
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        return self.by_digest.get(hashlib.sha256(key.encode("utf-8", "replace")).digest())


def new_key() -> str:
    """A fresh API key: `imgpipe_` + 32 random bytes, urlsafe base64 without padding."""
    token = base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip("=")
    return KEY_PREFIX + token


def key_hash(key: str) -> str:
    """The SHA-256 of a key, in hex: what IMGPIPE_API_KEYS holds."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def is_valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def bearer_token(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, or None."""
    return _token_of(value, "bearer")


def session_token(value: str | None) -> str | None:
    """The id of an `authorization: Session <id>` value (a browser's session), or None."""
    return _token_of(value, "session")


def _token_of(value: str | None, scheme: str) -> str | None:
    given, _, token = (value or "").strip().partition(" ")
    token = token.strip()
    if given.lower() != scheme or not token:
        return None
    return token


def parse_rate(raw: str) -> float:
    """`20/s`, `600/min`, `5000/h` or a bare `20` (per second) → calls per second."""
    match = _RATE.fullmatch(raw.strip().lower().replace(" ", ""))
    if match is None:
        raise ValueError("N/s, N/min or N/h")
    return float(match.group(1)) / _PER_SECONDS[match.group(2) or "s"]


def parse_api_keys(raw: str, defaults: Limits) -> tuple[KeyRing, list[str]]:
    """Parse IMGPIPE_API_KEYS; returns the key ring and every problem found.

    Problems name the variable and the entry's position (1-based), never the entry's text:
    a key pasted where its hash belongs must not end up in a log.
    """
    problems: list[str] = []
    by_digest: dict[bytes, Principal] = {}
    limits_of: dict[str, Limits] = {}
    entries = [entry.strip() for entry in _ENTRY_SEPARATOR.split(raw)]
    for index, entry in enumerate((e for e in entries if e), start=1):
        where = f"{VARIABLE} entry {index}"
        credential, *options = entry.split()
        name, sep, hex_digest = credential.partition(":")
        if not sep or ":" in hex_digest:
            if credential.startswith(KEY_PREFIX) or hex_digest.startswith(KEY_PREFIX):
                problems.append(f"{where}: looks like a key; put NAME:SHA256 of the key instead")
            else:
                problems.append(f"{where}: expected NAME:SHA256HEX [limit=value ...]")
            continue
        if hex_digest.startswith(KEY_PREFIX):
            problems.append(
                f"{where}: holds a key, not its hash; configure NAME:SHA256HEX "
                "(`imgpipe keygen NAME` prints the entry)"
            )
            continue
        if not is_valid_name(name):
            problems.append(f"{where}: the name must be {NAME_RULE}")
            continue
        if not _SHA256_HEX.fullmatch(hex_digest):
            problems.append(f"{where} ({name}): the hash must be 64 hexadecimal digits (SHA-256)")
            continue
        limits, bad = _limits(options, defaults)
        problems += [f"{where} ({name}): {problem}" for problem in bad]
        if limits_of.setdefault(name, limits) != limits:
            problems.append(
                f"{where} ({name}): other limits than an earlier entry of the same name; "
                "limits belong to the name, give them once"
            )
        digest = bytes.fromhex(hex_digest)
        if digest in by_digest:
            problems.append(f"{where} ({name}): the same hash as an earlier entry")
        by_digest[digest] = Principal(name, limits)
    return KeyRing(by_digest), problems


_WHOLE_NUMBER_LIMITS = ("burst", "concurrent", "images_per_day", "uploads", "streams", "weight")
_AT_LEAST_ONE = ("burst", "weight")


def _limits(options: list[str], defaults: Limits) -> tuple[Limits, list[str]]:
    limits, problems = defaults, []
    for option in options:
        key, _, value = option.partition("=")
        try:
            if key == "rate":
                limits = replace(limits, rate=parse_rate(value))
            elif key in _WHOLE_NUMBER_LIMITS:
                number = int(value)
                if number < (1 if key in _AT_LEAST_ONE else 0):
                    raise ValueError
                limits = replace(limits, **{key: number})
            else:
                # Named only when it looks like an option name: never echo what may be a key.
                shown = f" {key!r}" if re.fullmatch(r"[a-z_]{1,20}", key) else ""
                problems.append(
                    f"unknown option{shown}: expected rate, "
                    + ", ".join(_WHOLE_NUMBER_LIMITS[:-1])
                    + f" or {_WHOLE_NUMBER_LIMITS[-1]}"
                )
        except ValueError:
            rule = "N/s, N/min or N/h" if key == "rate" else "a whole number"
            rule += ", at least 1" if key in _AT_LEAST_ONE else ""
            problems.append(f"{key}: expected {rule}")
    return limits, problems


def log_auth_state(keys: KeyRing, listen: str) -> None:
    """At start-up: say loudly when authentication is off."""
    if keys.enabled:
        log.info("API keys required", extra={"owners": keys.owners, "listen": listen})
    else:
        log.warning(AUTH_OFF_WARNING, extra={"listen": listen})
