"""`buf breaking` for `make proto-check`: proto/ as it is now against proto/ as it was.

ImageTask and RequestEvent sit in Redis across versions during a rolling update, and the
services call each other across versions, so a change buf's FILE rules call breaking fails CI.

The reference, in order:
- PROTO_AGAINST=<git revision>, when set (a release tag, say);
- on main (HEAD is main's tip): the commit before, HEAD~1 (a merge's first parent);
- on another branch: where it forked from main (`git merge-base HEAD main`), so all of the
  branch's changes are checked;
- else the last tag reachable from HEAD.
Without git, in a shallow clone that lacks the reference, or when the reference has no
proto/ yet, the check cannot run: it says so on stderr, loudly, and passes; with
PROTO_BREAKING_REQUIRED=1, or a PROTO_AGAINST that cannot be had, it fails instead.

Usage: scripts/proto_breaking.py [REPO] (default: this checkout).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"


class NoReference(Exception):
    """The revision to compare with cannot be had here."""


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise NoReference(f"git {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done.stdout.strip()


def reference(repo: Path, environ: Mapping[str, str] = os.environ) -> str:
    """The commit to compare with (see the module docstring), or NoReference saying why."""
    explicit = environ.get("PROTO_AGAINST", "").strip()
    if explicit:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{explicit}^{{commit}}")
    git(repo, "rev-parse", "--git-dir")
    head = git(repo, "rev-parse", "HEAD")
    try:
        main = git(repo, "rev-parse", "--verify", "--quiet", "main^{commit}")
    except NoReference:
        main = ""
    try:
        if main == head:
            return git(repo, "rev-parse", "--verify", "--quiet", "HEAD~1^{commit}")
        if main:
            return git(repo, "merge-base", "HEAD", main)
        return git(repo, "rev-parse", git(repo, "describe", "--tags", "--abbrev=0"))
    except NoReference as exc:
        shallow = git(repo, "rev-parse", "--is-shallow-repository") == "true"
        hint = " (a shallow clone: git fetch --unshallow)" if shallow else ""
        raise NoReference(f"no earlier version of main or tag to compare with{hint}") from exc


def export_proto(repo: Path, commit: str, into: Path) -> Path:
    """proto/ as it was at `commit`, written under `into`; NoReference if it had none."""
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", commit, "proto"],
        capture_output=True,
        timeout=60,
    )
    if archive.returncode != 0:
        raise NoReference(f"{commit[:12]} has no proto/ to compare with")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / "proto"


def breaking(current: Path, previous: Path) -> subprocess.CompletedProcess[str]:
    """`buf breaking` of the module in `current` against the one in `previous`."""
    return subprocess.run(
        [str(BUF), "breaking", str(current), "--against", str(previous)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def main(repo: Path = ROOT) -> int:
    """0 when compatible (or, loudly, when there is nothing to compare with), else 1."""
    # A revision asked for by name that cannot be had is a mistake, not a missing history.
    required = os.environ.get("PROTO_BREAKING_REQUIRED") == "1" or "PROTO_AGAINST" in os.environ
    with tempfile.TemporaryDirectory(prefix="proto-against-") as tmp:
        try:
            commit = reference(repo)
            previous = export_proto(repo, commit, Path(tmp))
        except NoReference as exc:
            print(
                f"proto-check: buf breaking NOT RUN: {exc}. Set PROTO_AGAINST=<revision> to"
                " choose what to compare with.",
                file=sys.stderr,
            )
            return 1 if required else 0
        done = breaking(repo / "proto", previous)
    if done.returncode != 0:
        print(done.stdout + done.stderr, end="", file=sys.stderr)
        print(
            f"proto-check: proto/ breaks compatibility with {commit[:12]}: ImageTask and"
            " RequestEvent written by the running version must stay readable (docs/grpc.md)",
            file=sys.stderr,
        )
        return 1
    print(f"proto-check: buf breaking against {commit[:12]}: compatible")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
