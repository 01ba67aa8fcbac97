"""W3C traceparent parsing and formatting, the current trace, and the JSON log fields."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest

from services.common import tracing
from services.common.json_logs import JsonFormatter
from services.common.tracing import TraceContext, continue_trace, parse_traceparent

pytestmark = pytest.mark.unit

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{SPAN_ID}-01"


def test_a_valid_traceparent_is_read_and_written_back_the_same() -> None:
    parsed = parse_traceparent(VALID)
    assert parsed == TraceContext(TRACE_ID, SPAN_ID, 1)
    assert parsed.traceparent == VALID
    assert parse_traceparent(f"  {VALID}\t") == parsed  # surrounding whitespace is ignored
    assert parse_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-00") == TraceContext(TRACE_ID, SPAN_ID, 0)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "not a traceparent",
        f"ff-{TRACE_ID}-{SPAN_ID}-01",  # version ff is invalid
        f"00-{TRACE_ID.upper()}-{SPAN_ID}-01",  # lower-case hex only
        f"00-{'0' * 32}-{SPAN_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID}-{SPAN_ID}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE_ID}-{SPAN_ID}-1",
        f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01",
        f"00_{TRACE_ID}_{SPAN_ID}_01",
        f"0g-{TRACE_ID}-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{SPAN_ID}-zz",
        f"01-{TRACE_ID}-{SPAN_ID}-01x",  # a later version's extra fields follow a dash
    ],
)
def test_an_invalid_traceparent_is_refused(value: str | None) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_is_read_by_the_version_00_layout() -> None:
    parsed = parse_traceparent(f"cc-{TRACE_ID}-{SPAN_ID}-01-what-comes-next")
    assert parsed == TraceContext(TRACE_ID, SPAN_ID, 1)
    assert parsed.traceparent == VALID  # we speak version 00


def test_continuing_keeps_the_trace_and_flags_with_a_new_span() -> None:
    child = continue_trace(f"00-{TRACE_ID}-{SPAN_ID}-00")
    assert (child.trace_id, child.flags) == (TRACE_ID, 0)
    assert re.fullmatch(r"[0-9a-f]{16}", child.span_id) and child.span_id != SPAN_ID
    assert parse_traceparent(child.traceparent) == child


@pytest.mark.parametrize("value", [None, "", "garbage", f"00-{'0' * 32}-{SPAN_ID}-01"])
def test_without_a_valid_parent_a_new_sampled_trace_starts(value: str | None) -> None:
    trace = continue_trace(value)
    assert re.fullmatch(r"[0-9a-f]{32}", trace.trace_id) and trace.trace_id != "0" * 32
    assert re.fullmatch(r"[0-9a-f]{16}", trace.span_id)
    assert trace.traceparent == f"00-{trace.trace_id}-{trace.span_id}-01"
    assert continue_trace(value).trace_id != trace.trace_id  # random, never reused


def test_a_grpc_call_continues_the_trace_in_its_metadata() -> None:
    span = tracing.server_span([("authorization", "Bearer x"), ("traceparent", VALID)])
    assert span.trace_id == TRACE_ID and span.span_id != SPAN_ID
    assert tracing.server_span(None).trace_id != TRACE_ID


def test_bound_values_are_restored_after_the_block() -> None:
    outer = TraceContext.new()
    with tracing.bound(outer, "outer-id"):
        with tracing.bound(TraceContext(TRACE_ID, SPAN_ID), "inner-id"):
            assert tracing.current_traceparent() == VALID
            assert tracing.current_request_id() == "inner-id"
        assert (tracing.current_trace(), tracing.current_request_id()) == (outer, "outer-id")
    assert (tracing.current_trace(), tracing.current_request_id()) == (None, None)
    assert tracing.current_traceparent() == ""


async def test_values_set_in_one_task_stay_in_that_task() -> None:
    have_set = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def handle(request_id: str, other: str) -> tuple[str | None, str | None]:
        tracing.set_request_id(request_id)
        tracing.set_trace(TraceContext.new())
        have_set[request_id].set()
        await have_set[other].wait()  # the other task has set its own values meanwhile
        trace = tracing.current_trace()
        return tracing.current_request_id(), trace.trace_id if trace else None

    first, second = await asyncio.gather(handle("a", "b"), handle("b", "a"))
    assert (first[0], second[0]) == ("a", "b") and first[1] != second[1]
    assert tracing.current_request_id() is None and tracing.current_trace() is None


def _formatted(**extra: object) -> dict[str, object]:
    record = logging.LogRecord(
        "imgpipe.test", logging.INFO, __file__, 1, "hello %s", ("you",), None
    )
    record.__dict__.update(extra)
    entry: dict[str, object] = json.loads(JsonFormatter("worker").format(record))
    return entry


def test_log_lines_carry_the_request_and_trace_when_known() -> None:
    assert {"request_id", "trace_id", "span_id"}.isdisjoint(_formatted())
    with tracing.bound(TraceContext(TRACE_ID, SPAN_ID), "r-1"):
        entry = _formatted(image_id=7)
    assert entry["msg"] == "hello you" and entry["service"] == "worker"
    assert (entry["request_id"], entry["trace_id"], entry["span_id"]) == ("r-1", TRACE_ID, SPAN_ID)
    assert entry["image_id"] == 7
    with tracing.bound(None, "r-2"):
        entry = _formatted(request_id="given")  # extra= names it more precisely: it wins
    assert entry["request_id"] == "given" and "trace_id" not in entry
