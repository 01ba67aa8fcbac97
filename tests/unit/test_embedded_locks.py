"""Pid and lock files left by a crash (services.local.embedded): which are stale, which not.

A real "server" here is a sleep whose program is named postgres (a symlink) and whose working
directory is the data folder, as a real postmaster's is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.local import embedded
from services.local.embedded import DataDirInUse

pytestmark = pytest.mark.unit


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "pg"
    folder.mkdir()
    return folder.resolve()


@pytest.fixture
def postgres_program(tmp_path: Path) -> Path:
    program = tmp_path / "bin" / "postgres"
    program.parent.mkdir()
    sleep = shutil.which("sleep")
    assert sleep is not None
    program.symlink_to(sleep)
    return program


@pytest.fixture
def fake_postgres(postgres_program: Path, data_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([str(postgres_program), "60"], cwd=data_dir)
    yield process
    process.kill()
    process.wait()


def lock_naming(data_dir: Path, pid: object) -> Path:
    lock = data_dir / "postmaster.pid"
    lock.write_text(f"{pid}\n{data_dir}\n1700000000\n5432\n{data_dir}\n\n  1 1\nready   \n")
    return lock


def clear(data_dir: Path, lock: Path) -> None:
    embedded._clear_stale_locks("Postgres", "postgres", data_dir, [lock])


def test_the_lock_of_a_dead_process_is_removed(data_dir: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = lock_naming(data_dir, gone.pid)

    clear(data_dir, lock)

    assert not lock.exists()


def test_a_reused_pid_is_not_the_server(data_dir: Path) -> None:
    # After a power loss the old postmaster's pid may belong to anything: here, this test.
    lock = lock_naming(data_dir, os.getpid())

    clear(data_dir, lock)

    assert not lock.exists()


def test_a_postgres_of_another_folder_is_not_the_server(
    data_dir: Path, fake_postgres: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    lock = lock_naming(other, fake_postgres.pid)

    embedded._clear_stale_locks("Postgres", "postgres", other.resolve(), [lock])

    assert not lock.exists()


@pytest.mark.parametrize("content", ["", "not a pid\n", "\n"])
def test_an_empty_or_garbled_lock_is_removed(data_dir: Path, content: str) -> None:
    lock = data_dir / "postmaster.pid"
    lock.write_text(content)

    clear(data_dir, lock)

    assert not lock.exists()


def test_a_live_server_on_the_folder_is_reported_with_its_pid(
    data_dir: Path, fake_postgres: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "_DYING_GRACE", 0.3)
    lock = lock_naming(data_dir, fake_postgres.pid)

    with pytest.raises(DataDirInUse) as caught:
        clear(data_dir, lock)

    assert caught.value.pid == fake_postgres.pid
    assert str(caught.value) == f"Postgres (pid {fake_postgres.pid}) is still running on {data_dir}"
    assert lock.exists()


def test_a_server_on_its_way_out_is_waited_for(data_dir: Path, postgres_program: Path) -> None:
    # As after a launcher was killed: its postgres got SIGQUIT and is ending.
    ending = subprocess.Popen([str(postgres_program), "0.5"], cwd=data_dir)
    lock = lock_naming(data_dir, ending.pid)

    clear(data_dir, lock)  # returns once it has exited (well within the 5 s it may take)

    assert not lock.exists()
    ending.wait()
