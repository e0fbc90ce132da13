"""督办 in a real browser: an operator opens an overdue SOS in Debian's Chromium, clicks
督办, sees it on the timeline, and the next level is paged by the router; a grid
worker gets no such button. The API, the phone-network simulator and the router run
on one clock the test moves (tests/support/callbacks.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from shouhu.tokens import Role, create_token
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.callbacks import Stack
from tests.support.escalation import DAY, press, q


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run the README's test command")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _log_in(browser: Browser, stack: Stack, role: Role, areas: list[str], label: str) -> Page:
    with psycopg.connect(stack.db) as conn:
        secret = create_token(conn, role=role, areas=areas, label=label, now=stack.clock(), expires_at=None)
    page = browser.new_page(viewport={"width": 412, "height": 915})
    page.goto(f"{stack.api}/console/login")
    page.get_by_label("访问令牌").fill(secret)
    page.get_by_role("button", name="登录").click()
    page.wait_for_url(lambda url: "/console/login" not in url)
    return page


def test_an_operator_supervises_an_overdue_sos_and_the_next_level_is_paged(browser: Browser, stack: Stack) -> None:
    band, grid = q(
        stack.db,
        "SELECT d.id, r.grid_id FROM devices d JOIN residents r ON r.id = d.resident_id"
        " WHERE d.kind = 'wristband' ORDER BY d.id LIMIT 1",
    )[0]
    incident = press(stack.db, band, DAY, msg_id="console-supervise")
    stack.router.run_once()  # step 1: the grid workers
    stack.clock.advance(125)  # past the first wait: overdue; the guardians are paged on time
    stack.router.run_once()
    operators_paged = "SELECT count(*) FROM notification_attempts WHERE incident_id = %s AND step = 3"
    assert q(stack.db, operators_paged, incident) == [(0,)]

    worker = _log_in(browser, stack, Role.GRID_WORKER, [grid], "董思远")
    worker.goto(f"{stack.api}/console/incidents/{incident}")
    expect(worker.locator("#incident-due")).to_contain_text("已逾期")
    expect(worker.get_by_role("button", name="督办")).to_have_count(0)

    page = _log_in(browser, stack, Role.OPERATOR, [], "综治值班")
    page.goto(f"{stack.api}/console/incidents/{incident}")
    expect(page.locator("#incident-due")).to_contain_text("已逾期")
    expect(page.locator("#timeline")).not_to_contain_text("已督办")
    page.get_by_role("button", name="督办").click()
    page.wait_for_url(f"**/console/incidents/{incident}")
    expect(page.locator("#timeline")).to_contain_text("已督办")

    # The platform step finds nobody (none configured) and the operators are paged now,
    # not 120 s later.
    stack.router.run_once()
    assert q(stack.db, operators_paged, incident)[0][0] > 0
    page.reload()
    # Three steps paged (第 1 步：通知网格员 … the operators), as the incident's story tells them.
    expect(page.locator("#timeline li.story-step", has_text="：通知")).to_have_count(3)

    # The overview counts it, beside the response figures and their telecare targets.
    page.goto(f"{stack.api}/console/overview")
    expect(page.locator("#supervised-in-period")).to_have_text("1")
    expect(page.locator("#supervised-open")).to_have_text("1")
    expect(page.locator("#within_60")).to_contain_text("目标 97.5%")
    expect(page.locator("#within_180")).to_contain_text("目标 99.0%")
    expect(page.locator("#within_60")).to_contain_text("未达标")  # nobody took it in 60 s
