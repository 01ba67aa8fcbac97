"""What a request asks of each image, and the limits on its sources: no Pillow here.

`ImageOptions` (format, quality, size, effort, goals) is checked where a request comes in (the
gateway's upload parser, the ingest servicer) and carried to the worker in each task; the
worker's `compress` (services/worker/imaging.py) is what reads it. Their protobuf and JSON
forms are here too, so every service converts them the same way.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from services.common.pb.imgpipe.v1 import task_pb2


class OutputFormat(enum.StrEnum):
    """What a request asks for. AUTO and AUTO_AVIF are not formats but a choice among them,
    made per image (services/worker/tuning.py); every output is JPEG, WebP, PNG or AVIF."""

    JPEG = "jpeg"
    WEBP = "webp"
    PNG = "png"
    AVIF = "avif"
    AUTO = "auto"  # the smallest of JPEG and WebP at the SSIM of JPEG at the requested quality
    AUTO_AVIF = "auto_avif"  # the same, with AVIF among the candidates


class Effort(enum.StrEnum):
    FAST = "fast"
    BALANCED = "balanced"
    MAX = "max"


_LOSSY = (OutputFormat.JPEG, OutputFormat.WEBP, OutputFormat.AVIF)


@dataclass(frozen=True, slots=True)
class ImageOptions:
    format: OutputFormat = OutputFormat.JPEG
    quality: int = 50  # 1..95
    scale: float = 1.0  # 0 < scale <= 1
    max_width: int = 0  # 0 = no limit
    max_height: int = 0
    # CPU against bytes, same pixels (services/worker/encoders.py).
    effort: Effort = Effort.BALANCED
    # Goals that choose the quality per image (services/worker/tuning.py); 0 = off, at most
    # one of them.
    target_ratio: float = 0.0  # 0 < r < 1: each output at most r times its source's bytes
    min_ssim: float = 0.0  # 0 < s <= 1: the lowest quality whose SSIM is at least s

    def validate(self) -> list[str]:
        """Human messages, one per bad field; [] when every field is fine."""
        problems = []
        if self.format not in tuple(OutputFormat):
            choices = ", ".join(f.value for f in OutputFormat)
            problems.append(f"format must be one of {choices}, not {self.format!r}")
        if not _is_int(self.quality) or not 1 <= self.quality <= 95:
            problems.append(f"quality must be an integer from 1 to 95, not {self.quality!r}")
        if (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, int | float)
            or not 0 < self.scale <= 1
        ):
            problems.append(f"scale must be greater than 0 and at most 1, not {self.scale!r}")
        for name in ("max_width", "max_height"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                problems.append(f"{name} must be 0 (no limit) or a positive integer, not {value!r}")
        if self.effort not in tuple(Effort):
            choices = ", ".join(e.value for e in Effort)
            problems.append(f"effort must be one of {choices}, not {self.effort!r}")
        return problems + [message for _, message in self.goal_problems()]

    def goal_problems(self) -> list[tuple[str, str]]:
        """(field, message) for each problem of target_ratio and min_ssim."""
        problems = []
        if not _is_number(self.target_ratio) or not 0 <= self.target_ratio < 1:
            problems.append(("target_ratio", f"target_ratio {_FRACTION_RULE}"))
        if not _is_number(self.min_ssim) or not 0 <= self.min_ssim <= 1:
            problems.append(("min_ssim", f"min_ssim {_SSIM_RULE}"))
        if problems or not (self.target_ratio or self.min_ssim):
            return problems
        goal = "target_ratio" if self.target_ratio else "min_ssim"
        if self.target_ratio and self.min_ssim:
            problems.append(("min_ssim", "target_ratio and min_ssim cannot be combined"))
        elif self.format not in _LOSSY:
            message = f"{goal} needs a lossy format (jpeg, webp or avif), not {str(self.format)!r}"
            problems.append((goal, message))
        return problems


# The rules of the goal options, shared with the REST parser's messages.
_FRACTION_RULE = "must be greater than 0 and less than 1 (0: off)"
_SSIM_RULE = "must be greater than 0 and at most 1 (0: off)"
GOAL_RULES = {"target_ratio": _FRACTION_RULE, "min_ssim": _SSIM_RULE}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_pixels: int = 50_000_000  # checked from the header before decoding
    max_frames: int = 1000  # animation frames (or TIFF pages), counted without decoding them
    # Scans of a progressive JPEG, each a pass over the whole image: libjpeg's progressive
    # script has 10, cjpeg accepts at most 100, a valid file can have over 2,000.
    max_scans: int = 100


# The conversions to and from what a task and Postgres carry.
_TO_PROTO = {
    OutputFormat.JPEG: task_pb2.OUTPUT_FORMAT_JPEG,
    OutputFormat.WEBP: task_pb2.OUTPUT_FORMAT_WEBP,
    OutputFormat.PNG: task_pb2.OUTPUT_FORMAT_PNG,
    OutputFormat.AVIF: task_pb2.OUTPUT_FORMAT_AVIF,
    OutputFormat.AUTO: task_pb2.OUTPUT_FORMAT_AUTO,
    OutputFormat.AUTO_AVIF: task_pb2.OUTPUT_FORMAT_AUTO_AVIF,
}
_FROM_PROTO = {value: key for key, value in _TO_PROTO.items()}
_EFFORT_TO_PROTO = {
    Effort.FAST: task_pb2.EFFORT_FAST,
    Effort.BALANCED: task_pb2.EFFORT_BALANCED,
    Effort.MAX: task_pb2.EFFORT_MAX,
}
_EFFORT_FROM_PROTO = {value: key for key, value in _EFFORT_TO_PROTO.items()}


def from_proto(pb: task_pb2.ImageOptions) -> ImageOptions:
    """Zero values mean the defaults: JPEG, quality 50, no resize, balanced effort."""
    defaults = ImageOptions()
    return ImageOptions(
        format=_FROM_PROTO.get(pb.format, defaults.format),
        quality=pb.quality or defaults.quality,
        scale=pb.scale or defaults.scale,
        max_width=pb.max_width,
        max_height=pb.max_height,
        effort=_EFFORT_FROM_PROTO.get(pb.effort, defaults.effort),
        target_ratio=pb.target_ratio,
        min_ssim=pb.min_ssim,
    )


def to_proto(options: ImageOptions) -> task_pb2.ImageOptions:
    return task_pb2.ImageOptions(
        format=_TO_PROTO[options.format],
        quality=options.quality,
        scale=options.scale,
        max_width=options.max_width,
        max_height=options.max_height,
        effort=_EFFORT_TO_PROTO[options.effort],
        target_ratio=options.target_ratio,
        min_ssim=options.min_ssim,
    )


def to_json(options: ImageOptions) -> dict[str, Any]:
    return {
        "format": options.format.value,
        "quality": options.quality,
        "scale": options.scale,
        "max_width": options.max_width,
        "max_height": options.max_height,
        "effort": options.effort.value,
        "target_ratio": options.target_ratio,
        "min_ssim": options.min_ssim,
    }


def from_json(data: dict[str, Any]) -> ImageOptions:
    return ImageOptions(
        format=OutputFormat(data.get("format", "jpeg")),
        quality=int(data.get("quality", 50)),
        scale=float(data.get("scale", 1.0)),
        max_width=int(data.get("max_width", 0)),
        max_height=int(data.get("max_height", 0)),
        # Requests stored before effort existed were encoded with optimize + progressive;
        # balanced is what they would get now.
        effort=Effort(data.get("effort", Effort.BALANCED.value)),
        # Requests stored before the goals existed had none.
        target_ratio=float(data.get("target_ratio", 0.0)),
        min_ssim=float(data.get("min_ssim", 0.0)),
    )
