"""The HTML of the web page's no-JavaScript routes (`gateway.html_handlers`): pure functions.

Pages are built from the same JSON dicts the REST API returns (`gateway.json_views`), so the HTML
and the API cannot disagree about a request. Every value that comes from a caller (the CSV's
serial numbers, product names and URLs, error messages) goes through `esc`, and a URL is put in
`href` or `src` only when it is absolute http(s): the CSV is hostile input. The markup uses the
classes of `static/app.css`, like the page `static/app.js` renders in the browser.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from gateway.urls import cancel_path, request_path
from services.common.errors import Detail, ImgpipeError

# Seconds between reloads of an unfinished status page (a <meta http-equiv="refresh">).
REFRESH_SECONDS = 2
FINAL = frozenset({"Completed", "Failed", "Cancelled"})
_TITLES = {
    "invalid_csv": "The CSV was not accepted",
    "invalid_argument": "The upload was not accepted",
    "too_large": "The file is too large",
    "unsupported_media_type": "The upload was not accepted",
    "not_found": "No such request",
    "unavailable": "imgpipe is unavailable",
}
_HINTS = {
    "invalid_csv": "Nothing was stored. Fix these problems in your spreadsheet (row 1 is the "
    "header) and upload it again.",
    "unavailable": "A service is down or did not answer in time. Try again in a moment.",
    "not_found": "Check the link, or upload the CSV again.",
}


def esc(value: object) -> str:
    """`value` as HTML text or as a quoted attribute value."""
    return html.escape(str(value), quote=True)


def web_url(url: object) -> str | None:
    """`url` if it is an absolute http(s) URL or a path on this site (safe in href or src),
    else None. The gateway's own links are paths when it does not know its public URL."""
    if not isinstance(url, str):
        return None
    if url[:8].lower().startswith(("http://", "https://")):
        return url
    if url.startswith("/") and not url.startswith(("//", "/\\")):
        return url
    return None


def format_bytes(count: int) -> str:
    """`812 B`, `45.3 kB`, `1.2 MB`: decimal units, as file sizes are usually shown."""
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} GB"


def format_duration(seconds: float) -> str:
    """`12 s`, `3 min 20 s`, `2 h 5 min`."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60} s"
    return f"{total // 3600} h {total % 3600 // 60} min"


def requests_page(items: Sequence[Mapping[str, Any]], next_page_token: str | None) -> str:
    """Your requests, newest first (the items of GET /requests), each linking to its page."""
    if items:
        rows = "\n".join(_request_row(item) for item in items)
        table = (
            '<div class="table-scroll"><table class="requests" id="requests">\n'
            "<thead><tr><th>Request</th><th>Status</th><th>Created</th>"
            '<th class="num">Images</th></tr></thead>\n'
            f"<tbody>\n{rows}\n</tbody></table></div>"
        )
    else:
        table = '<p class="muted">No requests yet.</p>'
    more = ""
    if next_page_token:
        query = urlencode({"page_token": next_page_token})
        more = (
            f'<a class="button" id="next-page" href="/ui/requests?{esc(query)}">Older requests</a>'
        )
    body = f"""<section class="card" id="requests-card">
<h1>Your requests</h1>
{table}
<div class="actions">{more}<a class="button" href="/">New upload</a></div>
</section>"""
    return layout("Your requests", body)


def _request_row(item: Mapping[str, Any]) -> str:
    request_id, status = str(item["request_id"]), str(item["status"])
    progress: Mapping[str, Any] = item["progress"]
    done, total = int(progress["images_done"]), int(progress["images_total"])
    return (
        f'<tr><td><a href="{esc(request_path(request_id))}"><code>{esc(request_id)}</code></a></td>'
        f'<td><span class="badge status-{esc(status.lower())}">{esc(status)}</span></td>'
        f"<td>{esc(item.get('created_at') or '')}</td>"
        f'<td class="num">{done} of {total}</td></tr>'
    )


def layout(title: str, body: str, *, refresh: int | None = None) -> str:
    """A whole page: the site's header and footer around `body` (already HTML)."""
    meta_refresh = (
        f'<meta http-equiv="refresh" content="{int(refresh)}">\n' if refresh is not None else ""
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{meta_refresh}<title>{esc(title)} · imgpipe</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/app.css">
</head>
<body>
<header class="topbar"><div class="wrap">
<a class="brand" href="/"><span class="logo" aria-hidden="true"></span>imgpipe</a>
<nav><a href="/">New upload</a><a href="/ui/requests">Your requests</a>\
<a href="/docs">API docs</a></nav>
</div></header>
<main class="wrap">
{body}
</main>
<footer class="wrap footer">imgpipe · batch image compression for product catalogs</footer>
</body>
</html>
"""


def status_page(
    request: Mapping[str, Any],
    products: Sequence[Mapping[str, Any]],
    next_page_token: str | None,
    *,
    page_token: str = "",
) -> str:
    """One request: its progress while unfinished (the page reloads itself), then its
    products with thumbnails, its failed images and the output CSV link."""
    final = str(request["status"]) in FINAL
    parts = [_progress_card(request, final)]
    if final:
        request_id = str(request["request_id"])
        parts.append(_products_card(request_id, products, next_page_token, page_token))
        parts.append(_failures_card(products))
    refresh = None if final else REFRESH_SECONDS
    return layout(f"Request {request['status']}", "\n".join(parts), refresh=refresh)


def _progress_card(request: Mapping[str, Any], final: bool) -> str:
    progress: Mapping[str, Any] = request["progress"]
    status = str(request["status"])
    total, done = int(progress["images_total"]), int(progress["images_done"])
    failed = int(progress["images_failed"])
    percent = float(progress["percent"])
    eta, rate = progress.get("eta_seconds"), float(progress.get("images_per_second") or 0)
    if final:
        timing = "Finished"
    elif eta is not None:
        timing = f"About {format_duration(float(eta))} left"
        timing += f" · {rate:.1f} images/s" if rate else ""
    else:
        timing = "Estimating time left…"
    bar = "done" if final else ""
    csv_url = web_url(request.get("output_csv_url"))
    download = (
        f'<a class="button primary" id="download" href="{esc(csv_url)}" download>'
        "Download output CSV</a>"
        if final and csv_url
        else ""
    )
    note = (
        ""
        if final
        else f'<p class="muted small">This page refreshes every {REFRESH_SECONDS} seconds.</p>\n'
    )
    action = esc(cancel_path(request["request_id"]))
    cancel = (
        ""
        if final
        else f'<form class="inline" method="post" action="{action}">'
        '<button class="button danger" type="submit" id="cancel">Cancel request</button></form>'
    )
    return f"""<section class="card" id="progress-card">
<div class="card-head">
<h1>Request <code id="request-id">{esc(request["request_id"])}</code></h1>
<span class="badge status-{esc(status.lower())}" id="status">{esc(status)}</span>
</div>
<progress id="progress" class="{bar}" max="100" value="{percent:g}">{percent:g}%</progress>
<div class="progress-line">
<strong id="percent">{percent:g}%</strong>
<span id="counts">{done + failed} of {total} images processed</span>
<span id="eta">{esc(timing)}</span>
</div>
{_stats(total, done, failed, progress)}
{note}<div class="actions">{download}{cancel}<a class="button" href="/">New upload</a>
<a class="button" href="/ui/requests">Your requests</a></div>
</section>"""


def _stats(total: int, done: int, failed: int, progress: Mapping[str, Any]) -> str:
    # bytes_in and bytes_out count the done images only: the saving is theirs.
    before, after = int(progress.get("bytes_in") or 0), int(progress.get("bytes_out") or 0)
    saved = before - after
    saved_percent = round(100 * saved / before) if before else 0
    cells = (
        ("stat-total", "Images", str(total), total),
        ("stat-done", "Compressed", str(done), done),
        ("stat-failed", "Failed", str(failed), failed),
        ("stat-before", "Original size", format_bytes(before), before),
        ("stat-after", "Compressed size", format_bytes(after), after),
        ("stat-saved", "Saved", format_bytes(saved), saved),
        ("stat-ssim", "Mean SSIM", format_ssim(progress.get("mean_ssim")), ""),
    )
    percent = f' <span class="pct" id="stat-saved-percent">{saved_percent}%</span>'
    items = "".join(
        f'<div class="stat"><dt>{label}{percent if ident == "stat-saved" else ""}</dt>'
        f'<dd id="{ident}" data-value="{value}">{esc(text)}</dd></div>'
        for ident, label, text, value in cells
    )
    return f'<dl class="stats">{items}</dl>'


def _products_card(
    request_id: str,
    products: Sequence[Mapping[str, Any]],
    next_page_token: str | None,
    page_token: str,
) -> str:
    here = request_path(request_id)
    pager = ""
    if page_token:
        pager += f'<a class="button" href="{esc(here)}">First page</a>'
    if next_page_token:
        query = urlencode({"page_token": next_page_token})
        pager += f'<a class="button" id="next-page" href="{esc(f"{here}?{query}")}">Next page</a>'
    if products:
        rows = "\n".join(_product_row(product) for product in products)
        table = (
            '<div class="table-scroll"><table class="products" id="products">\n'
            '<thead><tr><th class="num">S. No.</th><th>Product</th>'
            "<th>Images: before → after</th><th>Result</th></tr></thead>\n"
            f"<tbody>\n{rows}\n</tbody></table></div>"
        )
    else:
        table = '<p class="muted">No products on this page.</p>'
    actions = f'\n<div class="actions">{pager}</div>' if pager else ""
    return f"""<section class="card" id="results">
<h2>Products</h2>
{table}{actions}
</section>"""


def _product_row(product: Mapping[str, Any]) -> str:
    name = str(product["product_name"])
    inputs: list[str] = list(product["input_image_urls"])
    outputs: list[str | None] = list(product["output_image_urls"])
    errors = {str(error["url"]): error for error in product["errors"]}
    pairs = "".join(
        _pair(f"image {index} of {len(inputs)}, {name}", source, output, errors.get(source))
        for index, (source, output) in enumerate(zip(inputs, outputs, strict=False), start=1)
    )
    result = f"{sum(1 for output in outputs if output)} of {len(inputs)} compressed"
    saving = product_saving(product)
    if saving is not None:
        result += f'<br><span class="saved" title="{esc(saving[1])}">{esc(saving[0])}</span>'
    kept = product_quality(product)
    if kept is not None:
        result += f'<br><span class="ssim" title="{esc(kept[1])}">{esc(kept[0])}</span>'
    missed = sum(1 for note in product.get("notes") or [] if note)
    if missed:
        result += f'<br><span class="note">{missed} target not met</span>'
    if product["errors"]:
        result += f'<br><span class="bad">{len(product["errors"])} failed</span>'
    return (
        f'<tr><td class="num">{esc(product["serial_number"])}</td>'
        f'<td class="name">{esc(name)}</td>'
        f'<td><div class="pairs">{pairs}</div></td>'
        f'<td class="result">{result}</td></tr>'
    )


def product_saving(product: Mapping[str, Any]) -> tuple[str, str] | None:
    """("saved 1.2 MB (64%)", "1.9 MB → 0.7 MB") over the product's done images; None when
    none is done yet (their sizes are null until then)."""
    before = sum(size or 0 for size in product.get("input_bytes") or [])
    after = sum(size or 0 for size in product.get("output_bytes") or [])
    if not before:
        return None
    percent = math.floor(100 * (before - after) / before + 0.5)  # as JavaScript's Math.round
    return (
        f"saved {format_bytes(before - after)} ({percent}%)",
        f"{format_bytes(before)} → {format_bytes(after)}",
    )


def format_ssim(value: object) -> str:
    """ "0.981" (three decimals, as the page's script shows it), or "—" before any is known."""
    return f"{value:.3f}" if isinstance(value, int | float) else "—"


def product_quality(product: Mapping[str, Any]) -> tuple[str, str] | None:
    """("SSIM 0.981", "image 1: quality 50, SSIM 0.9812; ...") over the product's done images
    (docs/quality.md: 1.0 identical, about 0.95 hard to tell apart); None before any."""
    ssims = product.get("ssim") or []
    qualities = product.get("quality") or []
    done = [(i, s) for i, s in enumerate(ssims, start=1) if isinstance(s, int | float)]
    if not done:
        return None
    lowest = min(s for _, s in done)
    detail = "; ".join(
        f"image {i}: quality {qualities[i - 1] if i <= len(qualities) else '?'}, SSIM {s:.4f}"
        for i, s in done
    )
    return f"SSIM {format_ssim(lowest)}", detail


def _pair(label: str, source: str, output: str | None, error: Mapping[str, Any] | None) -> str:
    if error is not None:
        # A failed source is not shown: it may be no image at all, or a decompression bomb.
        return f'<div class="pair failed">{failed_box(source, error)}</div>'
    after_url = web_url(output)
    after = (
        _thumb(after_url, f"After: {label}", "after")
        if after_url is not None
        else '<span class="thumb placeholder">…</span>'
    )
    before = _thumb(source, f"Before: {label}", "before")
    return f'<div class="pair">{before}<span class="arrow" aria-hidden="true">→</span>{after}</div>'


def failed_box(source: str, error: Mapping[str, Any]) -> str:
    """A failed image: its code (breakable after each `_`), linking to its source URL."""
    code = "<wbr>".join(esc(part) for part in re.split(r"(?<=_)", str(error["code"])))
    title = esc(f"{error['code']}: {error['message']}")
    inner = f"<strong>Failed</strong>{code}"
    link = web_url(source)
    if link is None:
        return f'<span class="thumb placeholder bad" title="{title}">{inner}</span>'
    return (
        f'<a class="thumb placeholder bad" href="{esc(link)}" target="_blank" '
        f'rel="noopener noreferrer" title="{title}">{inner}</a>'
    )


def _thumb(url: str, alt: str, kind: str) -> str:
    safe = web_url(url)
    if safe is None:
        return f'<span class="thumb placeholder" title="{esc(url)}">?</span>'
    return (
        f'<a href="{esc(safe)}" target="_blank" rel="noopener noreferrer">'
        f'<img class="thumb {kind}" src="{esc(safe)}" alt="{esc(alt)}" width="64" height="64" '
        'loading="lazy" decoding="async" referrerpolicy="no-referrer"></a>'
    )


def _failures_card(products: Iterable[Mapping[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td class="num">{esc(product["serial_number"])}</td>'
        f"<td>{esc(product['product_name'])}</td>"
        f'<td class="url">{esc(error["url"])}</td>'
        f'<td><span class="code">{esc(error["code"])}</span></td>'
        f"<td>{esc(error['message'])}</td></tr>\n"
        for product in products
        for error in product["errors"]
    )
    if not rows:
        return ""
    return f"""<section class="card" id="failures">
<h2>Failed images</h2>
<div class="table-scroll"><table class="failures">
<thead><tr><th class="num">S. No.</th><th>Product</th><th>Image URL</th><th>Code</th>
<th>Reason</th></tr></thead>
<tbody>
{rows}</tbody></table></div>
</section>"""


def problems_table(details: Sequence[Detail]) -> str:
    """Every problem of a refused upload, by spreadsheet row and column."""
    rows = "".join(
        f'<tr><td class="num">{"" if d.row is None else d.row}</td>'
        f"<td>{esc(d.column)}</td><td>{esc(d.message)}</td></tr>\n"
        for d in details
    )
    return (
        '<div class="table-scroll"><table class="problems" id="problems-table">\n'
        '<thead><tr><th class="num">Row</th><th>Column</th><th>Problem</th></tr></thead>\n'
        f"<tbody>\n{rows}</tbody></table></div>"
    )


def error_page(error: ImgpipeError) -> str:
    """Why an upload or a status page failed; a CSV's problems are listed by row and column."""
    title = _TITLES.get(error.code, "Something went wrong")
    hint = _HINTS.get(error.code)
    body = f"""<section class="card" id="problems">
<h1 id="problems-title">{esc(title)}</h1>
<p class="alert" id="problems-message">{esc(error.message)}</p>
{f'<p class="muted">{esc(hint)}</p>' if hint else ""}
{problems_table(error.details) if error.details else ""}
<div class="actions"><a class="button primary" href="/">Upload a CSV</a></div>
</section>"""
    return layout(title, body)


def key_page(next_path: str = "/") -> str:
    """A form for the API key, posted to /session, which keeps it in an HttpOnly cookie."""
    body = f"""<section class="card" id="key-panel">
<h1>API key required</h1>
<p class="muted">This imgpipe asks for an API key. It is kept in a cookie for this site only.</p>
<form class="key-form" method="post" action="/session">
<input type="hidden" name="next" value="{esc(next_path)}">
<label>API key <input type="password" name="key" autocomplete="off" required></label>
<button class="button primary" type="submit">Continue</button>
</form>
</section>"""
    return layout("API key required", body)
