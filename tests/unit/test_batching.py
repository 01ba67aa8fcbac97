"""The worker's Batcher: calls gathered into one run, each caller answered with its own result."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import pytest

from services.worker.batching import Batcher, Expected, KeyedBatcher
from testing.polling import wait_until_async


class Recorder:
    """A `run` that records its batches, answers item * 10, and can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [item * 10 for item in items]


async def _waiting(batcher: Batcher[int, int], count: int) -> bool:
    return batcher.waiting == count


async def test_calls_of_one_turn_of_the_loop_share_a_run_and_get_their_own_results() -> None:
    run = Recorder()
    batcher = Batcher(run)
    results = await asyncio.gather(*(batcher(n) for n in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert run.batches == [[0, 1, 2, 3, 4]]


async def test_calls_that_arrive_while_a_batch_runs_form_the_next_batch() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = Batcher(run)
    first = asyncio.create_task(batcher(1))
    await run.started.wait()
    later = [asyncio.create_task(batcher(n)) for n in (2, 3)]
    await wait_until_async(lambda: _waiting(batcher, 2), timeout=10, message="two queued")
    assert run.batches == [[1]]  # they wait behind the running batch
    run.gate.set()
    assert await first == 10
    assert await asyncio.gather(*later) == [20, 30]
    assert run.batches == [[1], [2, 3]]


async def test_linger_waits_for_company_and_max_size_cuts_it_short() -> None:
    run = Recorder()
    batcher = Batcher(run, linger=30.0, max_size=3)  # only a full batch can start it
    results = await asyncio.wait_for(asyncio.gather(*(batcher(n) for n in range(3))), 10)
    assert results == [0, 10, 20]
    assert run.batches == [[0, 1, 2]]


async def test_a_lingering_call_runs_once_its_linger_is_over() -> None:
    run = Recorder()
    batcher = Batcher(run, linger=0.05, max_size=100)  # neither full nor told who may come
    assert list(await asyncio.wait_for(asyncio.gather(batcher(1), batcher(2)), 10)) == [10, 20]
    assert run.batches == [[1, 2]]


async def test_with_nobody_else_expected_a_lingering_batch_runs_at_once() -> None:
    run = Recorder()
    expected = Expected()
    batcher = Batcher(run, linger=30.0, expected=expected)
    ticket = expected.ticket()
    ticket.done()  # the caller's own ticket ends as it calls
    assert await asyncio.wait_for(batcher(1), 10) == 10


async def test_a_batch_lingers_for_an_expected_caller_and_runs_when_it_is_done() -> None:
    run = Recorder()
    expected = Expected()
    released: list[str] = []
    batcher = Batcher(run, linger=30.0, expected=expected)
    other = expected.ticket(on_done=lambda: released.append("slot"))
    first = asyncio.create_task(batcher(1))
    done, _ = await asyncio.wait({first}, timeout=0.2)
    assert not done and run.batches == []  # waiting for the other caller
    other.done()
    other.done()  # a second done() changes nothing
    assert await asyncio.wait_for(first, 10) == 10
    assert released == ["slot"] and expected.count == 0


async def test_a_failed_run_raises_to_every_caller_of_its_batch_only() -> None:
    run = Recorder()
    run.error = ConnectionError("postgres went away")
    batcher = Batcher(run)
    results = await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    run.error = None
    assert await batcher(3) == 30  # the batcher carries on


async def test_a_cancelled_caller_leaves_its_batch_and_the_others_are_answered() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = Batcher(run)
    busy = asyncio.create_task(batcher(0))
    await run.started.wait()
    leaving = asyncio.create_task(batcher(1))
    staying = asyncio.create_task(batcher(2))
    await wait_until_async(lambda: _waiting(batcher, 2), timeout=10, message="two queued")
    leaving.cancel()
    run.gate.set()
    assert await busy == 0
    assert await staying == 20
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert run.batches == [[0], [2]]


async def test_cancelling_the_run_cancels_its_callers_instead_of_leaving_them_waiting() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = Batcher(run)
    caller = asyncio.create_task(batcher(1))
    await run.started.wait()
    drainer = batcher._drainer
    assert drainer is not None
    drainer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drainer
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 10)


class KeyedRecorder:
    """A Recorder per key: `runs[key]`."""

    def __init__(self, *keys: str) -> None:
        self.runs = {key: Recorder() for key in keys}

    async def __call__(self, key: str, items: Sequence[int]) -> list[int]:
        return await self.runs[key](items)


async def test_a_keys_batch_that_waits_holds_up_no_other_key() -> None:
    run = KeyedRecorder("held", "free")
    run.runs["held"].gate.clear()  # a statement queued for its request's row
    batcher: KeyedBatcher[str, int, int] = KeyedBatcher(run)
    held = asyncio.create_task(batcher("held", 1))
    await run.runs["held"].started.wait()
    answers = await asyncio.wait_for(asyncio.gather(batcher("free", 2), batcher("free", 3)), 10)
    assert list(answers) == [20, 30]
    assert run.runs["free"].batches == [[2, 3]]  # one key's calls still share a batch
    assert not held.done()
    run.runs["held"].gate.set()
    assert await held == 10


async def test_an_idle_keys_batcher_is_dropped_and_no_longer_poked() -> None:
    run = KeyedRecorder("a", "b")
    expected = Expected()
    batcher: KeyedBatcher[str, int, int] = KeyedBatcher(run, linger=30.0, expected=expected)
    other = expected.ticket()
    calls = [asyncio.create_task(batcher(key, n)) for key, n in (("a", 1), ("b", 2), ("a", 3))]
    await wait_until_async(lambda: _keys(batcher, 2), timeout=10, message="two keys waiting")
    assert len(expected.batchers) == 2
    assert not any(call.done() for call in calls)  # both linger for the expected caller
    other.done()
    assert await asyncio.wait_for(asyncio.gather(*calls), 10) == [10, 20, 30]
    assert (run.runs["a"].batches, run.runs["b"].batches) == ([[1, 3]], [[2]])
    assert batcher.keys == 0 and not expected.batchers


async def test_keys_whose_waiting_calls_fill_a_batch_together_start_together() -> None:
    """As when they shared one batch: a small request's record does not linger beside a big
    one's until its own batch is full or its linger is over."""
    run = KeyedRecorder("big", "small")
    expected = Expected()
    batcher: KeyedBatcher[str, int, int] = KeyedBatcher(
        run, linger=30.0, max_size=3, expected=expected
    )
    other = expected.ticket()  # a task still at work: without the rule, everyone lingers
    small = asyncio.create_task(batcher("small", 1))
    big = [asyncio.create_task(batcher("big", n)) for n in (2, 3)]
    assert await asyncio.wait_for(asyncio.gather(small, *big), 10) == [10, 20, 30]
    assert (run.runs["small"].batches, run.runs["big"].batches) == ([[1]], [[2, 3]])
    other.done()


async def _keys(batcher: KeyedBatcher[str, int, int], count: int) -> bool:
    return batcher.keys == count


def test_a_batch_holds_at_least_one_call() -> None:
    with pytest.raises(ValueError, match="max_size"):
        Batcher(Recorder(), max_size=0)
