"""Browser session ids: their form, their hash and how long a resolved one may be remembered.

What the gateway (the cookie) and the session store (services/common/sessions.py) share; no
database here, so the gateway can check an id without loading a Postgres driver.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

PREFIX = "ses_"
# How long a process remembers a session it resolved: a revocation takes effect everywhere
# within this time.
CACHE_SECONDS = 2.0
_SESSION_ID = re.compile(r"ses_[A-Za-z0-9_-]{43}")


def new_session_id() -> str:
    """`ses_` + 32 random bytes, urlsafe base64 without padding."""
    return PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def is_session_id(text: str) -> bool:
    return _SESSION_ID.fullmatch(text) is not None


def session_hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()
