"""The benchmarks' reading of the machine's CPU (bench/cpu.py)."""

from __future__ import annotations

import pytest

from bench.cpu import CpuMeter

pytestmark = pytest.mark.unit


def test_idle_share_is_the_cores_time_no_process_used() -> None:
    # 10 s on 2 cores is 20 CPU seconds, of which the machine used 15.
    assert CpuMeter(wall=10.0, machine=15.0).idle_share(2) == pytest.approx(0.25)
    assert CpuMeter(wall=10.0, machine=20.0).idle_share(2) == pytest.approx(0.0)
    assert CpuMeter().idle_share(2) == 0.0  # nothing measured yet


def test_the_others_share_is_what_the_measured_processes_did_not_use() -> None:
    meter = CpuMeter(seconds={"worker-1": 6.0, "bench (origin, client)": 3.0}, machine=12.0)
    assert meter.others_share == pytest.approx(0.25)
