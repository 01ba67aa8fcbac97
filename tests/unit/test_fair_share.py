"""FairShare: weighted turns between owners, equal turns between one owner's requests."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from services.ingest.fair_share import FairShare, Waiting

pytestmark = pytest.mark.unit

BIG, SMALL, OTHER = uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3)


def even(_: str) -> int:
    return 1


def test_a_small_request_is_not_queued_behind_a_big_one_of_the_same_owner() -> None:
    share = FairShare(even)
    assert share.plan([Waiting(BIG, "", 10_000)], 100) == {BIG: 100}

    # The small one arrives: from the next free places on, the two take turns.
    plan = share.plan([Waiting(BIG, "", 9_900), Waiting(SMALL, "", 10)], 8)

    assert plan == {BIG: 4, SMALL: 4}


def test_a_request_gets_no_more_than_it_has_waiting() -> None:
    share = FairShare(even)
    plan = share.plan([Waiting(BIG, "", 10_000), Waiting(SMALL, "", 3)], 20)
    assert plan == {BIG: 17, SMALL: 3}


def test_owners_share_by_weight_over_many_small_passes() -> None:
    weights = {"acme": 3, "globex": 1}
    share = FairShare(weights.__getitem__)
    total: Counter[uuid.UUID] = Counter()
    for _ in range(200):  # one free place at a time, as workers finish images
        total += share.plan([Waiting(BIG, "acme", 1000), Waiting(OTHER, "globex", 1000)], 2)
    assert total == {BIG: 300, OTHER: 100}


def test_a_newcomer_gets_its_share_from_now_on_not_credit_for_the_past() -> None:
    share = FairShare(even)
    for _ in range(50):
        share.plan([Waiting(BIG, "acme", 1000)], 10)  # acme alone for 500 releases
    plan = share.plan([Waiting(BIG, "acme", 500), Waiting(OTHER, "globex", 1000)], 10)
    assert plan == {BIG: 5, OTHER: 5}


def test_owners_and_requests_no_longer_waiting_are_forgotten() -> None:
    share = FairShare(even)
    share.plan([Waiting(BIG, "acme", 5), Waiting(OTHER, "globex", 5)], 4)
    share.plan([Waiting(OTHER, "globex", 3)], 1)
    assert share.remembered() == (1, 1)


def test_nothing_waiting_or_no_room_releases_nothing() -> None:
    share = FairShare(even)
    assert share.plan([], 10) == {}
    assert share.plan([Waiting(BIG, "", 10)], 0) == {}
