"""The client commands: call the API, print for people or (with --json) for scripts.

Each returns the command's exit code and raises ApiError when the server says no or cannot
be reached; `imgpipe.cli` prints that error and maps it to its exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Any

from imgpipe import render
from imgpipe.client import ApiClient, UploadOptions
from imgpipe.errors import ApiError
from imgpipe.events import follow
from imgpipe.exit_codes import Exit, exit_for_final
from imgpipe.progress_bar import ProgressBar


@dataclass(frozen=True)
class Target:
    """Where the server is and how to talk to it, decided once from flags and environment."""

    url: str
    api_key: str | None
    timeout: float
    json: bool

    def client(self) -> ApiClient:
        """A client for this server; use it with `async with`."""
        return ApiClient(self.url, api_key=self.api_key, timeout=self.timeout)


def say(lines: list[str]) -> None:
    """Print lines on stdout, flushed (a progress bar may follow on stderr)."""
    print("\n".join(lines), flush=True)


async def upload(
    target: Target,
    csv_file: IO[bytes],
    options: UploadOptions,
    *,
    idempotency_key: str | None,
    wait: bool,
) -> int:
    """Upload the CSV; print the request id and status URL (with --json, the server's answer).

    With `wait`, follow the request to its end: with --json only the final status (every
    page) is printed, else a progress bar and a summary. The exit code follows the outcome.
    """
    async with target.client() as api:
        accepted, created = await api.upload(csv_file, options, idempotency_key)
        if not target.json:
            say(render.accepted_lines(accepted, created))
        elif not wait:
            say([render.to_json(accepted)])
        if not wait:
            return Exit.OK
        return await _wait(api, target, accepted["request_id"])


async def status(target: Target, request_id: str, *, every_page: bool, page_size: int) -> int:
    """Print the request's status: the first page of products, or all of them."""
    async with target.client() as api:
        if every_page:
            found = await api.status_all(request_id, page_size=page_size)
        else:
            found = await api.status(request_id, page_size=page_size)
    say([render.to_json(found)] if target.json else render.status_lines(found))
    return Exit.OK


async def download(target: Target, request_id: str, out: IO[bytes]) -> int:
    """Write the output CSV to `out`; a request not final yet is a 409 "not finished yet"."""
    async with target.client() as api:
        try:
            await api.download(request_id, out)
        except ApiError as exc:
            if exc.status != 409:
                raise
            message = f"request {request_id} is not finished yet: {exc.message}"
            raise ApiError(exc.status, exc.code, message, exc.details) from exc
    return Exit.OK


async def retry(target: Target, request_id: str, *, wait: bool) -> int:
    """Queue the request's failed images again; with `wait`, follow it to its end as upload."""
    async with target.client() as api:
        answer = await api.retry(request_id)
        if not target.json:
            say(
                [
                    f"Request {answer['request_id']}: {answer['images_retried']} failed image(s) "
                    f"queued again, now {answer['status']}",
                    f"Status: {answer.get('status_url', '')}",
                ]
            )
        elif not wait:
            say([render.to_json(answer)])
        if not wait:
            return Exit.OK
        return await _wait(api, target, answer["request_id"])


async def list_requests(target: Target, *, status: str, every_page: bool, page_size: int) -> int:
    """Print the caller's requests, newest first: one page, or all of them."""
    requests: list[dict[str, Any]] = []
    token: str | None = None
    async with target.client() as api:
        while True:
            page = await api.list_requests(page_size=page_size, page_token=token, status=status)
            requests.extend(page.get("requests") or [])
            token = page.get("next_page_token")
            if not token or not every_page:
                break
    if target.json:
        say([render.to_json({"requests": requests, "next_page_token": token})])
    else:
        say(render.request_list_lines(requests, more=bool(token)))
    return Exit.OK


async def cancel(target: Target, request_id: str) -> int:
    """Cancel a running request; print its state."""
    async with target.client() as api:
        found = await api.cancel(request_id)
    say([render.to_json(found)] if target.json else render.request_lines(found))
    return Exit.OK


async def delete(target: Target, request_id: str) -> int:
    """Delete a final request and its stored outputs."""
    async with target.client() as api:
        await api.delete(request_id)
    if target.json:
        say([render.to_json({"request_id": request_id, "deleted": True})])
    else:
        say([f"Request {request_id} deleted, with its outputs and output CSV"])
    return Exit.OK


async def webhook_secret(target: Target, *, rotate: bool) -> int:
    """Print the key's webhook signing secret; with `rotate`, make a new one first."""
    async with target.client() as api:
        answer = await api.webhook_secret(rotate=rotate)
    say([render.to_json(answer)] if target.json else render.webhook_secret_lines(answer))
    return Exit.OK


async def _wait(api: ApiClient, target: Target, request_id: str) -> int:
    if target.json:
        await follow(api, request_id, _ignore)
        final = await api.status_all(request_id)
        say([render.to_json(final)])
        return exit_for_final(final)
    with ProgressBar() as bar:
        final = await follow(api, request_id, bar.update)
    failures = []
    if (final.get("progress") or {}).get("images_failed"):
        failures = await api.failed_images(request_id, render.FAILURES_SHOWN)
    say(render.summary_lines(final, failures))
    return exit_for_final(final)


def _ignore(event: dict[str, Any]) -> None:
    pass
