"""`Expect: 100-continue` on POST /upload: the 100 is sent when the body is first read.

A client that sends `Expect: 100-continue` (curl does for bodies over 1 MiB; the CLI always
does) waits for `100 Continue` before it sends the body. aiohttp answers the 100 as soon as
the headers arrive; POST /upload instead owes it until it reads the body, which it does only
once everything that can be judged without the file has been: the API key and its rate, the
options in the query, a declared size over the limit, and ingest's go-ahead (its `uploads=`
lease; gateway/upload.py). A refusal of any of these reaches the client before it has sent a
byte of the file, and says `Connection: close`: the body it did not send is not waited for,
and the connection cannot be mistaken for one that carries a next request.

A multipart form carries its options in the body, so the 100 comes before they are read.
"""

from __future__ import annotations

import contextvars

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from gateway.http_errors import Handler

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The request whose client waits for the 100, in the task that handles it. (Not request
# storage: web.RequestKey is newer than the aiohttp pyproject.toml allows, and a str key warns.)
_owed: contextvars.ContextVar[web.BaseRequest | None] = contextvars.ContextVar(
    "imgpipe_continue_owed", default=None
)


async def defer(request: web.Request) -> None:
    """The route's expect handler: the checks of aiohttp's own, but the 100 is only owed."""
    if request.version != HttpVersion11:
        return  # HTTP/1.0 has no 100 Continue: the client sends the body anyway
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect[:40]}")
    _owed.set(request)


async def send_if_owed(request: web.Request) -> None:
    """Send the 100 Continue, if the client waits for one; call before reading the body."""
    if _owed.get() is request:
        _owed.set(None)
        await request.writer.write(CONTINUE)
        request.writer.output_size = 0  # as aiohttp does: the response has not begun


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Close the connection after an answer given while the client still waits for the 100."""
    response = await handler(request)
    if _owed.get() is request:
        response.force_close()
    return response
