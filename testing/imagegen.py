"""Generated, photo-like test images: smooth gradients, shapes and sensor-like noise.

Real photos compress the way these do (JPEG q95 → q50 roughly halves them), unlike flat
colours, which would make every size assertion meaningless. Used by tests, bench and samples.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFilter


def photo_like(width: int, height: int, seed: int = 0, *, quality: int = 95) -> bytes:
    """A JPEG of the given size that compresses like a photograph."""
    rng = random.Random(seed)
    base = Image.linear_gradient("L").resize((width, height))
    red = base.rotate(rng.randint(0, 359), resample=Image.Resampling.BILINEAR, expand=False)
    green = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    blue = Image.radial_gradient("L").resize((width, height))
    image = Image.merge("RGB", (red, green, blue))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randint(max(4, width // 30), max(8, width // 6))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(1, width // 200)))
    noise = Image.effect_noise((width, height), 24).convert("RGB")
    image = Image.blend(image, noise, 0.12)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()
