"""CodecTurns: the compress threads taken in turns by request, by the thread time each has
used (services/worker/turns.py). A fake clock that the calls themselves advance stands for
their cost, on a real one-thread executor."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.worker.turns import CodecTurns
from testing.polling import wait_until_async

pytestmark = pytest.mark.unit


class Costs:
    """A clock that each call moves on by its cost, and the order the calls ran in."""

    def __init__(self) -> None:
        self.now = 0.0
        self.ran: list[str] = []
        self.gate = threading.Event()

    def clock(self) -> float:
        return self.now

    def work(self, name: str, cost: float) -> str:
        self.ran.append(name)
        self.now += cost
        return name

    def blocked(self, name: str, cost: float) -> str:
        return self.held(self.gate, name, cost)

    def held(self, gate: threading.Event, name: str, cost: float) -> str:
        gate.wait(10)  # released by the test once the others are queued
        return self.work(name, cost)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.fixture
async def costs() -> AsyncIterator[Costs]:
    costs = Costs()
    yield costs
    costs.gate.set()


async def queued(turns: CodecTurns, count: int) -> None:
    async def enough() -> bool:
        return turns.waiting == count

    await wait_until_async(enough, timeout=5, message=f"{count} calls waiting")


async def test_a_light_request_goes_before_a_heavy_ones_queued_calls(
    executor: ThreadPoolExecutor, costs: Costs
) -> None:
    turns = CodecTurns(executor, 1, clock=costs.clock)
    first = asyncio.create_task(turns.run("heavy", costs.blocked, "h", 10.0))
    heavy = [asyncio.create_task(turns.run("heavy", costs.work, f"h{i}", 10.0)) for i in range(3)]
    light = [asyncio.create_task(turns.run("light", costs.work, f"l{i}", 0.01)) for i in range(3)]
    await queued(turns, 6)

    costs.gate.set()
    await asyncio.gather(first, *heavy, *light)

    # First come, first served would have run h0-h2 before any light call.
    assert costs.ran == ["h", "l0", "l1", "l2", "h0", "h1", "h2"]
    assert (turns.running, turns.waiting, turns.keys) == (0, 0, 0)  # nothing kept


async def test_a_request_that_arrives_starts_level_without_credit(
    executor: ThreadPoolExecutor, costs: Costs
) -> None:
    turns = CodecTurns(executor, 1, clock=costs.clock)
    second_gate = threading.Event()
    first = asyncio.create_task(turns.run("early", costs.blocked, "e0", 30.0))
    second = asyncio.create_task(turns.run("early", costs.held, second_gate, "e1", 10.0))
    await queued(turns, 1)
    costs.gate.set()  # e0 ends: "early" has used 30 s, and e1 now holds the thread

    async def second_running() -> bool:
        return turns.waiting == 0 and costs.ran == ["e0"]

    await wait_until_async(second_running, timeout=5, message="e1 on the thread")
    early = [asyncio.create_task(turns.run("early", costs.work, f"e{i}", 10.0)) for i in (2, 3)]
    await queued(turns, 2)
    late = [asyncio.create_task(turns.run("late", costs.work, f"n{i}", 10.0)) for i in range(3)]
    await queued(turns, 5)

    second_gate.set()
    await asyncio.gather(first, second, *early, *late)

    # "late" joined level with "early" (30 s), not at 0: the turns alternate (the older queue
    # first on a tie); with a credit of 30 s it would have run n0-n2 first.
    assert costs.ran == ["e0", "e1", "n0", "e2", "n1", "e3", "n2"]


async def test_a_cancelled_call_gives_up_its_place(
    executor: ThreadPoolExecutor, costs: Costs
) -> None:
    turns = CodecTurns(executor, 1, clock=costs.clock)
    first = asyncio.create_task(turns.run("a", costs.blocked, "a", 1.0))
    doomed = asyncio.create_task(turns.run("b", costs.work, "b", 1.0))
    kept = asyncio.create_task(turns.run("c", costs.work, "c", 1.0))
    await queued(turns, 2)

    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    costs.gate.set()
    await asyncio.gather(first, kept)

    assert costs.ran == ["a", "c"]
    assert (turns.running, turns.waiting, turns.keys) == (0, 0, 0)
