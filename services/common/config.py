"""What every imgpipe process shares in reading its settings from `IMGPIPE_*` variables.

Each service has its own settings class beside its code (gateway/config.py,
services/{ingest,worker,status}/config.py), read by its `__main__` with
`<Service>Settings.from_env(os.environ)`. Here are the pieces they share: `EnvReader`, which
collects every problem instead of stopping at the first, `ConfigError`, which lists them all at
once so an operator fixes them in one go, the backends' `CommonSettings`, and the readers of
settings more than one service reads (storage, gRPC transport, API keys, the fetch guard).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar
from urllib.parse import urlsplit

from services.common.auth import KeyRing, Limits, parse_api_keys, parse_rate
from services.common.fetch import FetchAllow, IPNetwork
from services.common.grpc_transport import (
    DEFAULT_MAX_CONNECTION_AGE,
    DEFAULT_MAX_CONNECTION_AGE_GRACE,
    GrpcTransport,
    TlsFiles,
)
from services.common.storage import S3Options, StorageConfig

T = TypeVar("T")


class ConfigError(Exception):
    """One or more settings are missing or malformed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


# Seconds: the longest a Redis read blocks waiting for entries (streams.READ_BLOCK_MS; a copy,
# since importing streams would load redis into the gateway, which reads this module too;
# tests/unit/test_config.py keeps the two in step).
LONGEST_REDIS_BLOCK = 1.0


class EnvReader:
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
    # The most Postgres connections the process's pool opens (it opens them as they are
    # needed); Postgres must allow every pod's, plus one each for the dependency probe
    # (docs/operations.md, "Postgres connections").
    db_pool_size: int = 10
    # The longest a Postgres statement, or a connection attempt, may go unanswered before it
    # fails as a backend error; above the longest legitimate statement (docs/operations.md,
    # "Postgres timeouts"). Without it, a Postgres that stopped answering without closing its
    # connections held every caller for as long as TCP takes to give up.
    db_command_timeout: float = 60.0  # db/pool.DEFAULT_COMMAND_TIMEOUT (no asyncpg here)
    # The longest a Redis command may go unanswered before it fails as a backend error (and a
    # connection attempt): without it, a Redis that stops answering without closing its
    # connections held every caller for as long as TCP takes to give up.
    redis_timeout: float = 5.0
    log_level: str = "INFO"
    # Crash points for fault tests (services/common/failpoints.py); empty in production.
    failpoints: frozenset[str] = frozenset()
    metrics_listen: str = ""  # where /metrics is served; '' serves nothing

    @classmethod
    def read(cls, env: EnvReader, default_listen: str) -> Self:
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
            db_pool_size=env.integer("IMGPIPE_DB_POOL_SIZE", 10, minimum=2),
            db_command_timeout=env.number("IMGPIPE_DB_COMMAND_TIMEOUT", 60.0),
            # More than the longest blocking read (streams.READ_BLOCK_MS), which waits that
            # long for an answer by design.
            redis_timeout=env.number("IMGPIPE_REDIS_TIMEOUT", 5.0, minimum=LONGEST_REDIS_BLOCK),
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


def read_grpc_transport(env: EnvReader, *, server: bool) -> GrpcTransport:
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


def read_metrics_listen(env: EnvReader) -> str:
    """IMGPIPE_METRICS_LISTEN, host:port: where this process serves /metrics. Unset serves
    nothing (`make run` starts several processes on one machine: IMGPIPE_DEV_METRICS_BASE_PORT)."""
    listen = env.address("IMGPIPE_METRICS_LISTEN", "")
    if listen and int(listen.rpartition(":")[2]) == 0:
        env.problems.append(f"IMGPIPE_METRICS_LISTEN={listen!r}: expected a port from 1 to 65535")
        return ""
    return listen


def check_metrics_port(env: EnvReader, metrics: str, name: str, listen: str) -> None:
    """Metrics have a port of their own, never the API's: scrapers stay off the API port."""
    if metrics and metrics.rpartition(":")[2] == listen.rpartition(":")[2]:
        env.problems.append(
            f"IMGPIPE_METRICS_LISTEN={metrics!r} uses the port of {name}={listen!r}: give metrics"
            " a port of their own"
        )


def check_own_port(env: EnvReader, name: str, listen: str, settings: CommonSettings) -> None:
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


def read_storage(env: EnvReader) -> StorageConfig:
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


def _read_s3(env: EnvReader) -> S3Options:
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


def read_api_keys(env: EnvReader) -> KeyRing:
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


def read_fetch_allow(env: EnvReader) -> FetchAllow:
    """IMGPIPE_FETCH_ALLOW: what the fetch guard lets through (tests and demos only)."""
    return env.parsed(
        "IMGPIPE_FETCH_ALLOW", FetchAllow(), FetchAllow.parse, "host:port or CIDR entries"
    )


# The longest one live-progress stream (SSE, WatchRequest) stays open; clients reconnect.
MAX_WATCH_SECONDS = 600.0
