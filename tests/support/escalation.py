"""Shared helpers for escalation tests: a clock the test moves, a router wired to the
phone-network simulator, and queries over the demo county."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

import httpx
import psycopg

from alerts.incidents import Alarm, record_alarm
from alerts.notifiers.base import Provider
from alerts.notifiers.console import ConsoleNotifier
from alerts.notifiers.platform import PlatformNotifier
from alerts.notifiers.twilio import TwilioNotifier
from alerts.notifiers.webhook import WebhookNotifier
from alerts.providers import PhoneProviders
from alerts.router import Router, RouterConfig
from devices.contract import payload_hash
from devices.kinds import IncidentKind
from tests.support.local_http import serve_in_thread

ZONE = ZoneInfo("Asia/Shanghai")
PHONE_SID, PHONE_TOKEN, FROM = "AC" + "0" * 32, "router-test-token", "+12025550100"
PLATFORM_SECRET = "platform-test-secret"
# Tuesday 10:00 and Wednesday 02:00 in Asia/Shanghai.
DAY = datetime(2026, 11, 24, 10, 0, tzinfo=ZONE).astimezone(UTC)
NIGHT = datetime(2026, 11, 25, 2, 0, tzinfo=ZONE).astimezone(UTC)


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def calls(base: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = httpx.get(f"{base}/_sim/calls").json()
    return result


def messages(base: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = httpx.get(f"{base}/_sim/messages").json()
    return result


def make_router(
    url: str,
    phone_base: str,
    clock: Clock,
    name: str = "r1",
    *,
    public_url: str = "http://127.0.0.1:8000",
    platform: PlatformNotifier | None = None,
    exercise: bool = False,
    twiml_by_url: bool = False,
) -> Router:
    """A router paging through the phone network at ``phone_base``, callbacks to ``public_url``."""
    twilio = TwilioNotifier(PHONE_SID, PHONE_TOKEN, FROM, phone_base, public_url, twiml_by_url=twiml_by_url)
    return Router(
        url,
        RouterConfig(name, ZONE),
        PhoneProviders.of({Provider.TWILIO: twilio}),
        console=ConsoleNotifier(),
        platform=platform,
        clock=clock,
        exercise=exercise,
    )


def platform_webhook(platform_base: str) -> WebhookNotifier:
    """The CAP notifier for the platform simulator at ``platform_base``, as the router builds it:
    one request per call, its retries being attempt rows."""
    return WebhookNotifier(f"{platform_base}/cap", PLATFORM_SECRET, sender="shouhu@county.example", retries=0)


def platform_alerts(platform_base: str) -> list[dict[str, Any]]:
    """Every CAP message the platform simulator recorded, oldest first."""
    found: list[dict[str, Any]] = httpx.get(f"{platform_base}/_sim/alerts").json()
    return found


def press(url: str, device_id: str, at: datetime, msg_id: str = "m1") -> int:
    with psycopg.connect(url) as conn:
        outcome = record_alarm(
            conn,
            Alarm(device_id, IncidentKind.SOS, msg_id, b"{}", payload_hash(msg_id.encode()), at),
            ack_timeout_s=120,
            hub_id="test",
        )
    assert outcome.incident_id is not None
    return outcome.incident_id


def q(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def grid_worker_shifts(url: str) -> dict[str, list[tuple[str, str, Any, Any]]]:
    rows = q(
        url,
        """
        SELECT d.area_id, s.id, s.phone, d.start_time, d.end_time FROM duty_shifts d
        JOIN staff s ON s.id = d.staff_id WHERE s.role = 'grid_worker'""",
    )
    shifts: dict[str, list[tuple[str, str, Any, Any]]] = {}
    for area, staff, phone, start, end in rows:
        shifts.setdefault(area, []).append((staff, phone, start, end))
    return shifts


def wristband_in(url: str, *, night_covered: bool) -> tuple[str, str, str]:
    """(device, grid, resident) in a grid whose grid workers do or do not cover the night."""
    shifts = grid_worker_shifts(url)
    for device, grid, resident in q(
        url,
        """
            SELECT d.id, r.grid_id, r.id FROM devices d JOIN residents r ON r.id = d.resident_id
            JOIN areas a ON a.id = r.grid_id WHERE a.level = 'grid' ORDER BY d.id""",
    ):
        has_night = any(start > end for _s, _p, start, end in shifts.get(grid, []))
        if has_night == night_covered and grid in shifts:
            return device, grid, resident
    raise AssertionError("the demo county has no such grid")


class HangingProvider:
    """A provider that takes a request and never answers: a call stuck in flight.

    Every request hangs, or with ``hang_for`` only those to that number, the others
    being passed on to the Twilio API at ``upstream`` (the phone-network simulator)
    and its answer passed back.
    """

    def __init__(self, upstream: str | None = None, hang_for: str | None = None) -> None:
        self.requests: list[dict[str, str]] = []
        self.release = threading.Event()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                raw = self.rfile.read(length)
                if len(raw) < length:
                    # The client died between its headers and its body (urllib3 sends them
                    # apart): a request cut short never reached the provider, so it is no
                    # call in flight.
                    return
                fields = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                provider.requests.append(fields | {"path": self.path})
                if upstream is None or hang_for is None or fields.get("To") == hang_for:
                    provider.release.wait(60)  # no status line, no bytes
                    return
                skipped = ("host", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skipped}
                answer = httpx.post(upstream + self.path, content=raw, headers=headers)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server, self.url = serve_in_thread(Handler)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
