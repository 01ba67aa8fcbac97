"""A line chart drawn with Pillow's ImageDraw (no plotting library): x and y axes with ticks,
the measured line with labelled points, and a dashed reference line."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 800, 500
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 85, 70
INK, GRID, LINE, REFERENCE = (30, 30, 30), (225, 225, 225), (31, 119, 180), (150, 150, 150)


def line_chart(
    path: Path,
    title: str,
    x_label: str,
    y_label: str,
    points: Sequence[tuple[float, float]],
    reference: Sequence[tuple[float, float]] = (),
    reference_label: str = "",
) -> None:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    x_max = max(x for x, _ in points)
    y_max = _nice(max(y for _, y in [*points, *reference]) * 1.1)

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            LEFT + x / x_max * (WIDTH - LEFT - RIGHT),
            HEIGHT - BOTTOM - y / y_max * (HEIGHT - TOP - BOTTOM),
        )

    for i in range(6):  # horizontal grid and y ticks
        y = y_max * i / 5
        _, py = at(0, y)
        draw.line([(LEFT, py), (WIDTH - RIGHT, py)], fill=GRID)
        draw.text((LEFT - 8, py), f"{y:g}", fill=INK, font=font, anchor="rm")
    for x, _ in points:  # x ticks at the measured points
        px, py = at(x, 0)
        draw.line([(px, py), (px, py + 5)], fill=INK)
        draw.text((px, py + 8), f"{x:g}", fill=INK, font=font, anchor="mt")
    draw.line([at(0, 0), at(x_max, 0)], fill=INK, width=2)
    draw.line([at(0, 0), at(0, y_max)], fill=INK, width=2)
    if reference:
        _dashed(draw, [at(x, y) for x, y in reference])
    draw.line([at(x, y) for x, y in points], fill=LINE, width=3)
    for x, y in points:
        px, py = at(x, y)
        draw.ellipse((px - 5, py - 5, px + 5, py + 5), fill=LINE)
        draw.text((px, py - 10), f"{y:.1f}", fill=INK, font=font, anchor="mb")
    draw.text((WIDTH / 2, 15), title, fill=INK, font=ImageFont.load_default(size=18), anchor="mt")
    draw.text(((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 25), x_label, fill=INK, font=font, anchor="mm")
    legend_y = TOP - 30
    draw.text((10, legend_y), y_label, fill=INK, font=font, anchor="lm")
    draw.line([(WIDTH - 300, legend_y), (WIDTH - 270, legend_y)], fill=LINE, width=3)
    draw.text((WIDTH - 262, legend_y), "measured", fill=INK, font=font, anchor="lm")
    if reference:
        _dashed(draw, [(WIDTH - 180, legend_y), (WIDTH - 150, legend_y)])
        draw.text((WIDTH - 142, legend_y), reference_label, fill=INK, font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _nice(value: float) -> float:
    """The next round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten) at or
    above `value`, so the five grid steps fall on readable values."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(
        step * power for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if step * power >= value
    )


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], dash: float = 8) -> None:
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        length = math.hypot(x1 - x0, y1 - y0)
        steps = max(1, int(length // dash))
        for i in range(0, steps, 2):
            a, b = i / steps, min(1.0, (i + 1) / steps)
            start = (x0 + (x1 - x0) * a, y0 + (y1 - y0) * a)
            end = (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)
            draw.line([start, end], fill=REFERENCE, width=2)
