"""Issue 17 end to end: a page through Aliyun and the answer back, with nothing in between
stood in for. The router pages through the official SDKs to the Aliyun-compatible
simulator; the simulator's callee presses 1 (or replies by SMS) and the simulator pushes
its receipts to a served `shouhu api`, whose receipt worker takes the incident for the
person who answered — the same as a Twilio keypress or SMS reply."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import psycopg
import pytest

from alerts.notifiers.aliyun import aliyun_notifiers
from alerts.notifiers.base import Provider
from alerts.notifiers.console import ConsoleNotifier
from alerts.providers import PhoneProviders, ProviderChoice
from alerts.router import Router, RouterConfig
from api.main import create_app
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from simulators.aliyun import create_aliyun_service
from tests.support.aliyun import ALIYUN_SETTINGS, KEY_ID, KEY_SECRET, WORKER, WRISTBAND
from tests.support.escalation import ZONE, press, q
from tests.support.hub import wait_until
from tests.support.services import ShouhuProcess, serve_app, shouhu_env

TOKEN = "e2e-receipt-token-9f3c"


@dataclass(frozen=True)
class Stack:
    db: str
    aliyun: str
    router: Router


@pytest.fixture
def stack(county: str) -> Iterator[Stack]:
    """The API (with its receipt worker) and the simulator pushing to it; a router paging through it."""
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    settings = Settings.model_validate(
        ALIYUN_SETTINGS | {"database_url": county, "aliyun_callback_token": TOKEN, "resolve_timeout_s": 1800}
    )
    simulator = create_aliyun_service(
        KEY_ID, KEY_SECRET, announce=lambda _line: None, push_base=f"{api}/callbacks/aliyun/{TOKEN}"
    )
    for aliyun in serve_app(simulator):
        for _ in serve_app(create_app(settings), port=api_port):
            notifiers = aliyun_notifiers(settings.model_copy(update={"aliyun_endpoint": aliyun}))
            phone = PhoneProviders.build(
                {(Provider.ALIYUN, channel): notifier for channel, notifier in notifiers.items()},
                ProviderChoice(Provider.ALIYUN),
            )
            router = Router(county, RouterConfig("r1", ZONE), phone, console=ConsoleNotifier())
            try:
                yield Stack(county, aliyun, router)
            finally:
                router.close()


def taken_by(db: str, incident: int) -> tuple[object, ...]:
    """The incident's state and who took it, by name."""
    return q(db, "SELECT state, acknowledged_by_name FROM incidents WHERE id = %s", incident)[0]


def test_a_keypress_of_1_on_an_aliyun_call_takes_the_incident(stack: Stack) -> None:
    httpx.post(
        f"{stack.aliyun}/_sim/behaviour", json={"to": WORKER, "answer": "press1", "answer_after_s": 0}
    ).raise_for_status()
    incident = press(stack.db, WRISTBAND, datetime.now(UTC))
    stack.router.run_once()
    wait_until(lambda: taken_by(stack.db, incident)[0] == "acknowledged", 20, "the pushed keypress taking it")
    assert "董思远" in str(taken_by(stack.db, incident)[1])
    pushes = httpx.get(f"{stack.aliyun}/_sim/pushes").json()
    voice = [p for p in pushes if p["kind"] == "voice_report"]
    assert voice
    assert voice[0]["status"] == 200  # answered at once by the route; the worker did the rest


def test_an_sms_reply_to_an_aliyun_page_takes_the_incident(stack: Stack) -> None:
    httpx.post(f"{stack.aliyun}/_sim/behaviour", json={"to": WORKER, "answer": "no-answer"}).raise_for_status()
    incident = press(stack.db, WRISTBAND, datetime.now(UTC))
    stack.router.run_once()
    (code,) = q(stack.db, "SELECT code FROM incidents WHERE id = %s", incident)[0]
    wait_until(
        lambda: any(r["action"] == "SendSms" for r in httpx.get(f"{stack.aliyun}/_sim/requests").json()),
        20,
        "the SMS page",
    )
    httpx.post(f"{stack.aliyun}/_sim/sms-up", json={"from": WORKER, "content": f"{code} 1"}).raise_for_status()
    wait_until(lambda: taken_by(stack.db, incident)[0] == "acknowledged", 20, "the pushed SMS reply taking it")
    assert "董思远" in str(taken_by(stack.db, incident)[1])


@pytest.fixture
def aliyun_to_port() -> Iterator[tuple[str, int]]:
    """The simulator pushing to an API not started yet, on a port chosen now; (its URL, that port)."""
    port = free_port()
    simulator = create_aliyun_service(
        KEY_ID, KEY_SECRET, announce=lambda _line: None, push_base=f"http://127.0.0.1:{port}/callbacks/aliyun/{TOKEN}"
    )
    for aliyun in serve_app(simulator):
        yield aliyun, port


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_a_receipt_queued_when_the_api_dies_is_handled_after_its_restart(
    county: str, aliyun_to_port: tuple[str, int], signal_number: int
) -> None:
    """The API stored the pushed keypress and answered Aliyun; its worker was handling it
    (held on the incident's lock) when the process died. The receipt's transaction died
    with it: the restarted API's worker handles it, once."""
    aliyun, port = aliyun_to_port
    base = f"http://127.0.0.1:{port}"
    env = shouhu_env(SHOUHU_DATABASE_URL=county, SHOUHU_API_PORT=str(port), SHOUHU_ALIYUN_CALLBACK_TOKEN=TOKEN)
    api = ShouhuProcess(["api"], env, ready_url=f"{base}/readyz").start()
    settings = Settings.model_validate(ALIYUN_SETTINGS | {"database_url": county, "aliyun_endpoint": aliyun})
    notifiers = aliyun_notifiers(settings)
    phone = PhoneProviders.build(
        {(Provider.ALIYUN, channel): notifier for channel, notifier in notifiers.items()},
        ProviderChoice(Provider.ALIYUN),
    )
    router = Router(county, RouterConfig("r1", ZONE), phone, console=ConsoleNotifier())
    holder = psycopg.connect(county)
    try:
        # Answered after 1 s: time to take the incident's lock before the push arrives.
        httpx.post(
            f"{aliyun}/_sim/behaviour", json={"to": WORKER, "answer": "press1", "answer_after_s": 1}
        ).raise_for_status()
        incident = press(county, WRISTBAND, datetime.now(UTC))
        router.run_once()
        holder.execute("SELECT 1 FROM incidents WHERE id = %s FOR UPDATE", (incident,))
        wait_until(
            lambda: q(county, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] > 0,
            20,
            "the API's worker waiting on the incident with the keypress",
        )
        api.kill(signal_number)
        holder.rollback()
        assert taken_by(county, incident)[0] != "acknowledged"
        api = ShouhuProcess(["api"], env, ready_url=f"{base}/readyz").start()
        wait_until(lambda: taken_by(county, incident)[0] == "acknowledged", 20, "the restarted API handling it")
        assert "董思远" in str(taken_by(county, incident)[1])
        taken = "SELECT count(*) FROM incident_events WHERE incident_id = %s AND event = 'acknowledged'"
        assert q(county, taken, incident) == [(1,)]
    finally:
        holder.close()
        router.close()
        api.stop()
