"""Settings for every imgpipe process, read from `IMGPIPE_*` environment variables in one place.

Each service's `__main__` calls `<Service>Settings.from_env(os.environ)`. A missing or malformed
value raises `ConfigError` listing every problem at once, so an operator fixes them in one go.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar
from urllib.parse import urlsplit

from services.common.auth import KeyRing, Limits, parse_api_keys, parse_rate
from services.common.budget import DEFAULT_BUFFER_BYTES, DEFAULT_PIXEL_BUDGET
from services.common.csv_format import CsvLimits
from services.common.fetch import FetchAllow, FetchLimits, IPNetwork
from services.common.grpc_transport import (
    DEFAULT_MAX_CONNECTION_AGE,
    DEFAULT_MAX_CONNECTION_AGE_GRACE,
    GrpcTransport,
    TlsFiles,
)
from services.common.imaging import ImageLimits
from services.common.outcome import RetryPolicy
from services.common.storage import S3Options, StorageConfig

T = TypeVar("T")


class ConfigError(Exception):
    """One or more settings are missing or malformed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


class _Reader:
    """Reads typed values from a mapping, collecting every problem instead of stopping."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def parsed(self, name: str, default: T, parse: Callable[[str], T], rule: str) -> T:
        raw = self.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            detail = f" ({exc})" if str(exc) else ""
            self.problems.append(f"{name}={raw!r}: expected {rule}{detail}")
            return default

    def text(self, name: str, default: str = "") -> str:
        return self.environ.get(name, "").strip() or default

    def required(self, name: str, rule: str) -> str:
        value = self.text(name)
        if not value:
            self.problems.append(f"{name} is required: {rule}")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        def parse(raw: str) -> int:
            value = int(raw)
            if value < minimum:
                raise ValueError(f"at least {minimum}")
            return value

        return self.parsed(name, default, parse, "an integer")

    def switch(self, name: str, default: bool) -> bool:
        def parse(raw: str) -> bool:
            if raw.lower() not in ("on", "off"):
                raise ValueError
            return raw.lower() == "on"

        return self.parsed(name, default, parse, "on or off")

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        def parse(raw: str) -> float:
            value = float(raw)
            if not value > minimum:
                raise ValueError(f"greater than {minimum}")
            return value

        return self.parsed(name, default, parse, "a number")

    def ports(self, name: str, default: frozenset[int]) -> frozenset[int]:
        def parse(raw: str) -> frozenset[int]:
            ports = frozenset(int(p) for p in raw.replace(" ", "").split(",") if p)
            if not ports or not all(0 < p < 65536 for p in ports):
                raise ValueError("")
            return ports

        return self.parsed(name, default, parse, "comma-separated port numbers")

    def address(self, name: str, default: str) -> str:
        def parse(raw: str) -> str:
            host, sep, port = raw.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError("")
            return raw

        return self.parsed(name, default, parse, "HOST:PORT")

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        def parse(raw: str) -> str:
            if urlsplit(raw).scheme not in schemes:
                raise ValueError("")
            return raw

        return self.parsed(name, default, parse, f"a URL with scheme {' or '.join(schemes)}")

    def networks(self, name: str) -> tuple[IPNetwork, ...]:
        def parse(raw: str) -> tuple[IPNetwork, ...]:
            entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
            return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)

        return self.parsed(name, (), parse, "comma-separated IP addresses or CIDR networks")

    def done(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


@dataclass(frozen=True, slots=True)
class CommonSettings:
    """What every backend service needs: Postgres, Redis, storage and logging."""

    database_url: str
    redis_url: str
    redis_prefix: str = "imgpipe"
    storage: StorageConfig = field(
        default_factory=lambda: StorageConfig(default_storage_url(), DEFAULT_PUBLIC_BASE_URL)
    )
    grpc_listen: str = "127.0.0.1:50051"
    grpc: GrpcTransport = field(default_factory=GrpcTransport)  # TLS, connection age
    grace_seconds: float = 20.0
    # How long a call waits for a free Postgres connection before answering UNAVAILABLE.
    db_acquire_timeout: float = 5.0
    log_level: str = "INFO"
    # Crash points for fault tests (services/common/failpoints.py); empty in production.
    failpoints: frozenset[str] = frozenset()
    metrics_listen: str = ""  # where /metrics is served; '' serves nothing

    @classmethod
    def read(cls, env: _Reader, default_listen: str) -> Self:
        settings = cls(
            database_url=env.required(
                "IMGPIPE_DATABASE_URL", "a postgresql:// URL (make run starts one for you)"
            ),
            redis_url=env.required(
                "IMGPIPE_REDIS_URL", "a redis:// or unix:// URL (make run starts one for you)"
            ),
            redis_prefix=env.text("IMGPIPE_REDIS_PREFIX", "imgpipe"),
            storage=read_storage(env),
            grpc_listen=env.address("IMGPIPE_GRPC_LISTEN", default_listen),
            grpc=read_grpc_transport(env, server=True),
            grace_seconds=env.number("IMGPIPE_GRACE_SECONDS", 20.0),
            db_acquire_timeout=env.number("IMGPIPE_DB_ACQUIRE_TIMEOUT", 5.0),
            log_level=env.text("IMGPIPE_LOG_LEVEL", "INFO").upper(),
            failpoints=frozenset(
                name.strip() for name in env.text("IMGPIPE_FAILPOINTS").split(",") if name.strip()
            ),
            metrics_listen=read_metrics_listen(env),
        )
        check_metrics_port(
            env, settings.metrics_listen, "IMGPIPE_GRPC_LISTEN", settings.grpc_listen
        )
        check_own_port(env, "IMGPIPE_GRPC_HEALTH_LISTEN", settings.grpc.health_listen, settings)
        return settings


def read_grpc_transport(env: _Reader, *, server: bool) -> GrpcTransport:
    """IMGPIPE_GRPC_TLS_CERT, _KEY, _CA and _SERVER_NAME (PEM file paths, a name), and
    IMGPIPE_GRPC_MAX_CONNECTION_AGE and _GRACE (seconds), IMGPIPE_GRPC_HEALTH_LISTEN
    (host:port): see docs/grpc.md. A `server` serves TLS with CERT and KEY and requires
    client certificates signed by CA when CA is set; a client (the gateway) dials TLS when
    any file is set."""
    names = ("IMGPIPE_GRPC_TLS_CERT", "IMGPIPE_GRPC_TLS_KEY", "IMGPIPE_GRPC_TLS_CA")
    cert, key, ca = (env.text(name) for name in names)
    for name, path in zip(names, (cert, key, ca), strict=True):
        if path and not Path(path).is_file():
            env.problems.append(f"{name}={path!r}: no such file")
    if bool(cert) != bool(key):
        env.problems.append(
            "IMGPIPE_GRPC_TLS_CERT and IMGPIPE_GRPC_TLS_KEY go together: set both or neither"
        )
    elif server and ca and not cert:
        env.problems.append(
            "IMGPIPE_GRPC_TLS_CA makes a server require client certificates, over TLS: set"
            " IMGPIPE_GRPC_TLS_CERT and IMGPIPE_GRPC_TLS_KEY too"
        )
    health_listen = env.address("IMGPIPE_GRPC_HEALTH_LISTEN", "") if server else ""
    return GrpcTransport(
        tls=TlsFiles(cert, key, ca, server_name=env.text("IMGPIPE_GRPC_TLS_SERVER_NAME")),
        health_listen=health_listen,
        max_connection_age=env.number(
            "IMGPIPE_GRPC_MAX_CONNECTION_AGE", DEFAULT_MAX_CONNECTION_AGE
        ),
        max_connection_age_grace=env.number(
            "IMGPIPE_GRPC_MAX_CONNECTION_AGE_GRACE", DEFAULT_MAX_CONNECTION_AGE_GRACE
        ),
    )


def read_metrics_listen(env: _Reader) -> str:
    """IMGPIPE_METRICS_LISTEN, host:port: where this process serves /metrics. Unset serves
    nothing (`make run` starts several processes on one machine: IMGPIPE_DEV_METRICS_BASE_PORT)."""
    listen = env.address("IMGPIPE_METRICS_LISTEN", "")
    if listen and int(listen.rpartition(":")[2]) == 0:
        env.problems.append(f"IMGPIPE_METRICS_LISTEN={listen!r}: expected a port from 1 to 65535")
        return ""
    return listen


def check_metrics_port(env: _Reader, metrics: str, name: str, listen: str) -> None:
    """Metrics have a port of their own, never the API's: scrapers stay off the API port."""
    if metrics and metrics.rpartition(":")[2] == listen.rpartition(":")[2]:
        env.problems.append(
            f"IMGPIPE_METRICS_LISTEN={metrics!r} uses the port of {name}={listen!r}: give metrics"
            " a port of their own"
        )


def check_own_port(env: _Reader, name: str, listen: str, settings: CommonSettings) -> None:
    """`listen` (the variable `name`) takes a port neither the API nor metrics use."""
    port = listen.rpartition(":")[2]
    others = {
        "IMGPIPE_GRPC_LISTEN": settings.grpc_listen,
        "IMGPIPE_METRICS_LISTEN": settings.metrics_listen,
    }
    for other, address in others.items():
        if listen and address and address.rpartition(":")[2] == port:
            env.problems.append(f"{name}={listen!r} uses the port of {other}={address!r}")


def default_storage_url() -> str:
    return (Path.cwd() / ".imgpipe" / "store").as_uri()


DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8080/files/"  # the gateway serving a file:// store
URL_MODES = ("base", "presigned")
# At least 5 min: a status page can come from the gateway's page cache, up to a minute old.
# At most 7 days: the longest SigV4 allows.
PRESIGN_EXPIRY_BOUNDS = (300, 7 * 24 * 3600)


def read_storage(env: _Reader) -> StorageConfig:
    """IMGPIPE_STORAGE_URL, how output URLs are made, and for s3:// where S3 is and who we are.

    Output URLs are IMGPIPE_PUBLIC_BASE_URL + key (mode `base`: the default for file:// and
    for s3:// with a base URL) or GET URLs signed when served, valid IMGPIPE_PRESIGN_EXPIRY
    seconds (mode `presigned`: the default for s3:// without a base URL). S3 is configured
    with the standard AWS variables; IMGPIPE_S3_ENDPOINT, when set, wins over
    AWS_ENDPOINT_URL. Without AWS keys obstore uses the environment's role.
    """
    url = env.url("IMGPIPE_STORAGE_URL", default_storage_url(), ("file", "s3", "memory"))
    s3 = urlsplit(url).scheme == "s3"
    base = env.url("IMGPIPE_PUBLIC_BASE_URL", "", ("http", "https"))
    mode = env.parsed(
        "IMGPIPE_PUBLIC_URL_MODE",
        "presigned" if s3 and not base else "base",
        _url_mode,
        " or ".join(URL_MODES),
    )
    low, high = PRESIGN_EXPIRY_BOUNDS
    expiry = env.parsed(
        "IMGPIPE_PRESIGN_EXPIRY",
        3600,
        functools.partial(_bounded_int, low=low, high=high),
        f"whole seconds from {low} to {high} (7 days, the S3 limit)",
    )
    if mode == "presigned" and not s3:
        env.problems.append(
            f"IMGPIPE_PUBLIC_URL_MODE=presigned needs s3:// storage, not IMGPIPE_STORAGE_URL={url}"
        )
    elif mode == "presigned" and base:
        env.problems.append(
            "IMGPIPE_PUBLIC_BASE_URL is set but IMGPIPE_PUBLIC_URL_MODE=presigned does not use"
            " it: unset one of them"
        )
    elif mode == "base" and s3 and not base:
        env.problems.append(
            "IMGPIPE_PUBLIC_BASE_URL is required for s3:// storage in base mode (the gateway"
            " serves only file:// stores); or set IMGPIPE_PUBLIC_URL_MODE=presigned"
        )
    return StorageConfig(
        url=url,
        public_base_url=base or (DEFAULT_PUBLIC_BASE_URL if mode == "base" else ""),
        presign_expiry=expiry if mode == "presigned" else None,
        s3=_read_s3(env) if s3 else S3Options(),
    )


def _read_s3(env: _Reader) -> S3Options:
    key_id, secret = env.text("AWS_ACCESS_KEY_ID"), env.text("AWS_SECRET_ACCESS_KEY")
    if bool(key_id) != bool(secret):
        env.problems.append(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together: set both, or neither to"
            " use the environment's role"
        )
    endpoint_names = ("IMGPIPE_S3_ENDPOINT", "AWS_ENDPOINT_URL")
    name = next((name for name in endpoint_names if env.text(name)), endpoint_names[0])
    return S3Options(
        endpoint=env.url(name, "", ("http", "https")),
        region=env.text("AWS_REGION") or env.text("AWS_DEFAULT_REGION"),
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=env.text("AWS_SESSION_TOKEN"),
    )


def _url_mode(raw: str) -> str:
    if raw.lower() not in URL_MODES:
        raise ValueError("")
    return raw.lower()


def _bounded_int(raw: str, *, low: int, high: int) -> int:
    value = int(raw)
    if not low <= value <= high:
        raise ValueError("")
    return value


def read_api_keys(env: _Reader) -> KeyRing:
    """IMGPIPE_API_KEYS with the IMGPIPE_LIMIT_* defaults (format in services/common/auth.py).
    Its problems name the entry, never its text: an entry may be a key pasted by mistake."""
    defaults = Limits()
    limits = Limits(
        rate=env.parsed("IMGPIPE_LIMIT_RATE", defaults.rate, parse_rate, "a rate"),
        burst=env.integer("IMGPIPE_LIMIT_BURST", defaults.burst, minimum=1),
        concurrent=env.integer("IMGPIPE_LIMIT_CONCURRENT", defaults.concurrent),
        images_per_day=env.integer("IMGPIPE_LIMIT_IMAGES_PER_DAY", defaults.images_per_day),
        uploads=env.integer("IMGPIPE_LIMIT_UPLOADS", defaults.uploads),
        streams=env.integer("IMGPIPE_LIMIT_STREAMS", defaults.streams),
        weight=env.integer("IMGPIPE_LIMIT_WEIGHT", defaults.weight, minimum=1),
    )
    keys, problems = parse_api_keys(env.environ.get("IMGPIPE_API_KEYS", ""), limits)
    env.problems += problems
    return keys


# The setting behind each CsvLimits field, to name it when a CSV goes over it (413).
CSV_LIMIT_SETTINGS = {
    "max_bytes": ("IMGPIPE_MAX_UPLOAD_BYTES", "bytes"),
    "max_rows": ("IMGPIPE_MAX_ROWS", "rows"),
    "max_urls_per_row": ("IMGPIPE_MAX_URLS_PER_ROW", "image URLs in one row"),
    "max_urls_total": ("IMGPIPE_MAX_URLS_TOTAL", "image URLs"),
}


@dataclass(frozen=True, slots=True)
class IngestSettings:
    common: CommonSettings
    csv_limits: CsvLimits = field(default_factory=CsvLimits)
    api_keys: KeyRing = field(default_factory=KeyRing)
    # The status service's fetch guard settings: a webhook_url it would refuse whatever DNS
    # says is refused at upload instead.
    fetch_allow: FetchAllow = field(default_factory=FetchAllow)
    fetch_ports: frozenset[int] = FetchLimits().allowed_ports
    # Tasks on the stream and not yet final, at most (docs/scheduling.md): at least the
    # workers' tasks in flight (workers × IMGPIPE_WORKER_CONCURRENCY), plus a little headroom.
    scheduler_window: int = 128
    scheduler_poll: float = 0.1  # seconds between the feeder's looks at the window

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        env = _Reader(environ)
        defaults = CsvLimits()
        settings = cls(
            common=CommonSettings.read(env, "127.0.0.1:50051"),
            csv_limits=CsvLimits(
                max_bytes=env.integer("IMGPIPE_MAX_UPLOAD_BYTES", defaults.max_bytes, minimum=1),
                max_rows=env.integer("IMGPIPE_MAX_ROWS", defaults.max_rows, minimum=1),
                max_urls_per_row=env.integer(
                    "IMGPIPE_MAX_URLS_PER_ROW", defaults.max_urls_per_row, minimum=1
                ),
                max_urls_total=env.integer(
                    "IMGPIPE_MAX_URLS_TOTAL", defaults.max_urls_total, minimum=1
                ),
            ),
            api_keys=read_api_keys(env),
            fetch_allow=read_fetch_allow(env),
            fetch_ports=env.ports("IMGPIPE_FETCH_PORTS", FetchLimits().allowed_ports),
            scheduler_window=env.integer("IMGPIPE_SCHEDULER_WINDOW", 128, minimum=1),
            scheduler_poll=env.number("IMGPIPE_SCHEDULER_POLL", 0.1, minimum=0.01),
        )
        env.done()
        return settings


def read_fetch_allow(env: _Reader) -> FetchAllow:
    """IMGPIPE_FETCH_ALLOW: what the fetch guard lets through (tests and demos only)."""
    return env.parsed(
        "IMGPIPE_FETCH_ALLOW", FetchAllow(), FetchAllow.parse, "host:port or CIDR entries"
    )


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    common: CommonSettings
    consumer_name: str
    # Tasks in flight: enough to hide origin latency (32 × 16 per origin); the budgets below,
    # not this number, bound memory.
    concurrency: int = 32
    threads: int = 2
    fetch_per_host: int = 16
    buffer_bytes: int = DEFAULT_BUFFER_BYTES  # downloaded bodies waiting for a compress thread
    pixel_budget: int = DEFAULT_PIXEL_BUDGET  # pixels decoded and encoded at once, all threads
    fetch_limits: FetchLimits = field(default_factory=FetchLimits)
    fetch_allow: FetchAllow = field(default_factory=FetchAllow)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Time allowed to decode, encode and store one image and record it, after the download.
    process_budget: float = 60.0
    # An entry idle this long belongs to a dead worker and is claimed; None: derived.
    visibility_override: float | None = None
    max_deliveries: int = 5
    claim_interval: float = 10.0
    reconcile_interval: float = 30.0
    reconcile_min_age: float = 10.0
    # Final requests older than this many days are deleted by the janitor; 0 keeps everything.
    retention_days: int = 30
    janitor_interval: float = 300.0
    # Copy the owner's earlier output of the same source bytes and options instead of
    # compressing again (docs/quality.md, "No repeated work").
    reuse_outputs: bool = True

    @property
    def slowest_image(self) -> float:
        """The longest one image may legitimately take: every attempt at the total timeout,
        every wait between attempts and for cooldowns, and the processing budget."""
        fetching = self.retry.max_attempts * self.fetch_limits.total_timeout
        return fetching + self.retry.longest_wait + self.process_budget

    @property
    def visibility_timeout(self) -> float:
        """Entries idle longer than this are taken over; it exceeds the slowest legitimate
        image, so live work is never stolen."""
        return self.visibility_override or self.slowest_image

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        env = _Reader(environ)
        fetch = FetchLimits()
        images = ImageLimits()
        allow = read_fetch_allow(env)
        settings = cls(
            common=CommonSettings.read(env, "127.0.0.1:50061"),
            # The pod name in Kubernetes; hostname-pid elsewhere, so restarts get a new name
            # and the old name's pending entries are claimed by XAUTOCLAIM.
            consumer_name=env.text("IMGPIPE_CONSUMER_NAME", f"{os.uname().nodename}-{os.getpid()}"),
            concurrency=env.integer("IMGPIPE_WORKER_CONCURRENCY", 32, minimum=1),
            threads=env.integer("IMGPIPE_WORKER_THREADS", os.cpu_count() or 2, minimum=1),
            fetch_limits=FetchLimits(
                connect_timeout=env.number("IMGPIPE_FETCH_CONNECT_TIMEOUT", fetch.connect_timeout),
                total_timeout=env.number("IMGPIPE_FETCH_TOTAL_TIMEOUT", fetch.total_timeout),
                stall_timeout=env.number("IMGPIPE_FETCH_STALL_TIMEOUT", fetch.stall_timeout),
                max_bytes=env.integer("IMGPIPE_FETCH_MAX_BYTES", fetch.max_bytes, minimum=1),
                max_redirects=env.integer("IMGPIPE_FETCH_MAX_REDIRECTS", fetch.max_redirects),
                allowed_ports=env.ports("IMGPIPE_FETCH_PORTS", fetch.allowed_ports),
                max_retry_after=env.number("IMGPIPE_FETCH_MAX_RETRY_AFTER", fetch.max_retry_after),
            ),
            fetch_per_host=env.integer("IMGPIPE_FETCH_PER_HOST", 16, minimum=1),
            buffer_bytes=env.integer(
                "IMGPIPE_WORKER_BUFFER_BYTES", DEFAULT_BUFFER_BYTES, minimum=1
            ),
            pixel_budget=env.integer("IMGPIPE_PIXEL_BUDGET", DEFAULT_PIXEL_BUDGET, minimum=1),
            fetch_allow=allow,
            image_limits=ImageLimits(
                max_pixels=env.integer("IMGPIPE_MAX_PIXELS", images.max_pixels, minimum=1),
                max_frames=env.integer("IMGPIPE_MAX_FRAMES", images.max_frames, minimum=1),
            ),
            retry=RetryPolicy(
                max_attempts=env.integer("IMGPIPE_MAX_ATTEMPTS", 3, minimum=1),
                max_wait=env.number("IMGPIPE_FETCH_MAX_RETRY_AFTER", fetch.max_retry_after),
            ),
            process_budget=env.number("IMGPIPE_PROCESS_BUDGET", 60.0),
            visibility_override=env.number("IMGPIPE_VISIBILITY_TIMEOUT", 0.0) or None,
            max_deliveries=env.integer("IMGPIPE_MAX_DELIVERIES", 5, minimum=1),
            claim_interval=env.number("IMGPIPE_CLAIM_INTERVAL", 10.0),
            reconcile_interval=env.number("IMGPIPE_RECONCILE_INTERVAL", 30.0),
            reconcile_min_age=env.number("IMGPIPE_RECONCILE_MIN_AGE", 10.0),
            retention_days=env.integer("IMGPIPE_RETENTION_DAYS", 30, minimum=0),
            janitor_interval=env.number("IMGPIPE_JANITOR_INTERVAL", 300.0),
            reuse_outputs=env.switch("IMGPIPE_REUSE_OUTPUTS", True),
        )
        if settings.visibility_override and settings.visibility_override < settings.slowest_image:
            env.problems.append(
                f"IMGPIPE_VISIBILITY_TIMEOUT={settings.visibility_override:g} is shorter than the"
                f" slowest legitimate image ({settings.slowest_image:g} s, from the fetch and"
                " processing limits): live work would be taken over"
            )
        env.done()
        return settings


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


@dataclass(frozen=True, slots=True)
class StatusSettings:
    common: CommonSettings
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    api_keys: KeyRing = field(default_factory=KeyRing)
    session_ttl: float = 12 * 3600.0  # how long a browser's sign-in lasts (sessions.py)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        env = _Reader(environ)
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


# The longest one live-progress stream (SSE, WatchRequest) stays open; clients reconnect.
MAX_WATCH_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    http_listen: str = "127.0.0.1:8080"
    ingest_addr: str = "127.0.0.1:50051"
    status_addr: str = "127.0.0.1:50052"
    grpc: GrpcTransport = field(default_factory=GrpcTransport)  # how channels to them dial
    storage: StorageConfig = field(default_factory=lambda: StorageConfig(default_storage_url()))
    max_upload_bytes: int = CsvLimits().max_bytes
    rpc_timeout: float = 10.0
    upload_timeout: float = 300.0
    watch_timeout: float = MAX_WATCH_SECONDS  # the longest one live-progress stream stays open
    page_cache_bytes: int = 32 * 1024 * 1024  # rendered GET /status pages kept (page_cache.py)
    # An upload body that sends nothing for this long is answered 408.
    upload_idle_timeout: float = 30.0
    # Uploads at a time per client address when authentication is off (with keys: `uploads=`).
    anonymous_uploads: int = Limits().uploads
    log_level: str = "INFO"
    api_keys: KeyRing = field(default_factory=KeyRing)
    metrics_listen: str = ""  # where /metrics is served (never the API port); '' serves nothing
    # How callers reach the gateway, for the links it hands out (gateway/public_url.py); ''
    # trusts X-Forwarded-Proto from `trusted_proxies` only, else links are paths.
    public_api_url: str = ""
    trusted_proxies: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        env = _Reader(environ)
        settings = cls(
            http_listen=env.address("IMGPIPE_HTTP_LISTEN", "127.0.0.1:8080"),
            ingest_addr=env.address("IMGPIPE_INGEST_ADDR", "127.0.0.1:50051"),
            status_addr=env.address("IMGPIPE_STATUS_ADDR", "127.0.0.1:50052"),
            grpc=read_grpc_transport(env, server=False),
            storage=read_storage(env),
            max_upload_bytes=env.integer(
                "IMGPIPE_MAX_UPLOAD_BYTES", CsvLimits().max_bytes, minimum=1
            ),
            rpc_timeout=env.number("IMGPIPE_RPC_TIMEOUT", 10.0),
            upload_timeout=env.number("IMGPIPE_UPLOAD_TIMEOUT", 300.0),
            watch_timeout=env.number("IMGPIPE_WATCH_TIMEOUT", MAX_WATCH_SECONDS),
            page_cache_bytes=env.integer("IMGPIPE_PAGE_CACHE_BYTES", 32 * 1024 * 1024),
            upload_idle_timeout=env.number("IMGPIPE_UPLOAD_IDLE_TIMEOUT", 30.0),
            # read_api_keys has reported a bad value already: read it again quietly.
            anonymous_uploads=_Reader(environ).integer("IMGPIPE_LIMIT_UPLOADS", Limits().uploads),
            log_level=env.text("IMGPIPE_LOG_LEVEL", "INFO").upper(),
            api_keys=read_api_keys(env),
            metrics_listen=read_metrics_listen(env),
            public_api_url=env.url("IMGPIPE_PUBLIC_API_URL", "", ("http", "https")).rstrip("/"),
            trusted_proxies=env.networks("IMGPIPE_TRUSTED_PROXIES"),
        )
        check_metrics_port(
            env, settings.metrics_listen, "IMGPIPE_HTTP_LISTEN", settings.http_listen
        )
        if settings.watch_timeout > MAX_WATCH_SECONDS:
            env.problems.append(
                f"IMGPIPE_WATCH_TIMEOUT={settings.watch_timeout:g}: at most {MAX_WATCH_SECONDS:g}"
                " seconds (clients reconnect; a stream holds a slot of the streams= limit)"
            )
        env.done()
        return settings
