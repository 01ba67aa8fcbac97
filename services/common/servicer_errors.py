"""The service side of errors: what counts as a backend failure, and how a servicer answers one.

`BACKEND_ERRORS` (Postgres, Redis, the network to them) are failures callers may retry; every
service loop and servicer catches them by this one tuple. `rpc_method` turns whatever a
servicer method raises into its gRPC status. They live apart from services/common/errors.py,
which the gateway imports too, because naming asyncpg's and redis's exceptions loads both.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import asyncpg
import grpc
from redis.exceptions import RedisError

from services.common.errors import BackendBusy, ImgpipeError, Unavailable, grpc_abort

log = logging.getLogger(__name__)

# Failures of a backend (Postgres, Redis, the network to them), as opposed to a bad request:
# callers get UNAVAILABLE (503) and may retry.
BACKEND_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    # What asyncpg raises when the server goes away in the middle of an operation
    # ("cannot switch to state 12; another operation is in progress"), MagicStack/asyncpg#784.
    asyncpg.exceptions.InternalClientError,
    # Postgres broke a deadlock or a serialization conflict by failing this transaction:
    # trying again succeeds. Uncaught, one stopped ingest (its feeder loop) in a CI run.
    asyncpg.exceptions.TransactionRollbackError,
    RedisError,
)


F = TypeVar("F", bound=Callable[..., Any])


def rpc_method(method: F) -> F:
    """Decorate a servicer method: an ImgpipeError becomes its gRPC status, a backend failure
    becomes UNAVAILABLE, and nothing else leaks. Works for unary and server-streaming methods."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise  # the method ended the call itself
            except Exception as exc:
                await _fail(context, exc, name)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the method ended the call itself
        except Exception as exc:
            await _fail(context, exc, name)

    return unary  # type: ignore[return-value]


async def _fail(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, method: str
) -> NoReturn:
    """End the call with the status `exc` maps to (see rpc_method)."""
    if isinstance(exc, ImgpipeError):
        await grpc_abort(context, exc)
    if isinstance(exc, BackendBusy):
        log.warning("backend busy", extra={"error": str(exc), "method": method})
        await grpc_abort(context, Unavailable(str(exc), retry_after=exc.retry_after))
    if isinstance(exc, BACKEND_ERRORS):
        log.warning("backend unavailable", extra={"error": repr(exc), "method": method})
        await grpc_abort(context, Unavailable("a backend is unavailable; retry later"))
    # A bug: logged with its traceback here, never sent to the caller.
    log.error("unexpected error", exc_info=exc, extra={"method": method})
    await grpc_abort(context, ImgpipeError("internal error"))
