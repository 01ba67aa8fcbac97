"""How a service process ends (services.common.process): its code, its last words flushed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from testing.stack import ROOT

pytestmark = pytest.mark.unit

SCRIPT = """
import asyncio, logging, sys
from services.common.process import run_main

logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")

async def main() -> None:
    logging.getLogger("test").info("last words")
    print("buffered, not yet flushed", end="")
    {ending}

run_main(main())
"""


@pytest.mark.parametrize(
    ("ending", "code"),
    [
        ("return None", 0),
        ("raise SystemExit(3)", 3),
        ("raise ValueError('broken')", 1),
        ("raise KeyboardInterrupt", 130),
    ],
)
def test_run_main_ends_with_the_outcome_and_flushes_the_output(ending: str, code: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT.format(ending=ending))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == code, done.stderr
    assert done.stdout == "last words\nbuffered, not yet flushed"
    if code == 1:
        assert "ValueError: broken" in done.stderr  # the traceback, not a silent 1
