"""One error hierarchy for imgpipe, mapped once to gRPC status and once to HTTP.

Servicers raise `ImgpipeError` subclasses; `grpc_abort` turns them into a gRPC status with
`google.rpc` details, and the gateway turns that status back into the JSON error
(docs/architecture.md) with `http_error_from_rpc`. The field-violation encoding
("ROW:COLUMN") lives only here. What the services alone need, the backend failures and the
servicer decorator `rpc_method`, is in services/common/servicer_errors.py, so that the gateway
loads no database driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import initial_metadata

DOMAIN = "imgpipe"


@dataclass(frozen=True, slots=True)
class Detail:
    """One problem: `row` is the spreadsheet row (None when not about a row)."""

    message: str
    column: str = ""
    row: int | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.row is not None:
            out["row"] = self.row
        if self.column:
            out["column"] = self.column
        return out


@dataclass
class ImgpipeError(Exception):
    message: str
    details: list[Detail] = field(default_factory=list)
    code = "internal"
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500

    def __str__(self) -> str:
        return self.message

    def http_headers(self) -> dict[str, str]:
        """Headers the HTTP answer to this error must carry (none for most errors)."""
        return {}


class InvalidCsv(ImgpipeError):
    code = "invalid_csv"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class InvalidArgument(ImgpipeError):
    code = "invalid_argument"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(ImgpipeError):
    code = "not_found"
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Conflict(ImgpipeError):
    code = "conflict"
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class TooLarge(ImgpipeError):
    code = "too_large"
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


@dataclass
class Unavailable(ImgpipeError):
    """A backend cannot serve the call now; `retry_after` (whole seconds) when it is known to be
    worth trying again soon (a busy pool, as opposed to a backend that is down)."""

    retry_after: int | None = None
    code = "unavailable"
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503

    def http_headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(max(1, self.retry_after))}


class BackendBusy(TimeoutError):
    """Every connection to a backend stayed in use for the whole wait (a pool's acquire
    timeout). A TimeoutError, hence a BACKEND_ERROR, for code that does not tell them apart."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Unauthenticated(ImgpipeError):
    """No API key, or one that is not configured. `key_given` tells the two apart."""

    key_given: bool = False
    code = "unauthenticated"
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401

    def http_headers(self) -> dict[str, str]:
        challenge = 'Bearer realm="imgpipe"'
        if self.key_given:
            challenge += ', error="invalid_token"'
        return {"WWW-Authenticate": challenge}


class PermissionDenied(ImgpipeError):
    """The caller is known but may not do this (a write from another site, a session asking
    for a session)."""

    code = "permission_denied"
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


@dataclass
class RateLimited(ImgpipeError):
    """A per-key limit (call rate, unfinished requests, images per day) is reached. Details
    name the limit (`column`); `retry_after` is in whole seconds, at least 1."""

    retry_after: int = 1
    code = "rate_limited"
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, self.retry_after))}


_BY_CODE: dict[str, type[ImgpipeError]] = {
    cls.code: cls
    for cls in (
        InvalidCsv,
        InvalidArgument,
        NotFound,
        Conflict,
        TooLarge,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        RateLimited,
    )
}
_GRPC_CODE_VALUES = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
}
# gRPC status codes with no imgpipe reason attached (a dead backend, a deadline) → HTTP.
_HTTP_FOR_GRPC = {
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable", "a backend service is unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (
        503,
        "unavailable",
        "a backend service did not answer in time",
    ),
    grpc.StatusCode.NOT_FOUND: (404, "not_found", "not found"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_argument", "invalid argument"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (413, "too_large", "a limit was exceeded"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "unauthenticated", "an API key is required"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_denied", "not allowed"),
}


def to_rpc_status(error: ImgpipeError) -> status_pb2.Status:
    packed = [_packed(error_details_pb2.ErrorInfo(reason=error.code.upper(), domain=DOMAIN))]
    if isinstance(error, RateLimited):
        # The standard details of a quota: which limit (QuotaFailure), and when to come back.
        quota = error_details_pb2.QuotaFailure()
        for d in error.details:
            quota.violations.add(subject=d.column, description=d.message)
        packed += [_packed(quota), _packed(_retry_info(error.retry_after))]
    elif error.details:
        bad = error_details_pb2.BadRequest()
        for d in error.details:
            where = f"{d.row}:{d.column}" if d.row is not None else d.column
            bad.field_violations.add(field=where, description=d.message)
        packed.append(_packed(bad))
    if isinstance(error, Unavailable) and error.retry_after is not None:
        packed.append(_packed(_retry_info(error.retry_after)))
    return status_pb2.Status(
        code=_GRPC_CODE_VALUES[error.grpc_code], message=error.message, details=packed
    )


def _retry_info(seconds: int) -> error_details_pb2.RetryInfo:
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromSeconds(max(1, seconds))
    return retry


def _packed(message: Any) -> any_pb2.Any:
    extra = any_pb2.Any()
    extra.Pack(message)
    return extra


async def grpc_abort(context: grpc.aio.ServicerContext[Any, Any], error: ImgpipeError) -> NoReturn:
    await initial_metadata.settle(context)  # a refused upload still reports the caller's quota
    status = rpc_status.to_status(to_rpc_status(error))
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def error_from_rpc(exc: grpc.aio.AioRpcError) -> ImgpipeError:
    """Rebuild the ImgpipeError a servicer raised, or a generic one for transport failures."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is not None:
        reason, details, retry_after = "", [], None
        for packed in status.details:
            if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                packed.Unpack(info)
                reason = info.reason.lower()
            elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                packed.Unpack(bad)
                details = [_detail_from_field(v.field, v.description) for v in bad.field_violations]
            elif packed.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                packed.Unpack(quota)
                details = [Detail(v.description, v.subject) for v in quota.violations]
            elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                packed.Unpack(retry)
                retry_after = math.ceil(retry.retry_delay.ToNanoseconds() / 1e9)
        if retry_after is not None and reason in ("", RateLimited.code):
            return RateLimited(status.message, details, retry_after=max(1, retry_after))
        if reason == Unavailable.code:
            return Unavailable(status.message, details, retry_after=retry_after)
        if reason in _BY_CODE:
            return _BY_CODE[reason](status.message, details)
    http, code, message = _HTTP_FOR_GRPC.get(exc.code(), (500, "internal", "internal error"))
    cls = _BY_CODE.get(code, ImgpipeError)
    return cls(message if http >= 500 else (exc.details() or message))


def _detail_from_field(where: str, message: str) -> Detail:
    row, sep, column = where.partition(":")
    if sep and row.isdigit():
        return Detail(message=message, column=column, row=int(row))
    return Detail(message=message, column=where)


def error_body(error: ImgpipeError) -> dict[str, Any]:
    return {
        "error": {
            "code": error.code,
            "message": error.message,
            "details": [d.as_json() for d in error.details],
        }
    }
