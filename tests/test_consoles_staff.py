"""A grid worker signs in to the console as themselves, in Debian's Chromium: their phone
number, a code texted through the phone-network simulator (read back from it, as a
person reads their phone), then "mine": their grids, on duty now first, and the SOS
of their grid with the call and text Shouhu sent them.

With ``SHOUHU_SCREENSHOTS=<dir>`` the run saves the grid worker's console there
(``docs/screenshots/grid-console.png`` in the README).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect

from api.deps import get_now
from api.main import create_app
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from tests.support.browser import PHONE, assert_accessible_basics, assert_fits, snap
from tests.support.escalation import DAY, FROM, PHONE_SID, PHONE_TOKEN, Clock, make_router, messages, press, q
from tests.support.services import serve_app

GRID_WORKER_PHONE, GRID = "+12085550185", "dongguan-01-g1"  # 董思远, 东关村第一网格
CODE = re.compile(r"登录验证码 (\d{6})")


@pytest.fixture
def site(county_url: str, phone_network: str) -> Iterator[dict[str, Any]]:
    """The consoles at DAY (Tuesday 10:00, 董思远 on duty), an SOS in his grid already paged."""
    clock = Clock(DAY)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = Settings(
        database_url=county_url,
        public_url=base,
        twilio_account_sid=PHONE_SID,
        twilio_auth_token=PHONE_TOKEN,
        twilio_from=FROM,
        twilio_api_base=phone_network,
    )
    app = create_app(settings)
    app.dependency_overrides[get_now] = clock
    [(band,)] = q(
        county_url,
        "SELECT d.id FROM devices d JOIN residents r ON r.id = d.resident_id WHERE r.grid_id = %s"
        " ORDER BY d.id LIMIT 1",
        GRID,
    )
    incident = press(county_url, band, DAY, msg_id="staff-console")
    router = make_router(county_url, phone_network, clock, public_url=base)
    try:
        router.run_due_steps()
        router.send_pending()
        for url in serve_app(app, port=port):
            yield {"base": url, "phone": phone_network, "incident": incident, "clock": clock, "db": county_url}
    finally:
        router.close()


def texted_code(phone_base: str, to: str) -> str:
    bodies = [m["body"] for m in messages(phone_base) if m["to"] == to and CODE.search(m["body"])]
    assert bodies, f"no sign-in code was texted to {to}"
    found = CODE.search(bodies[-1])
    assert found is not None
    return found.group(1)


def test_a_grid_worker_signs_in_by_a_texted_code_and_sees_their_own_list(
    browser: Browser, site: dict[str, Any]
) -> None:
    page = browser.new_page(viewport=PHONE)
    page.goto(f"{site['base']}/console/grid")
    assert page.url.endswith("/console/login")
    assert_accessible_basics(page)
    assert_fits(page)
    page.get_by_label("手机号", exact=True).fill(GRID_WORKER_PHONE)
    page.get_by_role("button", name="发送验证码").click()
    expect(page.get_by_role("status").filter(has_text="验证码已发送")).to_be_visible()
    code = texted_code(site["phone"], GRID_WORKER_PHONE)

    page.get_by_label("验证码", exact=True).fill(f"{(int(code) + 1) % 1_000_000:06d}")
    page.get_by_role("button", name="验证码登录").click()
    expect(page.get_by_role("alert")).to_contain_text("验证码错误")

    page.get_by_label("验证码", exact=True).fill(code)
    page.get_by_role("button", name="验证码登录").click()
    page.wait_for_url("**/console/grid")
    assert_accessible_basics(page)
    assert_fits(page)
    expect(page.locator(".who")).to_have_text("董思远（网格员）")
    expect(page.locator("#my-grids")).to_contain_text("东关村第一网格")
    expect(page.locator("#my-grids")).to_contain_text("值班中")
    row = page.locator(f"#incident-list [data-incident='{site['incident']}']")
    expect(row).to_contain_text("值班中")
    sent = row.locator("[data-sent-to-me]")
    expect(sent).to_contain_text("电话")
    expect(sent).to_contain_text("短信")
    # Nothing of another grid: a grid worker's list is theirs.
    assert page.locator("#incident-list [data-incident]").count() == 1
    # The untaken SOS is due when its first step's wait runs out; not overdue yet.
    [(wait_s,)] = q(
        site["db"],
        "SELECT (policy_snapshot->'steps'->0->>'wait_s')::int FROM incidents WHERE id = %s",
        site["incident"],
    )
    due = row.locator("[data-due] time")
    expect(due).to_contain_text("截止")
    assert datetime.fromisoformat(due.get_attribute("datetime") or "") == DAY + timedelta(seconds=wait_s)
    expect(row.locator(".badge.overdue")).to_have_count(0)
    snap(page, "grid-console")
    site["clock"].advance(wait_s)  # due now: overdue, on the list as on the incident page
    page.reload()
    expect(row.locator(".badge.overdue")).to_have_text("已逾期")
    page.goto(f"{site['base']}/console/incidents/{site['incident']}")
    expect(page.locator("#incident-due")).to_contain_text("已逾期")

    # The session is theirs: the API says who, and the code cannot be used twice.
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    me = httpx.get(f"{site['base']}/api/v1/incidents", cookies=cookies)
    assert me.status_code == 200
    assert [i["id"] for i in me.json()["data"]] == [site["incident"]]
    again = httpx.post(
        f"{site['base']}/api/v1/session/sign-in", json={"phone": GRID_WORKER_PHONE, "code": code}
    )
    assert again.status_code == 401
