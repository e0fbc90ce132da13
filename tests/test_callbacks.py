"""Twilio's callbacks end to end: keypresses, call and SMS status, SMS replies.

The router pages through the phone-network simulator. The simulated callee presses
1 or 2, lets voicemail answer, is busy, or texts back. The simulator then posts
signed callbacks over HTTP to the API, served by uvicorn. Everything runs against
the real database, with one clock, moved by the test, for the router and the API.
"""

from __future__ import annotations

import time
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
import xmlschema
from fastapi.testclient import TestClient
from psycopg.rows import class_row

from alerts.notifiers.twilio import KEYPRESS_CALLBACK_PATH, STATUS_CALLBACK_PATH
from api.main import create_app
from api.routes.callbacks import SMS_CALLBACK_PATH, SMS_HELP, Settlement, SmsReply, parse_sms_reply, settle
from shouhu.settings import Settings
from simulators.emergency_platform import create_emergency_platform
from simulators.phone_network import gather_action
from tests.support.callbacks import CALLBACK_DEADLINE_S, Stack, add_grid_worker, sign, snapshot
from tests.support.cap import cap_schema_path
from tests.support.escalation import (
    DAY,
    FROM,
    PHONE_TOKEN,
    PLATFORM_SECRET,
    calls,
    make_router,
    messages,
    platform_alerts,
    press,
    q,
)
from tests.support.escalation import wristband_in as _wristband_in
from tests.support.services import serve_app

STRANGER = "+12125550177"


@dataclass(frozen=True)
class Sos:
    incident: int
    code: str
    grid: str
    resident: str


def sos(stack: Stack) -> Sos:
    """An SOS from a resident whose grid has a grid worker on duty at DAY."""
    device, grid, resident = _wristband_in(stack.db, night_covered=False)
    incident = press(stack.db, device, DAY)
    code = q(stack.db, "SELECT code FROM incidents WHERE id = %s", incident)[0][0]
    return Sos(incident, code, grid, resident)


@dataclass(frozen=True)
class Page:
    id: int
    recipient_id: str
    address: str
    provider_id: str | None
    state: str


def pages(url: str, channel: str, step: int = 0) -> list[Page]:
    with psycopg.connect(url) as conn:
        return conn.cursor(row_factory=class_row(Page)).execute(
            "SELECT id, recipient_id, address, provider_id, state FROM notification_attempts"
            " WHERE purpose = 'page' AND channel = %s AND step = %s ORDER BY id",
            (channel, step),
        ).fetchall()


def attempt(url: str, attempt_id: int) -> Page:
    with psycopg.connect(url) as conn:
        row = conn.cursor(row_factory=class_row(Page)).execute(
            "SELECT id, recipient_id, address, provider_id, state FROM notification_attempts WHERE id = %s",
            (attempt_id,),
        ).fetchone()
    assert row is not None, f"no attempt {attempt_id}"
    return row


def events(url: str, name: str) -> list[tuple[Any, ...]]:
    return q(url, "SELECT actor, detail FROM incident_events WHERE event = %s ORDER BY id", name)


def said(twiml: str) -> str:
    say = ET.fromstring(twiml).find("Say")
    assert say is not None, twiml
    assert (say.get("language"), say.get("voice")) == ("cmn-CN", "Polly.Zhiyu")
    return say.text or ""


def texted(twiml: str) -> str:
    return ET.fromstring(twiml).findtext("Message") or ""


def phones_of_guardians(url: str, resident: str) -> set[str]:
    return {row[0] for row in q(url, "SELECT phone FROM guardians WHERE resident_id = %s", resident)}


# --- by voice ----------------------------------------------------------------------


def test_pressing_1_acknowledges_by_voice_and_tells_the_others_who_took_it(stack: Stack) -> None:
    case = sos(stack)
    add_grid_worker(stack.db, case.grid)
    stack.router.run_due_steps()
    voice = pages(stack.db, "voice")
    assert len(voice) == 2
    # The one paged last presses 1: everyone else has been paged when the press lands.
    taker, other = voice[-1], voice[0]
    assert all(p.id < taker.id for p in pages(stack.db, "sms") if p.recipient_id == other.recipient_id)
    stack.behave(taker.address, answer="press1")

    stack.router.send_pending()

    keypress, status = stack.wait_for_webhooks(2)
    assert (keypress["kind"], keypress["status"], keypress["params"]["Digits"]) == ("keypress", 200, "1")
    assert said(keypress["reply"]).startswith("已确认，您已接单")
    assert (status["kind"], status["status"], status["params"]["CallStatus"]) == ("status", 200, "completed")
    taker_name = q(stack.db, "SELECT name FROM staff WHERE id = %s", taker.recipient_id)[0][0]
    assert q(stack.db, "SELECT state, acknowledged_by, acknowledged_via FROM incidents") == [
        ("acknowledged", f"staff:{taker.recipient_id}", "voice")
    ]
    called = attempt(stack.db, taker.id)
    assert called.state == "answered"  # the completed status leaves a keypress answered
    assert called.provider_id == keypress["params"]["CallSid"]
    [(actor, detail)] = events(stack.db, "keypress")
    assert (actor, detail["digit"], detail["provider_id"]) == (f"staff:{taker.recipient_id}", "1", called.provider_id)
    assert q(stack.db, "SELECT count(*) FROM notification_attempts WHERE attempt > 1") == [(0,)]  # no retry

    stack.router.run_once()
    notices = [m for m in messages(stack.phone) if "接单处置" in m["body"]]
    assert [m["to"] for m in notices] == [other.address]
    assert taker_name in notices[0]["body"]
    assert case.code in notices[0]["body"]

    calls_before = len(calls(stack.phone))
    stack.clock.advance(600)
    stack.router.run_once()
    assert len(calls(stack.phone)) == calls_before
    assert q(stack.db, "SELECT count(*) FROM notification_attempts WHERE purpose = 'page' AND step > 0") == [(0,)]


def test_pressing_2_declines_and_when_the_whole_step_declined_the_guardians_are_paged_at_once(stack: Stack) -> None:
    case = sos(stack)
    second = add_grid_worker(stack.db, case.grid)
    stack.router.run_due_steps()
    [first] = [p for p in pages(stack.db, "voice") if p.address != second]
    stack.behave(first.address, answer="press2")
    guardians = phones_of_guardians(stack.db, case.resident)

    stack.router.send_pending()

    keypress, status = stack.wait_for_webhooks(2)
    assert keypress["params"]["Digits"] == "2"
    assert said(keypress["reply"]) == "已记录，您无法前往，我们将继续联系他人。"
    assert status["params"]["CallStatus"] == "completed"
    assert attempt(stack.db, first.id).state == "answered"
    [(actor, detail)] = events(stack.db, "declined")
    assert (actor, detail["via"]) == (f"staff:{first.recipient_id}", "voice")
    stack.router.run_once()
    assert not guardians & {c["to"] for c in calls(stack.phone)}  # the second worker has not answered yet
    assert q(stack.db, "SELECT state FROM incidents") == [("open",)]

    reply = stack.text(second, f"{case.code} 2")

    assert reply["status"] == 200
    assert texted(reply["reply"]) == f"【守护】{case.code} 已记录，您无法前往，我们将继续联系他人。"
    calls_before = len(calls(stack.phone))
    stack.router.run_once()  # the clock has not moved: the guardians are paged now, not in 120 s
    assert {c["to"] for c in calls(stack.phone)[calls_before:]} == guardians
    assert [d["reason"] for _a, d in events(stack.db, "step_advanced")] == ["everyone paged declined"]
    assert [d["via"] for _a, d in events(stack.db, "declined")] == ["voice", "sms"]


@pytest.mark.parametrize("decline", ["first", "last"])
def test_one_declines_and_the_other_cannot_be_reached_the_guardians_are_paged_at_once(
    stack: Stack, decline: str
) -> None:
    case = sos(stack)
    second = add_grid_worker(stack.db, case.grid)
    stack.router.run_due_steps()
    [first] = [p for p in pages(stack.db, "voice") if p.address != second]
    if decline == "first":
        stack.behave(first.address, answer="press2")  # "I cannot", before the other is given up
    stack.behave(second, answer="no-answer", sms="undelivered")
    guardians = phones_of_guardians(stack.db, case.resident)
    hooks = 4 if decline == "first" else 2  # keypress and status for the first; call and SMS status for the second

    stack.send_due()  # 0 s
    stack.wait_for_webhooks(hooks)
    stack.clock.advance(20)
    stack.send_due()  # the second's second tries
    stack.wait_for_webhooks(hooks + 2)
    stack.clock.advance(60)
    calls_before = len(calls(stack.phone))
    stack.send_due()  # 80 s: the second's third and last tries
    stack.wait_for_webhooks(hooks + 4)
    tries = q(
        stack.db,
        "SELECT channel, attempt, state FROM notification_attempts WHERE address = %s AND channel IN ('voice', 'sms')",
        second,
    )
    assert sorted(tries) == [(c, n, s) for c, s in (("sms", "undelivered"), ("voice", "no_answer")) for n in (1, 2, 3)]
    if decline == "last":
        assert not guardians & {c["to"] for c in calls(stack.phone)}  # the first might still answer
        reply = stack.text(first.address, f"{case.code} 2")
        assert texted(reply["reply"]) == f"【守护】{case.code} 已记录，您无法前往，我们将继续联系他人。"

    stack.router.run_once()  # still 80 s: the guardians now, not at 120 s

    assert {c["to"] for c in calls(stack.phone)[calls_before:]} == guardians | {second}  # its last call, then them
    [(_actor, advanced)] = events(stack.db, "step_advanced")
    assert advanced == {"reason": "everyone paged declined or could not be reached", "step": 0, "round": 0}
    assert q(stack.db, "SELECT due_at FROM escalation_actions WHERE step = 1") == [(DAY + timedelta(seconds=80),)]


def test_calls_that_always_fail_while_the_sms_is_delivered_keep_the_step_to_its_wait(stack: Stack) -> None:
    case = sos(stack)
    stack.router.run_due_steps()
    [page] = pages(stack.db, "voice")
    httpx.post(
        f"{stack.phone}/_sim/faults", json={"to": page.address, "fail": "error", "only": "call"}
    ).raise_for_status()
    stack.behave(page.address, sms="delivered")
    guardians = phones_of_guardians(stack.db, case.resident)

    stack.send_due()  # 0 s
    [hook] = stack.wait_for_webhooks(1)
    assert (hook["params"]["MessageStatus"], hook["status"]) == ("delivered", 200)
    stack.clock.advance(20)
    stack.send_due()
    stack.clock.advance(60)
    stack.send_due()  # 80 s: the third call fails too; the voice channel is given up
    assert q(
        stack.db,
        "SELECT channel, attempt, state FROM notification_attempts WHERE address = %s AND channel <> 'console'"
        " ORDER BY id",
        page.address,
    ) == [("voice", 1, "failed"), ("sms", 1, "delivered"), ("voice", 2, "failed"), ("voice", 3, "failed")]
    assert len(events(stack.db, "channel_given_up")) == 1

    stack.clock.advance(39)
    stack.router.run_once()  # 119 s: the SMS reached the grid worker, who may yet reply
    assert not guardians & {c["to"] for c in calls(stack.phone)}
    assert events(stack.db, "step_advanced") == []
    stack.clock.advance(1)
    stack.router.run_once()  # 120 s
    assert guardians <= {c["to"] for c in calls(stack.phone)}


def call_the_grid_worker(stack: Stack, answer: str) -> Page:
    """An SOS; the grid worker's first call goes out, and its callee answers so."""
    sos(stack)
    stack.router.run_due_steps()
    [page] = pages(stack.db, "voice")
    stack.behave(page.address, answer=answer)
    stack.router.send_pending()
    return page


@pytest.mark.parametrize(
    ("answer", "state", "call_status", "event"),
    [
        ("voicemail", "no_keypress", "completed", "delivery_no_keypress"),
        ("busy", "busy", "busy", "delivery_busy"),
        ("no-answer", "no_answer", "no-answer", "delivery_no_answer"),
        ("unreachable", "failed", "failed", "delivery_failed"),
    ],
)
def test_a_call_nobody_pressed_on_fails_and_is_retried_with_backoff(
    stack: Stack, answer: str, state: str, call_status: str, event: str
) -> None:
    page = call_the_grid_worker(stack, answer)

    [hook] = stack.wait_for_webhooks(1)
    assert (hook["params"]["CallStatus"], hook["status"]) == (call_status, 200)
    first = attempt(stack.db, page.id)
    assert first.state == state
    [(actor, detail)] = events(stack.db, event)
    assert (actor, detail["provider_id"], detail["state"]) == ("twilio", first.provider_id, state)
    retries = q(
        stack.db,
        "SELECT attempt, state, not_before FROM notification_attempts WHERE channel = 'voice' AND attempt > 1",
    )
    assert retries == [(2, "pending", DAY + timedelta(seconds=20))]
    assert q(stack.db, "SELECT state FROM incidents") == [("open",)]  # not reached, still escalating

    stack.clock.advance(19)
    stack.router.run_once()
    assert [c["to"] for c in calls(stack.phone)] == [page.address]
    stack.clock.advance(1)
    stack.router.run_once()
    assert [c["to"] for c in calls(stack.phone)] == [page.address, page.address]
    stack.wait_for_webhooks(2)
    assert q(stack.db, "SELECT attempt, state FROM notification_attempts WHERE channel = 'voice' ORDER BY id") == [
        (1, state),
        (2, state),
        (3, "pending"),  # 60 s later
    ]


@pytest.mark.parametrize(
    ("answer", "digits"),
    [("press5", "5"), ("press#", ""), ("hangup", None)],
)
def test_a_call_that_ends_without_1_or_2_is_not_reached_and_is_retried(
    stack: Stack, answer: str, digits: str | None
) -> None:
    """A wrong key (5, # alone) or a hang-up without a key: retried like a busy line (issue 13)."""
    page = call_the_grid_worker(stack, answer)

    hooks = stack.wait_for_webhooks(1 if digits is None else 2)
    if digits is not None:
        keypress = hooks[0]
        assert (keypress["kind"], keypress["status"], keypress["params"]["Digits"]) == ("keypress", 200, digits)
        gather = ET.fromstring(keypress["reply"]).find("Gather")  # asked again, not taken
        assert gather is not None
        assert "请按1" in (gather.findtext("Say") or "")
        assert [d["digit"] for _a, d in events(stack.db, "keypress")] == [digits]
    status = hooks[-1]
    assert (status["kind"], status["params"]["CallStatus"], status["status"]) == ("status", "completed", 200)
    first = attempt(stack.db, page.id)
    assert first.state == "no_keypress"
    [(_actor, detail)] = events(stack.db, "delivery_no_keypress")
    assert detail["provider_id"] == first.provider_id
    retries = q(
        stack.db,
        "SELECT attempt, state, not_before FROM notification_attempts WHERE channel = 'voice' AND attempt > 1",
    )
    assert retries == [(2, "pending", DAY + timedelta(seconds=20))]
    assert q(stack.db, "SELECT state, acknowledged_by FROM incidents") == [("open", None)]
    assert events(stack.db, "declined") == []

    stack.clock.advance(20)
    stack.router.run_once()
    assert [c["to"] for c in calls(stack.phone)] == [page.address, page.address]


def test_wrong_keys_on_every_call_and_an_undelivered_sms_advance_the_step_at_once(stack: Stack) -> None:
    """As for no answer: when every try to everyone in the step failed, the next step runs at once."""
    case = sos(stack)
    stack.router.run_due_steps()
    [page] = pages(stack.db, "voice")
    stack.behave(page.address, answer="press5", sms="undelivered")
    guardians = phones_of_guardians(stack.db, case.resident)

    stack.send_due()  # 0 s: keypress, call status, SMS status
    stack.wait_for_webhooks(3)
    stack.clock.advance(20)
    stack.send_due()  # 20 s: the second tries
    stack.wait_for_webhooks(6)
    stack.clock.advance(60)
    calls_before = len(calls(stack.phone))
    stack.send_due()  # 80 s: the third and last tries
    stack.wait_for_webhooks(9)
    tries = q(
        stack.db,
        "SELECT channel, attempt, state FROM notification_attempts WHERE address = %s AND channel IN ('voice', 'sms')",
        page.address,
    )
    ended = (("sms", "undelivered"), ("voice", "no_keypress"))
    assert sorted(tries) == [(c, n, s) for c, s in ended for n in (1, 2, 3)]

    stack.router.run_once()  # still 80 s: the guardians now, not at 120 s

    assert {c["to"] for c in calls(stack.phone)[calls_before:]} == guardians | {page.address}
    [(_actor, advanced)] = events(stack.db, "step_advanced")
    assert advanced["step"] == 0
    assert q(stack.db, "SELECT state FROM incidents") == [("open",)]


def test_a_wrong_key_then_1_takes_it(stack: Stack) -> None:
    """The call asks again after a wrong key; a 1 then acknowledges as a first 1 would."""
    sos(stack)
    stack.router.run_once()
    [page] = pages(stack.db, "voice")
    assert page.provider_id is not None
    path = f"{KEYPRESS_CALLBACK_PATH}?attempt={page.id}"

    five = stack.post_signed(path, {"CallSid": page.provider_id, "Digits": "5"})
    one = stack.post_signed(path, {"CallSid": page.provider_id, "Digits": "1"})

    assert (five.status_code, one.status_code) == (200, 200)
    assert said(one.text).startswith("已确认，您已接单")
    assert attempt(stack.db, page.id).state == "answered"
    assert q(stack.db, "SELECT state, acknowledged_via FROM incidents") == [("acknowledged", "voice")]
    completed = {"CallSid": page.provider_id, "CallStatus": "completed", "To": page.address}
    assert stack.post_signed(STATUS_CALLBACK_PATH, completed).json()["handled"] == "recorded"
    assert q(stack.db, "SELECT count(*) FROM notification_attempts WHERE attempt > 1") == [(0,)]  # no retry


def test_the_same_status_callback_twice_retries_once(stack: Stack) -> None:
    sos(stack)
    stack.router.run_due_steps()
    [page] = pages(stack.db, "voice")
    stack.behave(page.address, answer="busy")
    stack.router.send_pending()
    [hook] = stack.wait_for_webhooks(1)
    before = snapshot(stack.db)

    again = httpx.post(hook["url"], data=hook["params"], headers={"X-Twilio-Signature": hook["signature"]})

    assert again.status_code == 200
    assert again.json()["handled"] == "duplicate"
    assert snapshot(stack.db) == before
    assert q(stack.db, "SELECT attempt FROM notification_attempts WHERE channel = 'voice' ORDER BY id") == [(1,), (2,)]
    assert len(events(stack.db, "retry_scheduled")) == 1
    # A different final status for the settled call is recorded, and moves nothing.
    late = dict(hook["params"], CallStatus="no-answer")
    answer = stack.post_signed(STATUS_CALLBACK_PATH, late)
    assert answer.json() == {"attempt_id": page.id, "state": "busy", "handled": "recorded", "follow_up": None}
    assert len(events(stack.db, "retry_scheduled")) == 1


def test_a_keypress_for_another_call_is_refused_and_an_unknown_digit_asks_again(stack: Stack) -> None:
    sos(stack)
    stack.router.run_once()
    [page] = pages(stack.db, "voice")
    assert page.provider_id is not None
    path = f"{KEYPRESS_CALLBACK_PATH}?attempt={page.id}"
    before = snapshot(stack.db)

    replayed = stack.post_signed(path, {"CallSid": "CA" + "0" * 32, "Digits": "1"})
    missing = stack.post_signed(
        f"{KEYPRESS_CALLBACK_PATH}?attempt=999999", {"CallSid": page.provider_id, "Digits": "1"}
    )

    assert (replayed.status_code, missing.status_code) == (403, 404)
    assert snapshot(stack.db) == before

    nine = stack.post_signed(path, {"CallSid": page.provider_id, "Digits": "9"})

    assert nine.status_code == 200
    gather = ET.fromstring(nine.text).find("Gather")
    assert gather is not None
    assert gather.get("action") == stack.api + path
    assert "请按1" in (gather.findtext("Say") or "")
    assert attempt(stack.db, page.id).state == "sent"  # not reached: a 9 is neither going nor cannot
    assert [d["digit"] for _a, d in events(stack.db, "keypress")] == ["9"]
    assert q(stack.db, "SELECT state FROM incidents") == [("open",)]


def test_a_second_keypress_hears_who_took_it(stack: Stack) -> None:
    case = sos(stack)
    second = add_grid_worker(stack.db, case.grid)
    stack.router.run_once()
    first, other = sorted(pages(stack.db, "voice"), key=lambda p: p.address == second)
    assert other.address == second

    taken = stack.post_signed(
        f"{KEYPRESS_CALLBACK_PATH}?attempt={first.id}", {"CallSid": str(first.provider_id), "Digits": "1"}
    )
    late = stack.post_signed(
        f"{KEYPRESS_CALLBACK_PATH}?attempt={other.id}", {"CallSid": str(other.provider_id), "Digits": "1"}
    )

    assert said(taken.text).startswith("已确认，您已接单")
    first_name = q(stack.db, "SELECT name FROM staff WHERE id = %s", first.recipient_id)[0][0]
    assert said(late.text) == f"此事件已由{first_name}（网格员）接单，无需前往。"
    assert q(stack.db, "SELECT acknowledged_by FROM incidents") == [(f"staff:{first.recipient_id}",)]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CALLBACK_DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {CALLBACK_DEADLINE_S}s")
        time.sleep(0.02)


def waiting_on_locks(url: str) -> int:
    rows = q(
        url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return int(rows[0][0])


@pytest.mark.parametrize("callback", ["status", "keypress"])
def test_a_callback_that_overtakes_the_routers_commit_waits_for_it(stack: Stack, callback: str) -> None:
    sos(stack)
    stack.router.run_due_steps()
    [page] = pages(stack.db, "voice")
    sid = "CA" + "5" * 32
    if callback == "status":
        path, params = STATUS_CALLBACK_PATH, {"CallSid": sid, "CallStatus": "busy", "To": page.address}
    else:
        path, params = f"{KEYPRESS_CALLBACK_PATH}?attempt={page.id}", {"CallSid": sid, "Digits": "1"}

    # A router mid-send: the attempt claimed, Twilio's sid written, not yet committed.
    with psycopg.connect(stack.db) as router, ThreadPoolExecutor(1) as twilio:
        router.execute("SELECT id FROM notification_attempts WHERE id = %s FOR UPDATE", (page.id,))
        router.execute(
            "UPDATE notification_attempts SET state = 'sent', provider_id = %s WHERE id = %s", (sid, page.id)
        )
        answer = twilio.submit(stack.post_signed, path, params)
        wait_until(lambda: waiting_on_locks(stack.db) == 1, "waiting for the router's commit")
        router.commit()
        reply = answer.result(timeout=CALLBACK_DEADLINE_S)

    assert reply.status_code == 200, reply.text
    if callback == "status":
        assert reply.json()["handled"] == "settled"
        assert attempt(stack.db, page.id).state == "busy"
        assert len(events(stack.db, "retry_scheduled")) == 1
    else:
        assert said(reply.text).startswith("已确认，您已接单")
        assert q(stack.db, "SELECT state, acknowledged_via FROM incidents") == [("acknowledged", "voice")]


# --- by SMS ------------------------------------------------------------------------


def test_an_sms_reply_with_the_code_acknowledges_and_others_get_help_and_change_nothing(stack: Stack) -> None:
    case = sos(stack)
    stack.router.run_once()
    [page] = pages(stack.db, "sms")
    guardian = sorted(phones_of_guardians(stack.db, case.resident))[0]  # not paged yet
    before = snapshot(stack.db)

    for sender, body in ((STRANGER, f"{case.code} 1"), (guardian, f"{case.code} 1"), (page.address, "好的 1")):
        answer = stack.text(sender, body)
        assert (answer["status"], texted(answer["reply"])) == (200, SMS_HELP)
    assert snapshot(stack.db) == before

    answer = stack.text(page.address, f"{case.code.lower()} 1")

    assert texted(answer["reply"]) == f"【守护】{case.code} 已确认，您已接单，请尽快前往。"
    assert q(stack.db, "SELECT state, acknowledged_by, acknowledged_via FROM incidents") == [
        ("acknowledged", f"staff:{page.recipient_id}", "sms")
    ]
    [(actor, detail)] = events(stack.db, "sms_reply")
    assert (actor, detail) == (f"staff:{page.recipient_id}", {"provider_id": answer["sid"], "digit": "1"})
    assert q(stack.db, "SELECT role, action, detail->>'via' FROM audit_log") == [("grid_worker", "acknowledge", "sms")]


def test_an_sms_reply_with_nul_bytes_from_the_grid_worker_still_acknowledges(stack: Stack) -> None:
    # A handset or gateway that pads the text with NUL: a 422 here would lose the ack,
    # and Twilio does not send a corrected reply (api/limits.py exempts these routes).
    case = sos(stack)
    stack.router.run_once()
    [page] = pages(stack.db, "sms")
    params = {"From": page.address, "To": FROM, "Body": f"{case.code}\x00 1\x00", "MessageSid": "SM" + "2" * 32}
    url = stack.api + SMS_CALLBACK_PATH
    before = snapshot(stack.db)

    # The signature is still checked over the fields as sent, NUL bytes and all.
    unsigned_nul = dict(params, Body=f"{case.code} 1")
    forged = httpx.post(url, data=params, headers={"X-Twilio-Signature": sign(url, unsigned_nul)})
    assert forged.status_code == 403, forged.text
    assert snapshot(stack.db) == before

    answer = stack.post_signed(SMS_CALLBACK_PATH, params)

    assert answer.status_code == 200, answer.text
    assert texted(answer.text) == f"【守护】{case.code} 已确认，您已接单，请尽快前往。"
    assert q(stack.db, "SELECT state, acknowledged_by, acknowledged_via FROM incidents") == [
        ("acknowledged", f"staff:{page.recipient_id}", "sms")
    ]
    [(actor, detail)] = events(stack.db, "sms_reply")
    assert (actor, detail) == (f"staff:{page.recipient_id}", {"provider_id": params["MessageSid"], "digit": "1"})


def test_a_guardian_taking_it_by_sms_stops_the_chain_before_the_platform(stack: Stack) -> None:
    case = sos(stack)
    for platform in serve_app(create_emergency_platform(PLATFORM_SECRET, announce=lambda _line: None)):
        stack.add_platform(platform)
        stack.router.run_once()  # 0 s: the grid worker
        stack.clock.advance(120)
        stack.router.run_once()  # 120 s: the guardians
        guardians = q(
            stack.db, "SELECT id, name, phone FROM guardians WHERE resident_id = %s ORDER BY priority", case.resident
        )
        assert len(guardians) >= 2
        taker_id, taker_name, taker_phone = guardians[-1]  # called last: everyone else is paged by now
        assert {p.address for p in pages(stack.db, "sms", step=1)} == {g[2] for g in guardians}
        paged = {r[0] for r in q(stack.db, "SELECT DISTINCT address FROM notification_attempts WHERE purpose = 'page'")}
        stack.clock.advance(30)

        answer = stack.text(taker_phone, f"收到 {case.code}")

        assert texted(answer["reply"]) == f"【守护】{case.code} 已确认，您已接单，请尽快前往。"
        assert q(stack.db, "SELECT state, acknowledged_by, acknowledged_via FROM incidents") == [
            ("acknowledged", f"guardian:{taker_id}", "sms")
        ]
        sms_before = len(messages(stack.phone))
        stack.router.run_once()
        notices = messages(stack.phone)[sms_before:]
        assert sorted(m["to"] for m in notices) == sorted(paged - {taker_phone})
        assert all(taker_name in m["body"] and case.code in m["body"] for m in notices)

        calls_before = len(calls(stack.phone))
        stack.clock.advance(600)  # well past 240 s, when the platform step was due
        stack.router.run_once()
        assert platform_alerts(platform) == []
        assert len(calls(stack.phone)) == calls_before
        assert q(stack.db, "SELECT count(*) FROM notification_attempts WHERE purpose LIKE 'cap%%'") == [(0,)]
        assert q(
            stack.db, "SELECT step FROM escalation_actions WHERE state = 'done' AND kind = 'step' ORDER BY id"
        ) == [
            (0,),
            (1,),
        ]


@pytest.mark.parametrize(("outcome", "retried"), [("delivered", False), ("undelivered", True)])
def test_sms_delivery_status_settles_the_attempt(stack: Stack, outcome: str, retried: bool) -> None:
    sos(stack)
    stack.router.run_due_steps()
    [page] = pages(stack.db, "sms")
    stack.behave(page.address, sms=outcome)

    stack.router.send_pending()

    [hook] = stack.wait_for_webhooks(1)
    assert (hook["params"]["MessageStatus"], hook["status"]) == (outcome, 200)
    sent = attempt(stack.db, page.id)
    assert sent.state == outcome
    [(actor, detail)] = events(stack.db, f"delivery_{outcome}")
    assert (actor, detail["provider_id"], detail["channel"]) == ("twilio", sent.provider_id, "sms")
    retries = q(stack.db, "SELECT attempt FROM notification_attempts WHERE channel = 'sms' AND attempt > 1")
    assert retries == ([(2,)] if retried else [])


# --- forgeries ---------------------------------------------------------------------


def forgeable(stack: Stack, case: Sos) -> list[tuple[str, dict[str, str]]]:
    """One request per route that, correctly signed, would change the incident."""
    [voice] = pages(stack.db, "voice")
    [sms] = pages(stack.db, "sms")
    return [
        (f"{KEYPRESS_CALLBACK_PATH}?attempt={voice.id}", {"CallSid": str(voice.provider_id), "Digits": "1"}),
        (STATUS_CALLBACK_PATH, {"CallSid": str(voice.provider_id), "CallStatus": "busy", "To": voice.address}),
        (SMS_CALLBACK_PATH, {"From": sms.address, "To": FROM, "Body": f"{case.code} 1", "MessageSid": "SM" + "1" * 32}),
    ]


def test_forged_callbacks_are_refused_with_403_and_change_nothing(stack: Stack) -> None:
    case = sos(stack)
    stack.router.run_once()
    requests = forgeable(stack, case)
    before = snapshot(stack.db)

    for path, params in requests:
        url = stack.api + path
        tampered = dict(params, Digits="2") if "Digits" in params else dict(params, Body=params.get("Body", "") + "x")
        for headers, data in (
            ({}, params),  # unsigned
            ({"X-Twilio-Signature": sign(url, params, "another-account-token")}, params),
            ({"X-Twilio-Signature": sign("https://elsewhere.example" + path, params)}, params),
            ({"X-Twilio-Signature": sign(url, params)}, tampered),
        ):
            answer = httpx.post(url, data=data, headers=headers)
            assert answer.status_code == 403, (path, headers, answer.text)
            assert "X-Twilio-Signature" in answer.json()["detail"]
    assert snapshot(stack.db) == before

    # The same requests signed by the account do act: the refusals above were the signature's.
    assert [stack.post_signed(path, params).status_code for path, params in requests] == [200, 200, 200]
    assert q(stack.db, "SELECT state FROM incidents") == [("acknowledged",)]
    assert snapshot(stack.db) != before


def test_with_no_auth_token_configured_every_callback_is_refused(stack: Stack) -> None:
    case = sos(stack)
    stack.router.run_once()
    requests = forgeable(stack, case)
    before = snapshot(stack.db)
    unconfigured = create_app(Settings(database_url=stack.db, public_url=stack.api, twilio_auth_token=""))

    with TestClient(unconfigured) as client:
        for path, params in requests:
            for token in (PHONE_TOKEN, ""):  # an empty key would let anyone sign
                signature = sign(stack.api + path, params, token)
                answer = client.post(path, data=params, headers={"X-Twilio-Signature": signature})
                assert answer.status_code == 403, (path, token, answer.text)

    assert snapshot(stack.db) == before
    assert stack.post_signed(*requests[0]).status_code == 200  # the configured API takes the same request


def test_a_status_for_an_unknown_sid_is_answered_200_and_changes_nothing(stack: Stack) -> None:
    sos(stack)
    stack.router.run_once()
    before = snapshot(stack.db)

    call = stack.post_signed(STATUS_CALLBACK_PATH, {"CallSid": "CA" + "9" * 32, "CallStatus": "busy", "To": STRANGER})
    sms = stack.post_signed(STATUS_CALLBACK_PATH, {"MessageSid": "SM" + "9" * 32, "MessageStatus": "undelivered"})

    assert (call.status_code, call.json()["handled"]) == (200, "unknown")
    assert (sms.status_code, sms.json()["handled"]) == (200, "unknown")
    assert snapshot(stack.db) == before


# --- the pure parts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("K7P2Q 1", [SmsReply("K7P2Q", "1")]),
        ("k7p2q", [SmsReply("K7P2Q", "")]),
        ("收到K7P2Q，2", [SmsReply("K7P2Q", "2")]),
        ("Ｋ７Ｐ２Ｑ１", [SmsReply("K7P2Q", "1")]),
        ("K7P2Q 3", [SmsReply("K7P2Q", "3")]),
        ("HELLO 1", []),  # L and O are not in the code alphabet
        ("K7P2QX 1", []),
        ("1 2", []),
    ],
)
def test_sms_replies_are_parsed_for_a_code_and_a_digit(body: str, expected: list[SmsReply]) -> None:
    assert parse_sms_reply(body) == expected


def test_what_each_digit_means() -> None:
    assert [SmsReply("K7P2Q", d).going for d in ("", "1", "2", "3", "12")] == [True, True, False, None, None]


def test_only_an_unsettled_attempt_is_settled() -> None:
    assert settle("voice", "completed", "sent") == Settlement("no_keypress", failed=True)
    assert settle("voice", "completed", "answered") is None
    assert settle("voice", "busy", "sent") == Settlement("busy", failed=True)
    assert settle("voice", "canceled", "sent") == Settlement("failed", failed=True)
    assert settle("voice", "ringing", "sent") is None
    assert settle("voice", "busy", "busy") is None
    assert settle("sms", "delivered", "sent") == Settlement("delivered", failed=False)
    assert settle("sms", "undelivered", "sent") == Settlement("undelivered", failed=True)
    assert settle("sms", "sent", "sent") is None
    assert settle("sms", "failed", "delivered") is None


def test_a_person_who_lets_it_ring_then_presses_1_is_waited_for(stack: Stack) -> None:
    sos(stack)
    stack.router.run_due_steps()
    [page] = pages(stack.db, "voice")
    httpx.post(
        f"{stack.phone}/_sim/behaviour", json={"to": page.address, "answer": "press1", "answer_after_s": 1.0}
    ).raise_for_status()
    stack.router.send_pending()
    [call] = calls(stack.phone)
    keypress, _status = stack.wait_for_webhooks(2)
    rang = datetime.fromisoformat(keypress["posted_at"]) - datetime.fromisoformat(call["received_at"])
    assert rang >= timedelta(seconds=1)  # answered only after ringing for a second
    assert keypress["params"]["Digits"] == "1"
    assert q(stack.db, "SELECT state, acknowledged_via FROM incidents") == [("acknowledged", "voice")]


def test_a_call_placed_by_url_fetches_its_twiml_from_the_api_and_the_keypress_takes_it(stack: Stack) -> None:
    """Twilio's other way to place a call: the simulator asks the API's signed voice route
    what to say, finds the <Gather>, and the press acknowledges as with inline TwiML."""
    case = sos(stack)
    by_url = make_router(stack.db, stack.phone, stack.clock, public_url=stack.api, twiml_by_url=True)
    by_url.run_due_steps()
    [page] = pages(stack.db, "voice")
    stack.behave(page.address, answer="press1")
    by_url.send_pending()
    fetched, keypress, status = stack.wait_for_webhooks(3)
    assert (fetched["kind"], fetched["status"]) == ("twiml", 200)
    assert fetched["url"].endswith(f"/callbacks/twilio/voice?attempt={page.id}")
    assert " ".join(case.code) in fetched["reply"]  # the incident code is read out, letter by letter
    assert "<Gather" in fetched["reply"]
    assert (keypress["kind"], keypress["status"], keypress["params"]["Digits"]) == ("keypress", 200, "1")
    assert status["kind"] == "status"
    [call] = [c for c in calls(stack.phone) if c["to"] == page.address]
    assert call["twiml"] is None
    assert call["url"] == fetched["url"]
    assert q(stack.db, "SELECT state, acknowledged_via FROM incidents WHERE id = %s", case.incident) == [
        ("acknowledged", "voice")
    ]


def test_the_voice_route_refuses_a_forged_request_and_never_answers_silence(stack: Stack) -> None:
    forged = httpx.post(f"{stack.api}/callbacks/twilio/voice?attempt=1", data={"CallSid": "CA1"})
    assert forged.status_code == 403
    unknown = stack.post_signed("/callbacks/twilio/voice?attempt=999999", {"CallSid": "CA1"})
    assert unknown.status_code == 200
    assert "请查看短信" in said(unknown.text)


# --- text with control characters (issue 13) ------------------------------------------


def test_a_resident_with_control_characters_in_the_database_is_still_paged_cleanly(stack: Stack) -> None:
    """An older load, the API or a hand edit left Excel's line break and a bell in the
    name and address: the call's TwiML is well formed (the simulator reads its <Gather>
    and the press lands), the SMS is clean, and the CAP alert is valid against the schema."""
    case = sos(stack)
    with psycopg.connect(stack.db) as conn:
        conn.execute(
            "UPDATE residents SET name = %s, address = %s WHERE id = %s",
            ("王\x0b奶奶<&>", "东关村\x071组\x0b1号", case.resident),
        )
    schema = xmlschema.XMLSchema(str(cap_schema_path()))
    for platform in serve_app(create_emergency_platform(PLATFORM_SECRET, announce=lambda _line: None)):
        stack.add_platform(platform)
        stack.router.run_due_steps()
        [page] = pages(stack.db, "voice")
        stack.behave(page.address, answer="press2")  # "I cannot": the chain goes on to the platform

        stack.send_due()

        keypress, _status = stack.wait_for_webhooks(2)
        assert (keypress["kind"], keypress["status"], keypress["params"]["Digits"]) == ("keypress", 200, "2")
        # The decline may already have paged the guardians (send_due runs the router again).
        [call] = [c for c in calls(stack.phone) if c["to"] == page.address]
        said_text = ET.fromstring(call["twiml"]).findtext("Gather/Say") or ""
        assert "王 奶奶<&>，地址东关村1组 1号，" in said_text
        [sms] = [m for m in messages(stack.phone) if m["to"] == page.address]
        assert "王 奶奶<&>（东关村1组 1号）" in sms["body"]
        assert not [c for c in call["twiml"] + sms["body"] if unicodedata.category(c) == "Cc"]

        for _ in range(4):  # the guardians (at once: the only grid worker declined), then the platform
            stack.router.run_once()
            if platform_alerts(platform):
                break
            stack.clock.advance(120)
        [alert] = platform_alerts(platform)
        assert schema.is_valid(alert["xml"].encode())
        assert alert["resident_name"] == "王 奶奶<&>"
        later = [c for c in calls(stack.phone) if c["to"] != page.address]
        assert later  # the guardians
        assert all(gather_action(c["twiml"]) is not None for c in later)
