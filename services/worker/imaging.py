"""Decode, normalise, resize and encode one image: pure, synchronous and thread-safe.

The worker runs `compress` in a thread pool. Nothing here touches global Pillow state (no
`Image.MAX_IMAGE_PIXELS`, no warning filters, no `LOAD_TRUNCATED_IMAGES`): every limit is
checked per call, so concurrent calls cannot interfere.

Every ImageFailure message is written for the merchant who sent the image: what is wrong with
it, in plain words, with the size or limit involved.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageChops, ImageCms, UnidentifiedImageError

from services.common.image_options import Effort, ImageLimits, ImageOptions, OutputFormat
from services.common.outcome import ImageFailure, OutcomeCode
from services.worker import tuning
from services.worker.budget import PixelBudget

# Pillow plugins we let parse untrusted bytes. Everything else (EPS runs Ghostscript, PDF,
# ICO, PSD, ...) is refused before its parser ever sees the data.
ACCEPTED_INPUT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# What Pillow raises from inside a decoder on bad data. Confined to the calls that decode.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    ZeroDivisionError,
)

_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


_CONTENT_TYPE = {
    OutputFormat.JPEG: "image/jpeg",
    OutputFormat.WEBP: "image/webp",
    OutputFormat.PNG: "image/png",
    OutputFormat.AVIF: "image/avif",
}
_ENCODER_MAX_SIDE = {
    OutputFormat.JPEG: 65_500,
    OutputFormat.WEBP: 16_383,
    OutputFormat.PNG: 2**31 - 1,
    # AV1 allows 65,536, but libavif's decoders refuse more than 32,768 by default, and an
    # output few viewers can open is no output; WebP's limit keeps auto's candidates equal.
    OutputFormat.AVIF: 16_383,
}
_EXTENSION = {
    OutputFormat.JPEG: "jpg",
    OutputFormat.WEBP: "webp",
    OutputFormat.PNG: "png",
    OutputFormat.AVIF: "avif",
}
# Pillow's name for the source format that counts as "already in the output format" (AVIF is
# not an accepted input, so an AVIF output is always a new encoding).
_SAME_SOURCE_FORMATS = {
    OutputFormat.JPEG: ("JPEG", "MPO"),
    OutputFormat.WEBP: ("WEBP",),
    OutputFormat.PNG: ("PNG",),
    OutputFormat.AVIF: (),
}


# Frozen, so one instance serves every call that passes none.
_DEFAULT_OPTIONS = ImageOptions()
_DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True, slots=True)
class Compressed:
    data: bytes
    width: int
    height: int
    format: OutputFormat  # never AUTO: the format auto chose for this image
    content_type: str  # image/jpeg ...
    extension: str  # "jpg", "webp", "png", "avif"
    kept_source: bool  # True when the never-larger rule kept the source bytes
    # Against the normalised, resized source (services/worker/quality.py); None when not
    # measured (effort=fast without a goal that needs it).
    ssim: float | None = 1.0
    quality: int = 0  # the quality setting used; 0 for PNG and for the source's own bytes
    note: str = ""  # "TARGET_NOT_MET" when target_ratio or min_ssim could not be reached
    encodes: int = 0  # how many encodes choosing the output took
    # Seconds spent on the two halves, for the worker's stage metrics: opening, decoding,
    # normalising and resizing (not waiting for the pixel budget); then encoding and the
    # never-larger check.
    decode_seconds: float = 0.0
    encode_seconds: float = 0.0


def compress(
    data: bytes,
    options: ImageOptions = _DEFAULT_OPTIONS,
    limits: ImageLimits = _DEFAULT_LIMITS,
    budget: PixelBudget | None = None,
) -> Compressed:
    """Decode, normalise, resize, encode.

    Normalising applies EXIF orientation, converts to sRGB (CMYK and embedded ICC profiles),
    brings 16-bit and palette images to 8-bit RGB or grey, flattens alpha on white for JPEG
    (kept for WebP and PNG), takes the first frame of animations and drops all metadata.
    The encoding (quality, and format under auto) is chosen by services/worker/tuning.py as
    `target_ratio`, `min_ssim` or `format` ask, and its SSIM against the normalised, resized
    image is measured (`ssim`, `quality`, `note` of the result; `ssim` is None under
    `effort=fast` unless `min_ssim` or auto needed it).
    When the source is already in the output format, needs no pixel change and is smaller than
    the new encoding, its own bytes are returned with metadata removed (`kept_source=True`).

    Refused before any pixel is decoded: more than `limits.max_pixels` pixels, more than
    `limits.max_frames` frames or a progressive JPEG of more than `limits.max_scans` scans
    (DECOMPRESSION_BOMB); SVG (UNSUPPORTED_FORMAT) and HTML pages
    (NOT_AN_IMAGE) are told apart from other non-images by their first bytes.

    With a `budget`, the decode and encode wait until the image's pixels (after JPEG
    shrink-on-load) fit in it beside the other threads' images.

    Raises ImageFailure (NOT_AN_IMAGE, UNSUPPORTED_FORMAT, DECOMPRESSION_BOMB, CORRUPT_IMAGE);
    ValueError when `options` are invalid.
    """
    started, waited = time.perf_counter(), 0.0
    problems = options.validate()
    if problems:
        raise ValueError("; ".join(problems))
    output = OutputFormat(options.format)
    with _open(data, limits) as img, contextlib.ExitStack() as held:
        source_format = img.format or ""
        width, height = img.size
        frames = _frames_within_limits(img, data, limits)
        try:
            animated = frames > 1
            img.seek(0)
            orientation = _orientation(img)
            swapped = orientation in (5, 6, 7, 8)
            upright = (height, width) if swapped else (width, height)
            target = _target_size(upright, options)
            stored_target = (target[1], target[0]) if swapped else target
            scale = 1
            if source_format in ("JPEG", "MPO") and target != upright:
                scale = shrink_on_load(img, stored_target)
            if budget is not None:
                waiting = time.perf_counter()
                held.enter_context(budget.reserve(img.width * img.height))
                waited = time.perf_counter() - waiting
            img.load()
        except Image.DecompressionBombError as exc:
            raise _bomb(exc, limits) from exc
        except _DECODE_ERRORS as exc:
            raise ImageFailure(OutcomeCode.CORRUPT_IMAGE, _describe(exc)) from exc
        normal, changed = _normalise(
            without_padding(img, (width, height), scale, stored_target), orientation, output
        )
        # A new size is new pixels, whether the decoder's scaling made it or the resize below.
        changed = changed or animated or target != upright
        if normal.size != target:
            normal = normal.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        decoded = time.perf_counter()
        chosen = tuning.choose(
            normal,
            output=output,
            requested=options.quality,
            effort=Effort(options.effort),
            target_ratio=options.target_ratio,
            min_ssim=options.min_ssim,
            source_bytes=len(data),
        )
    decode_seconds = decoded - started - waited
    if not changed and source_format in _SAME_SOURCE_FORMATS[chosen.format]:
        stripped = _strip_metadata(chosen.format, data)
        if stripped is not None and len(stripped) < len(chosen.data):
            # The source's own pixels: nothing was lost. The goal is judged on what is kept.
            kept = tuning.Choice(stripped, chosen.format, 0, 1.0, "", chosen.encodes)
            note = _goal_note(kept, options, len(data))
            return _result(kept, note, normal.size, True, decode_seconds, decoded)
    return _result(chosen, chosen.note, normal.size, False, decode_seconds, decoded)


def _goal_note(kept: tuning.Choice, options: ImageOptions, source_bytes: int) -> str:
    if options.target_ratio and len(kept.data) > math.floor(options.target_ratio * source_bytes):
        return tuning.TARGET_NOT_MET
    return ""  # kept source bytes have SSIM 1.0, which meets any min_ssim


def _result(
    chosen: tuning.Choice,
    note: str,
    size: tuple[int, int],
    kept_source: bool,
    decode_seconds: float,
    encode_began: float,  # perf_counter() when encoding began
) -> Compressed:
    return Compressed(
        data=chosen.data,
        width=size[0],
        height=size[1],
        format=chosen.format,
        content_type=_CONTENT_TYPE[chosen.format],
        extension=_EXTENSION[chosen.format],
        kept_source=kept_source,
        ssim=chosen.ssim,
        quality=chosen.quality,
        note=note,
        encodes=chosen.encodes,
        decode_seconds=decode_seconds,
        encode_seconds=time.perf_counter() - encode_began,
    )


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    markup = _sniff_markup(data)
    if markup is not None:
        raise markup
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_INPUT_FORMATS)
    except UnidentifiedImageError as exc:
        raise _unidentified(data) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning only arrives as an exception where warnings are errors (the tests);
        # elsewhere it is logged by Pillow and our own pixel check refuses the image.
        raise _bomb(exc, limits) from exc
    except _DECODE_ERRORS as exc:
        raise ImageFailure(OutcomeCode.CORRUPT_IMAGE, _describe(exc)) from exc


_SVG_PROLOGUES = (b"<?xml", b"<!doctype svg", b"<!--")
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<meta", b"<title")


def _sniff_markup(data: bytes) -> ImageFailure | None:
    """SVG and HTML, told from their first bytes before any Pillow plugin sees them: a CDN's
    error page served as image/jpeg deserves a clearer word than "not an image"."""
    head = data[:4096].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if not head.startswith(b"<"):
        return None  # no format we accept starts with "<"
    if head.startswith(_HTML_STARTS):
        return ImageFailure(OutcomeCode.NOT_AN_IMAGE, "the URL returned an HTML page, not an image")
    if head.startswith(b"<svg") or (head.startswith(_SVG_PROLOGUES) and b"<svg" in head):
        return ImageFailure(OutcomeCode.UNSUPPORTED_FORMAT, "SVG images are not supported")
    if head.startswith(b"<!--") and b"<html" in head:
        return ImageFailure(OutcomeCode.NOT_AN_IMAGE, "the URL returned an HTML page, not an image")
    return None


def _unidentified(data: bytes) -> ImageFailure:
    """Tell a damaged accepted image, a refused format and a non-image apart, using only the
    plugins' signature checks (never their parsers)."""
    if not data:
        return ImageFailure(
            OutcomeCode.NOT_AN_IMAGE, "the URL returned an empty file, not an image"
        )
    Image.init()
    prefix = data[:16]
    recognised = [name for name, (_, accept) in Image.OPEN.items() if _accepts(accept, prefix)]
    accepted = [name for name in recognised if name in ACCEPTED_INPUT_FORMATS]
    if accepted:
        return ImageFailure(
            OutcomeCode.CORRUPT_IMAGE,
            f"the {accepted[0]} image is damaged: its header cannot be read",
        )
    if recognised:
        return ImageFailure(
            OutcomeCode.UNSUPPORTED_FORMAT,
            f"{recognised[0]} images are not supported; send JPEG, PNG, GIF, WebP, BMP or TIFF",
        )
    return ImageFailure(
        OutcomeCode.NOT_AN_IMAGE, "the URL returned a file that is not an image we know"
    )


def _accepts(accept: Callable[[bytes], bool | str] | None, prefix: bytes) -> bool:
    if accept is None:
        return False
    try:
        return bool(accept(prefix))
    except (SyntaxError, IndexError, TypeError, struct.error):  # as Image.open treats them
        return False


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"the image is damaged or incomplete and cannot be decoded ({text})"


# Pillow's own bomb check, which runs first for headers far beyond any sane limit.
_PILLOW_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def _bomb(exc: Exception, limits: ImageLimits) -> ImageFailure:
    found = _PILLOW_BOMB.search(str(exc))
    if found is None:
        message = f"the image has more pixels than the limit of {_pixels(limits.max_pixels)}"
    else:
        pixels, pillow_limit = int(found[1]), int(found[2])
        limit = min(limits.max_pixels, pillow_limit)
        message = f"the image has {_pixels(pixels)}; the limit is {_pixels(limit)}"
    return ImageFailure(OutcomeCode.DECOMPRESSION_BOMB, message)


def _pixels(count: int) -> str:
    """ "50 megapixels", "12.3 megapixels", "19,999 pixels"."""
    if count < 1_000_000:
        return f"{count:,} pixels"
    return f"{count / 1e6:.1f}".removesuffix(".0") + " megapixels"


# --- frames: counted from the file structure, never decoded ---------------------------------


def _frames_within_limits(img: Image.Image, data: bytes, limits: ImageLimits) -> int:
    """The image's frame count, once its header shows nothing that decoding could make
    costly past `limits`: its pixels, frames and, for a progressive JPEG, scans. Raises
    DECOMPRESSION_BOMB otherwise."""
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageFailure(
            OutcomeCode.DECOMPRESSION_BOMB,
            f"the image is {width}x{height} pixels; the limit is {_pixels(limits.max_pixels)}",
        )
    frames = _count_frames(img, data, stop=limits.max_frames + 1)
    if frames > limits.max_frames:
        what, unit = (
            ("TIFF image", "pages") if img.format == "TIFF" else ("animated image", "frames")
        )
        raise ImageFailure(
            OutcomeCode.DECOMPRESSION_BOMB,
            f"the {what} has more than {limits.max_frames} {unit}; the limit is "
            f"{limits.max_frames} {unit}",
        )
    progressive = img.format in ("JPEG", "MPO") and img.info.get("progressive")
    if progressive and _jpeg_scans(data, stop=limits.max_scans + 1) > limits.max_scans:
        raise ImageFailure(
            OutcomeCode.DECOMPRESSION_BOMB,
            f"the progressive JPEG has more than {limits.max_scans} scans; the limit is"
            f" {limits.max_scans} scans",
        )
    return frames


def _count_frames(img: Image.Image, data: bytes, *, stop: int) -> int:
    """How many frames (or pages) the image holds, counted up to `stop`.

    Pillow's own count walks a GIF frame by frame and a TIFF page by page, in Python, to the
    end of the file; here both stop at `stop`. WebP (libwebp's demuxer), APNG (its acTL chunk)
    and MPO (its index) state the count in a header that Pillow has already read.
    """
    if img.format == "GIF":
        return _gif_frames(data, stop)
    if img.format == "TIFF":
        return _tiff_pages(data, stop)
    count = getattr(img, "n_frames", 1)
    return count if isinstance(count, int) and count > 0 else 1


def _jpeg_scans(data: bytes, stop: int) -> int:
    """Scans (SOS segments) of a JPEG's first image, counted up to `stop`.

    A progressive decoder goes over the whole image once per scan, and a scan may be a few
    bytes (one coefficient bit of every block, in end-of-band runs), so thousands of scans
    make a small file that costs seconds of CPU. Marker segments are stepped over by their
    lengths, entropy-coded data to the next marker (as `_strip_jpeg` does); anything
    unexpected ends the count (the decoder has the last word on damage)."""
    scans, i = 0, 2
    while scans < stop and (found := _jpeg_marker(data, i)) is not None:
        i, marker = found
        if marker == 0xD9:  # end of the first image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # restart markers, TEM: no length
            i += 2
            continue
        end = _jpeg_segment_end(data, i)
        if end is None:
            break
        i = end
        if marker == 0xDA:
            scans += 1
            scan_end = _NEXT_MARKER.search(data, i)
            if scan_end is None:
                break
            i = scan_end.start()
    return scans


def _gif_frames(data: bytes, stop: int) -> int:
    """Image descriptors in a GIF's block structure, up to `stop`. Anything unexpected ends
    the count (Pillow, decoding only the first frame, has the last word on damage)."""
    if len(data) < 13:
        return 1
    screen_flags = data[10]
    i = 13 + (3 << ((screen_flags & 7) + 1) if screen_flags & 0x80 else 0)
    frames, n = 0, len(data)
    while i < n and frames < stop:
        introducer = data[i]
        if introducer == 0x21:  # extension: a label, then sub-blocks
            i += 2
        elif introducer == 0x2C:  # image descriptor, local palette, LZW code size, sub-blocks
            frames += 1
            if i + 10 > n:
                break
            flags = data[i + 9]
            i += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
        else:  # 0x3B trailer, or not GIF structure
            break
        while i < n:  # sub-blocks, each a length byte and that many bytes; 0 ends them
            size = data[i]
            i += 1 + size
            if size == 0:
                break
    return max(frames, 1)


def _tiff_pages(data: bytes, stop: int) -> int:
    """The chain of image file directories in a TIFF or BigTIFF, followed up to `stop` (a
    loop or a bad offset ends it)."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 16:
        return 1
    pages = 0
    try:
        (version,) = struct.unpack_from(order + "H", data, 2)
        if version == 42:
            count_format, entry_size, offset_format = "H", 12, "I"
            (offset,) = struct.unpack_from(order + "I", data, 4)
        elif version == 43:
            count_format, entry_size, offset_format = "Q", 20, "Q"
            (offset,) = struct.unpack_from(order + "Q", data, 8)
        else:
            return 1
        seen: set[int] = set()
        while offset and offset not in seen and pages < stop:
            seen.add(offset)
            (entries,) = struct.unpack_from(order + count_format, data, offset)
            pages += 1
            after = offset + struct.calcsize(count_format) + entries * entry_size
            (offset,) = struct.unpack_from(order + offset_format, data, after)
    except struct.error:
        pass  # an offset past the end ends the chain; Pillow judges the damage when decoding
    return max(pages, 1)


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return 1  # unreadable EXIF: show the pixels as stored
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _target_size(size: tuple[int, int], options: ImageOptions) -> tuple[int, int]:
    """Scale and the max box together, keeping the aspect ratio, never upscaling; also fitted
    into the largest side the output encoder can write."""
    width, height = size
    factor = min(1.0, float(options.scale))
    if options.max_width:
        factor = min(factor, options.max_width / width)
    if options.max_height:
        factor = min(factor, options.max_height / height)
    output = OutputFormat(options.format)
    encoder_limit = min(_ENCODER_MAX_SIDE[f] for f in tuning.AUTO_CANDIDATES.get(output, (output,)))
    factor = min(factor, encoder_limit / max(width, height))
    if factor >= 1.0:
        return size
    return max(1, math.floor(width * factor + 0.5)), max(1, math.floor(height * factor + 0.5))


def draft_scale(stored: tuple[int, int], target: tuple[int, int]) -> int:
    """The largest of 1/2, 1/4 or 1/8 (as 2, 4 or 8; 1 for none) by which the JPEG decoder can
    shrink an image of `stored` pixels and still decode at least `target` (shrink-on-load:
    DCT scaling is nearly free, while a resize after a full decode is not).

    The decoder rounds a scaled side up, so 801 rows at 1/2 give 401, enough for a target of
    401. Pillow picks its scale by floor division instead (801 // 401 = 1) and would decode
    all 801 rows, then resample them.
    """
    width, height = stored
    for scale in (8, 4, 2):
        if scale <= min(width, height) and all(
            -(-side // scale) >= want for side, want in ((width, target[0]), (height, target[1]))
        ):
            return scale
    return 1


def shrink_on_load(img: Image.Image, target: tuple[int, int]) -> int:
    """Ask the JPEG decoder of `img` to shrink it by draft_scale on load; that scale."""
    scale = draft_scale(img.size, target)
    if scale > 1:
        # The floor of the scaled sides, so that Pillow's floor division takes our scale.
        img.draft(None, (img.width // scale, img.height // scale))
    return scale


def without_padding(
    img: Image.Image, stored: tuple[int, int], scale: int, target: tuple[int, int]
) -> Image.Image:
    """`img`, decoded at 1/`scale` from `stored` pixels, without the edge pixels that mix in
    the encoder's padding; `target` is the size wanted, in the same orientation.

    A JPEG codes whole 8×8 blocks, so an encoder fills the blocks past the right and bottom
    edges with something. libjpeg repeats the edge pixels; other encoders, and lossless crops
    (`jpegtran -crop`), leave other pixels there. A full decode crops them away, but at 1/2 to
    1/8 the last row or column of a side that `scale` does not divide averages the last source
    rows with that padding: a line of another colour along the edge (Pillow #3419,
    libjpeg-turbo #297). That row or column is cropped when the resize that follows still has
    at least the target's pixels without it; otherwise the decoded side is the target, and the
    edge pixels take their neighbours' values.
    """
    if scale == 1:
        return img
    width, height = img.size
    whole = (stored[0] // scale, stored[1] // scale)  # the scaled pixels with no padding in them
    if whole[0] < width and whole[0] < target[0]:
        img.paste(img.crop((width - 2, 0, width - 1, height)), (width - 1, 0))
        whole = (width, whole[1])
    if whole[1] < height and whole[1] < target[1]:
        img.paste(img.crop((0, height - 2, width, height - 1)), (0, height - 1))
        whole = (whole[0], height)
    return img if whole == img.size else img.crop((0, 0, *whole))


def _normalise(
    img: Image.Image, orientation: int, output: OutputFormat
) -> tuple[Image.Image, bool]:
    """Upright, sRGB, 8-bit, in a mode the output encoder takes. `changed` is True when the
    pixels differ from the stored ones (not merely re-represented, as palette to RGB is)."""
    changed = False
    icc = img.info.get("icc_profile")
    if orientation != 1:
        # The same table as ImageOps.exif_transpose, from the orientation already read.
        img = img.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
        changed = True
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit_grey(img)
        changed = True
        icc = None  # a grey profile describes the 16-bit data; the scaled copy is plain grey
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("P", "PA") or (img.mode in ("L", "RGB") and img.has_transparency_data):
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
    if img.mode in ("La", "RGBa"):
        img = img.convert({"La": "LA", "RGBa": "RGBA"}[img.mode])
    if icc and img.mode in ("RGB", "RGBA") and _is_srgb(icc):
        icc = None  # sRGB under some name: its pixels are what the output means already
    if icc or img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = _to_srgb(img, icc)
        changed = True
    img = tuning.for_output(img, output)
    img.info = {}  # no EXIF, ICC, XMP, comments or DPI reach the encoder
    return img, changed


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey to 8-bit by scaling, not clipping (clipping turns it white)."""
    if img.mode.startswith("I;16"):
        wide, bottom, top = img.convert("I"), 0.0, 65535.0
    else:  # "I" or "F": scale the range the data uses
        wide = img
        low, high = wide.getextrema()
        assert isinstance(low, int | float)
        assert isinstance(high, int | float)
        if low >= 0 and high <= 255:
            return wide.convert("L")
        bottom, top = (0.0, 65535.0) if low >= 0 and high <= 65535 else (float(low), float(high))
    factor = 255.0 / ((top - bottom) or 1.0)
    return wide.point(lambda v: (v - bottom) * factor).convert("L")


_CONVERSION_FLAGS = ImageCms.Flags.BLACKPOINTCOMPENSATION


@functools.lru_cache(maxsize=32)
def _is_srgb(icc: bytes) -> bool:
    """True when the RGB profile `icc` maps every colour of a 16-level cube to itself in sRGB,
    within one level: sRGB, whatever its name or version. Converting through such a profile
    cost 30 ms on a 1200 px photo (LittleCMS, per pixel) to change nothing. Decided once per
    distinct profile: a catalog's images carry a handful between them."""
    levels = range(0, 256, 17)
    cube = bytes(channel for r in levels for g in levels for b in levels for channel in (r, g, b))
    probe = Image.frombytes("RGB", (64, 64), cube)
    try:
        transform = ImageCms.buildTransform(
            ImageCms.ImageCmsProfile(io.BytesIO(icc)),
            ImageCms.createProfile("sRGB"),
            "RGB",
            "RGB",
            flags=_CONVERSION_FLAGS,
        )
        converted = ImageCms.applyTransform(probe, transform)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return False  # not an RGB profile, or broken: _to_srgb decides what to do with it
    assert converted is not None
    extrema = ImageChops.difference(converted, probe).getextrema()
    return all(high <= 1 for _, high in extrema)  # type: ignore[misc]


def _to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    alpha = img.getchannel("A") if img.mode in ("LA", "RGBA") else None
    colour_mode = {"LA": "L", "RGBA": "RGB"}.get(img.mode, img.mode)
    colour = img.convert(colour_mode) if colour_mode != img.mode else img
    converted: Image.Image | None = None
    if icc:
        try:
            converted = ImageCms.profileToProfile(
                colour,
                ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                ImageCms.createProfile("sRGB"),
                outputMode="RGB",
                flags=_CONVERSION_FLAGS,
            )
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            converted = None  # a broken or mismatched profile: fall back to a plain conversion
    if converted is None:
        if colour.mode in ("L", "RGB"):
            converted = colour
        else:
            try:
                converted = colour.convert("RGB")
            except ValueError as exc:
                raise ImageFailure(
                    OutcomeCode.UNSUPPORTED_FORMAT,
                    f"the image uses the {img.mode} colour mode, which is not supported",
                ) from exc
    if alpha is None:
        return converted
    if converted.mode == "L":
        converted.putalpha(alpha)
        return converted
    rgba = converted.convert("RGBA")
    rgba.putalpha(alpha)
    return rgba


# --- never-larger rule: the source's own bytes without metadata -----------------------------


def _strip_metadata(output: OutputFormat, data: bytes) -> bytes | None:
    """The source bytes with metadata removed, or None when the structure is not what we
    expect (then the new encoding is used)."""
    if output is OutputFormat.JPEG:
        return _strip_jpeg(data)
    if output is OutputFormat.PNG:
        return _strip_png(data)
    return _strip_webp(data)


_JPEG_KEEP_APP = (0xE0, 0xEE)  # APP0 JFIF, APP14 Adobe (its transform flag decides the colours)
# In entropy-coded data, 0xFF followed by 0x00 (a stuffed byte), a restart marker or another
# 0xFF (fill) is still data; anything else ends the scan. One C-level search instead of a
# Python loop over every 0xFF, of which a q90 photo has hundreds per scan.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _strip_jpeg(data: bytes) -> bytes | None:
    """Drop APP1..APP15 (EXIF, XMP, ICC, MPF, ...) except APP14, and COM segments; keep every
    other segment and the entropy-coded data byte for byte; stop at the first EOI, which also
    drops the extra images an MPO file appends."""
    if not data.startswith(b"\xff\xd8"):
        return None
    out = [b"\xff\xd8"]
    i = 2
    while True:
        found = _jpeg_marker(data, i)
        if found is None:
            return None
        i, marker = found
        if marker == 0xD9:
            out.append(b"\xff\xd9")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # restart markers, TEM: no length
            out.append(data[i : i + 2])
            i += 2
            continue
        end = _jpeg_segment_end(data, i)
        if end is None:
            return None
        if not _jpeg_metadata(marker):
            out.append(data[i:end])
        i = end
        if marker == 0xDA:  # start of scan: copy entropy-coded data up to the next marker
            scan_end = _NEXT_MARKER.search(data, i)
            if scan_end is None:
                return None
            out.append(data[i : scan_end.start()])
            i = scan_end.start()


def _jpeg_marker(data: bytes, i: int) -> tuple[int, int] | None:
    """The marker at `i` (after any fill bytes): its position and code; None if none is."""
    n = len(data)
    if i + 1 >= n or data[i] != 0xFF:
        return None
    while i + 1 < n and data[i + 1] == 0xFF:  # fill bytes before a marker
        i += 1
    if i + 1 >= n:
        return None
    return i, data[i + 1]


def _jpeg_segment_end(data: bytes, i: int) -> int | None:
    """Where the segment whose marker is at `i` ends, by its length field; None if it
    overruns the data or is shorter than its own length field."""
    if i + 4 > len(data):
        return None
    end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return end if i + 4 <= end <= len(data) else None


def _jpeg_metadata(marker: int) -> bool:
    """APPn segments but JFIF and Adobe, and comments: what stripping drops."""
    return (0xE0 <= marker <= 0xEF and marker not in _JPEG_KEEP_APP) or marker == 0xFE


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_KEEP = (b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND")


def _strip_png(data: bytes) -> bytes | None:
    """Keep only the chunks that define the pixels: IHDR, PLTE, tRNS, IDAT, IEND."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    out = [_PNG_SIGNATURE]
    i, n = len(_PNG_SIGNATURE), len(data)
    while i + 12 <= n:
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        end = i + 12 + length
        if end > n:
            return None
        if kind in _PNG_KEEP:
            out.append(data[i:end])
        if kind == b"IEND":
            return b"".join(out)
        i = end
    return None


_WEBP_DROP = (b"EXIF", b"XMP ", b"ICCP")
_VP8X_METADATA_FLAGS = 0x20 | 0x08 | 0x04  # ICC, EXIF, XMP


def _strip_webp(data: bytes) -> bytes | None:
    """Drop the EXIF, XMP and ICCP chunks and clear their flags in VP8X."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    n = min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    chunks = []
    i = 12
    while i + 8 <= n:
        kind = data[i : i + 4]
        size = int.from_bytes(data[i + 4 : i + 8], "little")
        end = i + 8 + size + (size & 1)
        if i + 8 + size > n:
            return None
        chunk = data[i : min(end, n)]
        if kind == b"VP8X" and size >= 1:
            chunk = chunk[:8] + bytes([chunk[8] & ~_VP8X_METADATA_FLAGS & 0xFF]) + chunk[9:]
        if kind not in _WEBP_DROP:
            chunks.append(chunk)
        i = end
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + len(body).to_bytes(4, "little") + body
