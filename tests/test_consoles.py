"""The consoles in a real browser: Debian's Chromium driven by Playwright, against the
API served by uvicorn over the real database with the demo county.

A grid worker logs in, watches an SOS arrive without reloading, takes it and sees the
state change and the timeline grow; a technician closes a work order; a grid worker
cannot open another grid's resident; the governance overview reads in Chinese and in
English. With ``SHOUHU_SCREENSHOTS=<dir>`` the same run saves each console's
screenshot there (docs/screenshots/ holds the ones the README shows).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, ViewportSize, expect

from alerts.acknowledge import Actor, acknowledge, resolve
from alerts.care import close_task
from alerts.care_sweep import sweep, sweep_visits
from alerts.supervise import Supervised, supervise_incident
from alerts.visits import period_of
from api.main import create_app
from devices.kinds import Outcome, TaskOutcome, VisitFrequency
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.support.browser import assert_accessible_basics, log_in, snap
from tests.support.care import RULES, WORKER, heard, last_will
from tests.support.escalation import ZONE, press, q
from tests.support.services import serve_app

GRID_A, GRID_B = "dongguan-01-g1", "xiguan-02-g2"
LIVE_WAIT_MS = 5_000


@pytest.fixture
def site(county_url: str) -> Iterator[dict[str, Any]]:
    """The API and consoles over the demo county, with a visit and a repair order open."""
    now = datetime.now(UTC)
    with psycopg.connect(county_url, autocommit=True) as conn:
        band = conn.execute(
            "SELECT d.id FROM devices d JOIN residents r ON r.id = d.resident_id WHERE r.grid_id = %s ORDER BY d.id",
            (GRID_A,),
        ).fetchall()
        last_will(conn, band[-1][0], now - timedelta(hours=2))
        heard(conn, "cam-002", now - timedelta(hours=1), reported_online=True)
        heard(conn, "cam-002", now - timedelta(minutes=30), reported_online=False, reported_reason="video_lost")
        sweep(conn, now, RULES, lock_key=0x7E57_C0DE)
        tokens = {
            "grid": create_token(conn, role=Role.GRID_WORKER, areas=[GRID_A], label="董思远", now=now, expires_at=None),
            "tech": create_token(
                conn, role=Role.TECHNICIAN, areas=["dongguan"], label="田霞", now=now, expires_at=None
            ),
            "operator": create_token(conn, role=Role.OPERATOR, areas=[], label="综治值班", now=now, expires_at=None),
        }
        wristbands = [r[0] for r in band]
        other = conn.execute(
            "SELECT d.id FROM devices d JOIN residents r ON r.id = d.resident_id WHERE r.grid_id = %s ORDER BY d.id",
            (GRID_B,),
        ).fetchone()
    assert other is not None
    for base in serve_app(create_app(Settings(database_url=county_url))):
        yield {"base": base, "url": county_url, "tokens": tokens, "wristbands": wristbands, "other_band": other[0]}


def test_a_grid_worker_sees_an_sos_arrive_live_takes_it_and_watches_the_timeline_grow(
    browser: Browser, site: dict[str, Any]
) -> None:
    page = log_in(browser, site["base"], site["tokens"]["grid"])
    assert page.url.endswith("/console/grid")
    expect(page.locator("#incident-list")).to_contain_text("手环离线")  # the visit already open
    assert_accessible_basics(page)
    before = page.locator("#incident-list [data-incident]").count()
    # A press as the hub stores it; the page must show it without a reload.
    incident = press(site["url"], site["wristbands"][0], datetime.now(UTC), msg_id="console-live")
    row = page.locator(f"#incident-list [data-incident='{incident}']")
    expect(row).to_be_visible(timeout=LIVE_WAIT_MS)
    expect(page.locator("#incident-list [data-incident]").first).to_have_attribute("data-incident", str(incident))
    assert page.locator("#incident-list [data-incident]").count() == before + 1
    # The grid worker's README screenshot is taken signed in as a person: tests/test_consoles_staff.py.
    row.locator("a").click()
    page.wait_for_url(f"**/console/incidents/{incident}")
    assert_accessible_basics(page)
    expect(page.locator("#incident-state")).to_have_text("待接单")
    expect(page.locator("a.call").first).to_have_attribute("href", re.compile(r"^tel:\+\d+$"))
    events_before = page.locator("#timeline li").count()
    page.get_by_role("button", name="接单（我去处置）").click()
    expect(page.locator("#incident-state")).to_have_text("已接单")
    expect(page.locator("dd", has_text="董思远")).to_be_visible()
    assert page.locator("#timeline li").count() > events_before
    expect(page.locator("#timeline")).to_contain_text("董思远（网格员）接单")
    page.get_by_label("处置结果").select_option("visited_fine")
    page.get_by_label("备注").fill("老人无恙")
    page.get_by_role("button", name="办结").click()
    expect(page.locator("#incident-state")).to_have_text("已办结")


def test_a_grid_worker_cannot_open_another_grids_incident(browser: Browser, site: dict[str, Any]) -> None:
    elsewhere = press(site["url"], site["other_band"], datetime.now(UTC), msg_id="console-other")
    page = log_in(browser, site["base"], site["tokens"]["grid"])
    answer = page.goto(f"{site['base']}/console/incidents/{elsewhere}")
    assert answer is not None
    assert answer.status == 404
    expect(page.locator("main")).to_contain_text("未找到，或不在您的辖区内")
    expect(page.locator("main")).not_to_contain_text("地址")
    # Nor can a post act on it.
    refused = page.request.post(
        f"{site['base']}/console/incidents/{elsewhere}/ack", headers={"Origin": site["base"]}, max_redirects=0
    )
    assert refused.status == 404


def test_a_technician_closes_a_work_order_from_the_board(browser: Browser, site: dict[str, Any]) -> None:
    page = log_in(browser, site["base"], site["tokens"]["tech"])
    assert page.url.endswith("/console/tech")
    assert_accessible_basics(page)
    expect(page.locator("#offline-table")).to_contain_text("cam-002")
    expect(page.locator("#offline-table")).to_contain_text("视频丢失")
    expect(page.locator("svg.chart")).to_be_visible()
    page.locator("#orders a", has_text="cam-002").click()
    expect(page.locator("#task-state")).to_have_text("待接单")
    page.get_by_label("处置结果").select_option("repaired")
    page.get_by_label("备注").fill("更换了电源适配器")
    page.get_by_role("button", name="销号").click()
    expect(page.locator("#task-state")).to_have_text("已销号")
    page.goto(f"{site['base']}/console/tech")
    expect(page.locator("#orders")).not_to_contain_text("cam-002")


def follow_ups_due_this_month(url: str, bands: list[str]) -> None:
    """Two SOS of GRID_A resolved, their follow-up visits due just now (inside this local
    month at any hour, even a minute after it began): one visited on time, one not."""
    now = datetime.now(UTC)
    month_start = period_of(VisitFrequency.MONTHLY, now, ZONE).start
    deadline = now - min(timedelta(minutes=2), (now - month_start) / 2)
    resolved = deadline - RULES.follow_up_due
    operator = Actor("staff", "op-01", "值班员", None, "operator")
    with psycopg.connect(url, autocommit=True) as conn:
        for band, msg_id in zip(bands, ("visit-1", "visit-2"), strict=True):
            incident = press(url, band, resolved - timedelta(minutes=5), msg_id=msg_id)
            with conn.transaction():
                resolve(conn, incident, Outcome.VISITED_FINE, "", operator, resolved)
        [visited, _missed] = sweep_visits(conn, resolved + timedelta(seconds=1), RULES, lock_key=0x7E57_C0DE).follow_ups
        with conn.transaction():
            close_task(conn, visited, TaskOutcome.RESIDENT_FINE, "", WORKER, deadline - timedelta(seconds=1))


def taken_and_supervised(url: str, bands: list[str]) -> None:
    """An SOS taken 25 s after the press, and one nobody took, overdue and supervised (督办)."""
    now = datetime.now(UTC)
    operator = Actor("staff", "op-01", "值班员", None, "operator")
    pressed = now - timedelta(minutes=20)
    taken = press(url, bands[0], pressed, msg_id="console-taken")
    untaken = press(url, bands[1], now - timedelta(minutes=10), msg_id="console-overview")
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            acknowledge(conn, taken, WORKER, "console", pressed + timedelta(seconds=25), resolve_timeout_s=1800)
        with conn.transaction():
            done = supervise_incident(conn, untaken, operator, now, ack_timeout_s=120, resolve_timeout_s=1800)
    assert done.result is Supervised.DONE


def test_the_governance_overview_in_chinese_and_english(browser: Browser, site: dict[str, Any]) -> None:
    taken_and_supervised(site["url"], [site["wristbands"][4], site["wristbands"][1]])
    follow_ups_due_this_month(site["url"], site["wristbands"][2:4])
    page = log_in(browser, site["base"], site["tokens"]["operator"], ViewportSize(width=1024, height=768))
    assert page.url.endswith("/console/overview")
    assert_accessible_basics(page)
    expect(page.locator("#severity-table")).to_contain_text("东关村第一网格")
    expect(page.locator("#sos-response")).to_contain_text("60 秒内接单")
    # The response figures against the telecare targets, and the supervision counts.
    # Of four SOS in the period one was taken within 60 s (the two follow-ups' were taken at 5 min).
    expect(page.locator("#within_60")).to_contain_text("25.0% （目标 97.5%，未达标）")
    expect(page.locator("#supervised-in-period")).to_have_text("1")
    expect(page.locator("#supervised-open")).to_have_text("1")
    # The month's visit rate against the 100 % target: one of two follow-ups on time.
    expect(page.locator("#visit-h")).to_contain_text("本月探视率（目标 100%）")
    row = page.locator(f"#visit-rate tr[data-area='{GRID_A}']")
    expect(row).to_contain_text("东关村第一网格")
    expect(row).to_have_class("below-target")
    expect(page.locator("#visit-rate-total")).to_contain_text("50.0% / 100.0%")
    expect(page.locator("h2", has_text="今晚无网格员值班的网格")).to_be_visible()
    snap(page, "governance-overview")
    page.get_by_role("link", name="English").click()
    expect(page.locator("h1")).to_contain_text("Governance overview")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    page.goto(f"{site['base']}/console/overview")  # the choice is remembered
    expect(page.locator("h1")).to_contain_text("Governance overview")


def test_a_page_without_a_session_goes_to_the_login(browser: Browser, site: dict[str, Any]) -> None:
    page = browser.new_page()
    page.goto(f"{site['base']}/console/grid")
    assert page.url.endswith("/console/login")
    page.get_by_label("访问令牌").fill("shh_not-a-token")
    page.get_by_role("button", name="登录", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("令牌无效")


def test_a_visit_page_is_an_audited_read_of_the_resident(site: dict[str, Any]) -> None:
    with httpx.Client(base_url=site["base"]) as client:
        client.post("/api/v1/session", json={"token": site["tokens"]["grid"]}).raise_for_status()
        [(task_id, resident)] = q(site["url"], "SELECT id, resident_id FROM care_tasks WHERE kind = 'visit'")
        page = client.get(f"/console/tasks/{task_id}")
        assert page.status_code == 200
        audit = q(site["url"], "SELECT action, subject, detail->>'via' FROM audit_log WHERE action = 'read_resident'")
        assert audit == [("read_resident", f"resident:{resident}", "console")]
        # A post from another site is refused even with the session cookie.
        forged = client.post(f"/console/tasks/{task_id}/start", headers={"Origin": "https://evil.example"})
        assert forged.status_code == 403
