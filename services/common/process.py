"""How a service process ends: its code, with logs flushed, and without interpreter teardown.

obstore runs on a Rust (tokio) runtime whose worker threads outlive `asyncio.run`. When one
of them wakes while the interpreter is being torn down, it panics and the process aborts
(SIGABRT, exit 134) although every piece of work had finished: about 1 exit in 30 here for a
script that touched the object store. By the time a service's main coroutine returns,
everything it owns is closed, so it flushes its output and leaves with `os._exit`, which skips
that teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Coroutine
from typing import Any, NoReturn


def exit_now(code: int) -> NoReturn:
    """Flush the logs and the standard streams, then end the process with `code`."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone: nothing to save
            stream.flush()
    os._exit(code)


def run_main(main: Coroutine[Any, Any, None]) -> NoReturn:
    """`asyncio.run(main)`, then `exit_now`: 0 when it returned, 1 (with the traceback) when it
    raised, the code of a SystemExit, 130 for Ctrl-C."""
    try:
        asyncio.run(main)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_now(code)
