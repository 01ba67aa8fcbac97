"""compress(): decode, normalise, resize, encode, with every image generated in memory."""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import ExifTags, Image, ImageChops, ImageCms, ImageStat
from PIL.PngImagePlugin import PngInfo

from services.common.image_options import Effort, ImageLimits, ImageOptions, OutputFormat
from services.common.outcome import ImageFailure, OutcomeCode
from services.worker.imaging import (
    Compressed,
    _gif_frames,
    _is_srgb,
    _jpeg_scans,
    _tiff_pages,
    compress,
)

pytestmark = pytest.mark.unit

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def photo(size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A smooth, photo-like RGB image that compresses like a real one."""
    fractal = Image.effect_mandelbrot(size, (-2.0, -1.2, 0.8, 1.2), 64)
    across = Image.linear_gradient("L").resize(size)
    down = Image.linear_gradient("L").rotate(90).resize(size)
    return Image.merge("RGB", (fractal, across, down))


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def display_p3_icc() -> bytes:
    """A minimal ICC v4 matrix/TRC profile for Display P3: P3 primaries (D50-adapted, as in
    Apple's profile), D65 white, the sRGB tone curve. ImageCms cannot create one, and none
    ships with Pillow or littlecms."""

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)

    def mluc(text: str) -> bytes:
        utf16 = text.encode("utf-16-be")
        return (
            b"mluc\0\0\0\0" + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(utf16), 28) + utf16
        )

    def numbers(kind: bytes, *values: float) -> bytes:
        return kind + b"\0\0\0\0" + b"".join(_s15(v) for v in values)

    # parametricCurveType 3: the sRGB transfer function.
    srgb_curve = (
        b"para\0\0\0\0"
        + struct.pack(">HH", 3, 0)
        + b"".join(_s15(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
    )
    bradford_d65_to_d50 = (
        1.0478112, 0.0228866, -0.0501270,
        0.0295424, 0.9904844, -0.0170491,
        -0.0092345, 0.0150436, 0.7521316,
    )  # fmt: skip
    tags = [
        (b"desc", mluc("Display P3 (test)")),
        (b"cprt", mluc("No copyright")),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"chad", numbers(b"sf32", *bradford_d65_to_d50)),
        (b"rXYZ", xyz(0.515102, 0.241196, -0.001053)),
        (b"gXYZ", xyz(0.291965, 0.692236, 0.041882)),
        (b"bXYZ", xyz(0.157153, 0.066574, 0.784073)),
        (b"rTRC", srgb_curve),
        (b"gTRC", srgb_curve),
        (b"bTRC", srgb_curve),
    ]
    data_start = 128 + 4 + 12 * len(tags)
    entries, body = b"", b""
    for signature, tag in tags:
        tag += b"\0" * (-len(tag) % 4)
        entries += struct.pack(">4sII", signature, data_start + len(body), len(tag))
        body += tag
    header = b"".join(
        (
            struct.pack(">I4sI", data_start + len(body), b"", 0x04300000),  # size, CMM, v4.3
            b"mntrRGB XYZ ",  # a display profile, RGB data, XYZ connection space
            bytes(12),  # date
            b"acsp",
            bytes(28),  # platform, flags, manufacturer, model, attributes, rendering intent
            _s15(0.9642) + _s15(1.0) + _s15(0.8249),  # the PCS illuminant, D50
            bytes(48),  # creator, profile ID, reserved
        )
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + entries + body


def exif_with(orientation: int | None = None, **tags: str) -> Image.Exif:
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    for name, value in tags.items():
        exif[ExifTags.Base[name]] = value
    return exif


def close_to(pixel: object, expected: tuple[int, ...], tolerance: int = 40) -> bool:
    assert isinstance(pixel, tuple)
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def failure_of(data: bytes, **kwargs: object) -> ImageFailure:
    with pytest.raises(ImageFailure) as caught:
        compress(data, **kwargs)  # type: ignore[arg-type]
    return caught.value


# --- default JPEG output ------------------------------------------------------------------


def test_jpeg_output_is_smaller_and_stripped() -> None:
    source = encode(
        photo(),
        "JPEG",
        quality=95,
        exif=exif_with(Artist="someone", Make="camera"),
        icc_profile=srgb_icc(),
    )

    result = compress(source)

    assert isinstance(result, Compressed)
    assert (result.format, result.content_type, result.extension) == (
        OutputFormat.JPEG,
        "image/jpeg",
        "jpg",
    )
    assert len(result.data) < len(source)
    assert not result.kept_source
    out = decode(result.data)
    assert out.format == "JPEG"
    assert out.size == (result.width, result.height) == (320, 240)
    assert out.mode == "RGB"
    # Balanced JPEG is sequential with optimised Huffman tables: progressive costs 2.4x the
    # CPU for no smaller files (services/worker/encoders.py).
    assert not (out.info.get("progressive") or out.info.get("progression"))
    assert "exif" not in out.info
    assert "icc_profile" not in out.info
    assert not out.getexif()


def test_quality_controls_size() -> None:
    source = encode(photo(), "PNG")
    low = compress(source, ImageOptions(quality=10))
    high = compress(source, ImageOptions(quality=90))
    assert len(low.data) < len(high.data)


# --- orientation --------------------------------------------------------------------------

# How to store an upright image so that EXIF orientation N shows it upright again: the inverse
# of the transform a viewer applies for N.
STORE_FOR_ORIENTATION: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_marker() -> Image.Image:
    """60x40, blue, with a red block in the top-left corner as the viewer should see it."""
    img = Image.new("RGB", (60, 40), BLUE)
    img.paste(RED, (0, 0, 16, 16))
    return img


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("source_format", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(orientation: int, source_format: str) -> None:
    store = STORE_FOR_ORIENTATION[orientation]
    stored = upright_marker() if store is None else upright_marker().transpose(store)
    source = encode(stored, source_format, exif=exif_with(orientation))

    result = compress(source, ImageOptions(quality=90))

    out = decode(result.data)
    assert (result.width, result.height) == out.size == (60, 40)
    assert close_to(out.getpixel((4, 4)), RED)
    assert close_to(out.getpixel((55, 35)), BLUE)
    assert not out.getexif()


def test_orientation_and_resize_use_upright_dimensions() -> None:
    stored = photo((400, 200)).transpose(Image.Transpose.ROTATE_90)  # stored 200x400
    source = encode(stored, "JPEG", quality=90, exif=exif_with(6))
    result = compress(source, ImageOptions(max_width=100))
    assert (result.width, result.height) == (100, 50)


# --- transparency -------------------------------------------------------------------------


def half_transparent(mode: str) -> bytes:
    """Left half opaque red (or dark grey), right half fully transparent."""
    if mode == "RGBA":
        img = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
        img.paste((255, 0, 0, 255), (0, 0, 20, 20))
        return encode(img, "PNG")
    if mode == "LA":
        img = Image.new("LA", (40, 20), (30, 0))
        img.paste((30, 255), (0, 0, 20, 20))
        return encode(img, "PNG")
    if mode == "P":
        img = Image.new("P", (40, 20), 1)
        img.putpalette([255, 0, 0, 0, 0, 0] + [0] * (256 - 2) * 3)
        img.paste(0, (0, 0, 20, 20))
        return encode(img, "PNG", transparency=1)
    assert mode == "GIF"
    img = Image.new("P", (40, 20), 1)
    img.putpalette([255, 0, 0, 0, 0, 0] + [0] * (256 - 2) * 3)
    img.paste(0, (0, 0, 20, 20))
    return encode(img, "GIF", transparency=1)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "GIF"])
def test_transparency_is_flattened_on_white_for_jpeg(mode: str) -> None:
    result = compress(half_transparent(mode), ImageOptions(quality=90))
    out = decode(result.data).convert("RGB")
    assert close_to(out.getpixel((35, 10)), WHITE, tolerance=8)
    expected_opaque = (30, 30, 30) if mode == "LA" else RED
    assert close_to(out.getpixel((5, 10)), expected_opaque)


@pytest.mark.parametrize("output", [OutputFormat.WEBP, OutputFormat.PNG])
def test_transparency_is_kept_for_webp_and_png(output: OutputFormat) -> None:
    result = compress(half_transparent("RGBA"), ImageOptions(format=output, quality=90))
    out = decode(result.data).convert("RGBA")
    pixel = out.getpixel((35, 10))
    assert isinstance(pixel, tuple)
    assert pixel[3] == 0
    assert close_to(out.getpixel((5, 10)), (255, 0, 0, 255))


# --- colour and modes ---------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red ink
    result = compress(encode(cmyk, "JPEG", quality=95))
    out = decode(result.data)
    assert out.mode == "RGB"
    assert close_to(out.getpixel((16, 16)), RED)


def ycck_jpeg(cmyk: tuple[int, int, int, int]) -> bytes:
    """A 32x32 Adobe YCCK JPEG (APP14 transform 2) that decodes to `cmyk`.

    Pillow writes CMYK JPEGs only (APP14 transform 0), inverted as Adobe does. So the YCCK
    components are computed here and written as if they were CMYK, then the transform byte
    is patched: a decoder then turns Y, Cb, Cr into R, G, B, stores 255 - R as C (and so on),
    and Pillow's inverted reading gives C = R. Hence Y, Cb, Cr are those of the RGB colour
    (c, m, y), and K is stored as it is.
    """
    c, m, y, k = cmyk
    ycc = Image.new("RGB", (1, 1), (c, m, y)).convert("YCbCr").getpixel((0, 0))
    assert isinstance(ycc, tuple)
    luma, blue, red = ycc
    stored = Image.new("CMYK", (32, 32), (255 - luma, 255 - blue, 255 - red, k))
    data = bytearray(encode(stored, "JPEG", quality=95))
    app14 = data.find(b"\xff\xee")
    assert data[app14 + 4 : app14 + 9] == b"Adobe"
    assert data[app14 + 15] == 0  # transform: none (CMYK)
    data[app14 + 15] = 2  # transform: YCCK
    return bytes(data)


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [((0, 255, 255, 0), RED), ((255, 255, 0, 0), BLUE), ((0, 0, 0, 255), (0, 0, 0))],
)
def test_ycck_jpeg_becomes_rgb(cmyk: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    source = ycck_jpeg(cmyk)
    decoded = decode(source)
    assert decoded.mode == "CMYK"
    assert decoded.info["adobe_transform"] == 2
    assert close_to(decoded.getpixel((16, 16)), cmyk, tolerance=4)

    out = decode(compress(source, ImageOptions(quality=90)).data)

    assert out.mode == "RGB"
    assert close_to(out.getpixel((16, 16)), rgb)


def test_display_p3_profile_is_converted_to_srgb() -> None:
    p3 = ImageCms.ImageCmsProfile(io.BytesIO(display_p3_icc()))
    assert ImageCms.getProfileDescription(p3).strip() == "Display P3 (test)"
    # Full P3 red clips to sRGB (255, 0, 0) with or without conversion; a slightly softer
    # P3 red is still outside sRGB and shows the difference.
    p3_red = (220, 40, 40)
    source = encode(Image.new("RGB", (16, 16), p3_red), "PNG", icc_profile=display_p3_icc())

    out = decode(compress(source, ImageOptions(format=OutputFormat.PNG)).data)

    assert "icc_profile" not in out.info
    pixel = out.getpixel((8, 8))
    assert isinstance(pixel, tuple)
    red, green, _ = pixel
    # Stripping the tag would leave (220, 40, 40): P3's wider red becomes a stronger sRGB
    # red, and the green that sRGB would need below zero is clipped to 0.
    assert red > p3_red[0] + 10
    assert green < p3_red[1] - 30
    assert close_to(pixel, (240, 0, 21), tolerance=6)
    # Neutral colours stay neutral: the white point is right.
    grey = encode(Image.new("RGB", (16, 16), (128, 128, 128)), "PNG", icc_profile=display_p3_icc())
    assert close_to(
        decode(compress(grey, ImageOptions(format=OutputFormat.PNG)).data).getpixel((8, 8)),
        (128, 128, 128),
        tolerance=1,
    )


def test_embedded_icc_profile_is_converted_and_removed() -> None:
    source = encode(Image.new("RGB", (32, 32), (200, 60, 20)), "JPEG", icc_profile=srgb_icc())
    out = decode(compress(source, ImageOptions(quality=90)).data)
    assert "icc_profile" not in out.info
    assert close_to(out.getpixel((16, 16)), (200, 60, 20), tolerance=12)


def test_an_srgb_profile_is_recognised_by_its_colours_and_costs_no_conversion() -> None:
    pixels = photo((64, 48))
    untagged = compress(encode(pixels, "PNG"), ImageOptions(quality=90))
    tagged = compress(encode(pixels, "PNG", icc_profile=srgb_icc()), ImageOptions(quality=90))
    # The same pixels reach the encoder: byte-identical outputs.
    assert tagged.data == untagged.data
    assert _is_srgb(srgb_icc())
    assert not _is_srgb(display_p3_icc())
    assert not _is_srgb(b"garbage" * 20)
    grey = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    assert not _is_srgb(grey)


def test_an_unchanged_srgb_tagged_jpeg_can_keep_its_own_bytes() -> None:
    # No conversion means no pixel change: the never-larger rule applies as if untagged.
    source = encode(photo(), "JPEG", quality=40, icc_profile=srgb_icc())
    result = compress(source, ImageOptions(quality=95))
    assert result.kept_source
    assert "icc_profile" not in decode(result.data).info
    assert len(result.data) < len(source)


def test_broken_icc_profile_falls_back_to_plain_conversion() -> None:
    source = encode(Image.new("RGB", (32, 32), (200, 60, 20)), "PNG", icc_profile=b"garbage" * 20)
    out = decode(compress(source, ImageOptions(quality=90)).data)
    assert "icc_profile" not in out.info
    assert close_to(out.getpixel((16, 16)), (200, 60, 20), tolerance=12)


def test_16_bit_grey_png_is_scaled_not_clipped() -> None:
    ramp = Image.linear_gradient("L").resize((64, 64)).convert("I")
    wide = ramp.point(lambda v: v * 257).convert("I;16")  # 0..65535 top to bottom
    source = encode(wide, "PNG")
    assert decode(source).mode == "I;16"

    out = decode(compress(source, ImageOptions(format=OutputFormat.PNG)).data)

    assert out.mode == "L"
    top, middle, bottom = (grey_at(out, (32, y)) for y in (0, 32, 63))
    assert top < 10
    assert 100 < middle < 160
    assert bottom > 245


def grey_at(img: Image.Image, xy: tuple[int, int]) -> int:
    value = img.getpixel(xy)
    assert isinstance(value, int)
    return value


def test_palette_png_becomes_rgb_jpeg() -> None:
    img = Image.new("P", (40, 20), 0)
    img.putpalette([0, 128, 0, 0, 0, 255] + [0] * (256 - 2) * 3)
    img.paste(1, (20, 0, 40, 20))
    out = decode(compress(encode(img, "PNG"), ImageOptions(quality=90)).data)
    assert out.mode == "RGB"
    assert close_to(out.getpixel((5, 10)), (0, 128, 0))
    assert close_to(out.getpixel((35, 10)), BLUE)


def test_grey_stays_grey_for_jpeg() -> None:
    grey = Image.linear_gradient("L").resize((64, 64))
    out = decode(compress(encode(grey, "PNG")).data)
    assert out.mode == "L"


def test_bilevel_image_is_handled() -> None:
    img = Image.new("1", (32, 32), 1)
    img.paste(0, (0, 0, 16, 32))
    out = decode(compress(encode(img, "BMP")).data)
    assert grey_at(out, (4, 4)) < 30
    assert grey_at(out, (28, 4)) > 225


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (30, 20), colour) for colour in (RED, BLUE, WHITE)]
    source = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert decode(source).n_frames == 3  # type: ignore[attr-defined]

    out = decode(compress(source, ImageOptions(quality=90)).data)

    assert out.size == (30, 20)
    assert close_to(out.getpixel((15, 10)), RED)


def animation(source_format: str, count: int, size: tuple[int, int] = (12, 8)) -> bytes:
    """`count` frames of distinct colours (identical frames would be merged by the writer);
    the first one red."""
    frames = [Image.new("RGB", size, (255 - i * 5, i * 5, 0)) for i in range(count)]
    params: dict[str, object] = {"lossless": True} if source_format == "WEBP" else {}
    return encode(
        frames[0], source_format, save_all=True, append_images=frames[1:], duration=40, **params
    )


@pytest.mark.parametrize("source_format", ["WEBP", "PNG"])
def test_animated_webp_and_png_give_their_first_frame(source_format: str) -> None:
    source = animation(source_format, 3, size=(30, 20))
    assert decode(source).n_frames == 3  # type: ignore[attr-defined]

    for output in OutputFormat:
        result = compress(source, ImageOptions(format=output, quality=90))
        out = decode(result.data)
        assert getattr(out, "n_frames", 1) == 1
        assert not result.kept_source
        assert out.size == (30, 20)
        assert close_to(out.convert("RGB").getpixel((15, 10)), RED)


@pytest.mark.parametrize(
    ("source_format", "message"),
    [
        ("GIF", "the animated image has more than 10 frames; the limit is 10 frames"),
        ("WEBP", "the animated image has more than 10 frames; the limit is 10 frames"),
        ("PNG", "the animated image has more than 10 frames; the limit is 10 frames"),
        ("TIFF", "the TIFF image has more than 10 pages; the limit is 10 pages"),
    ],
)
def test_too_many_frames_is_a_bomb(source_format: str, message: str) -> None:
    source = animation(source_format, 30)
    assert decode(source).n_frames == 30  # type: ignore[attr-defined]

    failure = failure_of(source, limits=ImageLimits(max_frames=10))

    assert failure.code is OutcomeCode.DECOMPRESSION_BOMB
    assert failure.message == message
    assert not failure.transient
    # Exactly at the limit is fine.
    assert compress(source, limits=ImageLimits(max_frames=30)).width == 12


def test_frames_are_counted_only_up_to_the_limit() -> None:
    gif = animation("GIF", 30)
    tiff = animation("TIFF", 30)
    assert _gif_frames(gif, stop=11) == 11
    assert _tiff_pages(tiff, stop=11) == 11
    assert _gif_frames(gif, stop=1000) == 30
    assert _tiff_pages(tiff, stop=1000) == 30
    assert ImageLimits().max_frames == 1000


def test_a_progressive_jpeg_of_too_many_scans_is_a_bomb() -> None:
    # libjpeg's progressive script: 10 scans, each a pass over every block of the image.
    source = encode(photo((64, 48)), "JPEG", quality=90, progressive=True)
    assert _jpeg_scans(source, stop=1000) == 10

    failure = failure_of(source, limits=ImageLimits(max_scans=9))

    assert failure.code is OutcomeCode.DECOMPRESSION_BOMB
    assert failure.message == ("the progressive JPEG has more than 9 scans; the limit is 9 scans")
    assert not failure.transient
    assert compress(source, limits=ImageLimits(max_scans=10)).width == 64  # at the limit
    # A baseline JPEG is one scan per component at most, and is not counted.
    baseline = encode(photo((64, 48)), "JPEG", quality=90)
    assert compress(baseline, limits=ImageLimits(max_scans=1)).width == 64
    assert ImageLimits().max_scans == 100


def test_jpeg_scans_are_counted_by_structure_and_only_up_to_the_limit() -> None:
    source = encode(photo((64, 48)), "JPEG", quality=90, progressive=True)
    # A segment whose bytes look like a scan (an EXIF thumbnail has real ones) is stepped over
    # by its length, and fill bytes before a marker are allowed.
    fake_scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * 5
    app1 = b"\xff\xe1" + (len(fake_scan) + 2).to_bytes(2, "big") + fake_scan
    padded = source[:2] + app1 + source[2:].replace(b"\xff\xda", b"\xff\xff\xda", 1)
    assert _jpeg_scans(padded, stop=1000) == 10
    assert decode(padded).size == (64, 48)
    assert _jpeg_scans(source, stop=4) == 4
    assert _jpeg_scans(b"\xff\xd8not a jpeg", stop=100) == 0


def test_gif_frame_count_agrees_with_pillow() -> None:
    # Local palettes, a comment and a loop extension between frames.
    frames = [photo((20, 10)).quantize(16 + i) for i in range(5)]
    source = encode(
        frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0, comment=b"hi"
    )
    pillow_count = decode(source).n_frames  # type: ignore[attr-defined]
    assert _gif_frames(source, stop=1000) == pillow_count == 5


def test_progressive_jpeg_input() -> None:
    original = photo()
    source = encode(original, "JPEG", quality=90, progressive=True)
    assert decode(source).info.get("progressive")

    for options, size in (
        (ImageOptions(quality=90), (320, 240)),
        (ImageOptions(quality=90, scale=0.5), (160, 120)),
    ):
        result = compress(source, options)
        out = decode(result.data)
        assert out.size == (result.width, result.height) == size
        expected = original.resize(size, Image.Resampling.LANCZOS)
        difference = ImageStat.Stat(ImageChops.difference(out.convert("RGB"), expected)).mean
        assert max(difference) < 6


@pytest.mark.parametrize(
    ("source_format", "params"),
    [("WEBP", {"quality": 90}), ("BMP", {}), ("TIFF", {}), ("GIF", {})],
)
def test_other_accepted_inputs(source_format: str, params: dict[str, object]) -> None:
    img = Image.new("RGB", (48, 32), (20, 160, 90))
    result = compress(encode(img, source_format, **params), ImageOptions(quality=90))
    out = decode(result.data)
    assert out.format == "JPEG"
    assert out.size == (48, 32)
    assert close_to(out.getpixel((24, 16)), (20, 160, 90))


# --- resizing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (ImageOptions(scale=0.5), (200, 100)),
        (ImageOptions(max_width=100), (100, 50)),
        (ImageOptions(max_height=50), (100, 50)),
        (ImageOptions(max_width=100, max_height=100), (100, 50)),
        (ImageOptions(scale=0.5, max_width=150), (150, 75)),
        (ImageOptions(scale=0.5, max_width=300), (200, 100)),
        (ImageOptions(max_width=1000, max_height=1000), (400, 200)),  # never upscales
        (ImageOptions(scale=1.0), (400, 200)),
        (ImageOptions(scale=0.001), (1, 1)),  # never below one pixel
    ],
)
def test_resize(options: ImageOptions, expected: tuple[int, int]) -> None:
    result = compress(encode(photo((400, 200)), "PNG"), options)
    assert (result.width, result.height) == expected
    assert decode(result.data).size == expected


@functools.cache
def _sources() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Sources of every kind the options meet differently, with their upright sizes."""
    return {
        "jpeg-q10-odd-sides": (encode(photo((201, 133)), "JPEG", quality=10), (201, 133)),
        "jpeg-444-rotated": (
            encode(photo((120, 75)), "JPEG", quality=90, subsampling=0, exif=exif_with(6)),
            (75, 120),
        ),
        "jpeg-grey": (encode(photo((97, 64)).convert("L"), "JPEG", quality=30), (97, 64)),
        "png-rgba": (encode(photo((90, 60)).convert("RGBA"), "PNG"), (90, 60)),
        "png-palette": (encode(photo((64, 64)).quantize(8), "PNG", optimize=True), (64, 64)),
        "webp-q5": (encode(photo((150, 100)), "WEBP", quality=5), (150, 100)),
    }


@pytest.mark.parametrize("source", list(_sources()))
@pytest.mark.parametrize(
    "options",
    [
        ImageOptions(quality=95),
        ImageOptions(quality=95, scale=0.5),
        ImageOptions(quality=95, scale=0.3),
        ImageOptions(max_width=50),
        ImageOptions(format=OutputFormat.WEBP, max_height=33),
        ImageOptions(format=OutputFormat.WEBP, quality=95),
        ImageOptions(format=OutputFormat.PNG, scale=0.25),
        ImageOptions(target_ratio=0.5, scale=0.5),
    ],
    ids=["q95", "half", "0.3", "max-width", "webp-max-height", "webp-q95", "png-quarter", "ratio"],
)
def test_every_output_keeps_the_promises_of_its_options(source: str, options: ImageOptions) -> None:
    # Invariants across source kinds and options together, where the paths meet: shrink-on-load,
    # EXIF rotation, the never-larger rule. The full-size source once came back for a half-size
    # request (shrink-on-load alone made the size, and nothing counted it as a change).
    data, (width, height) = _sources()[source]
    limit_w, limit_h = options.max_width or width, options.max_height or height

    result = compress(data, options)

    out = decode(result.data)
    assert out.size == (result.width, result.height)
    assert result.width <= min(width, limit_w) and result.height <= min(height, limit_h)
    if options.scale < 1:
        assert result.width <= math.floor(width * options.scale + 0.5)
    if result.kept_source:
        assert out.size == (width, height)
        assert len(result.data) <= len(data)


def test_large_jpeg_downscale_uses_shrink_on_load_and_keeps_the_picture() -> None:
    big = Image.new("RGB", (1600, 1200), BLUE)
    big.paste(RED, (0, 0, 800, 1200))
    result = compress(encode(big, "JPEG", quality=90), ImageOptions(scale=0.1, quality=90))
    out = decode(result.data)
    assert out.size == (160, 120)
    assert close_to(out.getpixel((20, 60)), RED)
    assert close_to(out.getpixel((140, 60)), BLUE)


def padded_jpeg(size: tuple[int, int], subsampling: int, **params: object) -> bytes:
    """A flat BLUE JPEG whose encoder filled the blocks past its edges with RED, as some
    encoders and lossless crops do (libjpeg repeats the edge pixels there): the blocks are
    coded from a larger canvas, then the frame header is given the true size."""
    width, height = size
    block = 16 if subsampling == 2 else 8  # the MCU: 4:2:0 codes 16×16 at a time
    canvas = Image.new("RGB", (-(-width // block) * block, -(-height // block) * block), RED)
    canvas.paste(BLUE, (0, 0, width, height))
    data = bytearray(encode(canvas, "JPEG", quality=90, subsampling=subsampling, **params))
    struct.pack_into(">HH", data, data.index(b"\xff\xc0") + 5, height, width)
    return bytes(data)


@pytest.mark.parametrize("subsampling", [2, 0], ids=["4:2:0", "4:4:4"])
@pytest.mark.parametrize(
    ("size", "options", "orientation", "expected"),
    [
        # The decoded sides are the target: the half-padding edge pixels take their neighbours'.
        ((65, 41), ImageOptions(scale=0.5), 1, (33, 21)),
        ((131, 83), ImageOptions(scale=0.25), 1, (33, 21)),
        ((1201, 803), ImageOptions(max_width=301), 1, (301, 201)),
        # Rotated by EXIF: the stored bottom edge is the output's left edge.
        ((65, 41), ImageOptions(scale=0.5), 6, (21, 33)),
        # A resize follows: the last decoded row and column are left out of it.
        ((131, 83), ImageOptions(scale=0.3), 1, (39, 25)),
        ((1201, 803), ImageOptions(max_width=302), 1, (302, 202)),
    ],
    ids=["half", "quarter", "max-width", "rotated", "resized-after", "max-width-resized-after"],
)
def test_shrink_on_load_leaves_out_the_encoders_padding(
    subsampling: int,
    size: tuple[int, int],
    options: ImageOptions,
    orientation: int,
    expected: tuple[int, int],
) -> None:
    # At 1/2 to 1/8 the last row and column of a side the scale does not divide average the
    # padding in: a red line along the edges (Pillow #3419, libjpeg-turbo #297), up to 175
    # levels off before this was handled. PNG output, so that only the decode is judged.
    source = padded_jpeg(size, subsampling, exif=exif_with(orientation))
    options = dataclasses.replace(options, format=OutputFormat.PNG)

    out = decode(compress(source, options).data).convert("RGB")

    assert out.size == expected
    worst = ImageChops.difference(out, Image.new("RGB", out.size, BLUE)).getextrema()
    assert max(high for _, high in worst) <= 8  # type: ignore[misc]


def test_webp_output_is_fitted_into_the_encoder_limit() -> None:
    wide = Image.new("RGB", (17_000, 20), BLUE)
    result = compress(encode(wide, "PNG"), ImageOptions(format=OutputFormat.WEBP))
    assert (result.width, result.height) == (16_383, 19)
    assert decode(result.data).size == (16_383, 19)


# --- output formats -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "pillow_format", "content_type", "extension"),
    [
        (OutputFormat.WEBP, "WEBP", "image/webp", "webp"),
        (OutputFormat.PNG, "PNG", "image/png", "png"),
        (OutputFormat.JPEG, "JPEG", "image/jpeg", "jpg"),
    ],
)
def test_output_formats(
    output: OutputFormat, pillow_format: str, content_type: str, extension: str
) -> None:
    source = encode(photo(), "JPEG", quality=95, exif=exif_with(Artist="someone"))
    result = compress(source, ImageOptions(format=output, quality=60))
    out = decode(result.data)
    assert out.format == pillow_format
    assert (result.content_type, result.extension, result.format) == (
        content_type,
        extension,
        output,
    )
    assert out.size == (320, 240)
    assert "exif" not in out.info
    assert not out.getexif()


# --- never larger than the source ---------------------------------------------------------


def test_small_optimised_jpeg_is_kept_without_metadata() -> None:
    source = encode(
        photo((96, 64)),
        "JPEG",
        quality=20,
        optimize=True,
        exif=exif_with(1, Artist="someone", ImageDescription="x" * 300),
        comment=b"a comment",
    )

    result = compress(source, ImageOptions(quality=95))

    assert result.kept_source
    assert len(result.data) < len(source)
    assert result.data.startswith(b"\xff\xd8")
    assert result.data.endswith(b"\xff\xd9")
    assert b"Exif" not in result.data
    assert b"a comment" not in result.data
    out = decode(result.data)
    assert out.size == (result.width, result.height) == (96, 64)
    assert "exif" not in out.info
    assert "comment" not in out.info
    assert out.tobytes() == decode(source).tobytes()  # the very same pixels


def test_source_is_not_kept_when_pixels_had_to_change() -> None:
    # The same tiny JPEG, but rotated by its EXIF: keeping its bytes without EXIF would show
    # it sideways, so the re-encoded (larger) result is used.
    source = encode(photo((96, 64)), "JPEG", quality=20, exif=exif_with(6))
    result = compress(source, ImageOptions(quality=95))
    assert not result.kept_source
    assert (result.width, result.height) == (64, 96)


@pytest.mark.parametrize(
    "options",
    [
        ImageOptions(quality=95, scale=0.9),  # resampled after the decode
        # Shrunk by the decoder alone (JPEG shrink-on-load gives exactly the target): the
        # full-size source must not come back as the "smaller" output.
        ImageOptions(quality=95, scale=0.5),
        ImageOptions(quality=95, scale=0.25),
        ImageOptions(quality=95, max_width=200),
    ],
    ids=["resampled", "half-by-the-decoder", "quarter-by-the-decoder", "max-width-by-the-decoder"],
)
def test_source_is_not_kept_when_resized(options: ImageOptions) -> None:
    # A q10 source so small that even its half-size q95 encoding is larger.
    source = encode(photo((400, 300)), "JPEG", quality=10)
    result = compress(source, options)
    assert not result.kept_source
    assert decode(result.data).size == (result.width, result.height)
    assert result.width < 400 and result.height < 300


def test_small_palette_png_is_kept_without_text_chunks() -> None:
    img = photo((64, 64)).quantize(4)
    info = PngInfo()
    info.add_text("Comment", "y" * 200)
    source = encode(img, "PNG", optimize=True, pnginfo=info)

    result = compress(source, ImageOptions(format=OutputFormat.PNG))

    assert result.kept_source
    out = decode(result.data)
    assert "Comment" not in out.info
    assert out.convert("RGB").tobytes() == decode(source).convert("RGB").tobytes()


def test_small_webp_is_kept_without_exif() -> None:
    source = encode(photo((64, 64)), "WEBP", quality=5, exif=exif_with(1, Artist="someone"))
    assert "exif" in decode(source).info

    result = compress(source, ImageOptions(format=OutputFormat.WEBP, quality=95))

    assert result.kept_source
    out = decode(result.data)
    assert "exif" not in out.info
    assert out.size == (64, 64)


# --- failures -----------------------------------------------------------------------------


# SVG, once in this list, now has a code of its own (test_svg_is_unsupported).
@pytest.mark.parametrize("data", [b"", b"hello, this is a text file\n" * 10])
def test_not_an_image(data: bytes) -> None:
    failure = failure_of(data)
    assert failure.code is OutcomeCode.NOT_AN_IMAGE
    assert not failure.transient


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the URL returned an empty file, not an image"),
        (b"hello, this is a text file\n", "the URL returned a file that is not an image we know"),
        (b'<?xml version="1.0"?><rss/>', "the URL returned a file that is not an image we know"),
    ],
)
def test_not_an_image_messages(data: bytes, message: str) -> None:
    failure = failure_of(data)
    assert failure.code is OutcomeCode.NOT_AN_IMAGE
    assert failure.message == message


@pytest.mark.parametrize(
    "data",
    [
        b"<svg></svg>",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
        b'<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x">\n<svg/>',
        b"\xef\xbb\xbf  \n<!-- drawn by hand -->\n<SVG></SVG>",
    ],
)
def test_svg_is_unsupported(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("SVG must be recognised before Pillow sees it")

    monkeypatch.setattr(Image, "open", tripwire)
    failure = failure_of(data)
    assert failure.code is OutcomeCode.UNSUPPORTED_FORMAT
    assert failure.message == "SVG images are not supported"
    assert not failure.transient


@pytest.mark.parametrize(
    "data",
    [
        b"<!doctype html><html><head><title>404</title></head><body>Not found</body></html>",
        b'\r\n\r\n  <!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01//EN">\n<HTML></HTML>',
        b"<html><body><svg></svg></body></html>",  # an inline SVG does not make it an SVG
        b"<!-- served by a CDN -->\n<html lang=en></html>",
        b"<head><meta charset=utf-8><title>Access denied</title></head>",
    ],
)
def test_html_page_served_as_an_image(data: bytes) -> None:
    failure = failure_of(data)
    assert failure.code is OutcomeCode.NOT_AN_IMAGE
    assert failure.message == "the URL returned an HTML page, not an image"


def test_truncated_jpeg_is_corrupt() -> None:
    source = encode(photo(), "JPEG", quality=90)
    failure = failure_of(source[: len(source) // 2])
    assert failure.code is OutcomeCode.CORRUPT_IMAGE
    assert failure.message.startswith("the image is damaged or incomplete and cannot be decoded")


def test_damaged_png_header_is_corrupt() -> None:
    source = bytearray(encode(photo((16, 16)), "PNG"))
    source[29] ^= 0xFF  # inside the IHDR CRC
    failure = failure_of(bytes(source))
    assert failure.code is OutcomeCode.CORRUPT_IMAGE
    assert failure.message == "the PNG image is damaged: its header cannot be read"


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_pixel_limit_is_checked_before_decoding() -> None:
    failure = failure_of(encode(photo((200, 100)), "PNG"), limits=ImageLimits(max_pixels=19_999))
    assert failure.code is OutcomeCode.DECOMPRESSION_BOMB
    assert "200x100" in failure.message
    assert failure.message == "the image is 200x100 pixels; the limit is 19,999 pixels"


def test_header_claiming_a_huge_image_is_a_bomb() -> None:
    failure = failure_of(png_claiming(60_000, 60_000))  # Pillow's own hard limit
    assert failure.code is OutcomeCode.DECOMPRESSION_BOMB


def test_header_over_our_limit_is_a_bomb_before_any_decoding() -> None:
    # 8000x8000 = 64 M pixels: under Pillow's warning threshold, over our default 50 M.
    failure = failure_of(png_claiming(8000, 8000))
    assert failure.code is OutcomeCode.DECOMPRESSION_BOMB
    assert failure.message == "the image is 8000x8000 pixels; the limit is 50 megapixels"


def test_png_claiming_30000_by_30000_is_a_bomb_before_decoding() -> None:
    # Its one IDAT byte stream holds a single pixel: decoding would fail as corrupt.
    failure = failure_of(png_claiming(30_000, 30_000))
    assert failure.code is OutcomeCode.DECOMPRESSION_BOMB
    assert failure.message == "the image has 900 megapixels; the limit is 50 megapixels"


def test_refused_format_ico() -> None:
    failure = failure_of(encode(Image.new("RGB", (32, 32), RED), "ICO"))
    assert failure.code is OutcomeCode.UNSUPPORTED_FORMAT
    assert "ICO" in failure.message
    assert failure.message == (
        "ICO images are not supported; send JPEG, PNG, GIF, WebP, BMP or TIFF"
    )


def test_eps_is_refused_without_running_its_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    Image.init()
    _, accept = Image.OPEN["EPS"]

    def tripwire(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("the EPS parser must never see untrusted bytes")

    monkeypatch.setitem(Image.OPEN, "EPS", (tripwire, accept))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"

    failure = failure_of(eps)

    assert failure.code is OutcomeCode.UNSUPPORTED_FORMAT
    assert "EPS" in failure.message


def test_failure_str_names_the_code() -> None:
    assert str(failure_of(b"nope")).startswith("NOT_AN_IMAGE: ")


# --- options ------------------------------------------------------------------------------


def test_default_options_are_valid() -> None:
    assert ImageOptions().validate() == []
    assert ImageOptions(OutputFormat.PNG, 95, 0.01, 10, 10).validate() == []


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (ImageOptions(quality=0), "quality"),
        (ImageOptions(quality=96), "quality"),
        (ImageOptions(scale=0), "scale"),
        (ImageOptions(scale=1.5), "scale"),
        (ImageOptions(scale=float("nan")), "scale"),
        (ImageOptions(max_width=-1), "max_width"),
        (ImageOptions(max_height=-5), "max_height"),
        (ImageOptions(format="gif"), "format"),  # type: ignore[arg-type]
    ],
)
def test_bad_options_are_named(options: ImageOptions, field: str) -> None:
    problems = options.validate()
    assert len(problems) == 1
    assert problems[0].startswith(field)


def test_every_bad_field_is_reported_at_once() -> None:
    problems = ImageOptions(quality=0, scale=2, max_width=-1, max_height=-1).validate()
    assert [p.split()[0] for p in problems] == ["quality", "scale", "max_width", "max_height"]


def test_compress_refuses_invalid_options() -> None:
    with pytest.raises(ValueError, match="quality"):
        compress(encode(photo(), "PNG"), ImageOptions(quality=0))


# --- thread safety ------------------------------------------------------------------------


def test_concurrent_calls_match_serial_results() -> None:
    sources = [
        encode(photo((120 + i * 8, 90)), fmt)
        for i, fmt in enumerate(["PNG", "JPEG", "WEBP", "GIF"] * 3)
    ]
    options = [ImageOptions(format=OutputFormat(f)) for f in ("jpeg", "webp", "png")]
    jobs = [(s, o) for s in sources for o in options]
    serial = [compress(s, o).data for s, o in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda job: compress(*job).data, jobs))
    assert parallel == serial


@pytest.mark.parametrize(
    "options",
    [ImageOptions(effort=Effort.FAST), ImageOptions(), ImageOptions(format=OutputFormat.WEBP)],
    ids=["fast", "balanced", "webp"],
)
def test_an_rgb_photo_is_never_copied(
    options: ImageOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy of a decoded photo is not only a memcpy: two photo-sized blocks alive at once push
    # glibc's heap past its trim threshold, and every photo after it is faulted in afresh
    # (docs/performance.md, "The plain loop's two speeds"). convert() to the same mode copies,
    # and so does Pillow's save() of an image not loaded yet.
    copies: list[tuple[int, int]] = []
    real_copy = Image.Image.copy

    def counting_copy(self: Image.Image) -> Image.Image:
        copies.append(self.size)
        return real_copy(self)

    monkeypatch.setattr(Image.Image, "copy", counting_copy)
    monkeypatch.setattr(Image.Image, "_copy", lambda self: copies.append(self.size))
    result = compress(encode(photo((640, 480)), "JPEG", quality=90), options)
    assert result.width == 640
    assert (640, 480) not in copies
