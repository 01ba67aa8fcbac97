"""The key of an output across an owner's requests (services/worker/dedup.py), and its switch."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.config import ConfigError
from services.common.image_options import Effort, ImageOptions, OutputFormat
from services.worker.config import WorkerSettings
from services.worker.dedup import digests_of, options_digest

pytestmark = pytest.mark.unit

BASE = {"IMGPIPE_DATABASE_URL": "postgresql://db/x", "IMGPIPE_REDIS_URL": "redis://r:6379/0"}


@pytest.mark.parametrize(
    "change",
    [
        {"quality": 70},
        {"format": OutputFormat.WEBP},
        {"scale": 0.5},
        {"max_width": 100},
        {"max_height": 100},
        {"effort": Effort.MAX},
        {"target_ratio": 0.5},
        {"min_ssim": 0.95},
    ],
)
def test_every_option_that_changes_the_output_changes_the_digest(change: dict[str, object]) -> None:
    base = ImageOptions()
    assert options_digest(dataclasses.replace(base, **change)) != options_digest(base)  # type: ignore[arg-type]


def test_equal_options_have_equal_digests_and_png_ignores_quality() -> None:
    assert options_digest(ImageOptions(scale=1)) == options_digest(ImageOptions(scale=1.0))
    png = ImageOptions(format=OutputFormat.PNG)
    assert options_digest(png) == options_digest(dataclasses.replace(png, quality=90))


def test_the_source_digest_is_the_sha256_of_its_bytes() -> None:
    first, again, other = (digests_of(data, ImageOptions()) for data in (b"a", b"a", b"b"))
    assert first == again and first.source != other.source and first.options == other.options
    assert first.source.hex().startswith("ca978112ca1bbdca")  # sha256("a")


def test_reuse_is_on_unless_switched_off() -> None:
    assert WorkerSettings.from_env(BASE).reuse_outputs is True
    off = WorkerSettings.from_env(BASE | {"IMGPIPE_REUSE_OUTPUTS": "OFF"})
    assert off.reuse_outputs is False
    with pytest.raises(ConfigError, match="IMGPIPE_REUSE_OUTPUTS='no': expected on or off"):
        WorkerSettings.from_env(BASE | {"IMGPIPE_REUSE_OUTPUTS": "no"})
