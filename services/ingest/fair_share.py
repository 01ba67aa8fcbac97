"""Who gets the next tasks released to the stream: fair shares of the workers' time, weighted
between owners, equal between one owner's requests (docs/scheduling.md).

Stride scheduling on two levels, charged by the worker time used. Each owner has a virtual
time that advances, at every pass, by the seconds its tasks held a worker's slot since the last
pass (tasks delivered and not yet final, times the time between the passes), divided by its
weight; the owner with the smallest virtual time gets the next release. Within an owner, each
request has a virtual time charged the same way, unweighted. A release is charged
RELEASE_CHARGE at once; the slot time its task then uses is charged as it is used.

Charging slot time rather than releases is what keeps an owner whose images take long (a slow
origin, big photos) from taking the workers: each of its tasks holds a slot a hundred times
longer than a prompt image's, so taking turns in releases gave it nearly every slot, and
another owner's 200 prompt images took 43 s instead of 0.8 s behind 600 that took 5 s each.
With equal costs, as many releases go to each owner as before.

Someone who starts waiting (a new request, an owner back after a pause) starts at the smallest
virtual time of those already active: a share from now on, no credit saved up from idle time.
Whoever has nothing waiting and nothing in a worker's hands is forgotten, so the state is
bounded by what is open. Pure and synchronous; the feeder keeps one instance, so the times carry
over from one pass to the next (a new leader starts them afresh).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K")

# Slot-seconds charged for a release when it is made: about a prompt 1200 px photo's time in a
# worker, which may begin and end between two passes and so never be seen held. It also shares
# one pass's room between owners; a longer task's slot time is charged as it is used.
RELEASE_CHARGE = 0.05
# The longest gap between passes charged at once: the feeder passes at least once a second,
# and a longer gap (a new leader, a stalled Postgres) is not evidence of slot time used.
MAX_STEP_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Waiting:
    """An open request: images not yet released (`waiting`, counted up to what may fit) and
    tasks in workers' hands (`held`: delivered to a worker, not yet final)."""

    request_id: uuid.UUID
    owner: str
    waiting: int
    held: int = 0


class FairShare:
    def __init__(self, weight: Callable[[str], int]) -> None:
        self.weight = weight
        self._owner_time: dict[str, float] = {}
        self._request_time: dict[uuid.UUID, float] = {}
        self._last_pass: float | None = None

    def plan(self, requests: Sequence[Waiting], room: int, now: float) -> Counter[uuid.UUID]:
        """How many tasks of each request to release now, `room` at most in all (0: only keep
        the accounts). `requests` are the open requests with images waiting or held, in the
        order ties are broken (oldest first); those not among them are forgotten. `now` is a
        monotonic clock's seconds: the slot time used since the last pass is charged first."""
        step = 0.0 if self._last_pass is None else min(MAX_STEP_SECONDS, now - self._last_pass)
        self._last_pass = now
        active = [r for r in requests if r.waiting > 0 or r.held > 0]
        owners_active = {r.owner for r in active}
        requests_active = {r.request_id for r in active}
        self._owner_time = {o: t for o, t in self._owner_time.items() if o in owners_active}
        self._request_time = {r: t for r, t in self._request_time.items() if r in requests_active}
        self._join(active)
        for r in active:
            self._owner_time[r.owner] += r.held * step / self._weight(r.owner)
            self._request_time[r.request_id] += r.held * step

        left = {r.request_id: r.waiting for r in requests if r.waiting > 0}
        owners: dict[str, list[uuid.UUID]] = {}
        for r in requests:
            if r.request_id in left:
                owners.setdefault(r.owner, []).append(r.request_id)
        planned: Counter[uuid.UUID] = Counter()
        for _ in range(room):
            if not owners:
                break
            owner = min(owners, key=self._owner_time.__getitem__)
            request_ids = owners[owner]
            request_id = min(request_ids, key=self._request_time.__getitem__)
            planned[request_id] += 1
            self._owner_time[owner] += RELEASE_CHARGE / self._weight(owner)
            self._request_time[request_id] += RELEASE_CHARGE
            left[request_id] -= 1
            if not left[request_id]:
                request_ids.remove(request_id)
                if not request_ids:
                    del owners[owner]
        return planned

    def remembered(self) -> tuple[int, int]:
        """(owners, requests) whose virtual times are kept: only those still active."""
        return len(self._owner_time), len(self._request_time)

    def _weight(self, owner: str) -> int:
        return max(1, self.weight(owner))

    def _join(self, requests: Sequence[Waiting]) -> None:
        """Newcomers start at the smallest time of those already known."""
        by_owner: dict[str, list[uuid.UUID]] = {}
        for r in requests:
            by_owner.setdefault(r.owner, []).append(r.request_id)
        self._owner_time |= _joined(self._owner_time, by_owner)
        for request_ids in by_owner.values():
            self._request_time |= _joined(self._request_time, request_ids)


def _joined(times: dict[K, float], members: Iterable[K]) -> dict[K, float]:
    """`times` of `members`, where a member without one starts at the smallest time of the
    members that have one (0 when none has)."""
    known = [times[m] for m in members if m in times]
    start = min(known, default=0.0)
    return {m: times.get(m, start) for m in members}
