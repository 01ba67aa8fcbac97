"""Effort levels: what each promises on real photographs, and the rules that choose them."""

from __future__ import annotations

import io
import os
import sys

import pytest
from PIL import Image

from services.common.image_options import (
    Effort,
    ImageOptions,
    OutputFormat,
    from_json,
    from_proto,
    to_json,
    to_proto,
)
from services.common.pb.imgpipe.v1 import task_pb2
from services.worker import tuning
from services.worker.encoders import Measured, encoder_settings, levels, pareto
from services.worker.imaging import compress
from testing import photos

pytestmark = pytest.mark.unit

EFFORTS = tuple(Effort)


def _pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB").tobytes()


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A real photograph, 600 px on the long side, as a merchant's q90 JPEG."""
    return photos.jpeg(photos.variant(2, long_side=600))


@pytest.mark.parametrize("output", [OutputFormat.JPEG, OutputFormat.PNG])
def test_efforts_decode_to_the_same_pixels(photo: bytes, output: OutputFormat) -> None:
    # Effort must never trade quality: only how hard the encoder works on the same pixels.
    decoded = {
        effort: _pixels(compress(photo, ImageOptions(format=output, effort=effort)).data)
        for effort in EFFORTS
    }
    assert decoded[Effort.FAST] == decoded[Effort.BALANCED] == decoded[Effort.MAX]


# The encodings themselves: auto and auto_avif choose among them per image, at equal SSIM, so
# their bytes need not fall with effort (the choice may change).
ENCODINGS = [OutputFormat.JPEG, OutputFormat.WEBP, OutputFormat.PNG, OutputFormat.AVIF]


@pytest.mark.parametrize("output", ENCODINGS)
def test_more_effort_never_gives_larger_files(photo: bytes, output: OutputFormat) -> None:
    sizes = [
        len(compress(photo, ImageOptions(format=output, effort=effort)).data) for effort in EFFORTS
    ]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] > sizes[-1]  # and the levels do differ


@pytest.mark.parametrize("effort", EFFORTS)
def test_output_is_never_larger_than_a_jpeg_source(effort: Effort) -> None:
    # A q30 source re-encoded at q50 would grow: its own bytes are kept, without the EXIF.
    exif = Image.Exif()
    exif[0x013B] = "photographer"  # Artist
    out = io.BytesIO()
    photos.variant(4, long_side=500).save(out, "JPEG", quality=30, exif=exif)
    source = out.getvalue()

    result = compress(source, ImageOptions(effort=effort))

    assert result.kept_source
    assert len(result.data) < len(source)
    assert b"photographer" not in result.data
    assert _pixels(result.data) == _pixels(source)


@pytest.mark.parametrize("effort", EFFORTS)
@pytest.mark.parametrize("output", ENCODINGS)
def test_encode_gives_the_bytes_pillow_writes_to_memory(
    photo: bytes, output: OutputFormat, effort: Effort
) -> None:
    # The worker encodes into a memory file rather than a BytesIO (for the GIL): same bytes.
    with Image.open(io.BytesIO(photo)) as img:
        rgb = img.convert("RGB")
    settings = dict(encoder_settings(output.value, effort))
    if output is not OutputFormat.PNG:  # lossless: no quality
        settings["quality"] = 50
    expected = io.BytesIO()
    rgb.save(expected, output.value.upper(), **settings)
    assert tuning.encode(rgb, output, 50, effort) == expected.getvalue()


def test_encode_falls_back_to_memory_when_no_memory_file_can_be_made(
    photo: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Image.open(io.BytesIO(photo)) as img:
        rgb = img.convert("RGB")
    expected = tuning.encode(rgb, OutputFormat.JPEG, 50, Effort.FAST)

    def refused(name: str, flags: int = 0) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", refused, raising=False)
    assert tuning.encode(rgb, OutputFormat.JPEG, 50, Effort.FAST) == expected


@pytest.mark.skipif(sys.platform != "linux", reason="memory files (memfd) are Linux's")
def test_encodes_go_to_a_real_file_descriptor_where_pillow_releases_the_gil() -> None:
    # Pillow encodes into a file descriptor without the GIL, into a BytesIO with it: one
    # worker process's codec threads then encode one at a time (docs/performance.md).
    with tuning._scratch_file() as out:
        out.write(b"written")
        out.seek(0)
        assert os.read(out.fileno(), 16) == b"written"


def test_an_unknown_effort_is_named() -> None:
    problems = ImageOptions(effort="slow").validate()  # type: ignore[arg-type]
    assert problems == ["effort must be one of fast, balanced, max, not 'slow'"]


def test_effort_survives_proto_and_json_and_old_rows_get_balanced() -> None:
    options = ImageOptions(format=OutputFormat.WEBP, effort=Effort.MAX)
    assert from_proto(to_proto(options)) == options
    assert from_json(to_json(options)) == options
    assert from_proto(task_pb2.ImageOptions()).effort is Effort.BALANCED
    stored_before_effort = {"format": "jpeg", "quality": 50, "scale": 1.0}
    assert from_json(stored_before_effort).effort is Effort.BALANCED


def _m(name: str, cpu_ms: float, kib: float) -> Measured:
    return Measured(name, {}, cpu_ms, kib)


def test_pareto_front_drops_dominated_candidates() -> None:
    a, b, c, d = _m("a", 1, 10), _m("b", 2, 8), _m("c", 3, 9), _m("d", 5, 7)
    assert pareto([a, b, c, d]) == [a, b, d]


def test_levels_follow_the_documented_rules() -> None:
    fast = _m("fast", 1.0, 100.0)
    cheap_saving = _m("cheap", 2.0, 90.0)  # 10 KiB for 1 ms
    dear_saving = _m("dear", 11.0, 80.0)  # 20 KiB for 10 ms
    dominated = _m("dominated", 12.0, 95.0)
    chosen = levels([dominated, dear_saving, fast, cheap_saving])
    assert chosen == {Effort.FAST: fast, Effort.BALANCED: cheap_saving, Effort.MAX: dear_saving}


def test_with_one_candidate_every_level_is_it() -> None:
    only = _m("only", 3.0, 50.0)
    assert list(levels([only]).values()) == [only, only, only]
