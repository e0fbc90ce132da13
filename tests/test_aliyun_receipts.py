"""Aliyun's receipt pushes end to end: the routes queue each item, the API's worker acts on it.

The API is served by uvicorn with its receipt worker, on the real database; pages are
placed by a router whose voice and SMS notifier accepts every page and names the
provider ids as Aliyun does (``CallId``, ``BizId``), standing in for the Aliyun
notifiers. The tests post batches in the documented formats (VoiceReport,
VoiceCallReport, SmsReport, SmsUp) and wait, with a deadline, for the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from alerts.aliyun_receipts import VOICE_RESULTS
from alerts.notifiers.aliyun_keys import address_from_aliyun, aliyun_number, aliyun_out_id, parse_out_id
from alerts.notifiers.base import Delivery, Provider, SendOutcome, SendResult
from alerts.notifiers.console import ConsoleNotifier
from alerts.providers import PhoneProviders, ProviderChoice
from alerts.receipts import MAX_TRIES, RECEIPTS_CHANNEL, ReceiptQueueCollector
from alerts.router import Router, RouterConfig
from api.deps import get_now
from api.main import create_app
from api.routes.aliyun import RedactToken
from devices.kinds import Channel
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from tests.support.callbacks import add_grid_worker, snapshot
from tests.support.escalation import DAY, ZONE, Clock, press, q, wristband_in
from tests.support.services import serve_app

TOKEN = "k3Jx9vQ2-receipts-token-7Fh2"
DEADLINE_S = 10.0
CHINESE_WORKER = "+8613912345678"  # Aliyun reports it as 13912345678
STRANGER = "13800000099"


class AcceptingProvider:
    """Voice and SMS as an Aliyun account would take them: accepted, with a CallId or BizId."""

    channels = frozenset({Channel.VOICE, Channel.SMS})

    def send(self, delivery: Delivery) -> SendResult:
        prefix = "1160" if delivery.channel is Channel.VOICE else "9050"
        return SendResult(SendOutcome.SENT, provider_id=f"{prefix}{delivery.attempt_id}^10{delivery.attempt_id}")


@dataclass
class Stack:
    db: str
    api: str
    clock: Clock
    router: Router

    def post(self, kind: str, items: Any, *, token: str = TOKEN) -> httpx.Response:
        return httpx.post(f"{self.api}/callbacks/aliyun/{token}/{kind}", json=items, timeout=10)

    def wait_handled(self) -> None:
        """Until the worker has handled every receipt due now."""
        deadline = time.monotonic() + DEADLINE_S
        while q(self.db, "SELECT count(*) FROM provider_receipts WHERE handled_at IS NULL") != [(0,)]:
            assert time.monotonic() < deadline, q(self.db, "SELECT id, kind, tries, error FROM provider_receipts")
            time.sleep(0.02)

    def outcomes(self) -> list[tuple[str, str]]:
        return q(self.db, "SELECT kind, outcome FROM provider_receipts ORDER BY id")


@pytest.fixture
def stack(county_url: str) -> Iterator[Stack]:
    clock = Clock(DAY)
    port = free_port()
    app = create_app(Settings(database_url=county_url, aliyun_callback_token=TOKEN, resolve_timeout_s=1800))
    app.dependency_overrides[get_now] = clock
    provider = AcceptingProvider()
    router = Router(
        county_url,
        RouterConfig("r1", ZONE),
        PhoneProviders.of({Provider.ALIYUN: provider}, ProviderChoice(Provider.ALIYUN)),
        console=ConsoleNotifier(),
        clock=clock,
    )
    for url in serve_app(app, port=port):
        yield Stack(county_url, url, clock, router)
    router.close()


@dataclass(frozen=True)
class Page:
    id: int
    phone: str
    provider_id: str


def paged(stack: Stack, extra_worker: str | None = None) -> tuple[int, str, list[Page], list[Page]]:
    """An SOS whose first step has been paged: (incident, code, voice pages, SMS pages)."""
    device, grid, _resident = wristband_in(stack.db, night_covered=False)
    if extra_worker:
        add_grid_worker(stack.db, grid, extra_worker)
    incident = press(stack.db, device, DAY)
    stack.router.run_due_steps()
    stack.router.send_pending()
    code = q(stack.db, "SELECT code FROM incidents WHERE id = %s", incident)[0][0]
    rows = q(
        stack.db,
        "SELECT channel, id, address, provider_id FROM notification_attempts"
        " WHERE incident_id = %s AND purpose = 'page' AND state = 'sent' ORDER BY id",
        incident,
    )
    pages = {c: [Page(i, a, p) for ch, i, a, p in rows if ch == c] for c in ("voice", "sms")}
    assert pages["voice"]
    assert pages["sms"]
    return incident, code, pages["voice"], pages["sms"]


def keypress(page: Page, digit: str, at: str = "2026-11-24 10:00:08") -> dict[str, Any]:
    return {
        "call_id": page.provider_id,
        "status_code": "300000",
        "dtmf": digit,
        "status_time": at,
        "out_id": aliyun_out_id(page.id),
    }


def progress(page: Page, code: str) -> dict[str, Any]:
    return {"call_id": page.provider_id, "status_code": code, "status_time": "2026-11-24 10:00:03",
            "out_id": aliyun_out_id(page.id), "smart_status_code": "ANSWERED"}  # fmt: skip


def call_result(page: Page, code: str) -> dict[str, Any]:
    return {
        "call_id": page.provider_id,
        "status_code": code,
        "status_msg": "用户听完语音",
        "out_id": aliyun_out_id(page.id),
        "caller": "057100005678",
        "callee": aliyun_number(page.phone),
        "duration": "21",
        "b_duration": 21,
        "start_time": "2026-11-24 10:00:02",
        "end_time": "2026-11-24 10:00:23",
    }


def sms_report(page: Page, *, success: bool, err_code: str) -> dict[str, Any]:
    return {
        "phone_number": aliyun_number(page.phone),
        "send_time": "2026-11-24 10:00:00",
        "report_time": "2026-11-24 10:00:05",
        "success": success,
        "err_code": err_code,
        "err_msg": "用户接收成功" if success else "失败",
        "sms_size": "1",
        "biz_id": page.provider_id,
        "out_id": aliyun_out_id(page.id),
    }


def sms_up(phone: str, content: str, sequence_id: int) -> dict[str, Any]:
    return {"phone_number": phone, "send_time": "2026-11-24 10:01:00", "content": content,
            "sign_name": "守护", "dest_code": "1234", "sequence_id": sequence_id}  # fmt: skip


def state_of(stack: Stack, attempt_id: int) -> str:
    return str(q(stack.db, "SELECT state FROM notification_attempts WHERE id = %s", attempt_id)[0][0])


def retries(stack: Stack, page: Page) -> list[tuple[Any, ...]]:
    """(state, try) of the tries after ``page`` to its number on its channel."""
    return q(
        stack.db,
        "SELECT r.state, r.attempt FROM notification_attempts r JOIN notification_attempts a ON a.id = %s"
        " WHERE r.address = a.address AND r.channel = a.channel AND r.purpose = a.purpose AND r.attempt > a.attempt",
        page.id,
    )


def refusals(stack: Stack) -> list[str]:
    rows = q(stack.db, "SELECT detail->>'reason' FROM audit_log WHERE action = 'receipt_refused' ORDER BY id")
    return [r[0] for r in rows]


ACCEPTED = {"code": 0, "msg": "接收成功"}


# --- keys -----------------------------------------------------------------------------


def test_out_ids_and_numbers_round_trip() -> None:
    assert parse_out_id(aliyun_out_id(4711)) == 4711
    assert [parse_out_id(s) for s in ("", "0", "0471", "-1", " 47", "４７", "1" * 16, "47a")] == [None] * 8
    assert aliyun_number(CHINESE_WORKER) == "13912345678"
    assert address_from_aliyun("13912345678") == CHINESE_WORKER
    assert address_from_aliyun(aliyun_number("+12085550191")) == "+12085550191"
    assert VOICE_RESULTS["200002"] == ("busy", "busy")
    assert VOICE_RESULTS["200003"] == ("no_answer", "no_answer")


def test_the_access_log_never_shows_the_token() -> None:
    args = ("127.0.0.1:50000", "POST", f"/callbacks/aliyun/{TOKEN}/sms_up", "1.1", 200)
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', args, None)

    assert RedactToken().filter(record)

    assert TOKEN not in record.getMessage()
    assert "/callbacks/aliyun/***/sms_up" in record.getMessage()


# --- by voice ---------------------------------------------------------------------------


def test_keypress_1_takes_the_incident_everyone_told_once_and_a_repeated_push_changes_nothing(stack: Stack) -> None:
    incident, code, voice, _sms = paged(stack, extra_worker=CHINESE_WORKER)
    taker = next(p for p in voice if p.phone == CHINESE_WORKER)
    [other] = [p for p in voice if p is not taker]
    batch = [progress(taker, "200201"), progress(taker, "200102"), keypress(taker, "1")]

    assert stack.post("voice_call_report", batch).json() == ACCEPTED
    assert stack.post("voice_report", [call_result(taker, "200000")]).json() == ACCEPTED
    stack.wait_handled()

    taker_id = q(stack.db, "SELECT id FROM staff WHERE phone = %s", CHINESE_WORKER)[0][0]
    assert q(stack.db, "SELECT state, acknowledged_by, acknowledged_via FROM incidents WHERE id = %s", incident) == [
        ("acknowledged", f"staff:{taker_id}", "voice")
    ]
    assert state_of(stack, taker.id) == "answered"  # the result after the keypress leaves it answered
    assert stack.outcomes() == [("voice_call_report", o) for o in ("recorded", "recorded", "taken")] + [
        ("voice_report", "recorded")
    ]
    notices = q(stack.db, "SELECT address FROM notification_attempts WHERE purpose = 'notice' AND channel = 'sms'")
    assert notices == [(other.phone,)]  # the other grid worker, once, naming who took it
    assert q(stack.db, "SELECT count(*) FROM notification_attempts WHERE attempt > 1") == [(0,)]  # no retry
    before = snapshot(stack.db)

    assert stack.post("voice_call_report", batch).json() == ACCEPTED
    assert stack.post("voice_report", [call_result(taker, "200000")]).json() == ACCEPTED
    stack.wait_handled()

    assert snapshot(stack.db) == before
    assert len(stack.outcomes()) == 4
    assert code  # the incident's code is never needed on a call


def test_keypress_2_declines_once_though_both_pushes_carry_it_and_the_guardians_are_paged_at_once(
    stack: Stack,
) -> None:
    incident, _code, [call], _sms = paged(stack)

    stack.post("voice_call_report", [keypress(call, "2")]).raise_for_status()
    stack.post("voice_report", [call_result(call, "200000") | {"dtmf": "2"}]).raise_for_status()  # the key again
    stack.wait_handled()

    assert stack.outcomes() == [("voice_call_report", "declined"), ("voice_report", "recorded")]
    assert q(stack.db, "SELECT state FROM incidents WHERE id = %s", incident) == [("open",)]
    assert state_of(stack, call.id) == "answered"
    assert q(stack.db, "SELECT count(*) FROM incident_events WHERE event IN ('keypress', 'declined')") == [(2,)]
    reasons = q(stack.db, "SELECT detail->>'reason' FROM incident_events WHERE event = 'step_advanced'")
    assert reasons == [("everyone paged declined",)]


def test_a_result_carrying_the_key_takes_the_incident(stack: Stack) -> None:
    incident, _code, [call], _sms = paged(stack)

    stack.post("voice_report", [call_result(call, "200000") | {"dtmf": "1"}]).raise_for_status()
    stack.wait_handled()

    assert stack.outcomes() == [("voice_report", "taken")]
    assert q(stack.db, "SELECT state, acknowledged_via FROM incidents WHERE id = %s", incident) == [
        ("acknowledged", "voice")
    ]
    assert state_of(stack, call.id) == "answered"
    assert retries(stack, call) == []


def test_a_call_not_answered_with_1_or_2_is_not_reached_and_retried(stack: Stack) -> None:
    _incident, _code, [call], _sms = paged(stack)
    code, state = "200000", "no_keypress"  # heard to the end, or a voicemail, without 1 or 2

    stack.post("voice_call_report", [keypress(call, "5")]).raise_for_status()  # a wrong key: no answer yet
    stack.post("voice_report", [call_result(call, code)]).raise_for_status()
    stack.wait_handled()

    assert stack.outcomes() == [("voice_call_report", "key_ignored"), ("voice_report", "settled")]
    assert q(stack.db, "SELECT state, error FROM notification_attempts WHERE id = %s", call.id) == [
        (state, f"aliyun: {VOICE_RESULTS[code][0]} (error {code})")
    ]
    assert retries(stack, call) == [("pending", 2)]


# --- SMS --------------------------------------------------------------------------------


def test_sms_reports_settle_the_page_and_replies_take_it_only_from_a_paged_number(stack: Stack) -> None:
    incident, code, _voice, sms = paged(stack, extra_worker=CHINESE_WORKER)
    failed = next(p for p in sms if p.phone != CHINESE_WORKER)
    delivered = next(p for p in sms if p.phone == CHINESE_WORKER)
    reports = [
        sms_report(failed, success=False, err_code="MK:0001"),
        sms_report(delivered, success=True, err_code="DELIVERED"),
    ]

    assert stack.post("sms_report", reports).json() == ACCEPTED
    assert stack.post("sms_up", [sms_up(STRANGER, f"{code} 1", 1001)]).json() == ACCEPTED  # never paged
    stack.wait_handled()

    assert q(stack.db, "SELECT state, error FROM notification_attempts WHERE id = %s", failed.id) == [
        ("failed", "aliyun: failed (error MK:0001)")
    ]
    assert state_of(stack, delivered.id) == "delivered"
    assert retries(stack, failed) == [("pending", 2)]
    assert refusals(stack) == ["no incident code in it paged this number"]
    assert q(stack.db, "SELECT state FROM incidents WHERE id = %s", incident) == [("open",)]

    stack.post("sms_up", [sms_up("13912345678", f"收到{code.lower()}，1", 1002)]).raise_for_status()
    stack.wait_handled()

    assert q(stack.db, "SELECT state, acknowledged_via FROM incidents WHERE id = %s", incident) == [
        ("acknowledged", "sms")
    ]
    assert stack.outcomes()[-2:] == [("sms_up", "refused"), ("sms_up", "taken")]


# --- forged pushes ----------------------------------------------------------------------


def test_a_wrong_token_unknown_out_ids_other_calls_and_other_numbers_are_audited_and_change_nothing(
    stack: Stack,
) -> None:
    _incident, _code, [call, *_], [text, *_] = paged(stack)
    before = snapshot(stack.db)

    answer = stack.post("voice_call_report", [keypress(call, "1")], token=TOKEN[:-1] + "x")
    unread = httpx.post(f"{stack.api}/callbacks/aliyun/x/sms_up", content=b"{not json", timeout=10)

    assert answer.status_code == 404
    assert unread.status_code == 404  # the body is not read before the token is right
    assert refusals(stack) == ["wrong token", "wrong token"]
    assert q(stack.db, "SELECT count(*) FROM provider_receipts") == [(0,)]

    unknown = keypress(call, "1") | {"out_id": "999999"}
    spooled = keypress(call, "1") | {"out_id": None, "status_time": "2026-11-24 10:00:09"}  # a page sent with none
    other_call = keypress(call, "1") | {"call_id": "1160999^10999"}
    sms_as_call = keypress(call, "1") | {"out_id": aliyun_out_id(text.id)}
    other_callee = call_result(call, "200002") | {"callee": STRANGER}

    stack.post("voice_call_report", [unknown, spooled, other_call, sms_as_call]).raise_for_status()
    stack.post("voice_report", [other_callee]).raise_for_status()
    stack.wait_handled()

    assert refusals(stack)[2:] == [
        "unknown out_id",
        "unknown out_id",
        "not the provider id the attempt was given",
        "out_id names a sms attempt, not voice",
        "not the number the attempt was sent to",
    ]
    assert {o for _k, o in stack.outcomes()} == {"refused"}
    after = snapshot(stack.db)
    assert after[:2] == before[:2]  # all but the audit rows
    assert after[3:] == before[3:]
    assert after[2] == before[2] + 7


# --- malformed items --------------------------------------------------------------------


def test_a_malformed_item_is_422_naming_the_field_and_dead_lettered_its_batch_queued(stack: Stack) -> None:
    _incident, _code, [call], _sms = paged(stack)
    missing = keypress(call, "1")
    del missing["call_id"]

    alone = stack.post("voice_call_report", [missing])
    mixed = stack.post("voice_call_report", [progress(call, "200201"), progress(call, "200102") | {"status_code": 7}])
    not_a_batch = stack.post("voice_call_report", {"call_id": call.provider_id})
    stack.wait_handled()

    assert alone.status_code == 422
    assert "body field '0.call_id'" in alone.json()["detail"]
    assert mixed.status_code == 422
    assert "body field '1.status_code'" in mixed.json()["detail"]
    assert not_a_batch.status_code == 422
    assert stack.outcomes() == [
        ("voice_call_report", "malformed"),
        ("voice_call_report", "recorded"),  # the good item of the mixed batch
        ("voice_call_report", "malformed"),
    ]
    assert stack.post("voice_call_report", [missing]).status_code == 422  # the provider's retry: kept once
    assert len(stack.outcomes()) == 3


# --- the queue --------------------------------------------------------------------------


def test_a_poison_receipt_is_marked_after_its_tries_and_never_holds_the_others(stack: Stack) -> None:
    _incident, _code, [call], _sms = paged(stack)
    with psycopg.connect(stack.db) as conn:  # a row this version cannot read (an older one wrote it)
        conn.execute(
            "INSERT INTO provider_receipts (provider, kind, key, body, received_at, not_before)"
            " VALUES ('aliyun', 'voice_report', 'old', '{\"call\": 1}', %s, %s)",
            (stack.clock(), stack.clock()),
        )
        conn.execute("SELECT pg_notify(%s, '')", (RECEIPTS_CHANNEL,))

    stack.post("voice_call_report", [progress(call, "200201")]).raise_for_status()
    for tries in range(1, MAX_TRIES):
        deadline = time.monotonic() + DEADLINE_S
        while q(stack.db, "SELECT tries FROM provider_receipts WHERE key = 'old'") != [(tries,)]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stack.clock.advance(300)  # past its backoff
        q(stack.db, "SELECT pg_notify(%s, '')", RECEIPTS_CHANNEL)
    stack.wait_handled()

    assert q(stack.db, "SELECT outcome, tries, error LIKE 'ValidationError%%' FROM provider_receipts ORDER BY id") == [
        ("poison", MAX_TRIES, True),
        ("recorded", 1, None),
    ]
    # What the ShouhuReceiptPoison and ShouhuReceiptsWaiting alerts watch (deploy/prometheus).
    metrics = httpx.get(f"{stack.api}/metrics").text
    assert 'shouhu_provider_receipts_poison{provider="aliyun"} 1.0' in metrics
    assert 'shouhu_provider_receipts_waiting{provider="aliyun"} 0.0' in metrics
    assert 'shouhu_provider_receipts_oldest_waiting_seconds{provider="aliyun"} 0.0' in metrics


def test_the_route_answers_within_200_ms_while_the_worker_is_busy_and_a_result_waits_for_its_keypress(
    stack: Stack,
) -> None:
    incident, _code, voice, _sms = paged(stack, extra_worker=CHINESE_WORKER)
    taker = next(p for p in voice if p.phone == CHINESE_WORKER)
    [other] = [p for p in voice if p is not taker]
    holder = psycopg.connect(stack.db)
    holder.execute("SELECT 1 FROM notification_attempts WHERE id = %s FOR UPDATE", (other.id,))
    stack.post("voice_call_report", [progress(other, "200201")]).raise_for_status()
    waiting = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'shouhu-api-receipts' AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + DEADLINE_S
    while q(stack.db, waiting) != [(1,)]:  # the worker is stuck on the row this test holds
        assert time.monotonic() < deadline
        time.sleep(0.02)

    timings = []
    for kind, items in [
        ("voice_report", [call_result(taker, "200000")]),  # the result first, then the keypress
        ("voice_call_report", [progress(taker, "200201"), keypress(taker, "1")]),
        ("sms_report", [sms_report(p, success=True, err_code="DELIVERED") for p in _sms]),
        ("sms_up", [sms_up(STRANGER, "hello", 77)]),
    ]:
        started = time.perf_counter()
        answer = stack.post(kind, items)
        timings.append(time.perf_counter() - started)
        assert answer.json() == ACCEPTED
    assert q(stack.db, waiting) == [(1,)]
    assert max(timings) < 0.2, timings

    holder.rollback()
    holder.close()
    stack.wait_handled()

    assert q(stack.db, "SELECT state FROM incidents WHERE id = %s", incident) == [("acknowledged",)]
    assert state_of(stack, taker.id) == "answered"
    assert retries(stack, taker) == []
    result = q(stack.db, "SELECT outcome FROM provider_receipts WHERE kind = 'voice_report'")
    assert result == [("recorded",)]  # handled after the keypress, though pushed before it


def test_the_queue_figures_count_what_waits_and_how_long(database_url: str) -> None:
    now = datetime(2026, 12, 4, 8, 0, tzinfo=UTC)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO provider_receipts (provider, kind, key, body, received_at, not_before)"
            " VALUES ('aliyun', 'voice_report', 'k1', '{}', %s, %s), ('aliyun', 'sms_up', 'k2', '{}', %s, %s)",
            (now - timedelta(seconds=90), now, now - timedelta(seconds=5), now),
        )

    @contextmanager
    def connect() -> Iterator[psycopg.Connection[Any]]:
        with psycopg.connect(database_url) as conn:
            yield conn

    families = {f.name: f.samples for f in ReceiptQueueCollector(connect, lambda: now).collect()}
    assert [(s.labels, s.value) for s in families["shouhu_provider_receipts_waiting"]] == [({"provider": "aliyun"}, 2)]
    assert [s.value for s in families["shouhu_provider_receipts_oldest_waiting_seconds"]] == [90.0]
    assert [s.value for s in families["shouhu_provider_receipts_poison"]] == [0]
