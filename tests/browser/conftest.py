"""Fixtures for browser tests: the real stack and image origin of the end-to-end tests, and
Debian's headless Chromium driven by Playwright, allowed to talk to loopback addresses only.

Never `playwright install`: the browser is the system's `chromium` package (`.ci/run` installs
it), launched through `executable_path`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Route,
    async_playwright,
)

from testing.stack import ROOT

# The end-to-end fixtures, shared as they are: a stack that may fetch from a local image origin.
from tests.e2e.conftest import image_origin, origin_stack, stack_factory  # noqa: F401

CHROMIUM = (
    os.environ.get("IMGPIPE_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
)
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # root in a container: the sandbox cannot start there
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Screenshots land here (ignored by git: build/), for CI to keep as artifacts.
ARTIFACTS = ROOT / "build" / "test-artifacts" / "browser"
LOOPBACK = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})
# Generous, since two shared cores also run the stack; the tests wait for states, never sleep.
TIMEOUT_MS = 60_000


class Browsing:
    """Contexts and pages of one test, and what they did that the test must not allow: a
    request to anything but loopback (aborted), a script error, a CSP violation."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.blocked: list[str] = []
        self.page_errors: list[str] = []
        self.csp_violations: list[str] = []
        self.posted: list[tuple[str, bytes]] = []  # (url, body) of every POST sent
        self._contexts: list[BrowserContext] = []

    async def page(self, *, javascript: bool = True) -> Page:
        context = await self.browser.new_context(
            java_script_enabled=javascript,
            viewport={"width": 1280, "height": 1000},
            accept_downloads=True,
        )
        context.set_default_timeout(TIMEOUT_MS)
        await context.route("**/*", self._only_loopback)
        self._contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("console", self._console)
        return page

    async def _only_loopback(self, route: Route) -> None:
        request = route.request
        if urlsplit(request.url).hostname not in LOOPBACK:
            self.blocked.append(request.url)
            await route.abort("blockedbyclient")
            return
        if request.method == "POST":
            self.posted.append((request.url, request.post_data_buffer or b""))
        await route.continue_()

    def _console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.csp_violations.append(message.text)

    async def close(self) -> None:
        for context in self._contexts:
            await context.close()


async def screenshot(page: Page, name: str) -> Path:
    """A full-page screenshot in ARTIFACTS."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=path, full_page=True, animations="disabled")
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser's path; CI installs it, so only a developer's machine may skip."""
    if not Path(CHROMIUM).is_file():
        message = f"no Chromium at {CHROMIUM}: apt-get install chromium (see .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def browsing(browser: Browser) -> AsyncIterator[Browsing]:
    session = Browsing(browser)
    try:
        yield session
    finally:
        await session.close()
    assert session.blocked == [], "the page tried to reach beyond 127.0.0.1"
    assert session.page_errors == [], "script errors on the page"
    assert session.csp_violations == [], "the page broke its own Content-Security-Policy"


@pytest.fixture(scope="module")
def database_url(module_database_url: str) -> str:
    """One database per module (tests/conftest.py `module_database_url` says why)."""
    return module_database_url
