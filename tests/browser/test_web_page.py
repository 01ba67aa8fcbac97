"""The web page in real headless Chromium against the real stack: a merchant drops a CSV, follows
the live progress to 100 %, sees the products with before and after thumbnails, the bytes saved
and the failed images, and downloads the output CSV; with JavaScript and without it.

Screenshots go to build/test-artifacts/browser/.
"""

from __future__ import annotations

import csv
import hashlib
import io
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import FilePayload, Page, expect

from gateway.html_pages import format_ssim, product_quality, product_saving
from testing.origin import ImageOrigin
from testing.stack import Stack, start_stack
from tests.browser.conftest import TIMEOUT_MS, Browsing, screenshot

pytestmark = pytest.mark.browser

Products = list[tuple[str, str, list[str]]]
OUTPUT_HEADER = [
    "S. No.",
    "Product Name",
    "Input Image Urls",
    "Output Image Urls",
    "Errors",
    "SSIM",
]
# Hostile product names: each would run script (an alert, caught as a dialog) if rendered as HTML.
HOSTILE = [
    ("1", '<script>alert("script")</script>'),
    ("2", '<img src=x onerror=alert("img")>'),
    ("<b>3</b>", '"><svg onload=alert("svg")><a href="javascript:alert(1)">x</a>'),
]


def catalog(origin: ImageOrigin) -> Products:
    """Three products, five images; the origin answers 404 for one of them."""
    origin.missing.add("/img/tote-side.jpg")
    return [
        (
            "1",
            "Trail Runner Shoe",
            [origin.url("/img/shoe-front.jpg"), origin.url("/img/shoe-back.jpg")],
        ),
        ("2", "Leather Tote", [origin.url("/img/tote.jpg"), origin.url("/img/tote-side.jpg")]),
        ("3", "Sun Hat", [origin.url("/img/hat.jpg")]),
    ]


def csv_text(products: Products) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    writer.writerows((serial, name, ",".join(urls)) for serial, name, urls in products)
    return out.getvalue()


def csv_file(name: str, text: str) -> FilePayload:
    return {"name": name, "mimeType": "text/csv", "buffer": text.encode()}


async def drop_csv(page: Page, text: str, name: str = "products.csv") -> None:
    """Drag a CSV file onto the drop zone: real drag events carrying a DataTransfer."""
    await page.evaluate(
        """([text, name]) => {
            const data = new DataTransfer();
            data.items.add(new File([text], name, {type: "text/csv"}));
            const zone = document.getElementById("dropzone");
            for (const type of ["dragenter", "dragover", "drop"]) {
                const init = {bubbles: true, cancelable: true, dataTransfer: data};
                zone.dispatchEvent(new DragEvent(type, init));
            }
        }""",
        [text, name],
    )
    await expect(page.locator("#file-name")).to_contain_text(name)


async def status_of(stack: Stack, request_id: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.base_url}/status/{request_id}", params={"page_size": "1000"}) as answer,
    ):
        assert answer.status == 200
        body: dict[str, Any] = await answer.json()
        return body


async def request_id_on(page: Page) -> str:
    return (await page.locator("#request-id").inner_text()).strip()


async def thumbnails_loaded(page: Page, scope: str) -> None:
    """Every thumbnail under `scope` has loaded a real image (a failed one is replaced)."""
    await page.wait_for_function(
        """(scope) => {
            const images = [...document.querySelectorAll(scope + " img.thumb")];
            const loaded = (image) => image.complete && image.naturalWidth > 0;
            return images.length > 0 && images.every(loaded);
        }""",
        arg=scope,
        timeout=TIMEOUT_MS,
    )


async def download_csv(page: Page, selector: str) -> tuple[str, list[list[str]]]:
    async with page.expect_download() as started:
        await page.click(selector)
    download = await started.value
    path = await download.path()
    return download.suggested_filename, list(csv.reader(io.StringIO(path.read_text("utf-8"))))


async def test_drop_a_csv_follow_the_progress_and_get_the_results(
    image_origin: ImageOrigin, origin_stack: Stack, browsing: Browsing
) -> None:
    products = catalog(image_origin)
    page = await browsing.page()
    await page.goto(f"{origin_stack.base_url}/")
    await expect(page.locator("h1")).to_have_text("Compress your product images")

    await drop_csv(page, csv_text(products))
    await page.fill("#quality", "70")
    await page.select_option("#format", "jpeg")
    await screenshot(page, "js-1-upload-form")
    # Every percentage the page shows, in order, to check the bar only moves forward.
    await page.evaluate(
        """() => {
            const percent = document.getElementById("percent");
            window.seenPercents = [];
            new MutationObserver(() => window.seenPercents.push(percent.textContent))
                .observe(percent, {childList: true, characterData: true, subtree: true});
        }"""
    )
    await page.click("#submit")

    await expect(page.locator("#progress-card")).to_be_visible()
    await expect(page.locator("#percent")).to_have_text("100%", timeout=TIMEOUT_MS)
    await expect(page.locator("#status")).to_have_text("Completed")
    assert await page.locator("#progress").evaluate("(bar) => bar.value") == 100
    seen = [float(text.rstrip("%")) for text in await page.evaluate("window.seenPercents")]
    assert seen == sorted(seen) and seen[-1] == 100
    await expect(page.locator("#counts")).to_have_text("5 of 5 images processed")
    await expect(page.locator("#eta")).to_have_text("Finished")

    # The form sent the options before the file, as the server needs them.
    [body] = [body for url, body in browsing.posted if url.endswith("/upload")]
    assert body.index(b'name="quality"\r\n\r\n70') < body.index(b'name="file"')

    request_id = await request_id_on(page)
    status = await status_of(origin_stack, request_id)
    rows = page.locator("#products tbody tr")
    await expect(rows).to_have_count(3)
    for row, (serial, name, _) in zip(await rows.all(), products, strict=True):
        await expect(row.locator("td").nth(0)).to_have_text(serial)
        await expect(row.locator("td").nth(1)).to_have_text(name)
    await thumbnails_loaded(page, "#products")
    before = [
        await image.get_attribute("src")
        for image in await page.locator("#products img.before").all()
    ]
    after = [
        await image.get_attribute("src")
        for image in await page.locator("#products img.after").all()
    ]
    inputs = [url for _, _, urls in products for url in urls]
    outputs = [url for product in status["products"] for url in product["output_image_urls"]]
    assert before == [
        url for url in inputs if not url.endswith("tote-side.jpg")
    ]  # failed: not shown
    assert after == [url for url in outputs if url]
    assert len(after) == 4

    # The saving, from the progress the status API reports.
    progress = status["progress"]
    saved = progress["bytes_in"] - progress["bytes_out"]
    assert saved > 0
    await expect(page.locator("#stat-saved")).to_have_attribute("data-value", str(saved))
    await expect(page.locator("#stat-before")).to_have_attribute(
        "data-value", str(progress["bytes_in"])
    )
    await expect(page.locator("#stat-after")).to_have_attribute(
        "data-value", str(progress["bytes_out"])
    )
    percent = round(100 * saved / progress["bytes_in"])
    await expect(page.locator("#stat-saved-percent")).to_have_text(f"{percent}%")
    await expect(page.locator("#stat-failed")).to_have_text("1")
    # Per product, from the sizes of its done images.
    for row, product in zip(await rows.all(), status["products"], strict=True):
        text, _ = product_saving(product) or ("", "")
        assert text.startswith("saved ")
        await expect(row.locator(".saved")).to_have_text(text)
        # The lowest SSIM of its images, as the server-rendered page shows it too.
        ssim_text, ssim_title = product_quality(product) or ("", "")
        assert ssim_text.startswith("SSIM ")
        await expect(row.locator(".ssim")).to_have_text(ssim_text)
        await expect(row.locator(".ssim")).to_have_attribute("title", ssim_title)
    await expect(page.locator("#stat-ssim")).to_have_text(format_ssim(progress["mean_ssim"]))

    failure = page.locator("#failures tbody tr")
    await expect(failure).to_have_count(1)
    await expect(failure.locator("td").nth(1)).to_have_text("Leather Tote")
    await expect(failure.locator("td").nth(2)).to_have_text(image_origin.url("/img/tote-side.jpg"))
    await expect(failure.locator("td").nth(3)).to_have_text("HTTP_STATUS")
    await expect(failure.locator("td").nth(4)).to_contain_text("404")
    failed_box = page.locator("#products .pair.failed .placeholder.bad")
    await expect(failed_box).to_have_text("FailedHTTP_STATUS")
    await expect(failed_box).to_have_attribute("href", image_origin.url("/img/tote-side.jpg"))
    await screenshot(page, "js-2-results")

    filename, table = await download_csv(page, "#download")
    assert filename == f"imgpipe-{request_id}.csv"
    assert table[0] == OUTPUT_HEADER
    assert [row[:3] for row in table[1:]] == [[s, n, ",".join(u)] for s, n, u in products]
    assert [row[3].split(",") for row in table[1:]] == [
        [url or "" for url in product["output_image_urls"]] for product in status["products"]
    ]
    assert table[2][4] == f"{image_origin.url('/img/tote-side.jpg')}: HTTP_STATUS"

    # A reload goes on showing the same request.
    await page.reload()
    await expect(page.locator("#request-id")).to_have_text(request_id)
    await expect(page.locator("#products tbody tr")).to_have_count(3)


async def test_a_csv_with_problems_shows_each_by_row_and_column(
    image_origin: ImageOrigin, origin_stack: Stack, browsing: Browsing
) -> None:
    page = await browsing.page()
    await page.goto(f"{origin_stack.base_url}/")
    bad = (
        "S. No.,Product Name,Input Image Urls\n"
        f"1,Shoe,{image_origin.url('/img/a.jpg')}\n"
        f"2,,{image_origin.url('/img/b.jpg')}\n"
        "3,Hat,not-a-url\n"
    )
    await drop_csv(page, bad, "catalog.csv")
    await page.click("#submit")

    await expect(page.locator("#problems")).to_be_visible()
    await expect(page.locator("#problems-title")).to_have_text("The CSV was not accepted")
    rows = page.locator("#problems-table tbody tr")
    await expect(rows).to_have_count(2)
    cells = [
        [await cell.inner_text() for cell in await row.locator("td").all()]
        for row in await rows.all()
    ]
    assert [cell[:2] for cell in cells] == [["3", "Product Name"], ["4", "Input Image Urls"]]
    assert "not-a-url" in cells[1][2]
    await expect(page.locator("#progress-card")).to_be_hidden()
    await screenshot(page, "js-3-csv-problems")


async def test_without_javascript_the_form_and_the_status_page_work(
    image_origin: ImageOrigin, origin_stack: Stack, browsing: Browsing
) -> None:
    products = catalog(image_origin)
    page = await browsing.page(javascript=False)
    base = origin_stack.base_url
    await page.goto(f"{base}/")
    await page.set_input_files("#file", files=csv_file("products.csv", csv_text(products)))
    await page.fill("#quality", "60")
    await page.select_option("#format", "webp")
    await page.click("#submit")

    # 303 to the status page, which reloads itself (meta refresh) until the request is final.
    await page.wait_for_url(f"{base}/ui/requests/*")
    await screenshot(page, "nojs-1-status-in-progress")
    await expect(page.locator("#status")).to_have_text("Completed", timeout=TIMEOUT_MS)
    await expect(page.locator("#percent")).to_have_text("100%")
    await expect(page.locator("#counts")).to_have_text("5 of 5 images processed")
    assert await page.locator('meta[http-equiv="refresh"]').count() == 0
    request_id = await request_id_on(page)
    assert page.url == f"{base}/ui/requests/{request_id}"
    status = await status_of(origin_stack, request_id)
    saved = status["progress"]["bytes_in"] - status["progress"]["bytes_out"]
    await expect(page.locator("#stat-saved")).to_have_attribute("data-value", str(saved))

    await expect(page.locator("#products tbody tr")).to_have_count(3)
    after = page.locator("#products img.after")
    await expect(after).to_have_count(4)
    sources = [await image.get_attribute("src") or "" for image in await after.all()]
    assert all(source.endswith(".webp") for source in sources)
    await thumbnails_loaded(page, "#products")
    await expect(page.locator("#products img.before")).to_have_count(4)
    await expect(page.locator("#failures tbody tr td").nth(3)).to_have_text("HTTP_STATUS")
    await screenshot(page, "nojs-2-status-final")

    filename, table = await download_csv(page, "#download")
    assert filename == f"imgpipe-{request_id}.csv"
    assert table[0] == OUTPUT_HEADER
    assert len(table) == 4

    # A CSV with problems: an HTML page with every problem by row and column.
    await page.goto(f"{base}/")
    # Never fetched: a CSV with problems is refused whole.
    bad = (
        "S. No.,Product Name,Input Image Urls\n1,,not-a-url\n"
        "5,Hat,http://127.0.0.1:9/a.jpg\n5,Cap,http://127.0.0.1:9/b.jpg\n"
    )
    await page.set_input_files("#file", files=csv_file("bad.csv", bad))
    async with page.expect_response(f"{base}/ui/upload") as answered:
        await page.click("#submit")
    assert (await answered.value).status == 400
    await expect(page.locator("#problems-title")).to_have_text("The CSV was not accepted")
    cells = [
        [await cell.inner_text() for cell in await row.locator("td").all()]
        for row in await page.locator("#problems-table tbody tr").all()
    ]
    assert {(row, column) for row, column, _ in cells} >= {
        ("2", "Product Name"),
        ("2", "Input Image Urls"),
        ("4", "S. No."),
    }
    await screenshot(page, "nojs-3-csv-problems")


async def test_hostile_product_names_render_as_text(
    image_origin: ImageOrigin, origin_stack: Stack, browsing: Browsing
) -> None:
    products: Products = [
        (serial, name, [image_origin.url(f"/img/hostile{index}.jpg")])
        for index, (serial, name) in enumerate(HOSTILE)
    ]
    page = await browsing.page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    base = origin_stack.base_url
    await page.goto(f"{base}/")
    await drop_csv(page, csv_text(products))
    await page.click("#submit")
    await expect(page.locator("#status")).to_have_text("Completed", timeout=TIMEOUT_MS)
    await expect(page.locator("#products tbody tr")).to_have_count(3)
    request_id = await request_id_on(page)

    # The same checks on the page the browser built and on the one the server rendered.
    for where in ("js", "server"):
        if where == "server":
            await page.goto(f"{base}/ui/requests/{request_id}")
            await expect(page.locator("#status")).to_have_text("Completed")
        rows = await page.locator("#products tbody tr").all()
        assert len(rows) == 3
        for row, (serial, name) in zip(rows, HOSTILE, strict=True):
            assert await row.locator("td").nth(0).inner_text() == serial
            assert await row.locator("td").nth(1).inner_text() == name
        injected = "script, svg, b, a[href^='javascript'], [onerror], [onload]"
        assert await page.locator(f"#products :is({injected})").count() == 0
        assert await page.locator("img[src='x']").count() == 0
        assert await page.locator("#products img").count() == 6  # before and after, per product
        await screenshot(page, f"hostile-{where}")
    assert dialogs == []

    # Problems echo the CSV too: a URL that is markup is shown as text.
    await page.goto(f"{base}/")
    await drop_csv(
        page, 'S. No.,Product Name,Input Image Urls\n1,Hat,"<img src=x onerror=alert(2)>"\n'
    )
    await page.click("#submit")
    await expect(page.locator("#problems-table tbody tr td").nth(2)).to_contain_text("<img src=x")
    assert await page.locator("img[src='x']").count() == 0
    assert dialogs == []


async def test_with_api_keys_the_page_asks_for_a_key_once_and_carries_on(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    image_origin: ImageOrigin,
    stack_factory: list[Stack],
    browsing: Browsing,
) -> None:
    key = f"imgpipe_{secrets.token_urlsafe(32)}"
    stack = start_stack(
        tmp_path,
        {
            "IMGPIPE_DATABASE_URL": database_url,
            "IMGPIPE_REDIS_URL": redis_server_url,
            "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{image_origin.port}",
            "IMGPIPE_API_KEYS": f"merchant:{hashlib.sha256(key.encode()).hexdigest()}",
        },
    )
    stack_factory.append(stack)
    page = await browsing.page()
    await page.goto(f"{stack.base_url}/")
    await drop_csv(page, csv_text(catalog(image_origin)))
    await page.click("#submit")

    # The upload is refused for want of a key: the key form opens, and a wrong key is refused.
    await expect(page.locator("#key-panel")).to_have_attribute("open", "")
    await expect(page.locator("#key-note")).to_have_text("This imgpipe needs an API key.")
    await page.fill("#key", "imgpipe_not-a-key")
    await page.click("#key-form button[type=submit]")
    await expect(page.locator("#key-note")).to_have_text("This key was not accepted.")
    await screenshot(page, "auth-1-key-form")

    # The right key: kept in an HttpOnly cookie, and the upload goes on by itself.
    await page.fill("#key", key)
    await page.click("#key-form button[type=submit]")
    await expect(page.locator("#status")).to_have_text("Completed", timeout=TIMEOUT_MS)
    await expect(page.locator("#key-panel")).not_to_have_attribute("open", "")
    assert await page.evaluate("document.cookie") == ""
    await expect(page.locator("#products tbody tr")).to_have_count(3)
    await thumbnails_loaded(page, "#products")
    _, table = await download_csv(page, "#download")
    assert table[0] == OUTPUT_HEADER
