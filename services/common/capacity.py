"""The defaults that size the scheduler's window together (docs/scheduling.md, "Settings"):
ingest's window must cover the workers' slots, and `make run` sizes it from its workers. A
module of its own, light to import: the launcher reads it without loading a worker."""

from __future__ import annotations

# Tasks in flight per worker (IMGPIPE_WORKER_CONCURRENCY): enough to hide origin latency and
# to hold another owner's tasks while a heavy owner's wait for the compress threads
# (docs/scheduling.md, "Slots for a newcomer"). The budgets, not this number, bound memory.
WORKER_CONCURRENCY = 64
# Room in the window beyond the workers' slots: the lookahead, and the Done records lingering
# for company (IMGPIPE_WORKER_RECORD_LINGER_MS).
WINDOW_HEADROOM = 64


def window_for(workers: int, concurrency: int = WORKER_CONCURRENCY) -> int:
    """The scheduler window (IMGPIPE_SCHEDULER_WINDOW) that keeps `workers` busy."""
    return workers * concurrency + WINDOW_HEADROOM
