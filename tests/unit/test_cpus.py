"""The worker's default thread count follows its cgroup CPU limit, not the node's cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.worker.cpus import cgroup_cpu_quota, usable_cpus

pytestmark = pytest.mark.unit

AFFINITY = len(os.sched_getaffinity(0))


def cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "200000 100000"}, 2.0),  # v2, `limits.cpu: 2`
        ({"cpu.max": "150000 100000"}, 1.5),
        ({"cpu.max": "max 100000"}, None),  # v2, no limit
        ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 0.5),  # v1
        ({"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 3),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),  # v1, none
        ({"cpu.max": "garbage"}, None),
        ({"cpu.max": "two 100000"}, None),
        ({}, None),  # no cgroup files at all (not Linux, or not mounted)
    ],
)
def test_the_cgroup_cpu_limit_is_read_in_cores(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    assert cgroup_cpu_quota(cgroup(tmp_path, files)) == quota


def test_a_limit_caps_the_cores_and_rounds_up(tmp_path: Path) -> None:
    assert usable_cpus(cgroup(tmp_path / "a", {"cpu.max": "50000 100000"})) == 1
    half_again = usable_cpus(cgroup(tmp_path / "b", {"cpu.max": "150000 100000"}))
    assert half_again == min(2, AFFINITY)


def test_without_a_limit_the_cores_are_the_affinity(tmp_path: Path) -> None:
    assert usable_cpus(cgroup(tmp_path, {"cpu.max": "max 100000"})) == AFFINITY
    # A limit above the cores the process may run on does not add any.
    assert usable_cpus(cgroup(tmp_path / "big", {"cpu.max": "6400000 100000"})) == AFFINITY
