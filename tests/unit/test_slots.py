"""The worker's slots (services/worker/runner.py): `concurrency` tasks at their image work, and
as many again waiting for their records at most."""

from __future__ import annotations

import asyncio

from services.worker.runner import Slots


def test_a_task_waiting_for_its_record_frees_its_slot_within_a_second_bound() -> None:
    slots = Slots(4)
    for n in range(4):
        slots.take(f"t{n}")
    assert slots.free == 0
    slots.work_over("t0")
    slots.work_over("t0")  # once is enough
    assert slots.free == 1
    for n in range(1, 4):
        slots.work_over(f"t{n}")
    for n in range(4, 8):
        slots.take(f"t{n}")
    # Four at work and four waiting for their records: the second bound is reached too.
    for n in range(4, 8):
        slots.work_over(f"t{n}")
    assert slots.free == 0
    slots.finished("t0")
    assert slots.free == 1


async def test_waiting_for_free_slots_wakes_when_enough_work_is_over() -> None:
    slots = Slots(4)
    for n in range(4):
        slots.take(f"t{n}")
    waiter = asyncio.create_task(slots.wait_free(slots.refill))
    done, _ = await asyncio.wait({waiter}, timeout=0.05)
    assert not done
    slots.finished("t0")
    await asyncio.wait_for(waiter, 10)
