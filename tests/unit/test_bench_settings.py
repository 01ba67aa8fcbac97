"""The benchmarks' knobs: IMGPIPE_BENCH_STACK_ENV reaches every stack a benchmark starts,
under the benchmark's own settings, and a reduced or changed run says so in its report."""

from __future__ import annotations

import pytest

from bench.pipeline import stack_settings
from bench.settings import BenchSettings

pytestmark = pytest.mark.unit

WIDER = {"IMGPIPE_BENCH_STACK_ENV": "IMGPIPE_WORKER_CONCURRENCY=64, IMGPIPE_SCHEDULER_WINDOW=192"}


def test_the_stack_settings_are_given_to_every_stack_under_the_benchmarks_own() -> None:
    settings = stack_settings({"IMGPIPE_WORKER_CONCURRENCY": "4"}, WIDER)
    assert settings["IMGPIPE_WORKER_CONCURRENCY"] == "4"  # B7's design wins
    assert settings["IMGPIPE_SCHEDULER_WINDOW"] == "192"
    assert settings["IMGPIPE_REUSE_OUTPUTS"] == "off"
    assert "IMGPIPE_SCHEDULER_WINDOW" not in stack_settings({}, {})


def test_a_run_with_stack_settings_says_so_in_its_report() -> None:
    changed = BenchSettings.from_env(WIDER).changed()
    assert changed == {
        "stack_env": (("IMGPIPE_WORKER_CONCURRENCY", "64"), ("IMGPIPE_SCHEDULER_WINDOW", "192"))
    }


@pytest.mark.parametrize("entry", ["WORKER_CONCURRENCY=64", "IMGPIPE_BENCH_RUNS=1", "IMGPIPE_X"])
def test_only_the_services_settings_may_be_given(entry: str) -> None:
    with pytest.raises(ValueError, match="IMGPIPE_BENCH_STACK_ENV entry"):
        BenchSettings.from_env({"IMGPIPE_BENCH_STACK_ENV": entry})
