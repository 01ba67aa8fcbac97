"""Write docs/configuration.md from the services' settings classes, or check that it is current.

    python scripts/gen_config_docs.py [--check]          (`make docs`, `make docs-check`)

The variables, their defaults, their bounds and the services that read them come from the
code itself: each service's `Settings.from_env` (gateway/config.py,
services/{ingest,status,worker}/config.py) runs against an empty environment and against one
with s3:// storage, and every read of `EnvReader` (services/common/config.py) is recorded. What
a variable means is the one thing written here, in MEANINGS, in the order of the page. A
variable that a service reads without a meaning here, or a meaning for a variable none reads
any more, stops the script, so the page cannot drift from the code: `make lint` runs `--check`.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# After the path is set:
from gateway.config import GatewaySettings  # noqa: E402
from services.common.config import ConfigError, EnvReader  # noqa: E402
from services.ingest.config import IngestSettings  # noqa: E402
from services.status.config import StatusSettings  # noqa: E402
from services.worker.config import WorkerSettings  # noqa: E402

PAGE = ROOT / "docs" / "configuration.md"
SERVICES: dict[str, Callable[[Mapping[str, str]], object]] = {
    "gateway": GatewaySettings.from_env,
    "ingest": IngestSettings.from_env,
    "status": StatusSettings.from_env,
    "worker": WorkerSettings.from_env,
}
# Environments each service is read with: the defaults, then s3:// storage (the AWS variables
# are read only then).
ENVIRONMENTS: tuple[dict[str, str], ...] = ({}, {"IMGPIPE_STORAGE_URL": "s3://bucket/prefix"})


@dataclass(frozen=True)
class Meaning:
    text: str
    # What the page says instead of the computed default, where that depends on the machine
    # (CPU count, host name, working directory) or on other settings.
    default: str = ""


MEANINGS: dict[str, Meaning] = {
    # --- backends ------------------------------------------------------------------------
    "IMGPIPE_DATABASE_URL": Meaning("Postgres DSN (`make run` starts one when unset)"),
    "IMGPIPE_REDIS_URL": Meaning(
        "`redis://`, `rediss://` or `unix://` URL (`make run` starts one when unset)"
    ),
    "IMGPIPE_REDIS_PREFIX": Meaning("prefix of every Redis key (`imgpipe:tasks`, ...)"),
    "IMGPIPE_DB_ACQUIRE_TIMEOUT": Meaning(
        "seconds; longest wait for a pooled Postgres connection, then 503 with `Retry-After`"
    ),
    "IMGPIPE_DB_COMMAND_TIMEOUT": Meaning(
        "seconds; longest wait for a Postgres statement or connection, then a backend error"
        " (retried); migrations wait up to an hour"
        " ([operations.md](operations.md#postgres-timeouts))"
    ),
    "IMGPIPE_REDIS_TIMEOUT": Meaning(
        "seconds; longest wait for a Redis answer or connection, then a backend error (retried);"
        " more than the 1 s blocking reads"
    ),
    "IMGPIPE_DB_POOL_SIZE": Meaning(
        "most Postgres connections one process opens; Postgres must allow every pod's, plus one"
        " each for the health probe ([operations.md](operations.md#postgres-connections))"
    ),
    # --- object storage --------------------------------------------------------------------
    "IMGPIPE_STORAGE_URL": Meaning(
        "object store: `file://DIR` or `s3://BUCKET[/PREFIX]` ([operations.md, Object"
        " storage](operations.md#object-storage-s3))"
    ),
    "IMGPIPE_PUBLIC_BASE_URL": Meaning(
        "prefix of output image URLs in `base` mode",
        default="`http://127.0.0.1:8080/files/` for `file://`; none for `s3://`",
    ),
    "IMGPIPE_PUBLIC_URL_MODE": Meaning(
        "`base`: base URL + key; `presigned`: GET URLs signed when served (`s3://` only)",
        default="`base`; `presigned` for `s3://` without a base URL",
    ),
    "IMGPIPE_PRESIGN_EXPIRY": Meaning("seconds a presigned URL stays valid"),
    "IMGPIPE_S3_ENDPOINT": Meaning(
        "S3-compatible endpoint (MinIO, SeaweedFS, R2...); an `http://` one is allowed; wins"
        " over `AWS_ENDPOINT_URL`",
        default="AWS",
    ),
    "AWS_ENDPOINT_URL": Meaning("the standard name of the same endpoint", default="AWS"),
    "AWS_REGION": Meaning("bucket region (obstore's default: `us-east-1`)"),
    "AWS_DEFAULT_REGION": Meaning("read when `AWS_REGION` is unset"),
    "AWS_ACCESS_KEY_ID": Meaning(
        "S3 key id; with the secret below, or neither to use the pod's or instance's role"
    ),
    "AWS_SECRET_ACCESS_KEY": Meaning("S3 secret key, with the key id"),
    "AWS_SESSION_TOKEN": Meaning("S3 session token, for temporary credentials"),
    # --- listening and calling -------------------------------------------------------------
    "IMGPIPE_GRPC_LISTEN": Meaning("gRPC listen address (workers serve health only)"),
    "IMGPIPE_HTTP_LISTEN": Meaning("the gateway's HTTP listen address"),
    "IMGPIPE_INGEST_ADDR": Meaning("where the gateway finds ingest"),
    "IMGPIPE_STATUS_ADDR": Meaning("where the gateway finds status"),
    "IMGPIPE_RPC_TIMEOUT": Meaning(
        "seconds; deadline of the gateway's gRPC calls; ten times this for a cancel, a retry"
        " and a delete, whose work grows with the request"
    ),
    "IMGPIPE_UPLOAD_TIMEOUT": Meaning("seconds; deadline of one upload's gRPC stream"),
    "IMGPIPE_UPLOAD_IDLE_TIMEOUT": Meaning(
        "seconds; an upload body that sends nothing this long is answered 408"
    ),
    "IMGPIPE_DOWNLOAD_IDLE_TIMEOUT": Meaning(
        "seconds; an output CSV download whose client takes nothing this long is cut off"
    ),
    "IMGPIPE_METRICS_LISTEN": Meaning(
        "`host:port` where the process serves `/metrics` (never its API port); Kubernetes sets"
        " `0.0.0.0:9464`; unset: off ([operations.md, Metrics](operations.md#metrics))"
    ),
    "IMGPIPE_PUBLIC_API_URL": Meaning(
        "the gateway as callers reach it: base of the URLs in webhooks, and of `Location` and"
        " `status_url` (unset on the gateway: from a trusted proxy's `X-Forwarded-Proto`, else"
        " paths)"
    ),
    "IMGPIPE_TRUSTED_PROXIES": Meaning(
        "IPs or CIDRs whose `X-Forwarded-Proto`/`Forwarded` are believed: for links when"
        " `IMGPIPE_PUBLIC_API_URL` is unset, and for the https session cookie and origin"
    ),
    "IMGPIPE_LOG_LEVEL": Meaning("logs are JSON lines on stdout"),
    "IMGPIPE_GRACE_SECONDS": Meaning("seconds; drain period on SIGTERM"),
    # --- uploads and the CSV ---------------------------------------------------------------
    "IMGPIPE_MAX_UPLOAD_BYTES": Meaning("largest CSV, in bytes (413 beyond)"),
    "IMGPIPE_MAX_ROWS": Meaning("most rows in a CSV (413 beyond)"),
    "IMGPIPE_MAX_URLS_PER_ROW": Meaning("most image URLs in one row (413 beyond)"),
    "IMGPIPE_MAX_URLS_TOTAL": Meaning("most image URLs in one CSV (413 beyond)"),
    # --- keys and limits -------------------------------------------------------------------
    "IMGPIPE_API_KEYS": Meaning(
        "`NAME:SHA256HEX [limit=value ...]` entries, comma-separated; empty: authentication"
        " off ([usage.md, Authentication and limits](usage.md#authentication-and-limits))",
        default="empty: authentication off",
    ),
    "IMGPIPE_LIMIT_RATE": Meaning("calls per key, sustained (`N/s`, `N/min`, `N/h`; 0 no limit)"),
    "IMGPIPE_LIMIT_BURST": Meaning("calls per key at once, after a quiet period"),
    "IMGPIPE_LIMIT_CONCURRENT": Meaning("unfinished requests per key (0 no limit)"),
    "IMGPIPE_LIMIT_IMAGES_PER_DAY": Meaning("images accepted per key and UTC day (0 no limit)"),
    "IMGPIPE_LIMIT_UPLOADS": Meaning(
        "uploads being received at a time, per key (per client address without keys; 0 no limit)"
    ),
    "IMGPIPE_LIMIT_STREAMS": Meaning(
        "live progress streams (SSE, `WatchRequest`) open at a time, per key"
        " ([sessions-and-streams.md](sessions-and-streams.md))"
    ),
    "IMGPIPE_LIMIT_WEIGHT": Meaning(
        "an owner's share of the workers against other owners ([scheduling.md](scheduling.md))"
    ),
    # --- scheduling ------------------------------------------------------------------------
    "IMGPIPE_SCHEDULER_WINDOW": Meaning(
        "tasks on the stream and not final, at most: at least workers x concurrency"
        " ([scheduling.md](scheduling.md))"
    ),
    "IMGPIPE_SCHEDULER_LOOKAHEAD": Meaning(
        "of those, not yet delivered to a worker, at most"
        " ([scheduling.md](scheduling.md#the-lookahead))"
    ),
    "IMGPIPE_SCHEDULER_LOOKAHEAD_SECONDS": Meaning(
        "and at most what the workers took from the stream in this many seconds: a new request"
        " waits behind about this much work ([scheduling.md](scheduling.md#the-lookahead))"
    ),
    "IMGPIPE_SCHEDULER_POLL": Meaning("seconds between the feeder's looks at the window"),
    # --- the worker ------------------------------------------------------------------------
    "IMGPIPE_CONSUMER_NAME": Meaning(
        "consumer name in the stream group (the pod name in Kubernetes)", default="hostname-pid"
    ),
    "IMGPIPE_WORKER_CONCURRENCY": Meaning(
        "images at their work per worker (hides origin latency; the two budgets below bound"
        " memory); as many again may wait for their Done records"
    ),
    "IMGPIPE_WORKER_THREADS": Meaning(
        "Pillow threads per worker", default="the cores it may use (its cgroup CPU limit)"
    ),
    "IMGPIPE_WORKER_RECORD_LINGER_MS": Meaning(
        "milliseconds an image's Done record waits for other images' to share one statement"
        " while other images of the worker are still in work (0: never waits;"
        " [performance.md](performance.md))"
    ),
    "IMGPIPE_WORKER_BUFFER_BYTES": Meaning(
        "downloaded bytes held until their images are compressed, reserved before they are kept"
        " (a body's Content-Length first, then in doubling steps); one body at a time may pass"
        " it"
    ),
    "IMGPIPE_PIXEL_BUDGET": Meaning(
        "pixels decoded and encoded at once across the threads (after JPEG shrink-on-load); a"
        " larger image runs alone"
    ),
    "IMGPIPE_FETCH_CONNECT_TIMEOUT": Meaning("seconds; download connect timeout"),
    "IMGPIPE_FETCH_TOTAL_TIMEOUT": Meaning("seconds; whole download, every redirect included"),
    "IMGPIPE_FETCH_STALL_TIMEOUT": Meaning("seconds; longest wait for the next byte"),
    "IMGPIPE_FETCH_MAX_BYTES": Meaning("largest image download, in bytes"),
    "IMGPIPE_FETCH_MAX_REDIRECTS": Meaning("redirects followed, each re-checked"),
    "IMGPIPE_FETCH_PORTS": Meaning("ports images and webhooks may be fetched from or sent to"),
    "IMGPIPE_FETCH_PER_HOST": Meaning("connections per origin, per worker"),
    "IMGPIPE_FETCH_CONNECTION_WAIT": Meaning(
        "seconds a task waits for a connection to its busy origin before it gives its worker slot"
        " back (the image waits in Postgres for about the origin's time per download, at most"
        " 10 times; then it waits in its slot)"
    ),
    "IMGPIPE_FETCH_MAX_RETRY_AFTER": Meaning(
        "seconds; cap on an origin's `Retry-After` (the image waits in Postgres meanwhile, not in"
        " a worker slot)"
    ),
    "IMGPIPE_FETCH_ALLOW": Meaning(
        "`host:port` entries or CIDRs that bypass the address block. **Tests and local demos"
        " only: never set it in production.**"
    ),
    "IMGPIPE_MAX_PIXELS": Meaning("largest image in pixels, checked before decoding"),
    "IMGPIPE_MAX_FRAMES": Meaning("most frames in an animation"),
    "IMGPIPE_MAX_SCANS": Meaning(
        "most scans in a progressive JPEG (each one a pass over the whole image), counted"
        " before decoding"
    ),
    "IMGPIPE_MAX_ATTEMPTS": Meaning(
        "tries for a transient download failure; between two, the image waits in Postgres for its"
        " backoff and gives its worker slot back"
    ),
    "IMGPIPE_PROCESS_BUDGET": Meaning("seconds to decode, encode, store and record one image"),
    "IMGPIPE_VISIBILITY_TIMEOUT": Meaning(
        "seconds an entry may stay idle before it belongs to a dead worker and is taken over; a"
        " value below the slowest legitimate image (one download attempt and the processing"
        " budget) is refused",
        default="derived (90 s with the defaults)",
    ),
    "IMGPIPE_MAX_DELIVERIES": Meaning("deliveries before a task goes to the dead-letter stream"),
    "IMGPIPE_CLAIM_INTERVAL": Meaning("seconds; how often a worker looks for entries to take over"),
    "IMGPIPE_RECONCILE_INTERVAL": Meaning("seconds; reconciler period"),
    "IMGPIPE_RECONCILE_MIN_AGE": Meaning(
        "seconds; how old work must be before the reconciler counts it as lost"
    ),
    "IMGPIPE_FAILPOINTS": Meaning("fault tests only: named points where the process kills itself"),
    # --- the status service: webhooks, sessions --------------------------------------------
    "IMGPIPE_WEBHOOK_SECRET": Meaning(
        "`whsec_<base64>` (16+ bytes): signs webhooks; with API keys each owner's secret is"
        " derived from it ([webhooks.md](webhooks.md))"
    ),
    "IMGPIPE_WEBHOOK_TIMEOUT": Meaning("seconds for one webhook attempt (at most 15)"),
    "IMGPIPE_WEBHOOK_SCHEDULE": Meaning("seconds between webhook attempts, comma-separated"),
    "IMGPIPE_WEBHOOK_SECRET_GRACE": Meaning(
        "seconds the secret before a rotation still signs ([webhooks.md](webhooks.md))"
    ),
    "IMGPIPE_WEBHOOK_REDELIVER_RATE": Meaning(
        "manual redeliveries per owner (`N/s`, `N/min`, `N/h`)"
    ),
    "IMGPIPE_WEBHOOK_REDELIVER_BURST": Meaning("manual redeliveries per owner at once"),
    "IMGPIPE_WEBHOOK_PER_OWNER": Meaning(
        "attempts of one owner in flight at once, across the status replicas: one owner's slow"
        " receivers hold no more of the deliveries ([webhooks.md](webhooks.md))"
    ),
    "IMGPIPE_SESSION_TTL": Meaning("seconds a browser's sign-in lasts"),
    # --- the gateway -----------------------------------------------------------------------
    "IMGPIPE_WATCH_TIMEOUT": Meaning(
        "seconds; longest live-progress stream (at most 600); clients reconnect"
    ),
    "IMGPIPE_PAGE_CACHE_BYTES": Meaning("bytes of rendered `GET /status` pages kept"),
    "IMGPIPE_GATEWAY_DOWNLOADS": Meaning(
        "output CSV downloads at a time per caller (its key or session, else its address), in"
        " one gateway process; each holds up to a page of rows while its client reads (0 no"
        " limit)"
    ),
    # --- gRPC transport (docs/grpc.md), reuse, retention ---------------------------------
    "IMGPIPE_GRPC_TLS_CERT": Meaning(
        "PEM file: the service's certificate; with the key, the service serves TLS"
        " ([grpc.md](grpc.md))"
    ),
    "IMGPIPE_GRPC_TLS_KEY": Meaning("PEM file: the key of that certificate"),
    "IMGPIPE_GRPC_TLS_CA": Meaning(
        "PEM file: on a service, require client certificates signed by it; on the gateway,"
        " trust it for the services' certificates"
    ),
    "IMGPIPE_GRPC_TLS_SERVER_NAME": Meaning(
        "the name the gateway expects in the services' certificates"
    ),
    "IMGPIPE_GRPC_HEALTH_LISTEN": Meaning(
        "`host:port` of a plaintext port serving only gRPC health (for probes when the API"
        " port speaks TLS); unset: none"
    ),
    "IMGPIPE_GRPC_MAX_CONNECTION_AGE": Meaning(
        "seconds a gRPC connection may live before the server asks the client to reconnect, so"
        " new replicas get calls ([grpc.md](grpc.md))"
    ),
    "IMGPIPE_GRPC_MAX_CONNECTION_AGE_GRACE": Meaning(
        "seconds calls in flight get to finish on a connection past its age"
    ),
    "IMGPIPE_REUSE_OUTPUTS": Meaning(
        "`on`: copy the owner's earlier output of the same source bytes and options instead"
        " of compressing again ([quality.md](quality.md))"
    ),
    "IMGPIPE_RETENTION_DAYS": Meaning(
        "final requests older than this many days are deleted by the janitor; 0 keeps"
        " everything ([lifecycle.md](lifecycle.md))"
    ),
    "IMGPIPE_JANITOR_INTERVAL": Meaning("seconds between the janitor's passes"),
}

HEADER = """\
# Configuration

<!-- Generated by scripts/gen_config_docs.py from the settings classes: do not edit.
     `make docs` rewrites it; `make docs-check` (in `make lint`) fails when it is stale. -->

Every setting is an environment variable, read in one place per service: its settings class
([`gateway/config.py`](../gateway/config.py),
[`services/ingest/config.py`](../services/ingest/config.py),
[`services/status/config.py`](../services/status/config.py),
[`services/worker/config.py`](../services/worker/config.py)), with the readers they share in
[`services/common/config.py`](../services/common/config.py). A bad value stops the service at
start with every problem listed at once. Variables a service does not read are ignored by it,
so one environment (a ConfigMap, `make run`'s) can serve all four.

"""

FOOTER = """
`make run` (`services/local/launcher.py`) passes its environment to every process it starts,
and reads four variables of its own: `IMGPIPE_DATA_DIR` (default `./.imgpipe`),
`IMGPIPE_DEV_WORKERS` (default 2), `IMGPIPE_DEV_GRPC_BASE_PORT` (default 50051) and
`IMGPIPE_DEV_METRICS_BASE_PORT` (unset: no metrics); see [local-stack.md](local-stack.md). The
command-line client reads `IMGPIPE_URL` and `IMGPIPE_API_KEY` ([usage.md](usage.md#using-the-cli)).
Tests read `IMGPIPE_TEST_DATABASE_URL` and `IMGPIPE_TEST_REDIS_URL` ([testing.md](testing.md)).
"""


@dataclass
class Variable:
    name: str
    rule: str = ""
    defaults: dict[str, object] = field(default_factory=dict)  # by service
    required: bool = False

    @property
    def services(self) -> list[str]:
        return sorted(self.defaults)


class _Recorder:
    """Wraps EnvReader's primitives and notes every variable read, by service."""

    def __init__(self) -> None:
        self.found: dict[str, Variable] = {}
        self.service = ""
        self.bound: dict[str, str] = {}

    def note(self, name: str, default: object, rule: str = "") -> None:
        variable = self.found.setdefault(name, Variable(name))
        variable.defaults.setdefault(self.service, default)
        variable.rule = variable.rule or rule

    @contextmanager
    def patched(self) -> Iterator[None]:
        reader = EnvReader
        parsed, text, required = reader.parsed, reader.text, reader.required
        integer, number = reader.integer, reader.number
        recorder = self

        def parsed_(self: Any, name: str, default: Any, parse: Any, rule: str) -> Any:
            recorder.note(name, default, rule + recorder.bound.pop(name, ""))
            return parsed(self, name, default, parse, rule)

        def text_(self: Any, name: str, default: str = "") -> str:
            recorder.note(name, default, "text")
            return text(self, name, default)

        def required_(self: Any, name: str, rule: str) -> str:
            recorder.found.setdefault(name, Variable(name)).required = True
            return required(self, name, rule)

        def integer_(self: Any, name: str, default: int, *, minimum: int = 0) -> int:
            recorder.bound[name] = f" ≥ {minimum}"
            return integer(self, name, default, minimum=minimum)

        def number_(self: Any, name: str, default: float, *, minimum: float = 0.0) -> float:
            recorder.bound[name] = f" > {minimum:g}"
            return number(self, name, default, minimum=minimum)

        class Environ(dict[str, str]):
            # IMGPIPE_API_KEYS is read straight from the mapping (auth.parse_api_keys).
            def get(self, key: str, default: Any = None) -> Any:
                recorder.note(key, "", "text")
                return super().get(key, default)

        self.environ_type = Environ
        with ExitStack() as stack:
            for attribute, wrapper in (
                ("parsed", parsed_),
                ("text", text_),
                ("required", required_),
                ("integer", integer_),
                ("number", number_),
            ):
                stack.enter_context(mock.patch.object(reader, attribute, wrapper))
            yield


def read_variables() -> dict[str, Variable]:
    recorder = _Recorder()
    with recorder.patched():
        for environ in ENVIRONMENTS:
            for service, from_env in SERVICES.items():
                recorder.service = service
                # The required URLs are missing on purpose; their reads are noted all the same.
                with suppress(ConfigError):
                    from_env(recorder.environ_type(environ))
    return recorder.found


def show_rate(per_second: float) -> str:
    """A rate as auth.parse_rate reads it: the largest unit that gives a whole number."""
    for unit, seconds in (("s", 1), ("min", 60), ("h", 3600)):
        if (per_second * seconds).is_integer() or unit == "h":
            return f"`{per_second * seconds:g}/{unit}`"
    raise AssertionError("unreachable")


def show_default(value: object, rule: str = "") -> str:
    if rule == "a rate" and isinstance(value, float):
        return show_rate(value)
    if isinstance(value, bool):
        return "`on`" if value else "`off`"
    if isinstance(value, bool) or not isinstance(value, str | int | float | tuple | frozenset):
        return "—"
    if isinstance(value, str):
        if not value:
            return "—"
        cwd = Path.cwd().as_uri()
        return f"`{value.replace(cwd, 'file://$PWD')}`"
    if isinstance(value, tuple | frozenset):
        items = sorted(value) if isinstance(value, frozenset) else list(value)
        return f"`{','.join(f'{item:g}' for item in items)}`" if items else "—"
    shown = f"`{value}`" if isinstance(value, int) else f"`{value:g}`"
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        shown += f" ({value >> 20} MiB)"
    return shown


def render_default(variable: Variable, meaning: Meaning) -> str:
    if meaning.default:
        return meaning.default
    if variable.required:
        return "— (required)"
    shown = {
        service: show_default(value, variable.rule) for service, value in variable.defaults.items()
    }
    if len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return ", ".join(f"{service} {shown[service]}" for service in sorted(shown))


def render(variables: Mapping[str, Variable]) -> str:
    meanings = MEANINGS
    unexplained = sorted(set(variables) - set(meanings))
    unread = sorted(set(MEANINGS) - set(variables))
    if unexplained or unread:
        raise SystemExit(
            "scripts/gen_config_docs.py: MEANINGS is out of step with the settings classes:"
            + (f"\n  read but not explained: {', '.join(unexplained)}" if unexplained else "")
            + (f"\n  explained but not read: {', '.join(unread)}" if unread else "")
        )
    rows = ["| variable | default | read by | value | meaning |", "|---|---|---|---|---|"]
    for name, meaning in meanings.items():
        variable = variables[name]
        services = variable.services
        read_by = "all four" if len(services) == len(SERVICES) else ", ".join(services)
        rule = "text" if variable.rule == "text" else variable.rule.removeprefix("expected ")
        rows.append(
            f"| `{name}` | {render_default(variable, meaning)} | {read_by} | {rule} "
            f"| {meaning.text} |"
        )
    return HEADER + "\n".join(rows) + "\n" + FOOTER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the page is stale")
    args = parser.parse_args(argv)
    page = render(read_variables())
    if not args.check:
        PAGE.write_text(page)
        return 0
    current = PAGE.read_text() if PAGE.exists() else ""
    if current == page:
        return 0
    sys.stdout.writelines(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            page.splitlines(keepends=True),
            "docs/configuration.md",
            "generated",
        )
    )
    print("docs/configuration.md is stale: run 'make docs' and commit", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
