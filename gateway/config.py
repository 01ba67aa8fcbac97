"""The gateway's settings (the shared pieces: services/common/config.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

from services.common.auth import KeyRing, Limits
from services.common.config import (
    MAX_WATCH_SECONDS,
    EnvReader,
    check_metrics_port,
    default_storage_url,
    read_api_keys,
    read_grpc_transport,
    read_metrics_listen,
    read_storage,
)
from services.common.csv_format import CsvLimits
from services.common.fetch import IPNetwork
from services.common.grpc_transport import GrpcTransport
from services.common.storage import StorageConfig

# How much longer than a read a cancel, retry or delete may take (bulk_rpc_timeout).
BULK_RPC_TIMEOUT_FACTOR = 10


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
    # A download whose client takes nothing for this long is cut off (gateway/output_csv.py).
    download_idle_timeout: float = 30.0
    # Uploads at a time per client address when authentication is off (with keys: `uploads=`).
    anonymous_uploads: int = Limits().uploads
    # Output CSV downloads at a time per caller (its credential, else its address), in one
    # gateway process (gateway/holds.py); 0: no limit.
    downloads: int = 4
    log_level: str = "INFO"
    api_keys: KeyRing = field(default_factory=KeyRing)
    metrics_listen: str = ""  # where /metrics is served (never the API port); '' serves nothing
    # How callers reach the gateway, for the links it hands out (gateway/urls.py); ''
    # trusts X-Forwarded-Proto from `trusted_proxies` only, else links are paths.
    public_api_url: str = ""
    trusted_proxies: tuple[IPNetwork, ...] = ()

    @property
    def bulk_rpc_timeout(self) -> float:
        """The deadline of a call whose work grows with the request: a cancel, a retry or a
        delete of 300,000 images is one statement of seconds (a retry took 6 s at the size
        limit, docs/operations.md, "Postgres timeouts"), more than a read may take."""
        return self.rpc_timeout * BULK_RPC_TIMEOUT_FACTOR

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        env = EnvReader(environ)
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
            download_idle_timeout=env.number("IMGPIPE_DOWNLOAD_IDLE_TIMEOUT", 30.0),
            # read_api_keys has reported a bad value already: read it again quietly.
            anonymous_uploads=EnvReader(environ).integer("IMGPIPE_LIMIT_UPLOADS", Limits().uploads),
            downloads=env.integer("IMGPIPE_GATEWAY_DOWNLOADS", 4, minimum=0),
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
