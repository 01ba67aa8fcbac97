"""B1's Pillow loops are what they claim to be: the plain loop is the plain script, and the
same-work loop does the worker's codec work, byte for byte (bench/corpus.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.corpus import PLAIN, pillow_loop, plain, same_work
from services.common.image_options import Effort, ImageOptions
from services.worker.imaging import compress
from testing import photos

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    # Odd sides too: at 0.5 and 0.3 their scaled decode ends in a pixel that is part padding,
    # which the worker replaces or leaves out (imaging.without_padding).
    for seed, (width, height) in enumerate([(600, 400), (600, 400), (601, 401)]):
        path = folder / f"{seed}.jpg"
        path.write_bytes(photos.jpeg(photos.sized(seed, width, height)))
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    ("effort", "scale"),
    [(Effort.FAST, 1.0), (Effort.BALANCED, 1.0), (Effort.BALANCED, 0.5), (Effort.FAST, 0.3)],
)
def test_the_same_work_loop_writes_what_the_worker_writes(
    photo_files: list[Path], effort: Effort, scale: float
) -> None:
    options = ImageOptions(quality=PLAIN["quality"], effort=effort, scale=scale)
    for path in photo_files:
        worker = compress(path.read_bytes(), options)
        assert not worker.kept_source  # a q90 source is larger: the encode is what is stored
        measure = effort is not Effort.FAST
        assert same_work(effort, measure, str(path), scale) == len(worker.data)


def test_a_loop_counts_each_photo_once_in_fresh_processes(photo_files: list[Path]) -> None:
    run = pillow_loop(photo_files, 2)
    assert run.images == len(photo_files)
    assert run.output_bytes == sum(plain(str(p)) for p in photo_files)
    assert run.cpu_s > 0 and run.images_per_s > 0
    assert 0 <= run.system_s <= run.cpu_s
    assert run.page_faults >= 0


_SETUP_RAN = False


def _mark_setup_ran() -> None:
    global _SETUP_RAN
    _SETUP_RAN = True


def _requires_setup(path: str) -> int:
    assert _SETUP_RAN, "the loop's setup did not run in this process"
    return plain(path)


def test_every_process_runs_the_setup_before_its_photos(photo_files: list[Path]) -> None:
    run = pillow_loop(photo_files, 2, _requires_setup, setup=_mark_setup_ran)
    assert run.output_bytes == sum(plain(str(p)) for p in photo_files)
