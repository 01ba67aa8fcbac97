"""Named crash points for fault tests.

`IMGPIPE_FAILPOINTS=ingest.after_commit` makes a process SIGKILL itself when it reaches that
point: the honest way to test "killed at the worst moment". Nothing is armed unless the
variable is set, and a crash point costs one set lookup.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable

log = logging.getLogger(__name__)

_armed: frozenset[str] = frozenset()


def arm(names: Iterable[str]) -> None:
    global _armed
    _armed = frozenset(names)
    if _armed:
        log.warning(
            "failpoints armed: this process will kill itself", extra={"failpoints": sorted(_armed)}
        )


def crash_here(name: str) -> None:
    if name in _armed:
        log.warning("failpoint reached: SIGKILL", extra={"failpoint": name})
        os.kill(os.getpid(), signal.SIGKILL)
