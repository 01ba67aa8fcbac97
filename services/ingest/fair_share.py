"""Who gets the next free places of the task window: weighted round robin between owners, then
round robin between one owner's requests (docs/scheduling.md).

Stride scheduling on two levels. Each owner has a virtual time that advances by 1/weight per
task released to it, and the owner with the smallest virtual time goes next, so over any stretch
where two owners both wait, their releases follow their weights. Within an owner, each request
advances by 1 per task and the one furthest behind goes next. Someone who starts waiting (a new
request, an owner back after a pause) starts at the smallest virtual time of those already
waiting: it gets its share from now on, not credit for the time it was away.

Pure and synchronous; the feeder keeps one instance, so the order carries over from one pass to
the next. Memory is bounded by what is waiting: whoever stops waiting is forgotten.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Waiting:
    """An open request with tasks not yet released (`waiting`, counted up to what may fit)."""

    request_id: uuid.UUID
    owner: str
    waiting: int


class FairShare:
    def __init__(self, weight: Callable[[str], int]) -> None:
        self.weight = weight
        self._owner_time: dict[str, float] = {}
        self._request_time: dict[uuid.UUID, float] = {}

    def plan(self, waiting: Sequence[Waiting], room: int) -> Counter[uuid.UUID]:
        """How many tasks of each request to release now, `room` at most in all. `waiting` is in
        the order ties are broken (oldest request first)."""
        left = {w.request_id: w.waiting for w in waiting if w.waiting > 0}
        owners: dict[str, list[uuid.UUID]] = {}
        for w in waiting:
            if w.request_id in left:
                owners.setdefault(w.owner, []).append(w.request_id)
        self._forget_all_but(owners)
        self._owner_time = _joined(self._owner_time, owners)
        for requests in owners.values():
            self._request_time |= _joined(self._request_time, requests)
        planned: Counter[uuid.UUID] = Counter()
        for _ in range(room):
            if not owners:
                break
            owner = min(owners, key=self._owner_time.__getitem__)
            requests = owners[owner]
            request_id = min(requests, key=self._request_time.__getitem__)
            planned[request_id] += 1
            self._owner_time[owner] += 1.0 / max(1, self.weight(owner))
            self._request_time[request_id] += 1.0
            left[request_id] -= 1
            if not left[request_id]:
                requests.remove(request_id)
                if not requests:
                    del owners[owner]
        return planned

    def remembered(self) -> tuple[int, int]:
        """(owners, requests) whose place in the turns is kept: only those still waiting."""
        return len(self._owner_time), len(self._request_time)

    def _forget_all_but(self, owners: dict[str, list[uuid.UUID]]) -> None:
        current = {r for requests in owners.values() for r in requests}
        self._owner_time = {o: t for o, t in self._owner_time.items() if o in owners}
        self._request_time = {r: t for r, t in self._request_time.items() if r in current}


def _joined(times: dict[K, float], members: Iterable[K]) -> dict[K, float]:
    """`times` of `members`, where a member without one starts at the smallest time of the
    members that have one (0 when none has)."""
    known = [times[m] for m in members if m in times]
    start = min(known, default=0.0)
    return {m: times.get(m, start) for m in members}
