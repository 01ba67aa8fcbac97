"""Contracts across versions: messages earlier versions wrote to Redis are read by this one,
and `make proto-check` (scripts/proto_breaking.py) fails on a breaking proto change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.message import Message

from services.common.pb.imgpipe.v1 import request_pb2 as request_pb
from services.common.pb.imgpipe.v1 import task_pb2 as task_pb
from tests.wire.messages import FIXTURES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
WIRE = ROOT / "tests" / "wire"
SCRIPT = ROOT / "scripts" / "proto_breaking.py"
READERS: dict[str, type[Message]] = {
    "image_task": task_pb.ImageTask,
    "request_event": request_pb.RequestEvent,
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_messages_written_by_earlier_versions_are_read(name: str) -> None:
    written = (WIRE / name).read_bytes()
    message = READERS[name.split("-")[0]]()
    message.ParseFromString(written)
    assert message == FIXTURES[name]()
    # Nothing is lost on the way through this version (unknown fields are kept too), so a
    # task this version re-queues (XAUTOCLAIM, dead letter) still reads the same in the old.
    assert message.SerializeToString(deterministic=True) == written


def test_every_stored_message_kind_has_a_fixture() -> None:
    kinds = {name.split("-")[0] for name in FIXTURES}
    assert kinds == set(READERS)
    assert {path.name for path in WIRE.glob("*.bin")} == set(FIXTURES)


def run_check(repo: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROTO_")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(repo)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **env},
    )


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid",
         "-c", "commit.gpgsign=false", *args],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return done.stdout.strip()


def edit(repo: Path, old: str, new: str) -> None:
    task = repo / "proto" / "imgpipe" / "v1" / "task.proto"
    text = task.read_text()
    assert old in text
    task.write_text(text.replace(old, new))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository on `main` with today's proto/ committed."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", repo / "proto")
    git(repo.parent, "init", "-q", "-b", "main", str(repo))
    git(repo, "add", "proto")
    git(repo, "commit", "-qm", "proto")
    return repo


def test_a_breaking_change_fails_and_an_added_field_passes(repo: Path) -> None:
    edit(repo, "  string traceparent = 6;\n}", "  string traceparent = 6;\n  string note = 7;\n}")
    git(repo, "commit", "-qam", "a field added")
    first = git(repo, "rev-parse", "HEAD~1")
    added = run_check(repo)
    # On main, against the commit before.
    assert added.returncode == 0, added.stderr
    assert f"against {first[:12]}: compatible" in added.stdout

    # A field whose type changes: a task in Redis written as int64 would not read as string.
    edit(repo, "int64 image_id = 2;", "string image_id = 2;")
    broken = run_check(repo)
    assert broken.returncode == 1
    assert "image_id" in broken.stderr and "breaks compatibility" in broken.stderr


def test_a_branch_is_checked_against_where_it_left_main(repo: Path) -> None:
    fork = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-qb", "feature")
    edit(repo, "  string input_url = 3;\n", "")  # a field removed, not reserved
    git(repo, "commit", "-qam", "drop input_url")
    edit(repo, "  string traceparent = 6;\n}", "  string traceparent = 6;\n  string note = 7;\n}")
    git(repo, "commit", "-qam", "a field added")  # HEAD~1 alone would hide the removal

    done = run_check(repo)
    assert done.returncode == 1
    assert fork[:12] in done.stderr and "input_url" in done.stderr


def test_without_history_it_says_so_and_fails_only_when_required(
    repo: Path, tmp_path: Path
) -> None:
    shallow = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow))
    done = run_check(shallow)
    assert done.returncode == 0
    assert "buf breaking NOT RUN" in done.stderr and "shallow" in done.stderr
    assert run_check(shallow, PROTO_BREAKING_REQUIRED="1").returncode == 1

    plain = tmp_path / "no-git"
    shutil.copytree(ROOT / "proto", plain / "proto")
    done = run_check(plain)
    assert done.returncode == 0 and "buf breaking NOT RUN" in done.stderr

    # A revision asked for by name must exist.
    assert run_check(repo, PROTO_AGAINST="v9.9.9").returncode == 1
    assert run_check(repo, PROTO_AGAINST="HEAD").returncode == 0
