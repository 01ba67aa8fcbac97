"""Issue 14, finding 7e: the dev webhook-secret file of `make run` is never readable by others,
not even between the steps that create it (it was written with the default umask, then
chmod'ed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from services.local import launcher as dev
from testing.stack import ROOT

WATCH_SECRET = """
import os, stat, sys
from pathlib import Path
from services.local.launcher import _dev_webhook_secret

folder = Path(sys.argv[1])
modes = set()
watching = []

def watch(event, args):
    # Every audited step (open, rename, chmod...) looks at the files in the folder: the
    # secret must never be readable by others, not even between two steps.
    if watching:
        return  # listing the folder is audited too
    watching.append(event)
    try:
        for name in os.listdir(folder):
            modes.add(stat.S_IMODE(os.stat(folder / name).st_mode))
    finally:
        watching.clear()

os.umask(0)  # the worst case: files are created with exactly the mode asked for
sys.addaudithook(watch)
secret = _dev_webhook_secret(folder)
final = stat.S_IMODE((folder / "webhook-secret").stat().st_mode)
print(secret.startswith("whsec_"), oct(final), sorted(oct(m) for m in modes))
"""


def test_the_dev_webhook_secret_is_never_readable_by_others(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WATCH_SECRET), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert result.stdout.split(maxsplit=2) == ["True", "0o600", "['0o600']\n"]
    # The second call reads the same secret back.
    assert dev._dev_webhook_secret(tmp_path) == (tmp_path / "webhook-secret").read_text().strip()
