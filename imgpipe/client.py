"""The imgpipe SDK: the gateway's REST API as `AsyncClient` (asyncio, aiohttp) and `Client`
(the same methods, blocking). Every call has a timeout. Documented in docs/client.md.

Any failure becomes an `ApiError`: an error answer carries the server's JSON error body, and
no answer at all (connection refused, reset, a timeout) is an `unavailable` error with no
HTTP status.

This package needs only aiohttp and rich: `pip install ./clients/python` (imgpipe-client)
installs it without the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import quote

import aiohttp

from imgpipe.errors import ApiError, unreachable
from imgpipe.events import Event, SseParser, follow

__all__ = ["ApiError", "AsyncClient", "Client", "Event", "UploadOptions"]

T = TypeVar("T")
OnEvent = Callable[[dict[str, Any]], None]

USER_AGENT = "imgpipe-cli/0.1"
DEFAULT_TIMEOUT = 30.0
# An upload waits for ingest to validate and store the whole CSV (the gateway's own deadline
# is 300 s), after sending up to 50 MiB.
UPLOAD_TIMEOUT = 600.0
# The gateway writes a keep-alive comment every 15 s, so a live stream silent for this long
# has dropped.
STREAM_READ_TIMEOUT = 45.0
CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True)
class UploadOptions:
    """The image options of an upload; None leaves the server's default."""

    quality: int | None = None
    format: str | None = None
    effort: str | None = None
    target_ratio: float | None = None
    min_ssim: float | None = None
    scale: float | None = None
    max_width: int | None = None
    max_height: int | None = None
    webhook_url: str | None = None

    def query(self) -> dict[str, str]:
        """The options that are set, as the upload's query parameters."""
        values = {
            "quality": self.quality,
            "format": self.format,
            "effort": self.effort,
            "target_ratio": self.target_ratio,
            "min_ssim": self.min_ssim,
            "scale": self.scale,
            "max_width": self.max_width,
            "max_height": self.max_height,
            "webhook_url": self.webhook_url,
        }
        return {name: str(value) for name, value in values.items() if value is not None}


class ApiClient:
    """One gateway, reached at `base_url`; use it as `async with ApiClient(...) as api`."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._headers = {"User-Agent": USER_AGENT}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        self._session = aiohttp.ClientSession(
            headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> str:
        """The absolute URL of an API path (`/upload`)."""
        return f"{self.base_url}{path}"

    def request_path(self, request_id: str, suffix: str = "") -> str:
        """`/requests/<id><suffix>`, the id quoted."""
        return f"/requests/{quote(request_id, safe='')}{suffix}"

    async def upload(
        self,
        csv_file: IO[bytes],
        options: UploadOptions | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """POST /upload with `csv_file` streamed as a text/csv body (never read whole), sent
        once the gateway has answered `Expect: 100-continue`.

        Returns the accepted request and whether it is new (202); an idempotent replay of an
        earlier upload (200) gives False.
        """
        headers = {"Content-Type": "text/csv"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        timeout = aiohttp.ClientTimeout(total=UPLOAD_TIMEOUT, connect=self.timeout)
        async with self._call(
            "POST",
            "/upload",
            params=(options or UploadOptions()).query(),
            data=csv_file,
            headers=headers,
            timeout=timeout,
            # The file goes out only after the gateway's 100 Continue: a refused key, rate or
            # option is answered before any of it is sent (docs/uploads.md).
            expect100=True,
        ) as response:
            return await _json(response), response.status == 202

    async def status(
        self, request_id: str, *, page_size: int | None = None, page_token: str | None = None
    ) -> dict[str, Any]:
        """One page of GET /status/{id}: the request, its progress and a page of products."""
        params = _paging(page_size, page_token)
        path = f"/status/{quote(request_id, safe='')}"
        async with self._call("GET", path, params=params) as response:
            return await _json(response)

    async def status_all(self, request_id: str, page_size: int = 1000) -> dict[str, Any]:
        """GET /status/{id} with every page: the last page's request fields, all products."""
        products: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = await self.status(request_id, page_size=page_size, page_token=token)
            products.extend(page.get("products") or [])
            token = page.get("next_page_token")
            if not token:
                return page | {"products": products, "next_page_token": None}

    async def failed_images(
        self, request_id: str, limit: int, page_size: int = 1000
    ) -> list[dict[str, Any]]:
        """Up to `limit` failed images (`url`, `code`, `message`, `serial_number`), in CSV
        order, reading only as many pages as it takes."""
        found: list[dict[str, Any]] = []
        token: str | None = None
        while len(found) < limit:
            page = await self.status(request_id, page_size=page_size, page_token=token)
            for product in page.get("products") or []:
                for error in product.get("errors") or []:
                    found.append(error | {"serial_number": product.get("serial_number")})
            token = page.get("next_page_token")
            if not token:
                break
        return found[:limit]

    async def download(self, request_id: str, out: IO[bytes]) -> int:
        """Write the output CSV to `out` in chunks as it arrives; return the bytes written.

        A request that is not final yet is a 409 ApiError, and nothing is written.
        """
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=self.timeout)
        async with self._call(
            "GET", self.request_path(request_id, "/output.csv"), timeout=timeout
        ) as response:
            written = 0
            async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                out.write(chunk)
                written += len(chunk)
            return written

    async def retry(self, request_id: str) -> dict[str, Any]:
        """POST /requests/{id}/retry: put the request's failed images back in the queue."""
        async with self._call("POST", self.request_path(request_id, "/retry")) as response:
            return await _json(response)

    async def list_requests(
        self, *, page_size: int | None = None, page_token: str | None = None, status: str = ""
    ) -> dict[str, Any]:
        """One page of GET /requests: the caller's requests, newest first."""
        params = _paging(page_size, page_token)
        if status:
            params["status"] = status
        async with self._call("GET", "/requests", params=params) as response:
            return await _json(response)

    async def cancel(self, request_id: str) -> dict[str, Any]:
        """POST /requests/{id}/cancel: the request, now Cancelled."""
        async with self._call("POST", self.request_path(request_id, "/cancel")) as response:
            return await _json(response)

    async def delete(self, request_id: str) -> None:
        """DELETE /requests/{id}: the final request and everything stored for it."""
        async with self._call("DELETE", self.request_path(request_id)):
            pass

    async def webhook_secret(self, *, rotate: bool = False) -> dict[str, Any]:
        """GET /webhook-secret, or POST /webhook-secret/rotate: the caller's signing secret."""
        method, path = ("POST", "/webhook-secret/rotate") if rotate else ("GET", "/webhook-secret")
        async with self._call(method, path) as response:
            return await _json(response)

    async def events(self, request_id: str) -> AsyncGenerator[Event, None]:
        """One connection to GET /requests/{id}/events: each (event name, data) until the
        server ends the stream. A silent stream times out after STREAM_READ_TIMEOUT."""
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeout, sock_read=STREAM_READ_TIMEOUT
        )
        async with self._call(
            "GET",
            self.request_path(request_id, "/events"),
            headers={"Accept": "text/event-stream"},
            timeout=timeout,
        ) as response:
            parser = SseParser()
            async for raw in response.content:
                event = parser.feed(raw.decode("utf-8", errors="replace"))
                if event is not None:
                    yield event

    async def wait(self, request_id: str, on_event: OnEvent | None = None) -> dict[str, Any]:
        """Follow the request's live progress to its end and return the final event's data
        (the request, its progress and `output_csv_url`). `on_event` gets every progress
        event's data. A dropped stream is reopened (imgpipe.events.follow); after 5 fruitless
        attempts in a row the last error is raised."""
        return await follow(self, request_id, on_event or _ignore)

    @contextlib.asynccontextmanager
    async def _call(
        self, method: str, path: str, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a 2xx status; anything else raises ApiError. Losing the connection
        or timing out while the caller reads the body is an `unavailable` ApiError too."""
        if self._session is None:
            raise RuntimeError("ApiClient is used outside `async with`")
        try:
            async with self._session.request(method, self.url(path), **kwargs) as response:
                if response.status >= 300:
                    raise await _error_from(response)
                yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise unreachable(self.base_url, exc) from exc


def _paging(page_size: int | None, page_token: str | None) -> dict[str, str]:
    """The query parameters of one page of a paged list."""
    params = {}
    if page_size is not None:
        params["page_size"] = str(page_size)
    if page_token:
        params["page_token"] = page_token
    return params


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await response.json(content_type=None)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(response.status, "bad_response", "the server's answer is not JSON")
    return body


async def _error_from(response: aiohttp.ClientResponse) -> ApiError:
    """The ApiError for a non-2xx answer, from its JSON error body when it has one."""
    text = await response.text(errors="replace")
    try:
        error = json.loads(text)["error"]
        return ApiError(
            response.status,
            str(error.get("code") or f"http_{response.status}"),
            str(error.get("message") or response.reason or ""),
            [d for d in error.get("details") or [] if isinstance(d, dict)],
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        message = text.strip()[:200] or response.reason or f"HTTP {response.status}"
        return ApiError(response.status, f"http_{response.status}", message)


def _ignore(data: dict[str, Any]) -> None:
    """An `on_event` that does nothing."""


# The documented name of the asyncio client; ApiClient is what the CLI has always called it.
AsyncClient = ApiClient


class Client:
    """The API without asyncio: `AsyncClient`'s methods, each blocking until its answer.

    Use it as `with Client(url, api_key=...) as api:` (or call `close()`). It runs its own
    event loop, so call it from one thread at a time and not from inside a running event loop
    (there, use AsyncClient).
    """

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._runner = asyncio.Runner()
        self._closed = False
        self._api = AsyncClient(base_url, api_key=api_key, timeout=timeout)
        # The aiohttp session is made inside the loop that will use it.
        self._run(self._api.__aenter__())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and the event loop; the client cannot be used after."""
        if self._closed:
            return
        try:
            self._run(self._api.__aexit__())
        finally:
            self._closed = True
            self._runner.close()

    def upload(
        self,
        csv: str | os.PathLike[str] | IO[bytes],
        options: UploadOptions | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """POST /upload of a CSV file (a path or a binary file object); see AsyncClient.upload."""
        if isinstance(csv, str | os.PathLike):
            with open(csv, "rb") as csv_file:
                return self._run(self._api.upload(csv_file, options, idempotency_key))
        return self._run(self._api.upload(csv, options, idempotency_key))

    def status(
        self, request_id: str, *, page_size: int | None = None, page_token: str | None = None
    ) -> dict[str, Any]:
        """One page of GET /status/{id}."""
        return self._run(self._api.status(request_id, page_size=page_size, page_token=page_token))

    def status_all(self, request_id: str, page_size: int = 1000) -> dict[str, Any]:
        """GET /status/{id} with every page of products."""
        return self._run(self._api.status_all(request_id, page_size))

    def failed_images(
        self, request_id: str, limit: int, page_size: int = 1000
    ) -> list[dict[str, Any]]:
        """Up to `limit` failed images, in CSV order."""
        return self._run(self._api.failed_images(request_id, limit, page_size))

    def download(self, request_id: str, out: IO[bytes]) -> int:
        """Write the output CSV to `out`; return the bytes written."""
        return self._run(self._api.download(request_id, out))

    def retry(self, request_id: str) -> dict[str, Any]:
        """Queue the request's failed images again."""
        return self._run(self._api.retry(request_id))

    def webhook_secret(self, *, rotate: bool = False) -> dict[str, Any]:
        """The caller's webhook signing secret (rotated first with `rotate`)."""
        return self._run(self._api.webhook_secret(rotate=rotate))

    def events(self, request_id: str) -> Iterator[Event]:
        """One connection to the live progress stream: each (event name, data) as it comes."""
        stream = self._api.events(request_id)

        async def step() -> Event:
            return await anext(stream)

        try:
            while True:
                try:
                    event = self._run(step())
                except StopAsyncIteration:
                    return
                yield event
        finally:
            # Closed already: the runner finalised the stream with its event loop.
            if not self._closed:
                self._run(stream.aclose())

    def wait(self, request_id: str, on_event: OnEvent | None = None) -> dict[str, Any]:
        """Block until the request is final; return the final event's data (see
        AsyncClient.wait)."""
        return self._run(self._api.wait(request_id, on_event))

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            call.close()  # never started: nothing to clean up, no "never awaited" warning
            raise RuntimeError("the Client is closed")
        return self._runner.run(call)
