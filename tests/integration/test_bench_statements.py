"""`python -m bench.statements` against the test Postgres, at a small size: it calls the query
functions directly, so a change of their signatures must show here, not on the day someone
measures again. Nothing here asserts a time."""

from __future__ import annotations

import pytest

from bench.statements import measure

pytestmark = pytest.mark.integration


async def test_every_statement_that_grows_with_a_request_is_timed(
    postgres_server_url: str,
) -> None:
    timings = await measure(postgres_server_url, rows=30)
    assert {
        "retry_failed_images (every image)",
        "cancel_request (every image)",
        "cancel_request's longest statement (a writer of its rows waits this long)",
        "delete_rows (the whole request)",
        "claim_releases (64)",
        "record_releases (64)",
        "an upload's inserts, all batches (an idempotent twin waits this long)",
    } <= timings.keys()
