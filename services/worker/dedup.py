"""No repeated work across an owner's requests (docs/quality.md, "No repeated work").

An output is identified by the sha256 of its source's bytes and a digest of the options that
change it. When the owner already has an output for both, the worker copies that object under
its own image's key (server-side on S3) instead of decoding and encoding again: each request
keeps only objects under its own prefix `requests/{id}/`, so deleting one request never takes
another's outputs. If the object is gone (its request was deleted or expired), the image is
compressed as usual and its output is remembered instead.

Repeats inside one request never reach a worker: ingest makes them followers of the first image
of the URL, and the outcome recorded for that image is theirs too (services/common/db).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import PIL

from services.common import storage as keys
from services.common.db import queries
from services.common.image_options import ImageOptions, OutputFormat, to_json
from services.common.storage import Storage

log = logging.getLogger(__name__)

# Part of every options digest: bump it when compress() starts making different bytes from the
# same source and options, so outputs made before are no longer reused. Pillow's version is
# part of it too (a new libjpeg or libavif changes the bytes).
RECIPE = 1


def options_digest(options: ImageOptions) -> bytes:
    """The sha256 of the options that decide the output, in a canonical form."""
    fields = to_json(options)
    for name in ("scale", "target_ratio", "min_ssim"):
        fields[name] = float(fields[name])  # 1 and 1.0 are the same scale
    if options.format is OutputFormat.PNG:
        fields["quality"] = 0  # lossless: the quality setting is not used
    fields["recipe"] = RECIPE
    fields["pillow"] = PIL.__version__
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


def digests_of(data: bytes, options: ImageOptions) -> queries.SourceDigests:
    """What finds an earlier output of the same source bytes and options (hashing a large
    source takes milliseconds: run it in the worker's thread pool)."""
    return queries.SourceDigests(hashlib.sha256(data).digest(), options_digest(options))


@dataclass(frozen=True, slots=True)
class Reused:
    """An earlier output, copied under this image's own key."""

    output: queries.StoredOutput  # this image's: its id, its key
    from_image: int  # the image it was copied from


# queries.find_reusable_outputs for one lookup (the worker's Batcher gathers them).
Find = Callable[[tuple[uuid.UUID, queries.SourceDigests]], Awaitable[queries.StoredOutput | None]]


async def reuse_stored(
    find: Find,
    storage: Storage,
    request_id: uuid.UUID,
    image_id: int,
    digests: queries.SourceDigests,
) -> Reused | None:
    """Copy the owner's stored output for `digests` (looked up with `find`) under `image_id`'s
    key; None when there is none or its object is gone (then the image is compressed as usual)."""
    found = await find((request_id, digests))
    if found is None:
        return None
    extension = found.output_key.rpartition(".")[2]
    key = keys.image_key(request_id, image_id, extension)
    if key != found.output_key:  # the same key: this image's own output, delivered again
        try:
            await storage.copy(found.output_key, key)
        except FileNotFoundError:
            log.info(
                "stored output gone; compressing again",
                extra={"image_id": image_id, "key": found.output_key},
            )
            return None
    return Reused(dataclasses.replace(found, image_id=image_id, output_key=key), found.image_id)
