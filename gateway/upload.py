"""POST /upload: read the CSV from the HTTP body as it arrives and stream it to ingest.

The body is never held whole in memory: it is read in 64 KiB chunks and each chunk is written
to the `IngestService.UploadCsv` client stream as soon as it arrives. Any failure while reading
(too large, a truncated body, a bad trailing form field) cancels the call, so ingest never
commits a partial upload. What the body may be (docs/uploads.md):

- every byte of it counts toward IMGPIPE_MAX_UPLOAD_BYTES, whatever its framing (chunked, form
  parts and boundaries): 413. A multipart form may add `_MULTIPART_OVERHEAD` for its framing;
- a form has the `file` field and option fields, nothing else: 400 names an unknown field;
- it is not encoded (`Content-Encoding`): 415, so nothing small inflates into something large;
- it keeps arriving: IMGPIPE_UPLOAD_IDLE_TIMEOUT seconds without a byte answers 408.

With authentication off there is no key to count uploads against, so the gateway itself allows
each client address `IMGPIPE_LIMIT_UPLOADS` uploads at a time (gateway/holds.py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import expect_continue
from gateway.config import GatewaySettings
from gateway.http_errors import BodyTimeout, UnsupportedMediaType
from gateway.keys import ANONYMOUS_UPLOADS
from services.common.errors import Detail, InvalidArgument, TooLarge
from services.common.image_options import GOAL_RULES, from_proto
from services.common.initial_metadata import is_ready
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import task_pb2

CHUNK_SIZE = 64 * 1024
CSV_MEDIA_TYPES = frozenset({"text/csv", "application/csv", "text/plain"})
OPTION_FIELDS = (
    "webhook_url",
    "quality",
    "format",
    "effort",
    "target_ratio",
    "min_ssim",
    "scale",
    "max_width",
    "max_height",
)
FILE_FIELD = "file"
# Room for boundaries, part headers and option fields when the declared length of a
# multipart body is compared with the limit on the file itself.
_MULTIPART_OVERHEAD = 64 * 1024
# How long an ingest may leave the upload's go-ahead unsaid, open, before it is taken for an
# ingest from before the handshake (a rolling update): the file is then written anyway.
LEGACY_INGEST_WAIT = 5.0
_MAX_FIELD_BYTES = 8 * 1024
_UINT32_MAX = 2**32 - 1
# Returns up to CHUNK_SIZE bytes of the CSV, b"" at the end.
ReadChunk = Callable[[], Awaitable[bytes]]
T = TypeVar("T")
_FORMATS = {
    "jpeg": task_pb2.OUTPUT_FORMAT_JPEG,
    "webp": task_pb2.OUTPUT_FORMAT_WEBP,
    "png": task_pb2.OUTPUT_FORMAT_PNG,
    "avif": task_pb2.OUTPUT_FORMAT_AVIF,
    "auto": task_pb2.OUTPUT_FORMAT_AUTO,
    "auto_avif": task_pb2.OUTPUT_FORMAT_AUTO_AVIF,
}
_EFFORTS = {
    "fast": task_pb2.EFFORT_FAST,
    "balanced": task_pb2.EFFORT_BALANCED,
    "max": task_pb2.EFFORT_MAX,
}


async def upload_csv(
    request: web.Request, ingest: ingest_grpc.IngestServiceAsyncStub, settings: GatewaySettings
) -> ingest_pb.Accepted:
    """Stream the uploaded CSV to ingest and return what it accepted."""
    if settings.api_keys.enabled:
        return await _upload_csv(request, ingest, settings)  # ingest counts uploads per key
    with request.app[ANONYMOUS_UPLOADS].hold(request.remote or ""):
        return await _upload_csv(request, ingest, settings)


async def _upload_csv(
    request: web.Request, ingest: ingest_grpc.IngestServiceAsyncStub, settings: GatewaySettings
) -> ingest_pb.Accepted:
    limit = settings.max_upload_bytes
    idempotency_key = request.headers.get("Idempotency-Key", "").strip()
    if not (idempotency_key.isascii() and idempotency_key.isprintable()):
        raise InvalidArgument(
            "Idempotency-Key must be printable ASCII",
            [Detail(message="printable ASCII, at most 255 characters", column="Idempotency-Key")],
        )
    if hdrs.CONTENT_ENCODING in request.headers:
        raise UnsupportedMediaType(
            f"Content-Encoding {request.headers[hdrs.CONTENT_ENCODING][:40]!r} is not accepted "
            "on an upload: send the CSV as it is"
        )
    if request.content_type == "multipart/form-data":
        body = _Body(request, limit, limit + _MULTIPART_OVERHEAD, settings.upload_idle_timeout)
        header, read, after = await _open_multipart(request, body, idempotency_key)
    elif request.content_type in CSV_MEDIA_TYPES:
        body = _Body(request, limit, limit, settings.upload_idle_timeout)
        header = build_header(request.query, idempotency_key)
        read, after = lambda: body.read(request.content.read(CHUNK_SIZE)), None
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {request.content_type!r}: send multipart/form-data "
            f"with a {FILE_FIELD!r} field, or a text/csv body"
        )
    return await _send(ingest, header, read, limit, after, settings.upload_timeout)


class _Body:
    """Every read of a request body: counted against the limit, whatever the framing, and
    given up when nothing arrives for `idle` seconds."""

    def __init__(self, request: web.Request, limit: int, allowed: int, idle: float) -> None:
        self._request = request
        self._content = request.content
        self._limit, self._allowed, self._idle = limit, allowed, idle
        # Refuse before reading a byte when the caller already told us the body is too big.
        if request.content_length is not None and request.content_length > allowed:
            raise _too_large(limit)

    async def read(self, step: Awaitable[T]) -> T:
        # A client waiting for the 100 sends nothing before it (gateway/expect_continue.py).
        await expect_continue.send_if_owed(self._request)
        try:
            result = await asyncio.wait_for(step, self._idle)
        except TimeoutError:
            raise BodyTimeout(
                f"no part of the upload arrived for {self._idle:g} s "
                f"(IMGPIPE_UPLOAD_IDLE_TIMEOUT={self._idle:g})"
            ) from None
        # Bytes received so far, after de-chunking: boundaries, part headers and every part
        # count, the ones read for us by the multipart parser included.
        if self._content.total_bytes > self._allowed:
            raise _too_large(self._limit)
        return result


def build_header(values: Mapping[str, str], idempotency_key: str = "") -> ingest_pb.UploadHeader:
    """The first message of an upload, from form or query values; every bad value is listed."""
    read = _OptionReader(values)
    options = task_pb2.ImageOptions(
        quality=read.integer("quality", 1, 95, "an integer from 1 to 95"),
        max_width=read.integer(
            "max_width", 0, _UINT32_MAX, "a whole number of pixels (0: no limit)"
        ),
        max_height=read.integer(
            "max_height", 0, _UINT32_MAX, "a whole number of pixels (0: no limit)"
        ),
    )
    options.format = read.choice("format", _FORMATS)  # type: ignore[assignment]
    options.effort = read.choice("effort", _EFFORTS)  # type: ignore[assignment]
    options.scale = read.fraction(
        "scale", "must be a number with 0 < scale <= 1", lambda v: 0 < v <= 1
    )
    ratio, ssim = GOAL_RULES["target_ratio"], GOAL_RULES["min_ssim"]
    options.target_ratio = read.fraction("target_ratio", ratio, lambda v: 0 <= v < 1)
    options.min_ssim = read.fraction("min_ssim", ssim, lambda v: 0 <= v <= 1)
    problems = read.problems
    if not problems:  # the goals' rules across fields: combined, or with a lossless format
        problems += [
            Detail(message=message, column=name)
            for name, message in from_proto(options).goal_problems()
        ]
    if problems:
        names = ", ".join(d.column for d in problems)
        raise InvalidArgument(f"invalid upload options: {names}", problems)
    return ingest_pb.UploadHeader(
        options=options, webhook_url=read.value("webhook_url"), idempotency_key=idempotency_key
    )


class _OptionReader:
    """Form or query values read as upload options; each bad one is kept as a problem (and
    read as 0, so that every field is checked before the upload is refused)."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.problems: list[Detail] = []

    def value(self, name: str) -> str:
        return self.values.get(name, "").strip()

    def integer(self, name: str, low: int, high: int, rule: str) -> int:
        raw = self.value(name)
        if not raw:
            return 0
        if raw.isascii() and raw.isdigit() and low <= int(raw) <= high:
            return int(raw)
        self._refuse(name, f"{name} must be {rule}, not {raw[:40]!r}")
        return 0

    def choice(self, name: str, choices: Mapping[str, int]) -> int:
        raw = self.value(name)
        if not raw or raw.lower() in choices:
            return choices.get(raw.lower(), 0)
        allowed = ", ".join(choices)
        self._refuse(name, f"{name} must be one of {allowed}, not {raw[:40]!r}")
        return 0

    def fraction(self, name: str, rule: str, accepts: Callable[[float], bool]) -> float:
        raw = self.value(name)
        if not raw:
            return 0.0
        try:
            number = float(raw)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and accepts(number):
            return number
        self._refuse(name, f"{name} {rule}, not {raw[:40]!r}")
        return 0.0

    def _refuse(self, name: str, message: str) -> None:
        self.problems.append(Detail(message=message, column=name))


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"the upload exceeds IMGPIPE_MAX_UPLOAD_BYTES={limit} bytes")


async def _send(
    ingest: ingest_grpc.IngestServiceAsyncStub,
    header: ingest_pb.UploadHeader,
    read: ReadChunk,
    limit: int,
    after: Callable[[], Awaitable[None]] | None,
    deadline: float,
) -> ingest_pb.Accepted:
    # The call is driven by writes from this task rather than by an async generator handed to
    # gRPC: gRPC swallows a generator's exception and reports a bare CancelledError, while here
    # TooLarge or a read error propagates as itself and the call is cancelled at once.
    call = ingest.UploadCsv(None, timeout=deadline)  # None: we write the messages
    try:
        await call.write(ingest_pb.UploadCsvRequest(header=header))
        # Nothing more until ingest says it will read the file: until then it may refuse (key,
        # rate, options, uploads=), and an answer that arrives while we write is lost to
        # grpc/grpc#36066 (services/common/initial_metadata.py). Not ready: awaiting the call
        # below gives the refusal.
        if await _file_wanted(call):
            total = 0
            while chunk := await read():
                total += len(chunk)
                if total > limit:
                    raise _too_large(limit)
                await call.write(ingest_pb.UploadCsvRequest(chunk=chunk))
            if after is not None:
                await after()
            # UploadEnd tells ingest the file is whole; without it ingest stores nothing.
            await call.write(ingest_pb.UploadCsvRequest(end=ingest_pb.UploadEnd(count=total)))
            await call.done_writing()
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
        # Ingest answered while a write was due (it stopped at a deadline, say): awaiting the
        # call gives its answer.
        pass
    except BaseException:
        call.cancel()
        raise
    response = await call
    return response.accepted


async def _file_wanted(call: grpc.aio.StreamUnaryCall[Any, Any]) -> bool:
    """Whether ingest will read the file: it said so, or it is an ingest from before the
    handshake, which says nothing, or only the key's quota, and keeps the call open."""
    try:
        metadata = await asyncio.wait_for(call.initial_metadata(), LEGACY_INGEST_WAIT)
    except TimeoutError:
        return True  # no word at all: an older ingest, waiting for the file
    if is_ready(metadata):
        return True
    try:
        await asyncio.wait_for(call.code(), LEGACY_INGEST_WAIT)  # a refusal ends the call
    except TimeoutError:
        return True  # the quota but no go-ahead, still open: an older ingest
    return False


async def _open_multipart(
    request: web.Request, body: _Body, idempotency_key: str
) -> tuple[ingest_pb.UploadHeader, ReadChunk, Callable[[], Awaitable[None]]]:
    """Read option fields up to the file part; return the header, the file's chunks, a check."""
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        raise InvalidArgument(f"malformed multipart body: {exc}") from None
    values = {name: request.query[name] for name in OPTION_FIELDS if name in request.query}
    while True:
        part = await _next_part(reader, body)
        if part is None:
            raise InvalidArgument(
                f"the form has no {FILE_FIELD!r} field",
                [Detail(message="the CSV file is required", column=FILE_FIELD)],
            )
        if part.name == FILE_FIELD:
            break
        values[_option_name(part)] = await _read_field(part, body)
    header = build_header(values, idempotency_key)
    file_part = part

    async def check_rest() -> None:
        # Options must be known before the first chunk is sent, so one that follows the file
        # cannot be honoured: refuse rather than silently ignore it.
        if (part := await _next_part(reader, body)) is not None:
            name = _option_name(part)
            raise InvalidArgument(
                f"the form field {name!r} comes after the file: put option fields "
                f"before the {FILE_FIELD!r} field, or in the query string",
                [Detail(message="option fields must precede the file", column=name)],
            )

    return header, lambda: body.read(file_part.read_chunk(CHUNK_SIZE)), check_rest


def _option_name(part: BodyPartReader) -> str:
    """The part's name if it is an option field; 400 for anything else (a second file too):
    a part nobody reads would be bytes taken in for nothing."""
    name = part.name or ""
    if name in OPTION_FIELDS:
        return name
    if name == FILE_FIELD:
        raise InvalidArgument(f"send one {FILE_FIELD!r} field, not several")
    shown = repr(name[:40]) if name else "without a name"
    raise InvalidArgument(
        f"unknown form field {shown}: expected {FILE_FIELD!r} and the options "
        + ", ".join(OPTION_FIELDS),
        [Detail(message="not a field of this form", column=name[:40])],
    )


async def _next_part(reader: MultipartReader, body: _Body) -> BodyPartReader | None:
    try:
        part = await body.read(reader.next())
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        raise InvalidArgument(f"malformed multipart body: {exc}") from None
    if isinstance(part, MultipartReader):
        raise InvalidArgument("nested multipart bodies are not supported")
    return part


async def _read_field(part: BodyPartReader, body: _Body) -> str:
    name = part.name or ""
    data = bytearray()
    while chunk := await body.read(part.read_chunk(CHUNK_SIZE)):
        data += chunk
        if len(data) > _MAX_FIELD_BYTES:
            raise InvalidArgument(
                f"the form field {name!r} is too long",
                [Detail(message=f"at most {_MAX_FIELD_BYTES} bytes", column=name)],
            )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"the form field {name!r} is not UTF-8",
            [Detail(message="not UTF-8", column=name)],
        ) from None
