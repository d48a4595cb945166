"""Browser fixtures: Playwright driving Debian's Chromium (`make install-dev` installs it).

A missing browser fails these tests, naming what to install: they are never skipped. Every
page a test opens records its JavaScript errors (uncaught exceptions and console errors) and
any dialog (an `alert` would be script run from user text); the test fails on any of them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Dialog, Error, Page, async_playwright

from giftstream.server.app import App

CHROMIUM = os.environ.get("GIFTSTREAM_CHROMIUM", "/usr/bin/chromium")


def chromium_path() -> str:
    """The browser the tests drive; a clear failure (never a skip) when it is missing."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run `make install-dev` (it installs Debian's chromium "
            "with apt-get) or point GIFTSTREAM_CHROMIUM at a Chromium binary",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium_path())
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Watched:
    """A page and what went wrong on it."""

    page: Page
    errors: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return list(self.errors)


OpenPage = Callable[[str], Awaitable[Watched]]


def http_base(app: App) -> str:
    return app.ws_url.replace("ws://", "http://").removesuffix("/ws")


@pytest.fixture
async def open_page(browser: Browser, app: App) -> AsyncIterator[OpenPage]:
    """`await open_page("/?room=cara#token=...")`: a phone-sized page of the test node, its
    errors recorded; the test fails if any page had one."""
    watched: list[Watched] = []

    async def opener(path: str) -> Watched:
        context = await browser.new_context(viewport={"width": 390, "height": 844})
        page = await context.new_page()
        entry = Watched(page)

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                entry.errors.append(f"console: {message.text}")

        def on_page_error(error: Error) -> None:
            entry.errors.append(f"page error: {error}")

        async def on_dialog(dialog: Dialog) -> None:
            entry.errors.append(f"dialog: {dialog.message}")
            await dialog.dismiss()

        page.on("console", on_console)
        page.on("pageerror", on_page_error)
        page.on("dialog", on_dialog)
        await page.goto(http_base(app) + path)
        watched.append(entry)
        return entry

    yield opener
    problems = [problem for entry in watched for problem in entry.problems()]
    for entry in watched:
        await entry.page.context.close()
    assert problems == [], problems
