"""How a service process ends: its code, with logs flushed, and without interpreter teardown;
and how a child process ends with the process that started it (`die_with_parent`).

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
import ctypes
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

_PR_SET_PDEATHSIG = 1
# Looked up once, here: a preexec_fn runs between fork and exec, where loading a library is
# not something to do. None where there is no prctl (macOS): children are then not tied.
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (AttributeError, OSError):
    _prctl = None


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


def die_with_parent(signum: signal.Signals) -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen: the child gets `signum` when this process dies,
    however it dies (SIGKILL, the OOM killer, a closed terminal). None where it cannot work.

    Linux delivers the signal when the *thread* that forked the child ends, so only children
    started from the main thread are tied (a worker thread would take them down when it ends).
    The setting does not survive a fork (a postmaster's backends die with the postmaster
    instead) nor a set-user-ID exec; Popen's `user=` is applied before the preexec_fn, so it
    survives that.
    """
    if _prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()
    prctl = _prctl

    def tie() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between fork and prctl: then nobody would send the signal.
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return tie
