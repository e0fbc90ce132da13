"""Issue 13: a slow or hung provider never holds another page; acknowledgements racing a send.

Real clock where the question is "on time" (a router running its sender pools), the
test's clock where it is "who was told what".
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import psycopg
import pytest
from twilio.request_validator import RequestValidator

from alerts.acknowledge import Actor, acknowledge
from alerts.notifiers.base import Provider
from alerts.notifiers.console import ConsoleNotifier
from alerts.notifiers.twilio import TwilioNotifier, keypress_url
from alerts.notifiers.webhook import WebhookNotifier
from alerts.providers import PhoneProviders
from alerts.router import DEFAULT_SENDERS, Router, RouterConfig
from shouhu.tokens import Role, create_token
from simulators.emergency_platform import create_emergency_platform
from tests.support.callbacks import Stack
from tests.support.escalation import (
    DAY,
    FROM,
    PHONE_SID,
    PHONE_TOKEN,
    PLATFORM_SECRET,
    ZONE,
    Clock,
    HangingProvider,
    make_router,
    messages,
    platform_alerts,
    platform_webhook,
    press,
    q,
    wristband_in,
)
from tests.support.local_http import serve_in_thread
from tests.support.services import serve_app

FAST_STEPS = [
    {"target": "grid_worker", "channels": ["voice", "sms", "console"], "wait_s": 1},
    {"target": "guardians", "channels": ["voice", "sms"], "wait_s": 1},
    {"target": "emergency_platform", "channels": ["webhook"], "wait_s": 1},
    {"target": "operators", "channels": ["voice", "sms", "console"], "wait_s": 30},
]
TAKEN = "接单处置"


@pytest.fixture
def platform() -> Iterator[str]:
    yield from serve_app(create_emergency_platform(PLATFORM_SECRET, announce=lambda _line: None))


def _fast_policy(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE escalation_policies SET steps = %s WHERE id = 'default-sos'", (json.dumps(FAST_STEPS),))


def _wristbands(url: str, count: int) -> list[str]:
    rows = q(
        url,
        "SELECT d.id FROM devices d JOIN residents r ON r.id = d.resident_id"
        " WHERE d.kind = 'wristband' ORDER BY d.id LIMIT %s",
        count,
    )
    assert len(rows) == count
    return [str(r[0]) for r in rows]


def _router(
    url: str, twilio_base: str, platform_url: str, name: str = "r1", public_url: str = "http://127.0.0.1:9"
) -> Router:
    twilio = TwilioNotifier(PHONE_SID, PHONE_TOKEN, FROM, twilio_base, public_url)
    webhook = WebhookNotifier(platform_url, PLATFORM_SECRET, sender="shouhu@county.example", retries=0, timeout=10)
    return Router(
        url,
        RouterConfig(name, ZONE),
        PhoneProviders.of({Provider.TWILIO: twilio}),
        console=ConsoleNotifier(),
        platform=webhook,
        clock=lambda: datetime.now(UTC),
    )


def _first_page_delays(url: str, incidents: list[int], channels: tuple[str, ...]) -> list[float]:
    """Seconds from each incident's press to its first step's first page settled as sent on ``channels``."""
    rows = q(
        url,
        "SELECT i.id, extract(epoch FROM min(a.sent_at) - i.opened_at) FROM incidents i"
        " JOIN notification_attempts a ON a.incident_id = i.id AND a.round = 0 AND a.step = 0"
        " AND a.purpose = 'page' AND a.channel = ANY(%s) AND a.state <> 'pending'"
        " WHERE i.id = ANY(%s) GROUP BY i.id",
        list(channels),
        incidents,
    )
    assert len(rows) == len(incidents), f"{len(incidents) - len(rows)} incidents had no first page"
    return sorted(float(r[1]) for r in rows)


def _step_lateness(url: str, incidents: list[int]) -> list[tuple[int, int, float]]:
    """(incident, step, seconds late) of every step that started, against its due time."""
    rows = q(
        url,
        "SELECT e.incident_id, (e.detail->>'step')::int, extract(epoch FROM e.at - a.due_at)"
        " FROM incident_events e JOIN escalation_actions a ON a.incident_id = e.incident_id"
        " AND a.kind = 'step' AND a.step = (e.detail->>'step')::int AND a.round = (e.detail->>'round')::int"
        " WHERE e.event IN ('step_started', 'no_recipients') AND e.incident_id = ANY(%s)",
        incidents,
    )
    return [(int(i), int(s), float(late)) for i, s, late in rows]


def _run_router(router: Router) -> threading.Thread:
    thread = threading.Thread(target=lambda: router.run(poll_s=0.1, senders=DEFAULT_SENDERS), daemon=True)
    thread.start()
    return thread


def _steps_started(url: str, incidents: list[int], step: int) -> int:
    """How many of ``incidents`` have started their step ``step``."""
    rows = q(
        url,
        "SELECT count(*) FROM incident_events WHERE event = 'step_started'"
        " AND (detail->>'step')::int = %s AND incident_id = ANY(%s)",
        step,
        incidents,
    )
    return int(rows[0][0])


def _cap_alerts_sent(url: str, incidents: list[int]) -> int:
    rows = q(
        url,
        "SELECT count(*) FROM notification_attempts"
        " WHERE purpose = 'cap_alert' AND sent_at IS NOT NULL AND incident_id = ANY(%s)",
        incidents,
    )
    return int(rows[0][0])


def _wait(what: str, check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_hung_platform_holds_up_no_page_and_no_step(county_url: str, phone_network: str) -> None:
    """Four CAP alerts hang at the platform (no answer, ever): new SOS first pages go out in under
    a second, and every step of every incident starts on time."""
    _fast_policy(county_url)
    hung = HangingProvider()
    router = _router(county_url, phone_network, f"{hung.url}/cap")
    thread = _run_router(router)
    try:
        bands = _wristbands(county_url, 12)
        early = [press(county_url, band, datetime.now(UTC), msg_id="early") for band in bands[:4]]
        _wait("the CAP alerts never reached the hung platform", lambda: len(hung.requests) >= 2)
        later = []
        for band in bands[4:]:
            later.append(press(county_url, band, datetime.now(UTC), msg_id="later"))
            time.sleep(0.3)
        # The operators (the last step) are due 1 s after the platform step, while it hangs:
        # wait until every incident has reached them; how late each step started is below.
        every = early + later
        _wait("not every incident reached its operators", lambda: _steps_started(county_url, every, 3) == len(every))
        delays = _first_page_delays(county_url, later, ("voice", "sms"))
        late_steps = [(i, s, late) for i, s, late in _step_lateness(county_url, early + later) if late >= 1.0]
    finally:
        router.stop()
        hung.close()
        thread.join(20)
    assert delays[-1] < 1.0, f"first pages took {delays}"
    assert late_steps == []
    operators = _steps_started(county_url, early, 3)
    assert operators == 4, "the operators of the incidents whose CAP alert hung were not paged on time"


def test_a_hung_twilio_holds_up_neither_the_console_nor_the_platform(county_url: str, platform: str) -> None:
    """Twilio takes every request and never answers: each new SOS is still on the consoles within
    a second, and the CAP alerts go out on time."""
    _fast_policy(county_url)
    hung = HangingProvider()
    router = _router(county_url, hung.url, f"{platform}/cap")
    thread = _run_router(router)
    try:
        bands = _wristbands(county_url, 8)
        incidents = []
        for band in bands:
            incidents.append(press(county_url, band, datetime.now(UTC), msg_id="p"))
            time.sleep(0.3)
        _wait("the voice and SMS pools never hung", lambda: len(hung.requests) >= DEFAULT_SENDERS)
        # Guardians at +1 s, the platform at +2 s: wait until every CAP alert has gone out.
        _wait("not every CAP alert went out", lambda: _cap_alerts_sent(county_url, incidents) == len(incidents))
        delays = _first_page_delays(county_url, incidents, ("console",))
        late_steps = [(i, s, late) for i, s, late in _step_lateness(county_url, incidents) if late >= 1.0]
        cap_late = q(
            county_url,
            "SELECT count(*) FROM notification_attempts a JOIN escalation_actions e ON e.id = a.action_id"
            " WHERE a.purpose = 'cap_alert' AND a.incident_id = ANY(%s)"
            " AND (a.sent_at IS NULL OR a.sent_at - e.due_at > interval '1 second')",
            incidents,
        )
    finally:
        router.stop()
        hung.close()
        thread.join(20)
    assert delays[-1] < 1.0, f"console first pages took {delays}"
    assert late_steps == []
    assert cap_late == [(0,)], "a CAP alert waited for Twilio"
    assert len(platform_alerts(platform)) == len(incidents)


def _first_step_sent(url: str, incidents: list[int], channel: str) -> dict[int, float]:
    """Seconds from each incident's press to its first step's page on ``channel`` settled as sent."""
    rows = q(
        url,
        "SELECT i.id, extract(epoch FROM min(a.sent_at) - i.opened_at) FROM incidents i"
        " JOIN notification_attempts a ON a.incident_id = i.id AND a.round = 0 AND a.step = 0"
        " AND a.purpose = 'page' AND a.channel = %s AND a.sent_at IS NOT NULL"
        " WHERE i.id = ANY(%s) GROUP BY i.id",
        channel,
        incidents,
    )
    return {int(i): float(s) for i, s in rows}


def test_a_leading_call_hung_at_the_provider_holds_up_neither_its_sms_nor_other_incidents(
    county_url: str, phone_network: str, platform: str
) -> None:
    """Each incident's first step leads with one page (an incident stepped alone: its call)
    and its SMS waits behind the leading pages of its channel, not behind its own call:
    with every call hanging at the provider (no answer for 8 s, the voice senders all
    stuck), each incident's SMS still goes out within a second of the press, while its
    leading call is provably still in flight."""
    _fast_policy(county_url)
    httpx.post(
        f"{phone_network}/_sim/faults", json={"to": "*", "fail": "hang", "only": "call", "hang_s": 8}
    ).raise_for_status()
    router = _router(county_url, phone_network, f"{platform}/cap")
    thread = _run_router(router)
    try:
        incidents = []
        for band in _wristbands(county_url, 8):
            incidents.append(press(county_url, band, datetime.now(UTC), msg_id="p"))
            time.sleep(0.3)
        _wait(
            "not every incident's first SMS went out",
            lambda: len(_first_step_sent(county_url, incidents, "sms")) == len(incidents),
        )
        sms = _first_step_sent(county_url, incidents, "sms")
        calls_done = _first_step_sent(county_url, incidents, "voice")
        leaders = q(
            county_url,
            "SELECT DISTINCT channel FROM notification_attempts WHERE incident_id = ANY(%s)"
            " AND round = 0 AND step = 0 AND purpose = 'page' AND channel IN ('voice', 'sms') AND NOT behind_sibling",
            incidents,
        )
    finally:
        router.stop()
        thread.join(20)
    assert leaders == [("voice",)], "each incident, stepped alone, leads with its call"
    assert max(sms.values()) < 1.0, f"first SMS took {sorted(sms.values())}"
    assert calls_done == {}, "a call came back before the SMS went: the hang did not hold the leading page"


# --- acknowledgements racing a send --------------------------------------------------------


def _claimed_pages(url: str, incident: int) -> set[int]:
    return {
        int(r[0])
        for r in q(
            url,
            "SELECT id FROM notification_attempts WHERE incident_id = %s AND purpose = 'page' AND sends > 0",
            incident,
        )
    }


def _in_flight(url: str, incident: int) -> list[tuple[Any, ...]]:
    return q(
        url,
        "SELECT id, address, channel FROM notification_attempts WHERE incident_id = %s AND state = 'pending'"
        " AND leased_by IS NOT NULL",
        incident,
    )


def _keypress(api: str, attempt_id: int, call_sid: str, digit: str) -> httpx.Response:
    url = keypress_url(api, attempt_id)
    params = {"CallSid": call_sid, "Digits": digit}
    signature = RequestValidator(PHONE_TOKEN).compute_signature(url, params)
    return httpx.post(url, data=params, headers={"X-Twilio-Signature": signature}, timeout=10)


@pytest.mark.parametrize("via", ["api", "console", "sms", "keypress"])
def test_an_ack_while_guardians_pages_are_in_flight_tells_each_of_them_once(stack: Stack, via: str) -> None:
    device, _grid, _resident = wristband_in(stack.db, night_covered=False)
    incident = press(stack.db, device, DAY)
    code = q(stack.db, "SELECT code FROM incidents WHERE id = %s", incident)[0][0]
    stack.router.run_once()  # step 0: the grid worker
    worker_call = q(
        stack.db,
        "SELECT id, address, provider_id, recipient_id FROM notification_attempts"
        " WHERE incident_id = %s AND channel = 'voice' AND state = 'sent'",
        incident,
    )[0]
    guardians = [
        r[0]
        for r in q(
            stack.db,
            "SELECT phone FROM guardians g JOIN incidents i ON i.resident_id = g.resident_id WHERE i.id = %s",
            incident,
        )
    ]
    assert guardians
    for phone in guardians:  # each guardian's provider answers 1.5 s late: provably in flight
        httpx.post(f"{stack.phone}/_sim/faults", json={"to": phone, "fail": "hang", "hang_s": 1.5}).raise_for_status()
    stack.clock.advance(120)
    sending = threading.Thread(target=stack.router.run_once, daemon=True)
    sending.start()
    _wait("no guardian page went in flight", lambda: _in_flight(stack.db, incident))
    in_flight = _in_flight(stack.db, incident)
    if via == "api":
        with psycopg.connect(stack.db) as conn:
            secret = create_token(
                conn, role=Role.OPERATOR, areas=[], label="值班长", now=datetime.now(UTC), expires_at=None
            )
        answer = httpx.post(
            f"{stack.api}/api/v1/incidents/{incident}/ack", headers={"Authorization": f"Bearer {secret}"}, timeout=10
        )
        assert answer.status_code == 200, answer.text
    elif via == "console":  # the console's form acts through the same domain function
        with psycopg.connect(stack.db) as conn:
            actor = Actor("staff", str(worker_call[3]), "网格员", str(worker_call[1]), "grid_worker")
            acknowledge(conn, incident, actor, "console", stack.clock(), resolve_timeout_s=1800)
    elif via == "sms":
        answer = httpx.post(
            f"{stack.phone}/_sim/inbound-sms", json={"from": worker_call[1], "body": f"{code} 1"}, timeout=10
        )
        answer.raise_for_status()
    else:
        started = time.monotonic()
        answer = _keypress(stack.api, int(worker_call[0]), str(worker_call[2]), "1")
        assert answer.status_code == 200, answer.text
        assert time.monotonic() - started < 1.0, "the keypress waited for the pages in flight"
    claimed_at_ack = _claimed_pages(stack.db, incident)
    sending.join(30)
    stack.router.run_once()  # the notices
    assert _claimed_pages(stack.db, incident) == claimed_at_ack, "a page started after the acknowledgement"
    assert q(stack.db, "SELECT state FROM incidents WHERE id = %s", incident) == [("acknowledged",)]
    told = [m["to"] for m in messages(stack.phone) if TAKEN in m["body"]]
    assert sorted(told) == sorted(set(told)), "someone was told twice"
    for _id, address, _channel in in_flight:
        assert address in told, f"{address} was being paged at the ack and never told who took it"
    paged = {
        r[0]
        for r in q(
            stack.db,
            "SELECT DISTINCT address FROM notification_attempts WHERE incident_id = %s"
            " AND purpose = 'page' AND sends > 0 AND channel <> 'console'",
            incident,
        )
    }
    acker = set() if via == "api" else {worker_call[1]}  # the operator's token has no phone
    assert set(told) == paged - acker
    never = q(
        stack.db,
        "SELECT count(*) FROM notification_attempts WHERE incident_id = %s AND purpose = 'page' AND state = 'pending'",
        incident,
    )
    assert never == [(0,)]


class SlowPlatform:
    """Passes every request on to the platform simulator after ``delay_s``: a CAP send in flight."""

    def __init__(self, upstream: str, delay_s: float) -> None:
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.requests += 1
                time.sleep(delay_s)
                skipped = ("host", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skipped}
                answer = httpx.post(upstream + self.path, content=raw, headers=headers)
                self.send_response(answer.status_code)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server, self.url = serve_in_thread(Handler)

    def close(self) -> None:
        self.server.shutdown()


def test_an_ack_while_the_cap_alert_is_in_flight_sends_the_platform_an_update(
    county_url: str, phone_network: str, platform: str
) -> None:
    slow = SlowPlatform(platform, 1.5)
    try:
        device, _grid, _resident = wristband_in(county_url, night_covered=False)
        clock = Clock(DAY)
        incident = press(county_url, device, DAY)
        router = make_router(county_url, phone_network, clock, platform=platform_webhook(slow.url))
        for _ in range(2):
            router.run_once()
            clock.advance(120)
        sending = threading.Thread(target=router.run_once, daemon=True)
        sending.start()
        _wait("the CAP alert never went in flight", lambda: slow.requests >= 1)
        with psycopg.connect(county_url) as conn:
            actor = Actor("token", "dispatcher", "平台调度员", None, "platform")
            acknowledge(conn, incident, actor, "api", clock(), resolve_timeout_s=1800)
        sending.join(30)
        router.run_once()
    finally:
        slow.close()
    received = platform_alerts(platform)
    assert [a["msgType"] for a in received] == ["Alert", "Update"]
    assert received[1]["references"], "the Update does not reference the Alert"


# --- everything at once ------------------------------------------------------------------

# Issue 13 asks for 60 s of everything at once; SHOUHU_STRESS_S shortens (or lengthens) it.
STRESS_S = float(os.environ.get("SHOUHU_STRESS_S", "60"))


def _calls_still_playing(phone_network: str) -> list[str]:
    """The calls whose callee is still playing out (the simulator plays every call that has
    a status callback and an answer set), i.e. whose final status callback is not yet posted."""
    calls = httpx.get(f"{phone_network}/_sim/calls").json()
    hooks = httpx.get(f"{phone_network}/_sim/webhooks").json()
    ended = {h["params"].get("CallSid") for h in hooks if h["kind"] == "status"}
    return [c["sid"] for c in calls if c["status_callback"] and c["answer"] and c["sid"] not in ended]


def test_acks_callbacks_steps_and_two_routers_against_each_other_never_deadlock(
    county_url: str, phone_network: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two routers with their sender pools, due steps every second, people answering calls
    (1, 2, voicemail, busy), status callbacks, SMS replies, acknowledgements through the
    API and the console, resolutions, presses joining open incidents, for ``STRESS_S``
    seconds: no deadlock anywhere, every callback and every acknowledgement answered."""
    import random

    from alerts.acknowledge import resolve
    from api.main import create_app
    from devices.kinds import Outcome
    from shouhu.embedded.postgres import free_port
    from shouhu.settings import Settings

    _fast_policy(county_url)
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    app = create_app(
        Settings(database_url=county_url, public_url=api, twilio_auth_token=PHONE_TOKEN, resolve_timeout_s=1800)
    )
    httpx.post(f"{phone_network}/_sim/config", json={"sms_url": api + "/callbacks/twilio/sms", "number": FROM})
    rng = random.Random(13)
    phones = [r[0] for r in q(county_url, "SELECT phone FROM staff UNION SELECT phone FROM guardians")]
    for phone in phones:
        answer = rng.choice(["press1", "press2", "voicemail", "busy", "no-answer", None])
        behaviour = {"to": phone, "answer": answer, "answer_after_s": rng.choice([0.1, 0.3, 0.8])}
        httpx.post(f"{phone_network}/_sim/behaviour", json=behaviour).raise_for_status()
    bands = _wristbands(county_url, 10)
    stop = threading.Event()
    errors: list[BaseException] = []
    with psycopg.connect(county_url) as conn:
        secret = create_token(
            conn, role=Role.OPERATOR, areas=[], label="值班长", now=datetime.now(UTC), expires_at=None
        )
    bearer = {"Authorization": f"Bearer {secret}"}
    acks: list[tuple[str, int]] = []  # (via, HTTP status) of every acknowledgement
    console: dict[str, str] = {}  # the operator's session cookie, once logged in

    def people() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                press(county_url, rng.choice(bands), datetime.now(UTC), msg_id=f"s{n}")
                open_ = q(
                    county_url, "SELECT id, code FROM incidents WHERE state IN ('open', 'unreached', 'acknowledged')"
                )
                if open_:
                    incident, code = rng.choice(open_)
                    action = rng.random()
                    if action < 0.15:
                        answer = httpx.post(f"{api}/api/v1/incidents/{incident}/ack", headers=bearer, timeout=30)
                        acks.append(("api", answer.status_code))
                    elif action < 0.3:
                        answer = httpx.post(
                            f"{api}/console/incidents/{incident}/ack",
                            cookies=console,
                            headers={"Origin": api},
                            timeout=30,
                        )
                        acks.append(("console", answer.status_code))
                    elif action < 0.45:
                        with psycopg.connect(county_url) as conn:
                            actor = Actor("token", "t1", "值班长", None, "operator")
                            resolve(conn, incident, Outcome.VISITED_FINE, "", actor, datetime.now(UTC))
                    if action >= 0.45:
                        paged = q(
                            county_url,
                            "SELECT address FROM notification_attempts WHERE incident_id = %s"
                            " AND channel = 'sms' LIMIT 1",
                            incident,
                        )
                        if paged:
                            reply = {"from": paged[0][0], "body": f"{code} {rng.choice(['1', '2'])}"}
                            httpx.post(f"{phone_network}/_sim/inbound-sms", json=reply, timeout=30)
            except BaseException as exc:  # reported below
                errors.append(exc)
            stop.wait(0.2)

    routers = [
        _router(county_url, phone_network, f"http://127.0.0.1:{free_port()}/cap", name, public_url=api)
        for name in ("ra", "rb")
    ]
    threads = [_run_router(router) for router in routers]
    for _url in serve_app(app, port=port):
        login = httpx.post(f"{api}/api/v1/session", json={"token": secret})
        assert login.status_code == 201, login.text
        console.update(login.cookies)
        driver = threading.Thread(target=people, daemon=True)
        driver.start()
        time.sleep(STRESS_S)
        stop.set()
        driver.join(30)
        for router in routers:
            router.stop()
        for thread in threads:
            thread.join(30)
        # Calls placed before the routers stopped still end, and their status callbacks
        # must find the API up: serve it until every call has posted its final status.
        _wait("calls still ringing 30 s after the routers stopped", lambda: not _calls_still_playing(phone_network), 30)
    deadlocks = q(county_url, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    hooks = httpx.get(f"{phone_network}/_sim/webhooks").json()
    assert not errors, errors[:3]
    assert "deadlock" not in caplog.text.lower()
    assert deadlocks == [(0,)]
    assert len(hooks) > 50, f"only {len(hooks)} callbacks in {STRESS_S} s"
    # An acknowledgement is taken (200; the console redirects, 303) or refused as taken (409).
    assert {via for via, _status in acks} == {"api", "console"}, acks
    assert [a for a in acks if a[1] not in (200, 303, 409)] == []
    unanswered = [(h["kind"], h["status"], str(h.get("reply"))[:300]) for h in hooks if h["status"] != 200]
    assert unanswered == []
