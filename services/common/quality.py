"""Measured quality: SSIM of an output against its source, cheap enough to run on every image.

SSIM (structural similarity, Wang et al. 2004) compares local means, contrasts and structure
of two images: 1.0 means identical pixels; around 0.95 a viewer at normal size is hard put to
tell the two apart; below about 0.90 the artefacts show. Here it is computed on luminance
only (ITU-R 601 luma, what the eye is most sensitive to) of a pair downscaled to at most
512 px on the long side, so one measurement costs a few milliseconds whatever the image size.

The formula is scikit-image's default `structural_similarity(..., data_range=255)`: a uniform
7x7 window, K1 = 0.01, K2 = 0.03, sample (co)variances (divided by 48), and the mean taken
over the pixels whose window lies inside the image. tests/unit/test_quality.py checks the two
agree. The window sums are running sums over a flat array (a handful of NumPy operations,
none of them strided), in one scratch buffer per thread: fresh arrays of this size are often
new pages from the kernel, and faulting them in cost more than the arithmetic.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from PIL import Image

MAX_SIDE = 512  # the long side of the pair SSIM is computed on
WINDOW = 7  # scikit-image's default uniform window
_N = WINDOW * WINDOW
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2
# With window sums S (not means) and sample covariances, SSIM's two factors scale by N**2 and
# N * (N - 1) after cancelling: these are C1 and C2 in those units.
_K1 = _C1 * _N * _N
_K2 = _C2 * _N * (_N - 1)
_SCRATCH_LIMIT = 3 * 4 * MAX_SIDE * MAX_SIDE  # float32s kept per thread (12 MiB at most)
_scratch = threading.local()


def luminance(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """`img` as 8-bit luma, flattened on white where it has alpha, box-downscaled to `size`
    (default: at most MAX_SIDE on the long side, aspect kept). Encoders may change the colour
    of fully transparent pixels at will; on white they all look the same, as on a web page.

    The downscale first halves by whole factors (Image.reduce: exact 2x2 box means, cheap),
    then box-resamples the rest, as a JPEG decoded with draft() at 1/2, 1/4 or 1/8 does."""
    if img.mode in ("LA", "RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    grey = img.convert("L")
    size = size or reduced_size(grey.size)
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BOX, reducing_gap=1.0)
    return np.asarray(grey)


def reduced_size(size: tuple[int, int]) -> tuple[int, int]:
    """`size` scaled to at most MAX_SIDE on the long side (never up)."""
    width, height = size
    factor = min(1.0, MAX_SIDE / max(width, height))
    return max(1, math.floor(width * factor + 0.5)), max(1, math.floor(height * factor + 0.5))


def ssim(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean SSIM of two same-shape luma arrays (0..255), in [-1, 1]; 1.0 when identical.

    Arrays smaller than the 7-pixel window on a side are compared as one window (their
    global means, variances and covariance)."""
    if reference.shape != other.shape or reference.ndim != 2:
        raise ValueError(f"SSIM needs arrays of one shape, not {reference.shape} and {other.shape}")
    height, width = reference.shape
    if min(height, width) < WINDOW:
        return _one_window(reference.astype(np.float64), other.astype(np.float64))
    sums, spare = _window_sums(reference, other)
    sx, sy, squares, products = sums  # S(x), S(y), S(x²+y²), S(xy)
    cross, means = spare[:2, : sums.shape[1]]  # S(x)S(y), S(x)²+S(y)²
    np.multiply(sx, sy, out=cross)
    np.multiply(sx, sx, out=means)
    np.multiply(sy, sy, out=sx)
    means += sx
    # (2 N S(xy) - 2 S(x)S(y) + K2) and (N S(x²+y²) - S(x)² - S(y)² + K2): the covariance
    # and the variances' sum, times N (N - 1).
    products *= 2 * _N
    products -= cross
    products -= cross
    products += _K2
    squares *= _N
    squares -= means
    squares += _K2
    cross *= 2
    cross += _K1
    cross *= products
    means += _K1
    means *= squares
    cross /= means
    valid = cross.reshape(height - WINDOW + 1, width)[:, : width - WINDOW + 1]
    return float(valid.mean(dtype=np.float64))


def _window_sums(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sums of x, y, x²+y² and xy over the 7x7 window below and right of every pixel of
    the first height-6 rows, as 4 flat arrays of (height-6)*width: the last 6 of every row
    wrap onto the next row and mean nothing. Sums of 7 by doubling (1, 2, 4, then 4 + 4 minus
    the shared middle), first over rows (shifts of `width`), then over columns (shifts of 1):
    every operation reads contiguous memory. Also returns 4 free rows of scratch."""
    height, width = x.shape
    size = height * width
    a, b, c = _buffer(3 * 4 * size).reshape(3, 4, size)
    a[0] = x.reshape(-1)
    a[1] = y.reshape(-1)
    np.multiply(a[0], a[0], out=a[2])
    np.multiply(a[1], a[1], out=a[3])
    a[2] += a[3]
    np.multiply(a[0], a[1], out=a[3])
    _sum7(a, width, b, c)
    rows = size - 6 * width
    _sum7(b[:, :rows], 1, a, c)
    sums = a[:, :rows]
    sums[:, rows - 6 :] = 0  # past the last window: keep the formula finite
    return sums, b


def _sum7(src: np.ndarray, step: int, out: np.ndarray, tmp: np.ndarray) -> None:
    """out[:, i] = the sum of src[:, i + k * step] for k in 0..6, for i < len - 6 * step."""
    n = src.shape[1]
    np.add(src[:, : n - step], src[:, step:], out=tmp[:, : n - step])  # 2
    np.add(tmp[:, : n - 3 * step], tmp[:, 2 * step : n - step], out=out[:, : n - 3 * step])  # 4
    np.add(out[:, : n - 6 * step], out[:, 3 * step : n - 3 * step], out=tmp[:, : n - 6 * step])
    np.subtract(tmp[:, : n - 6 * step], src[:, 3 * step : n - 3 * step], out=out[:, : n - 6 * step])


def _buffer(n: int) -> np.ndarray:
    """`n` float32s of this thread's scratch buffer (a fresh array beyond _SCRATCH_LIMIT)."""
    if n > _SCRATCH_LIMIT:
        return np.empty(n, np.float32)
    buffer: np.ndarray | None = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < n:
        buffer = _scratch.buffer = np.empty(n, np.float32)
    return buffer[:n]


def _one_window(x: np.ndarray, y: np.ndarray) -> float:
    mx, my = x.mean(), y.mean()
    variances = x.var() + y.var()
    covariance = ((x - mx) * (y - my)).mean()
    numerator = (2 * mx * my + _C1) * (2 * covariance + _C2)
    return float(numerator / ((mx * mx + my * my + _C1) * (variances + _C2)))
