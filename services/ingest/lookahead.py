"""How many released tasks may wait on the stream for a worker: what the workers take in a
short time, so that a newcomer waits behind a bounded amount of work, not a number of tasks
(docs/scheduling.md, "The lookahead").

The stream is first in, first out, so a request released now waits until every entry before it
is delivered, and entries leave the stream only as the workers' slots free. Thirty-two prompt
images leave it in a fifth of a second; thirty-two 24 MP photos take several seconds on two
cores. So the limit follows the slots' turnover: the tasks that left a slot (ended, or gave
their slot back) during the last `seconds`, between `least` and `most`. While no worker holds a
task, whatever is released is taken at once, and the limit is `most`.

Turnover is counted from what each pass sees, and from nothing a worker reports: the tasks
taken since the last pass (entries added to the stream, the feeders' and the reconciler's,
less the growth of what waits on it) less the growth of what the workers hold. A task taken
and ended between two passes counts, though no pass saw it held. Pure and synchronous; the
feeder keeps one instance, and a new leader starts afresh.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# At least this many tasks may wait on the stream, whatever the turnover: enough for the
# workers' next reads while the turnover is still unknown or low (long tasks).
LEAST = 4


@dataclass(frozen=True, slots=True)
class Window:
    """What one pass sees: the tasks workers hold and those on the stream (released, not final),
    and the stream's count of entries ever added."""

    held: int
    on_stream: int
    added: int


class Lookahead:
    """`seconds` of turnover, between `least` and `most` tasks (`seconds` ≤ 0: `most`)."""

    def __init__(self, most: int, seconds: float, least: int = LEAST) -> None:
        self.most = most
        self.seconds = seconds
        self.least = min(least, most)
        self._last: Window | None = None
        self._last_at = 0.0
        self._freed: deque[tuple[float, int]] = deque()  # (when, tasks that left a slot)

    def limit(self, window: Window, now: float) -> int:
        """The tasks that may wait on the stream after this pass; `now` is a monotonic clock's
        seconds. Call once per pass."""
        # A pass longer ago than `seconds` (another ingest's feeder took the passes meanwhile)
        # says what left the slots since, but not how quickly: start afresh.
        freed = 0
        if self._last is not None and now - self._last_at <= self.seconds:
            freed = _freed(self._last, window)
        self._last, self._last_at = window, now
        self._freed.append((now, freed))
        while self._freed and self._freed[0][0] <= now - self.seconds:
            self._freed.popleft()
        if self.seconds <= 0 or window.held == 0:
            return self.most
        turnover = sum(count for _, count in self._freed)
        return min(self.most, max(self.least, turnover))


def _freed(last: Window, now: Window) -> int:
    """Tasks that left a slot between two passes: those taken from the stream, less the growth
    of what the workers hold."""
    if now.added < last.added:  # Redis lost its data: the count restarted
        return 0
    taken = last.on_stream + (now.added - last.added) - now.on_stream
    return max(0, taken - (now.held - last.held))
