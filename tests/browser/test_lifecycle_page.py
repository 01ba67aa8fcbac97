"""Cancel from the web page in real headless Chromium against the real stack: a merchant uploads
a CSV whose images come from a slow origin, sees the request under "Your requests", presses
Cancel while it runs, and sees it Cancelled on the page and in the list (docs/lifecycle.md).
The image that was in flight at the cancel then finishes, and the page shows it without a
reload.

The screenshot goes to build/test-artifacts/browser/lifecycle-cancel.png.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from playwright.async_api import expect

from testing.origin import serve_images
from testing.polling import wait_until_async
from testing.stack import Stack, start_stack
from tests.browser.conftest import Browsing, screenshot
from tests.browser.test_web_page import csv_text, drop_csv, request_id_on, status_of

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

# 40 images at one second each, one at a time, the first held until the test releases it: the
# request runs far longer than the page needs to show it and the test to press Cancel.
IMAGES = 40


async def test_cancel_a_running_request_from_the_page(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    stack_factory: list[Stack],
    browsing: Browsing,
) -> None:
    async with serve_images((320, 240), delay=1.0) as origin:
        stack = start_stack(
            tmp_path,
            {
                "IMGPIPE_DATABASE_URL": database_url,
                "IMGPIPE_REDIS_URL": redis_server_url,
                "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}",
                "IMGPIPE_DEV_WORKERS": "1",
                "IMGPIPE_WORKER_CONCURRENCY": "1",
            },
        )
        stack_factory.append(stack)
        urls = [origin.url(f"/img/slow{i}.jpg") for i in range(IMAGES)]
        origin.gates["/img/slow0.jpg"] = release = asyncio.Event()
        products = [(str(n), f"Slow {n}", urls[n * 4 : n * 4 + 4]) for n in range(IMAGES // 4)]
        page = await browsing.page()
        await page.goto(f"{stack.base_url}/")
        await drop_csv(page, csv_text(products))
        await page.click("#submit")

        # Running, and listed under "Your requests" as such.
        await expect(page.locator("#progress-card")).to_be_visible()
        request_id = await request_id_on(page)
        row = page.locator("#requests tbody tr", has_text=request_id)
        await expect(page.locator("#requests-card")).to_be_visible()
        await expect(row).to_have_count(1)
        await expect(row.locator(".badge")).to_have_text(re.compile("^(Pending|Processing)$"))
        await expect(page.locator("#cancel")).to_be_visible()
        assert (await status_of(stack, request_id))["status"] in ("Pending", "Processing")

        async def held() -> bool:
            return origin.hits_of(urls[0]) > 0

        await wait_until_async(held, timeout=60, message="the held image in flight")
        await page.click("#cancel")

        await expect(page.locator("#status")).to_have_text("Cancelled")
        await expect(page.locator("#cancel")).to_be_hidden()
        await expect(row.locator(".badge")).to_have_text("Cancelled")
        await expect(row.locator(".badge")).to_have_class("badge status-cancelled")
        await expect(page.locator("#download")).to_be_visible()  # what was done stays
        status = await status_of(stack, request_id)
        assert status["status"] == "Cancelled"
        assert status["progress"]["images_done"] < IMAGES
        await expect(page.locator("#stat-failed")).not_to_have_text("0")
        done_at_cancel = int(await page.locator("#stat-done").inner_text())

        # The held image lands after the cancel: the page shows it, the request stays Cancelled.
        release.set()
        late = str(done_at_cancel + 1)
        await expect(page.locator("#stat-done")).to_have_text(late, timeout=30_000)
        await expect(page.locator("#status")).to_have_text("Cancelled")
        assert (await status_of(stack, request_id))["progress"]["images_done"] == done_at_cancel + 1
        # Listed again, not twice: one row per product, one per failed image.
        await expect(page.locator("#products tbody tr")).to_have_count(IMAGES // 4)
        failed = IMAGES - done_at_cancel - 1
        await expect(page.locator("#failures tbody tr")).to_have_count(failed)
        await screenshot(page, "lifecycle-cancel")
