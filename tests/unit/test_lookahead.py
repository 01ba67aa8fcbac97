"""The lookahead measured in the workers' turnover (services/ingest/lookahead.py)."""

from __future__ import annotations

from services.ingest.lookahead import LEAST, Lookahead, Window


def test_idle_workers_take_whatever_is_released() -> None:
    lookahead = Lookahead(most=32, seconds=0.5)

    assert lookahead.limit(Window(held=0, on_stream=0, added=0), now=0.0) == 32


def test_an_unknown_turnover_allows_the_least() -> None:
    lookahead = Lookahead(most=32, seconds=0.5)

    assert lookahead.limit(Window(held=10, on_stream=0, added=10), now=0.0) == LEAST


def test_tasks_taken_and_ended_between_passes_count_as_turnover() -> None:
    lookahead = Lookahead(most=32, seconds=0.5)
    lookahead.limit(Window(held=10, on_stream=4, added=100), now=0.0)

    # 20 released; the stream still holds 4 and the workers 10: 20 tasks left a slot, though
    # no pass saw them held.
    assert lookahead.limit(Window(held=10, on_stream=4, added=120), now=0.1) == 20


def test_filling_free_slots_is_not_turnover() -> None:
    lookahead = Lookahead(most=32, seconds=0.5)
    lookahead.limit(Window(held=10, on_stream=20, added=100), now=0.0)

    # The 20 waiting were taken into 20 free slots: nothing left a slot.
    assert lookahead.limit(Window(held=30, on_stream=0, added=100), now=0.1) == LEAST
    # Then 3 ended and their slots took 3 of 5 new entries.
    assert lookahead.limit(Window(held=30, on_stream=2, added=105), now=0.2) == LEAST
    assert lookahead.limit(Window(held=25, on_stream=2, added=105), now=0.3) == 3 + 5


def test_turnover_older_than_the_seconds_is_forgotten() -> None:
    lookahead = Lookahead(most=32, seconds=0.5)
    lookahead.limit(Window(held=10, on_stream=0, added=0), now=0.0)
    assert lookahead.limit(Window(held=10, on_stream=0, added=9), now=0.1) == 9
    assert lookahead.limit(Window(held=10, on_stream=0, added=15), now=0.4) == 9 + 6

    assert lookahead.limit(Window(held=10, on_stream=0, added=15), now=0.65) == 6
    assert lookahead.limit(Window(held=10, on_stream=0, added=15), now=0.9) == LEAST


def test_the_limit_is_at_most_the_count() -> None:
    lookahead = Lookahead(most=32, seconds=0.5)
    lookahead.limit(Window(held=10, on_stream=0, added=0), now=0.0)

    assert lookahead.limit(Window(held=10, on_stream=0, added=500), now=0.1) == 32


def test_a_lost_count_starts_afresh() -> None:
    """Redis lost its data (the count of added entries went back): no turnover is made up."""
    lookahead = Lookahead(most=32, seconds=0.5)
    lookahead.limit(Window(held=10, on_stream=0, added=1000), now=0.0)

    assert lookahead.limit(Window(held=10, on_stream=0, added=3), now=0.1) == LEAST
    assert lookahead.limit(Window(held=10, on_stream=0, added=10), now=0.2) == 7


def test_a_pass_long_ago_says_nothing_of_the_rate() -> None:
    """Another ingest's feeder took the passes for a while: what left the slots since this
    one's last pass is not half a second's turnover."""
    lookahead = Lookahead(most=32, seconds=0.5)
    lookahead.limit(Window(held=10, on_stream=0, added=0), now=0.0)

    assert lookahead.limit(Window(held=10, on_stream=0, added=30), now=5.0) == LEAST
    assert lookahead.limit(Window(held=10, on_stream=0, added=36), now=5.1) == 6
