"""The callbacks stack: the database, the API serving Twilio's callbacks, the phone-network
simulator and a router, all on one clock that the test moves."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from twilio.request_validator import RequestValidator

from alerts.router import Router
from api.deps import get_now
from api.main import create_app
from api.routes.callbacks import SMS_CALLBACK_PATH
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from tests.support.escalation import DAY, FROM, PHONE_TOKEN, Clock, make_router, platform_webhook, q
from tests.support.services import serve_app

CALLBACK_DEADLINE_S = 10.0
SECOND_WORKER = "+12125550142"  # not in the demo county (checked when added)


@dataclass
class Stack:
    """The database, the API it serves, the phone network, and a router: one clock for all."""

    db: str
    api: str
    phone: str
    clock: Clock
    router: Router

    def behave(self, to: str, **behaviour: str | None) -> None:
        httpx.post(f"{self.phone}/_sim/behaviour", json={"to": to, **behaviour}).raise_for_status()

    def webhooks(self) -> list[dict[str, Any]]:
        hooks: list[dict[str, Any]] = httpx.get(f"{self.phone}/_sim/webhooks").json()
        return hooks

    def wait_for_webhooks(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` callbacks the network posted, once each has had its answer."""
        deadline = time.monotonic() + CALLBACK_DEADLINE_S
        while True:
            hooks = self.webhooks()
            if len(hooks) >= count:
                return hooks[:count]
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(hooks)} of {count} callbacks posted in {CALLBACK_DEADLINE_S}s: {hooks}")
            time.sleep(0.02)

    def text(self, sender: str, body: str) -> dict[str, Any]:
        """``sender`` texts the Twilio number; returns the webhook's answer."""
        answer = httpx.post(f"{self.phone}/_sim/inbound-sms", json={"from": sender, "body": body}, timeout=30)
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    def send_due(self) -> None:
        """Run the router until every attempt due now has gone out.

        A callback holds the incident's pending attempts while it acts, and the
        router skips rows someone holds: one pass may leave some for the next.
        """
        deadline = time.monotonic() + CALLBACK_DEADLINE_S
        due = "SELECT count(*) FROM notification_attempts WHERE state = 'pending' AND coalesce(not_before, %s) <= %s"
        while True:
            self.router.run_once()
            if q(self.db, due, self.clock(), self.clock()) == [(0,)]:
                return
            assert time.monotonic() < deadline, "attempts due now were never sent"
            time.sleep(0.02)

    def add_platform(self, platform_base: str) -> None:
        """From now on the router sends the chain's CAP messages to the platform at ``platform_base``."""
        self.router.close()
        self.router = make_router(
            self.db, self.phone, self.clock, public_url=self.api, platform=platform_webhook(platform_base)
        )

    def post_signed(self, path: str, params: dict[str, str], *, token: str = PHONE_TOKEN) -> httpx.Response:
        """POST as Twilio would, signed with ``token`` for the URL posted to."""
        url = self.api + path
        return httpx.post(url, data=params, headers={"X-Twilio-Signature": sign(url, params, token)}, timeout=30)


def sign(url: str, params: dict[str, str], token: str = PHONE_TOKEN) -> str:
    signature: str = RequestValidator(token).compute_signature(url, params)
    return signature


@pytest.fixture
def stack(county_url: str, phone_network: str) -> Iterator[Stack]:
    clock = Clock(DAY)
    # The API must know its own public URL before it is built: Twilio signs that URL.
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    app = create_app(
        Settings(database_url=county_url, public_url=api, twilio_auth_token=PHONE_TOKEN, resolve_timeout_s=1800)
    )
    app.dependency_overrides[get_now] = clock
    config = {"sms_url": api + SMS_CALLBACK_PATH, "number": FROM}
    httpx.post(f"{phone_network}/_sim/config", json=config).raise_for_status()
    stack = Stack(county_url, api, phone_network, clock, make_router(county_url, phone_network, clock, public_url=api))
    for _url in serve_app(app, port=port):
        yield stack
    stack.router.close()


def add_grid_worker(url: str, grid: str, phone: str = SECOND_WORKER) -> str:
    """A second grid worker on duty in ``grid`` around the clock (the demo county has one per grid)."""
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1 FROM staff WHERE phone = %s", (phone,)).fetchone() is None
        conn.execute(
            "INSERT INTO staff (id, name, role, phone) VALUES ('gw-test', '赵网格', 'grid_worker', %s)", (phone,)
        )
        conn.execute("INSERT INTO staff_areas (staff_id, area_id) VALUES ('gw-test', %s)", (grid,))
        conn.execute(
            "INSERT INTO duty_shifts (staff_id, area_id, weekdays, start_time, end_time)"
            " VALUES ('gw-test', %s, '{1,2,3,4,5,6,7}', '00:00', '00:00')",
            (grid,),
        )
    return phone


def snapshot(url: str) -> tuple[Any, ...]:
    """Everything a callback could change."""
    return q(
        url,
        """
        SELECT (SELECT count(*) FROM incident_events), (SELECT count(*) FROM notification_attempts),
               (SELECT count(*) FROM audit_log),
               (SELECT string_agg(id || ':' || state, ',' ORDER BY id) FROM notification_attempts),
               (SELECT string_agg(state || ':' || escalation_token, ',' ORDER BY id) FROM incidents),
               (SELECT string_agg(id || ':' || due_at || ':' || state, ',' ORDER BY id) FROM escalation_actions)
        """,
    )[0]
