"""Measured quality: SSIM of an output against its source, cheap enough to run on every image.

SSIM (structural similarity, Wang et al. 2004) compares local means, contrasts and structure
of two images: 1.0 means identical pixels; around 0.95 a viewer at normal size is hard put to
tell the two apart; below about 0.90 the artefacts show. Here it is computed on luminance
only (ITU-R 601 luma, what the eye is most sensitive to) of a pair downscaled to at most
512 px on the long side, so one measurement costs a few milliseconds whatever the image size.

The formula is scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`: an 11-tap Gaussian window (sigma 1.5,
truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, and the mean taken over the pixels whose window
lies inside the image. tests/unit/test_quality.py checks the two agree. NumPy does the
arithmetic (a pure-Python loop would cost seconds per image).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

MAX_SIDE = 512  # the long side of the pair SSIM is computed on
_SIGMA = 1.5
_RADIUS = int(3.5 * _SIGMA + 0.5)  # scipy's truncate=3.5: an 11-pixel window
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2
_WEIGHTS = np.exp(-0.5 * (np.arange(-_RADIUS, _RADIUS + 1) / _SIGMA) ** 2)
_TAPS = (_WEIGHTS / _WEIGHTS.sum()).astype(np.float32)


def luminance(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """`img` as float64 luma, flattened on white where it has alpha, box-downscaled to `size`
    (default: at most MAX_SIDE on the long side, aspect kept). Encoders may change the colour
    of fully transparent pixels at will; on white they all look the same, as on a web page."""
    if img.mode in ("LA", "RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    grey = img.convert("L")
    size = size or reduced_size(grey.size)
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float64)


def reduced_size(size: tuple[int, int]) -> tuple[int, int]:
    """`size` scaled to at most MAX_SIDE on the long side (never up)."""
    width, height = size
    factor = min(1.0, MAX_SIDE / max(width, height))
    return max(1, math.floor(width * factor + 0.5)), max(1, math.floor(height * factor + 0.5))


def ssim(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean SSIM of two same-shape luma arrays (0..255), in [-1, 1]; 1.0 when identical.

    Arrays smaller than the 11-pixel window on a side are compared as one window (their
    global means, variances and covariance)."""
    if reference.shape != other.shape:
        raise ValueError(f"SSIM needs arrays of one shape, not {reference.shape} and {other.shape}")
    # float32 halves the memory traffic; the mean differs from float64's by about 1e-6.
    x, y = reference.astype(np.float32), other.astype(np.float32)
    if min(x.shape) < 2 * _RADIUS + 1:
        mx, my = x.mean(keepdims=True), y.mean(keepdims=True)
        squares = (x * x + y * y).mean(keepdims=True)
        products = (x * y).mean(keepdims=True)
    else:
        mx, my = _blur(x), _blur(y)
        # The formula needs only the sum of the two variances: one blur instead of two.
        squares = _blur(x * x + y * y)
        products = _blur(x * y)
    means = mx * mx + my * my
    cross = mx * my
    variances = squares - means  # var(x) + var(y)
    covariance = products - cross
    index = ((2 * cross + _C1) * (2 * covariance + _C2)) / ((means + _C1) * (variances + _C2))
    return float(np.mean(index, dtype=np.float64))


def _blur(a: np.ndarray) -> np.ndarray:
    """The Gaussian-weighted mean around every pixel whose window lies inside `a` (a 'valid'
    separable convolution): what scikit-image keeps after cropping the window's radius. The
    window is symmetric, so each pair of taps shares one multiplication."""
    r = _RADIUS
    n = a.shape[0] - 2 * r
    rows = a[r : r + n] * _TAPS[r]
    for i in range(r):
        rows += (a[i : i + n] + a[2 * r - i : 2 * r - i + n]) * _TAPS[i]
    n = a.shape[1] - 2 * r
    out = rows[:, r : r + n] * _TAPS[r]
    for i in range(r):
        out += (rows[:, i : i + n] + rows[:, 2 * r - i : 2 * r - i + n]) * _TAPS[i]
    return out
