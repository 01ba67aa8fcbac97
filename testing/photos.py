"""Real photographs for benchmarks and tests, loaded offline from scikit-image's bundled data.

scikit-image (a dev dependency) ships nine colour photographs inside its wheel: an astronaut,
a cat, a coffee cup, a rocket, two motorcycles, a retina, a stained tissue sample and the
Hubble deep field. Their files are read directly (skimage.data's loaders are not imported, and
nothing is downloaded). Synthetic images (testing/imagegen.py) cover the awkward types; these
cover what a JPEG encoder meets in a catalog: edges, skin, textures, smooth gradients.
"""

from __future__ import annotations

import functools
import io
import math
from importlib.resources import files

from PIL import Image

PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
SOURCE_QUALITY = 90  # what a merchant's camera or CMS typically hands over


@functools.cache
def original(name: str) -> Image.Image:
    """One bundled photograph, decoded to RGB (cached; callers must not modify it)."""
    data = (files("skimage") / "data" / name).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def scaled(name: str, long_side: int) -> Image.Image:
    """The photograph with its long side at `long_side` pixels (LANCZOS, up or down)."""
    img = original(name)
    factor = long_side / max(img.size)
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, Image.Resampling.LANCZOS)


def variant(index: int, long_side: int = 1200) -> Image.Image:
    """Photo `index`: the nine photographs in turn, each time in another of the eight
    orientations (flips and quarter turns), so up to 72 images differ in every pixel while
    keeping the statistics of real photographs."""
    name = PHOTOS[index % len(PHOTOS)]
    img = scaled(name, long_side)
    turn = (index // len(PHOTOS)) % 8
    if turn:
        img = img.transpose(list(Image.Transpose)[turn - 1])
    return img


def sized(seed: int, width: int, height: int) -> Image.Image:
    """A real photograph of exactly `width` x `height`, different for every seed.

    Up to about 2 MP: photo `seed` (a `variant`) scaled to cover the box and cropped, the crop
    shifted by a pixel per round of 72 seeds so no two seeds share their bytes. Larger: a
    `mosaic`, mirrored or turned by the seed (upscaling one photograph 10x would compress
    unrealistically well).
    """
    if width * height > 2_000_000:
        img = mosaic(width, height)
        flip = (None, *_SAME_SHAPE_TURNS)[seed % 4]
        return img.transpose(flip) if flip is not None else img
    shift = seed // (len(PHOTOS) * 8)
    img = variant(seed)
    factor = max(width / img.width, height / img.height)
    cover = (math.ceil(img.width * factor) + shift, math.ceil(img.height * factor))
    img = img.resize(cover, Image.Resampling.LANCZOS)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


_SAME_SHAPE_TURNS = (
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_180,
)


def mosaic(width: int, height: int) -> Image.Image:
    """A photograph-filled image of any size (up to 24 MP and beyond): the nine photographs
    tiled in a grid, each scaled to fill its cell."""
    columns = math.ceil(math.sqrt(len(PHOTOS) * width / height))
    rows = math.ceil(len(PHOTOS) / columns)
    cell = (math.ceil(width / columns), math.ceil(height / rows))
    canvas = Image.new("RGB", (width, height))
    for i in range(rows * columns):
        tile = original(PHOTOS[i % len(PHOTOS)]).resize(cell, Image.Resampling.BILINEAR)
        canvas.paste(tile, ((i % columns) * cell[0], (i // columns) * cell[1]))
    return canvas


def jpeg(img: Image.Image, quality: int = SOURCE_QUALITY) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def photo_jpeg(index: int, long_side: int = 1200) -> bytes:
    """Photo `index` as the q90 JPEG a merchant would link to."""
    return jpeg(variant(index, long_side))
