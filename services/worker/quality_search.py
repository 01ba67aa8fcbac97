"""A bounded search for the quality setting that just meets a goal, in a few encodes.

Both goals are monotone in quality, up to noise: a file's bytes grow with it (`target_ratio`:
the highest quality whose file is small enough), and so does its SSIM (`min_ssim`: the lowest
quality whose SSIM is high enough). Neither is a straight line, but both are close to one
after a transform: log-bytes, and -log(1 - SSIM). So the search interpolates there:

1. the first probe is the caller's guess (the requested quality);
2. the next is extrapolated from it with a prior slope (measured on the real-photo corpus),
   later ones by the secant through the two probes that bracket the goal (or lie nearest it);
3. with one probe left and none meeting the goal yet, it probes the end of the range, so that
   "not met" is only ever said of the best quality allowed.

It stops early once the neighbour of the best probe is known to miss. Real encoders are not
perfectly monotone (a re-compressed JPEG's SSIM can dip a little at some qualities), so the
answer is the best probe that met the goal, never a quality that was not tried.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# d(log bytes)/d(quality) and d(-log(1 - SSIM))/d(quality) around quality 30-90, on the nine
# photographs of testing/photos.py (JPEG 0.020 / 0.034, WebP 0.022 / 0.025, AVIF 0.032 / 0.038).
SIZE_SLOPE = 0.025
SSIM_SLOPE = 0.03


@dataclass(frozen=True, slots=True)
class Searched:
    """The probes of one search ({quality: value}) and the best that met the goal (None if
    none did)."""

    probes: dict[int, float]
    best: int | None


def search(
    evaluate: Callable[[int], float],
    target: float,
    *,
    highest: bool,
    low: int,
    high: int,
    first: int,
    slope: float,
    budget: int,
) -> Searched:
    """For an increasing `evaluate`, in at most `budget` calls: with `highest`, the highest
    quality q in [low, high] with evaluate(q) <= target; otherwise the lowest one with
    evaluate(q) >= target."""
    if not highest:
        # Mirrored: q -> -q and value -> -value turn it into the highest-at-most search.
        found = search(
            lambda q: -evaluate(-q),
            -target,
            highest=True,
            low=-high,
            high=-low,
            first=-first,
            slope=slope,
            budget=budget,
        )
        return Searched(
            {-q: -v for q, v in found.probes.items()},
            None if found.best is None else -found.best,
        )
    probes: dict[int, float] = {}
    ok: int | None = None  # the highest probe that met the goal
    miss: int | None = None  # the lowest probe that missed it
    q = min(max(first, low), high)
    for left in range(budget - 1, -1, -1):
        value = probes[q] = evaluate(q)
        if value <= target:
            ok = q if ok is None else max(ok, q)
        else:
            miss = q if miss is None else min(miss, q)
        top = high if miss is None else miss - 1  # the highest quality that may still meet it
        bottom = low if ok is None else ok + 1  # anything lower is no better than `ok`
        if left == 0 or bottom > top:
            break
        if ok is None and left == 1:
            q = low  # the last probe decides whether anything in range meets the goal
            continue
        q = min(max(_next_guess(probes, target, ok, miss, slope), bottom), top)
    return Searched(probes, ok)


def log_bytes(size: int) -> float:
    return math.log(max(size, 1))


def ssim_scale(value: float) -> float:
    """-log(1 - SSIM): about linear in quality where SSIM itself flattens out near 1."""
    return -math.log(max(1.0 - value, 1e-9))


def _next_guess(
    probes: dict[int, float], target: float, ok: int | None, miss: int | None, slope: float
) -> int:
    if ok is not None and miss is not None:
        pair = (ok, miss)  # the goal lies between these two
    else:
        nearest = sorted(probes, key=lambda q: abs(probes[q] - target))
        pair = (nearest[0], nearest[1]) if len(nearest) > 1 else (nearest[0], nearest[0])
    (q0, q1), (v0, v1) = pair, (probes[pair[0]], probes[pair[1]])
    measured = (v1 - v0) / (q1 - q0) if q1 != q0 else 0.0
    # A flat or falling pair is noise; the prior slope keeps the step sane.
    step_slope = measured if measured > 0 else slope
    return math.floor(q0 + (target - v0) / step_slope)
