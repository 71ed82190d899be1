"""Fixtures for tests that drive a real web client in a real browser.

- ``hydrogen_site``: Hydrogen built from npm (once per cache key, see ``webapp.py``) and served on
  loopback for the whole session.
- ``browser``: a fresh headless Chromium (its own profile under the test's tmp dir). When the
  test fails, every open page is saved as a PNG in the tmp dir and the path printed, with the
  page's console output beside it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, ConsoleMessage, Page, async_playwright

from tests.browser.chromium import CHROMIUM_ARGS, NoChromium, chromium_path
from tests.browser.webapp import BuildError, StaticSite, build_hydrogen

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


@pytest.fixture(scope="session")
def hydrogen_site() -> Iterator[StaticSite]:
    try:
        root = build_hydrogen()
    except BuildError as err:
        pytest.fail(str(err), pytrace=False)
    site = StaticSite(root)
    try:
        yield site
    finally:
        site.close()


class Browser:
    """One Chromium with its pages' console output kept for the failure report."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.console: list[str] = []
        self._fresh = list(context.pages)  # the blank page a persistent context opens with
        for page in self._fresh:
            self._watch(page)
        context.on("page", self._watch)

    def _watch(self, page: Page) -> None:
        def record(message: ConsoleMessage) -> None:
            self.console.append(f"[{message.type}] {message.text}")

        page.on("console", record)
        page.on("pageerror", lambda error: self.console.append(f"[pageerror] {error}"))

    async def new_page(self) -> Page:
        if self._fresh:
            return self._fresh.pop()
        return await self.context.new_page()

    async def save_evidence(self, directory: Path) -> list[Path]:
        saved = []
        for number, page in enumerate(self.context.pages):
            path = directory / f"page-{number}.png"
            try:
                await page.screenshot(path=str(path), full_page=True, timeout=10_000)
            except Exception as err:  # a crashed page: keep going, say why
                self.console.append(f"[screenshot of page {number} failed] {err}")
                continue
            saved.append(path)
        log = directory / "browser-console.log"
        log.write_text("\n".join(self.console) + "\n")
        saved.append(log)
        return saved


@pytest.fixture
async def browser(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Browser]:
    try:
        executable = chromium_path()
    except NoChromium as err:
        pytest.fail(str(err), pytrace=False)
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(executable),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        browser = Browser(context)
        try:
            yield browser
        finally:
            if _failed(request.node):
                saved = await browser.save_evidence(tmp_path)
                print("browser evidence:", *(str(p) for p in saved), sep="\n  ")
            await context.close()
