"""The status service's settings, webhooks among them (the shared pieces:
services/common/config.py).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

from services.common.auth import KeyRing, parse_rate
from services.common.config import CommonSettings, EnvReader, read_api_keys, read_fetch_allow
from services.common.fetch import FetchAllow, FetchLimits

# The Standard Webhooks retry schedule: seconds after the previous attempt.
WEBHOOK_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
# After a rotation, the secret before still signs this long: a day to update receivers.
WEBHOOK_SECRET_GRACE = 86_400.0
# Redeliveries per owner: each one is a signed POST to a URL the owner chose.
WEBHOOK_REDELIVER_RATE = 10 / 60
WEBHOOK_REDELIVER_BURST = 5


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """Webhook delivery (status service). Receivers verify with `secret` (whsec_...)."""

    secret: str = ""
    # Where callers reach the REST gateway: the base of status_url and output_csv_url.
    public_api_url: str = "http://127.0.0.1:8080"
    timeout: float = 10.0  # at most 15 s
    schedule: tuple[float, ...] = WEBHOOK_SCHEDULE
    fetch_allow: FetchAllow = field(default_factory=FetchAllow)
    fetch_limits: FetchLimits = field(default_factory=FetchLimits)
    # With API keys, each owner's secret is derived from `secret` (webhook_secrets.py).
    secret_grace: float = WEBHOOK_SECRET_GRACE
    redeliver_rate: float = WEBHOOK_REDELIVER_RATE  # per second and owner; 0: unthrottled
    redeliver_burst: int = WEBHOOK_REDELIVER_BURST
    # Attempts of one owner in flight at once, across the replicas (db.webhooks.claim_due).
    per_owner: int = 4


@dataclass(frozen=True, slots=True)
class StatusSettings:
    common: CommonSettings
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    api_keys: KeyRing = field(default_factory=KeyRing)
    session_ttl: float = 12 * 3600.0  # how long a browser's sign-in lasts (sessions.py)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        env = EnvReader(environ)
        secret = env.text("IMGPIPE_WEBHOOK_SECRET")
        if secret and not _is_webhook_secret(secret):
            env.problems.append(
                "IMGPIPE_WEBHOOK_SECRET: expected a Standard Webhooks secret, whsec_<base64>"
            )
        timeout = env.number("IMGPIPE_WEBHOOK_TIMEOUT", 10.0)
        if timeout > 15:
            env.problems.append(f"IMGPIPE_WEBHOOK_TIMEOUT={timeout:g}: at most 15 seconds")
        settings = cls(
            common=CommonSettings.read(env, "127.0.0.1:50052"),
            webhooks=WebhookSettings(
                secret=secret,
                public_api_url=env.url(
                    "IMGPIPE_PUBLIC_API_URL", "http://127.0.0.1:8080", ("http", "https")
                ).rstrip("/"),
                timeout=timeout,
                schedule=env.parsed(
                    "IMGPIPE_WEBHOOK_SCHEDULE",
                    WEBHOOK_SCHEDULE,
                    _seconds_list,
                    "seconds, comma-separated",
                ),
                fetch_allow=read_fetch_allow(env),
                fetch_limits=FetchLimits(
                    connect_timeout=min(timeout, FetchLimits().connect_timeout),
                    total_timeout=timeout,
                    stall_timeout=timeout,
                    max_redirects=0,  # a webhook receiver answers; it does not redirect
                    allowed_ports=env.ports("IMGPIPE_FETCH_PORTS", FetchLimits().allowed_ports),
                ),
                secret_grace=env.number("IMGPIPE_WEBHOOK_SECRET_GRACE", WEBHOOK_SECRET_GRACE),
                redeliver_rate=env.parsed(
                    "IMGPIPE_WEBHOOK_REDELIVER_RATE", WEBHOOK_REDELIVER_RATE, parse_rate, "a rate"
                ),
                redeliver_burst=env.integer(
                    "IMGPIPE_WEBHOOK_REDELIVER_BURST", WEBHOOK_REDELIVER_BURST, minimum=1
                ),
                per_owner=env.integer("IMGPIPE_WEBHOOK_PER_OWNER", 4, minimum=1),
            ),
            api_keys=read_api_keys(env),
            session_ttl=env.number("IMGPIPE_SESSION_TTL", 12 * 3600.0, minimum=59.0),
        )
        env.done()
        return settings


def _is_webhook_secret(secret: str) -> bool:
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        return False
    return secret.startswith("whsec_") and len(key) >= 16


def _seconds_list(raw: str) -> tuple[float, ...]:
    values = tuple(float(part) for part in raw.replace(" ", "").split(",") if part)
    if not values or any(value < 0 for value in values):
        raise ValueError("")
    return values
