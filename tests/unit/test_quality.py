"""Measured quality and the goals that choose it: SSIM, target_ratio, min_ssim, AVIF and auto,
on real photographs (testing/photos.py)."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

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
from services.worker.imaging import Compressed, compress
from services.worker.quality import SAMPLED_AGREEMENT, luminance, ssim
from services.worker.quality_search import search
from testing import photos

pytestmark = pytest.mark.unit

LONG_SIDE = 480  # small enough for dozens of encodes per test, large enough to be a photo
LOSSY = (OutputFormat.JPEG, OutputFormat.WEBP, OutputFormat.AVIF)


@pytest.fixture(scope="module")
def corpus() -> list[bytes]:
    """The nine photographs as the q90 JPEGs a merchant would link to."""
    return [photos.photo_jpeg(i, LONG_SIDE) for i in range(len(photos.PHOTOS))]


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[OutputFormat, int]]:
    """Every (format, quality) tuning.encode is called with, in order."""
    calls: list[tuple[OutputFormat, int]] = []
    real = tuning.encode

    def counting(img: Image.Image, output: OutputFormat, quality: int, effort: object) -> bytes:
        calls.append((output, quality))
        return real(img, output, quality, effort)  # type: ignore[arg-type]

    monkeypatch.setattr(tuning, "encode", counting)
    return calls


def ssim_of(result: Compressed) -> float:
    assert result.ssim is not None  # every output is measured at the default effort
    return result.ssim


def decoded_source(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def decoded(result: Compressed) -> Image.Image:
    img = Image.open(io.BytesIO(result.data))
    img.load()
    return img


# --- SSIM itself --------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 3, 5])
@pytest.mark.parametrize("quality", [10, 60])
def test_ssim_agrees_with_scikit_image(index: int, quality: int) -> None:
    img = photos.variant(index, 700)
    reference = luminance(img)
    other = luminance(Image.open(io.BytesIO(photos.jpeg(img, quality))))
    # scikit-image's defaults: a uniform 7x7 window, sample covariances.
    expected = structural_similarity(  # type: ignore[no-untyped-call]
        reference.astype(np.float64), other.astype(np.float64), data_range=255
    )
    assert ssim(reference, other) == pytest.approx(expected, abs=1e-5)
    assert max(reference.shape) == 512


def test_ssim_agrees_with_scikit_image_at_every_shape_after_larger_ones() -> None:
    # The window sums wrap across rows of a flat array and reuse a per-thread scratch buffer:
    # odd shapes, the smallest window-sized one, and a small one after a large one must not
    # see each other's leftovers.
    rng = np.random.default_rng(11)
    for shape in [(300, 200), (7, 7), (9, 13), (40, 31), (8, 300), (512, 7)]:
        a = rng.integers(0, 256, shape).astype(np.float64)
        b = np.clip(a + rng.normal(0, 25, shape), 0, 255).round()
        expected = structural_similarity(a, b, data_range=255)  # type: ignore[no-untyped-call]
        assert ssim(a, b) == pytest.approx(expected, abs=1e-5), shape


@pytest.mark.parametrize("long_side", [600, 1200])
def test_sampled_ssim_agrees_with_the_full_mean_on_every_photo(long_side: int) -> None:
    # The hot path measures a seventh of the windows (every 7th row): on each photograph and
    # at low, middle and high quality it must stay within SAMPLED_AGREEMENT of all of them.
    worst = 0.0
    for index in range(len(photos.PHOTOS)):
        img = photos.variant(index, long_side)
        reference = luminance(img)
        for output, quality in (("JPEG", 30), ("JPEG", 75), ("WEBP", 50)):
            out = io.BytesIO()
            img.save(out, output, quality=quality)
            other = luminance(Image.open(out), reference.shape[::-1])
            full = ssim(reference, other)
            worst = max(worst, abs(ssim(reference, other, sampled=True) - full))
            assert full < 0.999  # a real difference to estimate
    assert worst <= SAMPLED_AGREEMENT
    assert worst > 0  # it is an estimate: a zero would mean both paths are the same


def test_ssim_of_identical_images_is_one_and_of_unrelated_ones_low() -> None:
    a = luminance(photos.variant(1, 300))
    noise = np.random.default_rng(7).integers(0, 256, a.shape).astype(np.float64)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, noise) < 0.2


def test_ssim_of_images_smaller_than_the_window_uses_one_window() -> None:
    a = np.arange(30, dtype=np.float64).reshape(5, 6)
    assert ssim(a, a) == pytest.approx(1.0)
    assert 0 < ssim(a, a + 20) < 1
    assert ssim(a, a[::-1].copy()) < 0  # anti-correlated


def test_ssim_refuses_different_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        ssim(np.zeros((20, 20)), np.zeros((20, 21)))


def test_luminance_is_at_most_512_px_and_flattens_alpha_on_white() -> None:
    assert max(luminance(photos.variant(2, 1200)).shape) == 512
    clear = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    assert luminance(clear).min() == 255  # transparent shows the page, not the hidden colour


# --- SSIM reported on every output, in range and monotonic in quality ---------------------


@pytest.mark.parametrize("output", LOSSY)
def test_ssim_is_in_range_and_rises_with_quality_on_every_photo(
    corpus: list[bytes], output: OutputFormat
) -> None:
    for index, source in enumerate(corpus):
        measured = [
            ssim_of(compress(source, ImageOptions(format=output, quality=q)))
            for q in (20, 50, 80, 95)
        ]
        assert all(0.5 < s <= 1.0 for s in measured), (index, measured)
        # Strictly rising over steps of 15-30 quality points (a re-compressed JPEG's SSIM may
        # dip by a little between neighbouring qualities; see quality_search.py).
        assert measured == sorted(measured) and len(set(measured)) == 4, (index, measured)


def test_effort_fast_measures_ssim_only_where_the_choice_needs_it(corpus: list[bytes]) -> None:
    fast = Effort.FAST
    assert compress(corpus[0], ImageOptions(effort=fast)).ssim is None
    assert compress(corpus[0], ImageOptions(effort=fast, target_ratio=0.5)).ssim is None
    assert compress(corpus[0], ImageOptions(format=OutputFormat.PNG, effort=fast)).ssim == 1.0
    # min_ssim and auto choose by SSIM, so they measure it at every effort.
    assert ssim_of(compress(corpus[0], ImageOptions(effort=fast, min_ssim=0.95))) >= 0.95
    auto = ImageOptions(format=OutputFormat.AUTO, effort=fast)
    assert 0.9 < ssim_of(compress(corpus[0], auto)) < 1
    assert 0.9 < ssim_of(compress(corpus[0], ImageOptions(effort=Effort.BALANCED))) < 1


def test_a_size_target_measures_the_ssim_of_the_output_it_keeps_only(
    corpus: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[bytes] = []
    real = tuning.measure_ssim

    def counting(reference: np.ndarray, data: bytes) -> float:
        measured.append(data)
        return real(reference, data)

    monkeypatch.setattr(tuning, "measure_ssim", counting)
    result = compress(corpus[1], ImageOptions(target_ratio=0.5))
    assert result.encodes > 1 and measured == [result.data]
    assert result.ssim == real(luminance(decoded_source(corpus[1])), result.data)


def test_png_is_lossless_and_says_so(corpus: list[bytes]) -> None:
    result = compress(corpus[0], ImageOptions(format=OutputFormat.PNG))
    assert (result.ssim, result.quality, result.note) == (1.0, 0, "")


# --- target_ratio -------------------------------------------------------------------------


def test_target_ratio_is_met_or_flagged_on_every_photo_in_at_most_four_encodes(
    corpus: list[bytes], encodes: list[tuple[OutputFormat, int]]
) -> None:
    met = 0
    for source in corpus:
        encodes.clear()
        result = compress(source, ImageOptions(target_ratio=0.5))
        tried = [q for _, q in encodes]
        assert 1 <= len(tried) <= tuning.MAX_ENCODES
        assert result.quality in tried
        if len(result.data) <= 0.5 * len(source):
            assert result.note == ""
            met += 1
            for q in tried:  # no higher quality tried met it
                if q > result.quality:
                    assert len(compress(source, ImageOptions(quality=q)).data) > len(source) / 2
        else:
            assert result.note == tuning.TARGET_NOT_MET
            assert (OutputFormat.JPEG, tuning.QUALITY_FLOOR) in encodes
    assert met >= 7  # q90 photographs halve comfortably


def test_target_ratio_finds_the_highest_quality_within_one_step(corpus: list[bytes]) -> None:
    source = corpus[2]
    result = compress(source, ImageOptions(target_ratio=0.5))
    assert result.note == ""
    above = compress(source, ImageOptions(quality=result.quality + 2))
    # Two steps up no longer meets the target: the search stopped near the boundary.
    assert len(above.data) > 0.5 * len(source)


def test_a_target_even_the_floor_cannot_meet_is_flagged_not_failed(
    encodes: list[tuple[OutputFormat, int]],
) -> None:
    # Noise at quality 20 is already about as small as JPEG makes noise: 10 % cannot be met.
    rng = random.Random(3)
    noise = Image.frombytes("RGB", (200, 150), rng.randbytes(200 * 150 * 3))
    source = photos.jpeg(noise, 20)

    result = compress(source, ImageOptions(target_ratio=0.1))

    assert result.note == tuning.TARGET_NOT_MET
    assert len(result.data) > 0.1 * len(source)
    assert len(encodes) <= tuning.MAX_ENCODES
    assert (OutputFormat.JPEG, tuning.QUALITY_FLOOR) in encodes
    # The smallest file is kept: the floor's, or the source's own bytes if smaller still.
    floor = compress(source, ImageOptions(quality=tuning.QUALITY_FLOOR))
    assert len(result.data) == len(floor.data)


@pytest.mark.parametrize("output", [OutputFormat.WEBP, OutputFormat.AVIF])
def test_target_ratio_works_for_the_other_lossy_formats(
    corpus: list[bytes], output: OutputFormat, encodes: list[tuple[OutputFormat, int]]
) -> None:
    result = compress(corpus[4], ImageOptions(format=output, target_ratio=0.2))
    assert result.format is output
    assert len(encodes) <= tuning.MAX_ENCODES
    assert len(result.data) <= 0.2 * len(corpus[4]) or result.note == tuning.TARGET_NOT_MET


# --- min_ssim -----------------------------------------------------------------------------


def test_min_ssim_is_met_with_the_lowest_quality_tried(
    corpus: list[bytes], encodes: list[tuple[OutputFormat, int]]
) -> None:
    for source in corpus[:5]:
        encodes.clear()
        result = compress(source, ImageOptions(min_ssim=0.95))
        assert len(encodes) <= tuning.MAX_ENCODES
        assert result.note == ""
        assert ssim_of(result) >= 0.95
        below = [q for _, q in encodes if q < result.quality]
        for q in below:  # every lower quality tried missed it
            assert ssim_of(compress(source, ImageOptions(quality=q))) < 0.95


def test_min_ssim_that_even_quality_95_misses_is_flagged(
    encodes: list[tuple[OutputFormat, int]],
) -> None:
    # A PNG source: a JPEG source's own bytes (SSIM 1.0) would be kept and meet any goal.
    out = io.BytesIO()
    photos.variant(1, LONG_SIDE).save(out, "PNG")
    result = compress(out.getvalue(), ImageOptions(min_ssim=0.99999))
    assert result.note == tuning.TARGET_NOT_MET
    assert (OutputFormat.JPEG, tuning.MAX_QUALITY) in encodes
    assert len(encodes) <= tuning.MAX_ENCODES
    assert result.quality == tuning.MAX_QUALITY  # the best SSIM found


# --- AVIF and auto ------------------------------------------------------------------------


def test_avif_output_decodes_to_the_right_size(corpus: list[bytes]) -> None:
    result = compress(corpus[3], ImageOptions(format=OutputFormat.AVIF, quality=50))
    assert (result.content_type, result.extension) == ("image/avif", "avif")
    img = decoded(result)
    assert img.format == "AVIF"
    assert img.size == (result.width, result.height)
    assert 0.8 < ssim_of(result) < 1.0  # photo 3 is the Hubble deep field: dark noise
    assert len(result.data) < len(corpus[3]) / 3


def test_avif_keeps_alpha_and_takes_grey() -> None:
    rgba = photos.variant(5, 200).convert("RGBA")
    rgba.putalpha(128)
    grey = photos.variant(6, 200).convert("LA")
    grey.putalpha(200)  # an opaque alpha channel is dropped by the encoder, rightly
    for img in (rgba, grey):
        out = io.BytesIO()
        img.save(out, "PNG")
        result = compress(out.getvalue(), ImageOptions(format=OutputFormat.AVIF))
        assert decoded(result).mode == "RGBA"


@pytest.mark.parametrize("output", [OutputFormat.AUTO, OutputFormat.AUTO_AVIF])
def test_auto_picks_the_smallest_at_the_ssim_of_jpeg(
    corpus: list[bytes], output: OutputFormat, encodes: list[tuple[OutputFormat, int]]
) -> None:
    chosen = set()
    for source in corpus[:5]:
        encodes.clear()
        jpeg = compress(source, ImageOptions(quality=50))
        encodes.clear()
        result = compress(source, ImageOptions(format=output, quality=50))
        candidates = len(tuning.AUTO_CANDIDATES[output])
        assert len(encodes) <= 1 + (candidates - 1) * (tuning.MAX_ENCODES - 1)
        assert encodes[0] == (OutputFormat.JPEG, 50)
        assert ssim_of(result) >= ssim_of(jpeg)
        assert len(result.data) <= len(jpeg.data)
        assert decoded(result).format == result.format.value.upper()
        assert result.extension == {"jpeg": "jpg"}.get(result.format, result.format.value)
        chosen.add(result.format)
    assert chosen - {OutputFormat.JPEG}  # another format wins somewhere


# --- the search on its own ----------------------------------------------------------------


def test_search_finds_the_exact_boundary_of_a_smooth_curve() -> None:
    calls: list[int] = []

    def size(q: int) -> float:
        calls.append(q)
        return math.log(20_000) + 0.022 * q

    goal = math.log(20_000) + 0.022 * 71.5
    found = search(size, goal, highest=True, low=30, high=95, first=50, slope=0.025, budget=4)
    assert found.best == 71
    assert len(calls) <= 4
    assert len(set(calls)) == len(calls)


def test_search_probes_the_floor_before_saying_not_met() -> None:
    found = search(lambda q: q, -1, highest=True, low=30, high=95, first=80, slope=0.5, budget=4)
    assert found.best is None
    assert 30 in found.probes
    assert len(found.probes) <= 4


def test_the_lowest_at_least_search_mirrors_it() -> None:
    def ssim_like(q: int) -> float:
        return q / 100

    found = search(ssim_like, 0.6, highest=False, low=30, high=95, first=50, slope=0.01, budget=4)
    assert found.best == 60
    missed = search(ssim_like, 2, highest=False, low=30, high=95, first=50, slope=0.01, budget=4)
    assert missed.best is None
    assert 95 in missed.probes


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ImageOptions(target_ratio=1.0), "target_ratio must be greater than 0 and less than 1"),
        (ImageOptions(target_ratio=-0.5), "target_ratio must be"),
        (ImageOptions(target_ratio=math.nan), "target_ratio must be"),
        (ImageOptions(min_ssim=1.5), "min_ssim must be greater than 0 and at most 1"),
        (ImageOptions(target_ratio=0.5, min_ssim=0.9), "cannot be combined"),
        (ImageOptions(format=OutputFormat.PNG, target_ratio=0.5), "needs a lossy format"),
        (ImageOptions(format=OutputFormat.AUTO, min_ssim=0.9), "needs a lossy format"),
    ],
)
def test_bad_goals_are_named(options: ImageOptions, message: str) -> None:
    assert any(message in problem for problem in options.validate()), options.validate()


def test_goals_and_new_formats_survive_proto_and_json_and_old_rows_have_none() -> None:
    for options in (
        ImageOptions(format=OutputFormat.AVIF, target_ratio=0.5),
        ImageOptions(format=OutputFormat.WEBP, min_ssim=0.95),
        ImageOptions(format=OutputFormat.AUTO_AVIF, quality=70),
    ):
        assert from_proto(to_proto(options)) == options
        assert from_json(to_json(options)) == options
    stored_before_goals = {"format": "jpeg", "quality": 50, "scale": 1.0, "effort": "max"}
    old = from_json(stored_before_goals)
    assert (old.target_ratio, old.min_ssim) == (0.0, 0.0)
    assert from_proto(task_pb2.ImageOptions()).target_ratio == 0.0
