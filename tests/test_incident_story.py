"""The incident page tells what happened: each step, each call and text with its
person and how it ended, who declined, who took it, the outcome and the note.

An SOS is paged for real: the router calls and texts two grid workers through the
phone-network simulator, whose callees are busy, do not answer, text back "2"
(cannot go) and press 1 on the retried call; the simulator posts signed callbacks to
the API. The story is then read as the console reads it (``api/consoles/queries.py``)
and, in Chromium on a 375 px phone, as a person sees it after the incident is resolved.
With ``SHOUHU_SCREENSHOTS=<dir>`` the browser test saves the README's incident picture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, expect
from psycopg.rows import dict_row

from alerts.acknowledge import Actor, Result, resolve
from api.consoles import queries
from api.consoles.i18n import Lang, actor_label, person_label
from api.consoles.pages import OUTCOME_WORDS
from api.consoles.story import StoryLine, attempt_line, story
from api.deps import get_now
from api.main import create_app
from devices.kinds import Outcome
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.support.browser import SMALL_PHONE, assert_accessible_basics, assert_fits, log_in, snap
from tests.support.callbacks import CALLBACK_DEADLINE_S, Stack
from tests.support.escalation import DAY, press, q, wristband_in
from tests.support.hub import wait_until

SECOND_ID, SECOND_NAME, SECOND_PHONE = "gw-story", "赵网格", "+12125550143"  # not in the demo county
NOTE = "老人无恙，女儿已到"
# What no line of the story may show: machines' ids and the old faceless line.
INTERNAL = ("router-", "twilio", "token:", "staff:", "guardian:", "shouhu-hub-", "已发送通知", "attempt_")


@dataclass(frozen=True)
class Played:
    incident: int
    code: str
    first_name: str  # the grid worker on the roster: busy, then texts "2"
    first_phone: str


def add_second_grid_worker(url: str, grid: str) -> None:
    """A second grid worker on duty in ``grid`` around the clock (the demo county has one per grid)."""
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1 FROM staff WHERE phone = %s", (SECOND_PHONE,)).fetchone() is None
        conn.execute(
            "INSERT INTO staff (id, name, role, phone) VALUES (%s, %s, 'grid_worker', %s)",
            (SECOND_ID, SECOND_NAME, SECOND_PHONE),
        )
        conn.execute("INSERT INTO staff_areas (staff_id, area_id) VALUES (%s, %s)", (SECOND_ID, grid))
        conn.execute(
            "INSERT INTO duty_shifts (staff_id, area_id, weekdays, start_time, end_time)"
            " VALUES (%s, %s, '{1,2,3,4,5,6,7}', '00:00', '00:00')",
            (SECOND_ID, grid),
        )


def settled(stack: Stack) -> None:
    """Wait until every call and SMS due now has its final status from the network (retries wait their turn)."""
    unsettled = """
        SELECT count(*) = 0 FROM notification_attempts WHERE channel IN ('voice', 'sms')
          AND (state = 'sent' OR (state = 'pending' AND coalesce(not_before, %s) <= %s))
    """
    wait_until(
        lambda: q(stack.db, unsettled, stack.clock(), stack.clock()) == [(True,)],
        CALLBACK_DEADLINE_S,
        "every call and SMS due now settled",
    )


def play_an_sos(stack: Stack) -> Played:
    """An SOS: busy, no answer, a "2" by SMS, a 1 pressed on the retried call, resolved with a note."""
    device, grid, _resident = wristband_in(stack.db, night_covered=False)
    add_second_grid_worker(stack.db, grid)
    incident = press(stack.db, device, stack.clock())
    [(code,)] = q(stack.db, "SELECT code FROM incidents WHERE id = %s", incident)
    stack.router.run_due_steps()
    [(first_name, first_phone)] = q(
        stack.db,
        "SELECT s.name, a.address FROM notification_attempts a JOIN staff s ON s.id = a.recipient_id"
        " WHERE a.channel = 'voice' AND a.address <> %s",
        SECOND_PHONE,
    )
    stack.behave(first_phone, answer="busy", sms="delivered")
    stack.behave(SECOND_PHONE, answer="no-answer", sms="delivered")
    stack.send_due()
    settled(stack)

    reply = stack.text(first_phone, f"{code} 2")  # "I cannot go"
    assert reply["status"] == 200

    stack.behave(SECOND_PHONE, answer="press1")
    stack.clock.advance(20)  # the calls' second tries
    stack.send_due()
    taken = "SELECT state = 'acknowledged' FROM incidents WHERE id = %s"
    wait_until(lambda: q(stack.db, taken, incident) == [(True,)], CALLBACK_DEADLINE_S, "the keypress to take it")
    stack.send_due()  # the first grid worker is told who took it
    settled(stack)

    stack.clock.advance(600)
    taker = Actor("staff", SECOND_ID, SECOND_NAME, SECOND_PHONE, "grid_worker")
    with psycopg.connect(stack.db) as conn:
        assert resolve(conn, incident, Outcome.VISITED_FINE, NOTE, taker, stack.clock()) is Result.DONE
    return Played(incident, code, first_name, first_phone)


def told(stack: Stack, incident: int, lang: Lang = Lang.ZH) -> list[StoryLine]:
    outcomes = {o.value: words[0] if lang is Lang.ZH else words[1] for o, words in OUTCOME_WORDS.items()}
    with psycopg.connect(stack.db, row_factory=dict_row) as conn:
        return story(lang, queries.timeline(conn, incident), queries.attempts(conn, incident), outcomes)


def test_the_story_names_each_call_and_text_its_person_and_how_it_ended(stack: Stack) -> None:
    played = play_an_sos(stack)
    first = f"{played.first_name}（网格员）"
    second = f"{SECOND_NAME}（网格员）"

    lines = [(line.headline, line.result) for line in told(stack, played.incident)]

    expected = [
        ("收到报警", "一键求助"),
        ("第 1 步：通知网格员", ""),
        (f"电话 → {first}", "占线"),
        (f"短信 → {first}", "短信已送达"),
        (f"控制台 → {first}", "已推送到控制台"),
        (f"电话 → {second}", "无人接听"),
        (f"短信 → {second}", "短信已送达"),
        (f"{first}无法前往", "短信回复"),
        (f"电话 → {second}（第 2 次）", "接听并按 1：前往处置"),
        (f"{second}接单", "电话按键"),
        (f"短信 · 告知 → {first}", "短信已送达"),
        (f"{second}办结", f"已上门，老人无恙：{NOTE}"),
    ]
    for line in expected:
        assert line in lines, f"{line} is not told: {lines}"
    # In the order it happened: the step, then its pages; declined, taken, told, resolved.
    positions = [lines.index(line) for line in expected[1:2] + expected[7:]]
    assert positions == sorted(positions), lines
    assert lines.index(expected[1]) < lines.index(expected[2])
    # The first worker's retried calls: busy again, or never placed because the SOS was taken first.
    retried = [result for headline, result in lines if headline.startswith(f"电话 → {first}（第 ")]
    assert set(retried) <= {"占线", "未发送：已有人接单或事件已结束"}, retried
    # No provider callback, keypress or SMS reply gets a line of its own, nor any machine's id.
    assert len(lines) == len(expected) + len(retried) + 1, "\n".join(map(str, lines))
    for headline, result in lines:
        assert not any(word in headline + result for word in INTERNAL), (headline, result)


def test_the_story_in_english(stack: Stack) -> None:
    played = play_an_sos(stack)
    lines = [(line.headline, line.result) for line in told(stack, played.incident, Lang.EN)]
    assert (f"Call → {SECOND_NAME} (grid worker) (try 2)", "answered, pressed 1: going") in lines
    assert (f"{played.first_name} (grid worker) cannot go", "by SMS reply") in lines
    assert (f"{SECOND_NAME} (grid worker) resolved", f"Visited, resident fine — {NOTE}") in lines


def test_actor_labels_are_words_and_names_pass_through() -> None:
    assert actor_label(Lang.ZH, "token:3") == "接口令牌 #3"
    assert actor_label(Lang.EN, "token:3") == "API token #3"
    assert actor_label(Lang.ZH, "router-shouhu-hub-vm") == "自动通知"
    assert actor_label(Lang.ZH, "shouhu-hub-vm") == "网关"
    assert actor_label(Lang.ZH, "sms:+8613800000000") == "短信 +8613800000000"
    assert actor_label(Lang.ZH, "twilio") == "电话网络"
    assert actor_label(Lang.ZH, "care") == "设备巡检"
    assert actor_label(Lang.ZH, "device:wb-0042") == "设备 wb-0042"
    assert actor_label(Lang.ZH, "董思远（网格员）") == "董思远（网格员）"
    assert actor_label(Lang.ZH, "token:") == "token:"  # not an id: shown as it is, never hidden
    assert actor_label(Lang.ZH, None) == ""
    assert person_label(Lang.ZH, "董思远", "grid_worker") == "董思远（网格员）"
    assert person_label(Lang.ZH, "董思远（网格员）", "grid_worker") == "董思远（网格员）"
    assert person_label(Lang.EN, "Li Mei", "guardian") == "Li Mei (guardian)"
    assert person_label(Lang.ZH, "综治值班", "no_such_role") == "综治值班"


def test_the_incident_page_tells_the_story_after_it_is_resolved_on_a_375_px_phone(
    browser: Browser, stack: Stack
) -> None:
    played = play_an_sos(stack)
    with psycopg.connect(stack.db) as conn:
        operator = create_token(
            conn, role=Role.OPERATOR, areas=[], label="综治值班", now=stack.clock(), expires_at=None
        )
    page = log_in(browser, stack.api, operator, SMALL_PHONE)
    assert_fits(page)  # the overview, the operator's home
    page.goto(f"{stack.api}/console/incidents/{played.incident}")
    assert_accessible_basics(page)

    expect(page.locator("#incident-state")).to_have_text("已办结")
    expect(page.locator("#incident-outcome")).to_have_text("已上门，老人无恙")
    expect(page.locator("#incident-note")).to_have_text(NOTE)
    story_list = page.locator("#timeline")
    expect(story_list).to_contain_text(f"{SECOND_NAME}（网格员）接单")
    expect(story_list.locator("li", has_text=f"电话 → {SECOND_NAME}（网格员）（第 2 次）")).to_contain_text(
        "接听并按 1：前往处置"
    )
    expect(story_list.locator("li", has_text=f"{played.first_name}（网格员）无法前往")).to_contain_text("短信回复")
    expect(story_list.locator("li", has_text=f"{SECOND_NAME}（网格员）办结")).to_contain_text(NOTE)
    for internal in INTERNAL:
        expect(page.locator("main")).not_to_contain_text(internal)
    expect(page.locator("#next-step")).to_have_count(0)  # resolved: nothing more will happen
    assert_fits(page)
    snap(page, "incident")

    icon = page.locator("link[rel=icon]").get_attribute("href")
    assert icon is not None
    served = page.request.get(f"{stack.api}{icon}")
    assert served.status == 200
    assert served.headers["content-type"].startswith("image/svg+xml")

    for console in ("/console/grid", "/console/tech", "/console/overview"):
        page.goto(f"{stack.api}{console}")
        assert_accessible_basics(page)
        assert_fits(page)


def _attempt(**changes: Any) -> queries.AttemptRow:
    fields: dict[str, Any] = {
        "id": 1,
        "created_at": DAY,
        "due_at": DAY,
        "settled_at": DAY,
        "purpose": "page",
        "round": 0,
        "step": 0,
        "channel": "voice",
        "attempt": 1,
        "state": "sent",
        "in_flight": False,
        "error": None,
        "recipient_kind": "staff",
        "recipient_id": "gw-1",
        "recipient_name": "董思远",
        "recipient_role": "grid_worker",
        "digit": None,
    }
    return queries.AttemptRow(**(fields | changes))


@pytest.mark.parametrize(
    ("changes", "headline", "result"),
    [
        ({"state": "pending"}, "电话 → 董思远（网格员）", "等待发送"),
        ({"state": "pending", "in_flight": True}, "电话 → 董思远（网格员）", "发送中"),
        ({"state": "sent"}, "电话 → 董思远（网格员）", "已拨出，振铃中"),
        ({"state": "answered", "digit": "2"}, "电话 → 董思远（网格员）", "接听并按 2：无法前往"),
        (
            {"state": "no_keypress", "attempt": 3},
            "电话 → 董思远（网格员）（第 3 次）",
            "接听但未按键（可能是语音信箱）",
        ),
        ({"channel": "sms", "state": "undelivered"}, "短信 → 董思远（网格员）", "短信未送达"),
        (
            {"channel": "sms", "state": "failed", "error": "twilio: failed (error 30003)"},
            "短信 → 董思远（网格员）",
            "失败：twilio: failed (error 30003)",
        ),
        (
            {"channel": "sms", "purpose": "repage", "recipient_kind": "guardian", "recipient_role": "guardian"},
            "短信 · 再次呼叫 → 董思远（监护人）",
            "已发出",
        ),
        (
            {
                "channel": "webhook",
                "purpose": "cap_alert",
                "recipient_kind": "platform",
                "recipient_id": "emergency-platform",
                "recipient_name": None,
                "recipient_role": "platform",
            },
            "平台 · 推送警报 → 应急平台",
            "平台已接收",
        ),
        ({"recipient_name": None}, "电话 → gw-1（网格员）", "已拨出，振铃中"),  # deleted from the registry since
    ],
)
def test_each_attempt_says_to_whom_and_how_it_ended(changes: dict[str, Any], headline: str, result: str) -> None:
    line = attempt_line(Lang.ZH, _attempt(**changes))
    assert (line.headline, line.result) == (headline, result)


def test_each_console_page_says_what_an_empty_part_means(county_url: str) -> None:
    """A county with nothing open, nothing offline and an SOS nobody was paged for yet."""
    with psycopg.connect(county_url) as conn:
        operator = create_token(conn, role=Role.OPERATOR, areas=[], label="综治值班", now=DAY, expires_at=None)
    app = create_app(Settings(database_url=county_url))
    app.dependency_overrides[get_now] = lambda: DAY
    with TestClient(app) as client:
        client.post("/api/v1/session", json={"token": operator}).raise_for_status()
        grid = client.get("/console/grid").text
        assert "暂无待处置事件" in grid
        overview = client.get("/console/overview").text
        assert "该时段内没有事件" in overview
        assert "当前没有离线设备" in overview
        assert "当前没有离线摄像头" in client.get("/console/tech").text
        device, _grid, _resident = wristband_in(county_url, night_covered=False)
        incident = press(county_url, device, DAY)
        page = client.get(f"/console/incidents/{incident}").text
        assert "尚未通知任何人" in page  # the router has not run: nobody paged yet, and it says so
        # What comes next if nobody takes it: the first step, due at the press (10:00 local).
        assert re.search(r'id="next-step">无人接单则 <time[^>]*>10:00:00</time>：第 1 步：通知网格员<', page)
        assert "收到报警" in page
        assert "Nobody has been paged yet" in client.get(f"/console/incidents/{incident}?lang=en").text
        assert 'rel="icon" href="/console/static/favicon.svg"' in page
        # Browsers ask for /favicon.ico whatever the page links: the same icon, typed as SVG.
        icon = client.get("/favicon.ico")
        assert icon.status_code == 200
        assert icon.headers["content-type"] == "image/svg+xml"
        assert icon.content == client.get("/console/static/favicon.svg").content
        assert icon.content.lstrip().startswith(b"<svg")
