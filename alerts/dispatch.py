"""Sending pending attempts: pages, re-pages and notices by phone; CAP messages to the platform.

Each attempt is leased in a short transaction (``alerts/attempts.py``), sent with no
transaction or lock open, then settled with the provider's id in a new transaction.
A worker that dies mid-send leaves its leases behind; the next sender takes them over
and sends those attempts again under the same keys — at most the attempts in flight
are sent twice, none a third time.

A voice or SMS attempt goes out on a provider (``alerts/providers.py``): the one its
row names (a retry's, a fallback's), else the primary of its incident's area, written
on the row when it is claimed. A send that falls back queues the next try on the
other provider, and the sender that saw the failure sends that try at once itself:
no other sender, busy or held by the hung provider, stands between the failure and
the page going out again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from prometheus_client import Histogram
from psycopg.rows import kwargs_row

from alerts.attempts import ATTEMPTS, Lease, claim, next_try, settle
from alerts.notifiers.base import Delivery, Message, Notifier, Provider, SendOutcome, SendResult
from alerts.notifiers.console import ConsoleNotifier
from alerts.notifiers.platform import CapMsgType, PlatformAlert, PlatformNotifier, TriedContact
from alerts.providers import PHONE_CHANNELS, Failover, PhoneProviders, ProviderChoice, choice_for_area
from alerts.states import AttemptState, IncidentState
from devices.kinds import AttemptPurpose, Channel
from shouhu.db import Conn

log = logging.getLogger(__name__)


PRESS_TO_FIRST_REQUEST = Histogram(
    "shouhu_sos_press_to_first_request_seconds",
    "From the hub receiving an SOS or fall to the first provider request for its incident",
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)

# How long a sender keeps an area's phone providers before reading them again.
CHOICE_CACHE_S = 30.0

CAP_TYPE = {
    AttemptPurpose.CAP_ALERT: CapMsgType.ALERT,
    AttemptPurpose.CAP_UPDATE: CapMsgType.UPDATE,
    AttemptPurpose.CAP_CANCEL: CapMsgType.CANCEL,
}


@dataclass(frozen=True, slots=True)
class PendingAttempt:
    id: int
    incident_id: int
    purpose: AttemptPurpose
    channel: Channel
    address: str
    step: int
    round: int
    attempt: int
    body: str | None
    code: str
    kind: str
    opened_at: datetime
    resident_name: str
    resident_address: str
    resident_phone: str | None
    device_id: str | None = None
    area_id: str | None = None
    provider: Provider | None = None

    def message(self) -> Message:
        """What the person is told: the minimum, never medical notes (PIPL)."""
        return Message(
            self.incident_id,
            self.code,
            self.kind,
            self.resident_name,
            self.resident_address,
            self.resident_phone or "",
            notice=self.body if self.purpose is AttemptPurpose.NOTICE else None,
            device_id=self.device_id or "",
        )


def attempt_by_id(conn: Conn, attempt_id: int) -> PendingAttempt | None:
    """One attempt with what its message needs, whatever its state (the call's TwiML is asked for mid-call)."""
    cursor = conn.cursor(row_factory=kwargs_row(_attempt))
    return cursor.execute(_ATTEMPTS + " WHERE a.id = %s", (attempt_id,)).fetchone()


def _leased(lease: Lease) -> tuple[PendingAttempt, bool]:
    """A leased attempt with what its message needs, as the lease's statement read it
    (``_LEASED``), and whether it may be its incident's first provider request."""
    assert lease.read is not None, f"attempt {lease.attempt_id} leased without its row"
    _id, first, *columns = lease.read
    return _attempt(**dict(zip(_COLUMNS, columns, strict=True))), bool(first)


def _attempt(*, purpose: str, channel: str, provider: str | None, **columns: Any) -> PendingAttempt:
    return PendingAttempt(
        purpose=AttemptPurpose(purpose),
        channel=Channel(channel),
        provider=Provider(provider) if provider else None,
        **columns,
    )


_ATTEMPTS = """
    SELECT a.id, a.incident_id, a.purpose, a.channel, a.address, a.step, a.round, a.attempt, a.body,
           i.code, i.kind, i.opened_at, coalesce(r.name, '未登记手环') AS resident_name,
           coalesce(r.address, '') AS resident_address, r.phone AS resident_phone, i.device_id,
           i.area_id, a.provider
    FROM notification_attempts a
    JOIN incidents i ON i.id = a.incident_id
    LEFT JOIN residents r ON r.id = i.resident_id
"""


_COLUMNS = (
    "id", "incident_id", "purpose", "channel", "address", "step", "round", "attempt", "body", "code", "kind",
    "opened_at", "resident_name", "resident_address", "resident_phone", "device_id", "area_id", "provider",
)
# An incident's first provider request, counted once even with several senders: its
# leading first page on a phone (``alerts.attempts.behind_the_leader``; of rows written
# before leaders were chosen, the lowest), none of them sent yet, on its first try (and,
# checked by the caller, its first send). A console page is recorded with its step, not requested.
_FIRST_REQUEST = f"""
    (a.purpose = '{AttemptPurpose.PAGE}' AND a.attempt = 1 AND a.round = 0 AND a.step = 0
     AND a.channel <> '{Channel.CONSOLE}' AND NOT a.behind_sibling
     AND NOT EXISTS (SELECT 1 FROM notification_attempts f
                     WHERE f.incident_id = a.incident_id AND f.purpose = '{AttemptPurpose.PAGE}' AND f.round = 0
                       AND f.step = 0 AND f.channel <> '{Channel.CONSOLE}' AND NOT f.behind_sibling
                       AND (f.id < a.id OR f.sent_at IS NOT NULL)))
"""


# What a sender reads about the attempts it leases, in the lease's own statement
# (``alerts.attempts.claim(read=…)``): the id, whether it is its incident's first request,
# then the columns of ``_COLUMNS``.
_LEASED = _ATTEMPTS.replace(
    "SELECT a.id,", f"SELECT a.id AS leased_id, {_FIRST_REQUEST} AS first_request, a.id,", 1
).replace("FROM notification_attempts a", "FROM leased a", 1)


# A leased attempt ready to send: its lease, what it is, the CAP alert (webhook), whether it
# is the incident's first page, and what it may fall back on (phone).
_Work = tuple[Lease, PendingAttempt, PlatformAlert | None, bool, Failover | None]


class Dispatcher:
    """Sends what the escalation queued, through the notifiers it was given.

    One channel at a time (each channel has its own senders, ``alerts/router.py``): an
    attempt is leased in one short transaction (``alerts/attempts.py``), sent with no
    transaction open, and settled in another. Voice and SMS go out through ``phone``,
    by the attempt's provider; the console through ``console``.
    """

    def __init__(
        self,
        phone: PhoneProviders,
        platform: PlatformNotifier | None,
        *,
        worker_id: str,
        clock: Callable[[], datetime],
        zone: ZoneInfo,
        console: Notifier | None = None,
        exercise: bool = False,
    ) -> None:
        self.phone = phone
        self.console = console
        self.platform = platform
        self.worker_id = worker_id
        self.clock = clock
        self.zone = zone
        self.exercise = exercise
        # area → (when read, its providers): one walk up the area tree per area and
        # CHOICE_CACHE_S, not one per page — in a mass event that walk was a query per send.
        self._choices: dict[str | None, tuple[float, ProviderChoice]] = {}

    def channels(self) -> frozenset[Channel]:
        """Every channel this dispatcher can send on."""
        return (
            self.phone.channels
            | ({Channel.CONSOLE} if self.console else frozenset())
            | ({Channel.WEBHOOK} if self.platform else frozenset())
        )

    def recorded_channels(self) -> frozenset[Channel]:
        """Channels whose pages are recorded as sent with their step instead of sent here: the
        console's, when its notifier is the plain ``ConsoleNotifier`` (sending is recording)."""
        return frozenset({Channel.CONSOLE}) if type(self.console) is ConsoleNotifier else frozenset()

    def send_due(
        self, conn: Conn, channel: Channel | None = None, *, limit: int = 1, first_pages_only: bool = False
    ) -> int:
        """Claim up to ``limit`` due attempts of ``channel`` (None: any), send each, settle each; how many.

        ``conn`` must have no transaction open: none is held while a provider is called.
        """
        with conn.transaction():
            now = self.clock()
            channels = self.channels() if channel is None else (channel,)
            leases = claim(
                conn, channels, now, self.worker_id, limit=limit, first_pages_only=first_pages_only, read=_LEASED
            )
            work = self._prepare_all(conn, leases)
        self._send(conn, work)
        return len(leases)

    def _send(self, conn: Conn, work: list[_Work]) -> None:
        for lease, attempt, alert, first, failover in work:
            result = self._send_one(conn, lease, attempt, alert, first, failover)
            if result.fall_back and failover is not None:
                self._send_fallback(conn, attempt.id)

    def _prepare_all(self, conn: Conn, leases: list[Lease]) -> list[_Work]:
        """What sending the leased attempts needs: their rows, read by the lease's own
        statement (in a mass event, two statements per page were a fifth of the router's)."""
        return [self._prepare(conn, lease, *_leased(lease)) for lease in leases]

    def _prepare(self, conn: Conn, lease: Lease, attempt: PendingAttempt, first_request: bool) -> _Work:
        """What sending a leased attempt needs; a phone attempt gets its provider here (its
        own, else its area's primary)."""
        alert = self._cap_alert(conn, attempt) if attempt.channel is Channel.WEBHOOK else None
        failover = None
        if attempt.channel in PHONE_CHANNELS and self.phone.default is not None:
            choice = self._choice(conn, attempt.area_id, self.phone.default)
            # Its own provider (a retry's, a fallback's), else the area's primary; recorded
            # when the outcome is settled (``settle(provider=…)``).
            attempt = replace(attempt, provider=attempt.provider or choice.primary)
            failover = Failover(choice, self.zone)
        first = first_request and lease.sends == 1
        return lease, attempt, alert, first, failover

    def _choice(self, conn: Conn, area_id: str | None, default: ProviderChoice) -> ProviderChoice:
        """The area's providers (``choice_for_area``), read again after ``CHOICE_CACHE_S``: a
        registry change of ``phone_providers:`` reaches the senders within that."""
        cached = self._choices.get(area_id)
        if cached is not None and time.monotonic() - cached[0] < CHOICE_CACHE_S:
            return cached[1]
        choice = choice_for_area(conn, area_id, default)
        self._choices[area_id] = (time.monotonic(), choice)
        return choice

    def _send_fallback(self, conn: Conn, failed_id: int) -> None:
        """Send the try queued on the next provider after ``failed_id`` fell back, now, in this thread."""
        with conn.transaction():
            fallback = next_try(conn, failed_id)
            if fallback is None:
                return  # no provider left (the step goes on as after any failure), or another sender has it
            attempt = attempt_by_id(conn, fallback)
            assert attempt is not None
            leases = claim(conn, (attempt.channel,), self.clock(), self.worker_id, only=fallback, read=_LEASED)
            work = self._prepare_all(conn, leases)
        self._send(conn, work)  # a fallback that fails so again goes on to the next provider, if any

    def _send_one(
        self,
        conn: Conn,
        lease: Lease,
        attempt: PendingAttempt,
        alert: PlatformAlert | None,
        first: bool,
        failover: Failover | None,
    ) -> SendResult:
        started = self.clock()
        if first:
            PRESS_TO_FIRST_REQUEST.observe(max((started - attempt.opened_at).total_seconds(), 0.0))
        try:
            if attempt.channel is Channel.WEBHOOK:
                if self.platform is None or alert is None:
                    result = SendResult(SendOutcome.FAILED, error="no emergency platform configured", final=True)
                else:
                    result = self.platform.send_alert(alert)
            else:
                result = self._send_phone(attempt)
        except Exception as exc:  # a notifier must not take the router down
            log.exception("sending attempt %s raised", attempt.id)
            result = SendResult(SendOutcome.FAILED, error=repr(exc)[:500])
        ATTEMPTS.labels(attempt.channel.value, attempt.purpose.value, result.outcome.value).inc()
        # A success is settled by one statement: on an autocommit connection (the router's)
        # that is its own transaction, without a BEGIN and a COMMIT around it.
        alone = result.outcome is SendOutcome.SENT and conn.autocommit
        with nullcontext() if alone else conn.transaction():
            settle(
                conn,
                lease,
                result,
                self.clock(),
                self.worker_id,
                {
                    "purpose": attempt.purpose.value,
                    "channel": attempt.channel.value,
                    "to": attempt.address,
                    "step": attempt.step,
                    "round": attempt.round,
                }
                | ({"provider": attempt.provider.value} if attempt.provider else {}),
                failover=failover,
                provider=attempt.provider,
            )
        return result

    def _send_phone(self, attempt: PendingAttempt) -> SendResult:
        if attempt.channel is Channel.CONSOLE:
            notifier = self.console
        elif attempt.provider is not None:
            notifier = self.phone.notifier(attempt.provider, attempt.channel)
        else:
            notifier = None
        if notifier is None:
            where = f"{attempt.provider} {attempt.channel}" if attempt.provider else str(attempt.channel)
            # Another provider may carry it: a provider named for an area but not configured here.
            fall_back = attempt.channel in PHONE_CHANNELS
            return SendResult(SendOutcome.FAILED, error=f"no notifier for {where}", fall_back=fall_back)
        return notifier.send(Delivery(attempt.id, attempt.channel, attempt.address, attempt.message()))

    def _cap_alert(self, conn: Conn, attempt: PendingAttempt) -> PlatformAlert | None:
        if self.platform is None:
            return None
        stored = json.loads(attempt.body) if attempt.body else {}
        identifier = stored["identifier"]
        sent = datetime.fromisoformat(stored["sent"])
        return self._platform_alert(conn, attempt, identifier, sent)

    def _platform_alert(self, conn: Conn, attempt: PendingAttempt, identifier: str, sent: datetime) -> PlatformAlert:
        row = conn.execute(
            """
            SELECT i.state, i.lat, i.lon, coalesce(r.medical_notes, ''), coalesce(a.name, ''),
                   i.acknowledged_by_name, i.outcome, i.resolution_note, r.lat, r.lon
            FROM incidents i
            LEFT JOIN residents r ON r.id = i.resident_id
            LEFT JOIN areas a ON a.id = i.area_id
            WHERE i.id = %s
            """,
            (attempt.incident_id,),
        ).fetchone()
        assert row is not None
        state, lat, lon, notes, area_name, taken_by, outcome, resolution, home_lat, home_lon = row
        tried = tuple(
            TriedContact(str(name), str(role), str(channel), at, str(outcome_))
            for name, role, channel, at, outcome_ in conn.execute(
                """
                SELECT coalesce(s.name, g.name, a.recipient_id), coalesce(s.role, a.recipient_kind),
                       a.channel, coalesce(a.sent_at, a.updated_at), a.state
                FROM notification_attempts a
                LEFT JOIN staff s ON a.recipient_kind = 'staff' AND s.id = a.recipient_id
                LEFT JOIN guardians g ON a.recipient_kind = 'guardian' AND g.id = a.recipient_id
                WHERE a.incident_id = %s AND a.purpose = %s AND a.channel IN ('voice', 'sms')
                  AND a.state <> %s
                ORDER BY a.created_at, a.id
                """,
                (attempt.incident_id, AttemptPurpose.PAGE, AttemptState.PENDING),
            ).fetchall()
        )
        references: tuple[tuple[str, datetime], ...] = ()
        if attempt.purpose is not AttemptPurpose.CAP_ALERT:
            first = conn.execute(
                "SELECT body FROM notification_attempts WHERE incident_id = %s AND purpose = %s"
                " AND state = %s ORDER BY id LIMIT 1",
                (attempt.incident_id, AttemptPurpose.CAP_ALERT, AttemptState.SENT),
            ).fetchone()
            if first and first[0]:
                original = json.loads(first[0])
                references = ((original["identifier"], datetime.fromisoformat(original["sent"])),)
        note = {
            IncidentState.ACKNOWLEDGED: f"已由{taken_by}接单处置" if taken_by else "",
            IncidentState.RESOLVED: f"已处置：{outcome}。{resolution}" if outcome else "",
            IncidentState.CANCELLED: "老人已在手环上取消求助",
        }.get(IncidentState(state), "")
        return PlatformAlert(
            identifier=identifier,
            msg_type=CAP_TYPE[attempt.purpose],
            sent=sent,
            exercise=self.exercise,
            incident_id=attempt.incident_id,
            incident_code=attempt.code,
            incident_kind=attempt.kind,
            opened_at=attempt.opened_at,
            state=str(state),
            resident_name=attempt.resident_name,
            address=attempt.resident_address,
            phone=attempt.resident_phone,
            lat=lat if lat is not None else home_lat,
            lon=lon if lon is not None else home_lon,
            medical_notes=str(notes),
            area_name=str(area_name),
            tried=tried,
            note=note,
            references=references,
        )
