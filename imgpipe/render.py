"""What the commands print for people. Pure functions from the API's JSON to lines of text."""

from __future__ import annotations

import json
from typing import Any

from imgpipe.errors import ApiError

FAILURES_SHOWN = 20
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def to_json(value: Any) -> str:
    """`value` as the JSON the commands print with --json."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def format_bytes(count: int) -> str:
    """`1536` -> `1.5 KiB`; below 1 KiB, whole bytes (`512 B`)."""
    size = float(count)
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_saving(bytes_in: int, bytes_out: int) -> str:
    """`bytes in → bytes out (N% saved)`, or `(N% larger)` when the output grew."""
    text = f"{format_bytes(bytes_in)} → {format_bytes(bytes_out)}"
    if bytes_in <= 0:
        return text
    saved = (bytes_in - bytes_out) / bytes_in * 100
    return f"{text} ({saved:.1f}% saved)" if saved >= 0 else f"{text} ({-saved:.1f}% larger)"


def format_rate(images_per_second: float | None) -> str:
    """`12.3 images/s`, or empty when there is no rate yet."""
    return f"{images_per_second:.1f} images/s" if images_per_second else ""


def format_eta(seconds: float | None) -> str:
    """`0:01:05 left`, or empty when the time left is unknown."""
    if seconds is None or seconds < 0:
        return ""
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d} left"


def format_detail(detail: dict[str, Any]) -> str:
    """One problem of an error body: `row 3, column Product Name: empty product name`."""
    where = []
    if detail.get("row") is not None:
        where.append(f"row {detail['row']}")
    if detail.get("column"):
        where.append(f"column {detail['column']}")
    message = str(detail.get("message", ""))
    return f"{', '.join(where)}: {message}" if where else message


def error_lines(error: ApiError) -> list[str]:
    """An error for people: the message, then every detail on its own line."""
    code = f" ({error.code}, HTTP {error.status})" if error.status else ""
    head = f"error: {error.message or error.code}{code}"
    return [head] + [f"  {format_detail(detail)}" for detail in error.details]


def accepted_lines(accepted: dict[str, Any], created: bool) -> list[str]:
    """The answer to an upload: the request id and where to follow it."""
    how = "accepted" if created else "already accepted (same idempotency key)"
    return [
        f"Request {accepted['request_id']} {how}: "
        f"{accepted.get('products', 0)} products, {accepted.get('images', 0)} images",
        f"Status: {accepted.get('status_url', '')}",
    ]


def webhook_secret_lines(secret: dict[str, Any]) -> list[str]:
    """An owner's webhook secrets: the one to verify with, and the previous one in grace."""
    lines = [
        f"Webhook signing secret of {secret.get('owner', '')} "
        f"(generation {secret.get('generation', '')}):",
        f"  {secret.get('secret', '')}",
    ]
    previous = secret.get("previous")
    if previous:
        lines += [
            f"Previous secret (generation {previous.get('generation', '')}), still signing "
            f"until {previous.get('expires_at', '')}:",
            f"  {previous.get('secret', '')}",
        ]
    return lines


def request_lines(request: dict[str, Any]) -> list[str]:
    """The head of a status: the request's state, counters, saving and timestamps."""
    progress = request.get("progress") or {}
    total = progress.get("images_total", 0)
    done, failed = progress.get("images_done", 0), progress.get("images_failed", 0)
    counts = f"{total} total: {done} done, {failed} failed"
    if total - done - failed > 0:
        counts += f", {total - done - failed} pending ({progress.get('percent', 0)}%)"
    lines = [
        f"Request {request.get('request_id')}: {request.get('status')}",
        f"  images      {counts}",
        f"  bytes       {format_saving(progress.get('bytes_in', 0), progress.get('bytes_out', 0))}",
    ]
    pace = ", ".join(
        text
        for text in (
            format_rate(progress.get("images_per_second")),
            format_eta(progress.get("eta_seconds")),
        )
        if text
    )
    if pace and not request.get("completed_at"):
        lines.append(f"  pace        {pace}")
    for label, key in (("created", "created_at"), ("completed", "completed_at")):
        if request.get(key):
            lines.append(f"  {label:<11} {request[key]}")
    if request.get("output_csv_url"):
        lines.append(f"  output CSV  {request['output_csv_url']}")
    return lines


def request_list_lines(requests: list[dict[str, Any]], *, more: bool) -> list[str]:
    """GET /requests for people: one line per request, newest first."""
    if not requests:
        return ["No requests"]
    lines = []
    for request in requests:
        progress = request.get("progress") or {}
        lines.append(
            f"{request.get('request_id')}  {request.get('status', ''):<10}  "
            f"{request.get('created_at', '')}  {progress.get('images_done', 0)}/"
            f"{progress.get('images_total', 0)} done, {progress.get('images_failed', 0)} failed"
        )
    if more:
        lines.append("(more pages: use --all)")
    return lines


def product_lines(product: dict[str, Any]) -> list[str]:
    """One product: its serial number, name and image counts, then each failed image."""
    outputs = product.get("output_image_urls") or []
    errors = product.get("errors") or []
    done = sum(1 for url in outputs if url)
    counts = [f"{done} done"]
    if errors:
        counts.append(f"{len(errors)} failed")
    pending = len(product.get("input_image_urls") or []) - done - len(errors)
    if pending > 0:
        counts.append(f"{pending} pending")
    head = f"  {product.get('serial_number')}  {product.get('product_name')}: {', '.join(counts)}"
    return [head] + [f"      {failure_line(error)}" for error in errors]


def status_lines(status: dict[str, Any]) -> list[str]:
    """GET /status for people: the request, then its products on this page."""
    lines = request_lines(status)
    products = status.get("products") or []
    more = " (more pages: use --all)" if status.get("next_page_token") else ""
    lines.append(f"Products ({len(products)}){more}:")
    for product in products:
        lines.extend(product_lines(product))
    return lines


def failure_line(error: dict[str, Any]) -> str:
    """A failed image: `URL  CODE: message`."""
    message = f": {error['message']}" if error.get("message") else ""
    return f"{error.get('url')}  {error.get('code')}{message}"


def summary_lines(
    final: dict[str, Any], failures: list[dict[str, Any]], limit: int = FAILURES_SHOWN
) -> list[str]:
    """The end of `upload --wait`: the request's outcome and up to `limit` failed images, then
    `… and N more`, N counted from the request's images_failed."""
    lines = request_lines(final)
    failed = int((final.get("progress") or {}).get("images_failed", 0))
    if failed:
        lines.append("Failed images:")
        shown = failures[:limit]
        lines.extend(f"  {failure_line(error)}" for error in shown)
        if failed > len(shown):
            lines.append(f"  … and {failed - len(shown)} more")
    return lines
