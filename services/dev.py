"""`make run`: the whole stack on one machine, as child processes of this launcher.

    python -m services.dev

With no IMGPIPE_DATABASE_URL or IMGPIPE_REDIS_URL it starts an embedded Postgres and Redis under
the data folder (IMGPIPE_DATA_DIR, default ./.imgpipe), which keeps their data across runs. Then
ingest and status, the workers, and the gateway; it waits for the gateway's /readyz and prints
where everything is. Ctrl-C or SIGTERM stops the services in reverse order (gateway, workers,
ingest and status), each with a grace period, then Redis and Postgres.

Metrics are off unless IMGPIPE_DEV_METRICS_BASE_PORT is set: then each child serves /metrics on
a port of its own (`metrics_ports`). IMGPIPE_METRICS_LISTEN itself is never passed on, since
one address cannot serve several processes.

plan_stack() turns the environment into a StackPlan without side effects; run_stack() runs it.
"""

from __future__ import annotations

import base64
import http.client
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from urllib.parse import unquote, urlsplit, urlunsplit

from services.common.embedded import EmbeddedPostgres, EmbeddedRedis, start_postgres, start_redis

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

    def stop_stages(self) -> list[list[ChildSpec]]:
        """The children grouped in the order they are stopped."""
        return [[c for c in self.children if c.role in roles] for roles in STOP_ORDER]


def plan_stack(
    environ: Mapping[str, str], *, cwd: Path | None = None, python: str | None = None
) -> StackPlan:
    """Decide what `make run` starts from `environ` alone; PlanError lists every problem."""
    problems: list[str] = []

    def get(name: str) -> str | None:
        value = environ.get(name, "").strip()
        return value or None

    def integer(name: str, default: int, low: int, high: int) -> int:
        raw = get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            problems.append(f"{name}={raw!r}: expected a whole number from {low} to {high}")
            return default
        return value

    base = cwd if cwd is not None else Path.cwd()
    data_dir = (base / Path(get("IMGPIPE_DATA_DIR") or ".imgpipe").expanduser()).resolve()
    workers = integer("IMGPIPE_DEV_WORKERS", DEFAULT_WORKERS, 1, 64)
    grpc_base = integer("IMGPIPE_DEV_GRPC_BASE_PORT", DEFAULT_GRPC_BASE_PORT, 1, 65535)
    if grpc_base + 9 + workers > 65535:
        problems.append(
            f"IMGPIPE_DEV_GRPC_BASE_PORT={grpc_base}: workers would listen beyond port 65535"
        )
    metrics_base = integer("IMGPIPE_DEV_METRICS_BASE_PORT", 0, 1, 65535)
    if metrics_base + 9 + workers > 65535:
        problems.append(
            f"IMGPIPE_DEV_METRICS_BASE_PORT={metrics_base}: workers would serve metrics beyond"
            " port 65535"
        )
    http_listen = get("IMGPIPE_HTTP_LISTEN") or DEFAULT_HTTP_LISTEN
    http_host, http_port = _split_address(http_listen)
    if http_port is None:
        problems.append(f"IMGPIPE_HTTP_LISTEN={http_listen!r}: expected host:port, port 1-65535")
    if problems:
        raise PlanError(problems)

    url_host = "127.0.0.1" if http_host in _WILDCARD_HOSTS else http_host
    if ":" in url_host:
        url_host = f"[{url_host}]"
    gateway_url = f"http://{url_host}:{http_port}"

    python = python or sys.executable
    ingest_addr = f"127.0.0.1:{grpc_base}"
    status_addr = f"127.0.0.1:{grpc_base + 1}"
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

    storage_url = get("IMGPIPE_STORAGE_URL") or (data_dir / "store").as_uri()
    # The gateway serves a file:// store; S3 URLs are a CDN's or presigned (empty: unset).
    files_url = f"{gateway_url}/files/" if storage_url.startswith("file:") else ""
    return StackPlan(
        data_dir=data_dir,
        database_url=get("IMGPIPE_DATABASE_URL"),
        redis_url=get("IMGPIPE_REDIS_URL"),
        postgres_dir=data_dir / "pg",
        redis_dir=data_dir / "redis",
        storage_url=storage_url,
        public_base_url=get("IMGPIPE_PUBLIC_BASE_URL") or files_url,
        http_listen=http_listen,
        gateway_url=gateway_url,
        ingest_addr=ingest_addr,
        status_addr=status_addr,
        children=tuple(children),
        base_env=dict(environ),
    )


def run_stack(plan: StackPlan) -> int:
    """Run the plan until a signal (exit 0) or a child's unexpected exit (non-zero).

    Must run in the main thread: it installs SIGINT and SIGTERM handlers.
    """
    signals = _Signals()
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    running: list[_Child] = []
    try:
        plan.data_dir.mkdir(parents=True, exist_ok=True)
        if plan.storage_url.startswith("file:"):
            Path(unquote(urlsplit(plan.storage_url).path)).mkdir(parents=True, exist_ok=True)
        database_url, redis_url = plan.database_url, plan.redis_url
        try:
            if database_url is None:
                _say(f"starting embedded Postgres in {plan.postgres_dir}")
                postgres = start_postgres(plan.postgres_dir)
                database_url = postgres.url
            if signals.received:
                return 0
            if redis_url is None:
                _say(f"starting embedded Redis in {plan.redis_dir}")
                redis = start_redis(plan.redis_dir)
                redis_url = redis.url
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _say(f"could not start an embedded server: {exc}")
            return 1
        if signals.received:
            return 0

        # A local stack signs webhooks too: with a secret of its own, kept in the data folder.
        secret = plan.base_env.get("IMGPIPE_WEBHOOK_SECRET") or _dev_webhook_secret(plan.data_dir)
        for spec in plan.children:
            env = plan.child_env(
                spec, database_url=database_url, redis_url=redis_url, webhook_secret=secret
            )
            try:
                running.append(_Child.start(spec, env))
            except OSError as exc:
                _say(f"could not start {spec.name}: {exc}")
                return 1

        ready = _wait_until_ready(plan, running, signals)
        if ready is not None:
            return ready
        print(_banner(plan, database_url, redis_url, postgres, redis), file=sys.stderr, flush=True)
        return _supervise(running, signals)
    finally:
        _stop_children(plan, running, signals)
        if redis is not None:
            _say("stopping embedded Redis")
            redis.stop()
        if postgres is not None:
            _say("stopping embedded Postgres")
            postgres.stop()
        signals.close()


def main() -> int:
    try:
        plan = plan_stack(os.environ)
    except PlanError as exc:
        for problem in exc.problems:
            _say(problem)
        return 2
    return run_stack(plan)


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, spec: ChildSpec, env: dict[str, str]) -> _Child:
        # A process group of its own: Ctrl-C in the terminal reaches only the launcher, which
        # then stops the children in order instead of all of them at once.
        process = subprocess.Popen(spec.argv, env=env, stdin=subprocess.DEVNULL, process_group=0)
        _say(f"started {spec.name} (pid {process.pid})")
        return cls(spec, process)

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            return f"{self.spec.name} (pid {self.process.pid}) was killed by signal {-code}"
        return f"{self.spec.name} (pid {self.process.pid}) exited with code {code}"


class _Signals:
    """Records SIGINT/SIGTERM and wakes a waiting select() through a self-pipe."""

    def __init__(self) -> None:
        self.received = 0
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous = {
            signum: signal.signal(signum, self._handle)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        if self.received > 1:
            _say("second signal: stopping without waiting for the grace period")

    def wait(self, timeout: float) -> None:
        """Return after `timeout` seconds, or at once when a signal arrives."""
        readable, _, _ = select.select([self._reader], [], [], max(timeout, 0.0))
        if readable:
            try:
                while self._reader.recv(256):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()


def _wait_until_ready(plan: StackPlan, running: list[_Child], signals: _Signals) -> int | None:
    """None once the gateway's /readyz answers 200; otherwise the exit code to return."""
    host, port = _split_address(plan.gateway_url.removeprefix("http://"))
    assert port is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if signals.received:
            return 0
        if _report_exits(running, "during startup; stopping the others"):
            return 1
        if _ready(host, port):
            return None
        if time.monotonic() >= deadline:
            _say(f"the gateway did not answer {plan.gateway_url}/readyz within {READY_TIMEOUT} s")
            return 1
        signals.wait(0.25)


def _supervise(running: list[_Child], signals: _Signals) -> int:
    while True:
        if signals.received:
            _say("stopping")
            return 0
        if _report_exits(running, "unexpectedly; stopping everything"):
            return 1
        signals.wait(0.5)


def _report_exits(running: list[_Child], why: str) -> bool:
    exited = [child for child in running if child.process.poll() is not None]
    for child in exited:
        _say(f"{child.describe_exit()} {why}")
    return bool(exited)


def _stop_children(plan: StackPlan, running: list[_Child], signals: _Signals) -> None:
    by_name = {child.spec.name: child for child in running}
    for stage_specs in plan.stop_stages():
        stage = [by_name[spec.name] for spec in stage_specs if spec.name in by_name]
        alive = [child for child in stage if child.process.poll() is None]
        for child in alive:
            _say(f"stopping {child.spec.name} (pid {child.process.pid})")
            child.process.terminate()
        deadline = time.monotonic() + STOP_GRACE
        while any(child.process.poll() is None for child in alive):
            if time.monotonic() >= deadline or signals.received > 1:
                break
            signals.wait(0.1)
        for child in alive:
            if child.process.poll() is None:
                _say(f"{child.spec.name} (pid {child.process.pid}) did not stop: SIGKILL")
                child.process.kill()
            child.process.wait()
            if child.process.returncode != 0:
                _say(child.describe_exit())


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
    path = data_dir / "webhook-secret"
    if not path.exists():
        path.write_text("whsec_" + base64.b64encode(secrets.token_bytes(24)).decode() + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


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


def _say(message: str) -> None:
    # stderr: stdout carries the children's JSON log lines, which people pipe into jq.
    print(f"imgpipe dev: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
