"""Debian's Chromium, as the consoles' browser tests and benchmark launch it, and what
those tests share: the ``browser`` fixture, logging in, screenshots, the checks every
page owes a screen reader and a phone."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, ViewportSize, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# The flags this machine's closed network needs (no background fetches to Google).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = ViewportSize(width=412, height=915)
# The narrowest phone the consoles promise to fit without scrolling sideways.
SMALL_PHONE = ViewportSize(width=375, height=812)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run the README's test command")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def log_in(browser: Browser, base: str, token: str, viewport: ViewportSize = PHONE) -> Page:
    """A new page on a phone, logged in to the consoles at ``base`` with ``token``."""
    page = browser.new_page(viewport=viewport)
    page.goto(f"{base}/console/login")
    page.get_by_label("访问令牌").fill(token)
    page.get_by_role("button", name="登录").click()
    page.wait_for_url(lambda url: "/console/login" not in url)
    return page


def snap(page: Page, name: str) -> None:
    """With ``SHOUHU_SCREENSHOTS=<dir>``, the whole page saved as ``<dir>/<name>.png`` (the README's pictures)."""
    folder = os.environ.get("SHOUHU_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def assert_accessible_basics(page: Page) -> None:
    """What every page owes a screen reader: a language, one main landmark, one h1, labelled fields."""
    assert page.locator("html").get_attribute("lang") in ("zh-CN", "en")
    assert page.locator("main").count() == 1
    assert page.locator("h1").count() == 1
    for field in page.locator("input:not([type=hidden]), select").all():
        field_id = field.get_attribute("id")
        assert field_id, "a form field without an id cannot be labelled"
        assert page.locator(f"label[for='{field_id}']").count() == 1, f"field {field_id} has no label"
    for image in page.locator("svg[role=img]").all():
        assert image.get_attribute("aria-labelledby")


def assert_fits(page: Page) -> None:
    """The page is no wider than its viewport: nothing makes a phone scroll sideways."""
    viewport = page.viewport_size
    assert viewport is not None
    width = page.evaluate("Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)")
    assert width <= viewport["width"], f"{page.url} is {width} px wide on a {viewport['width']} px screen"
