"""``shouhu router``: runs escalation steps as they fall due, then sends their attempts.

Two kinds of durable work, both rows claimed with ``FOR UPDATE SKIP LOCKED`` so any
number of routers share them without a coordinator:

1. a due ``escalation_actions`` row: resolve the step's recipients *now* (rosters
   in SHOUHU_TIMEZONE), write one ``notification_attempts`` row per recipient and
   channel, schedule the next step, all in one transaction; a stale fencing token
   or a closed incident retires the action instead;
2. a ``pending`` attempt: call the provider while holding the attempt's row lock,
   then record the provider's id. A router that dies mid-call releases the lock, and
   the next one re-sends that attempt under the same key: at most the one attempt
   in flight is sent twice, and no step is skipped.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from prometheus_client import Counter, Histogram
from psycopg.types.json import Jsonb

from alerts.incidents import ESCALATION_CHANNEL
from alerts.notifiers.base import Delivery, Message, Notifier, SendOutcome, SendResult
from alerts.policy import PolicySnapshot
from alerts.recipients import Recipient, resolve
from devices.kinds import Channel, EscalationTarget

log = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[Any, ...]]
Clock = Callable[[], datetime]

PRESS_TO_FIRST_REQUEST = Histogram(
    "shouhu_sos_press_to_first_request_seconds",
    "From the hub receiving an SOS or fall to the first provider request for its incident",
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)
STEPS = Counter("shouhu_router_steps_total", "Escalation steps run, by target and result", ["target", "result"])
ATTEMPTS = Counter(
    "shouhu_router_attempts_total", "Notification attempts, by channel and outcome", ["channel", "outcome"]
)

ACTIVE_STATES = ("open", "unreached")


def utc_now() -> datetime:
    return datetime.now(UTC)


def _event(conn: Conn, incident_id: int, at: datetime, event: str, actor: str | None, detail: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO incident_events (incident_id, at, event, actor, detail) VALUES (%s, %s, %s, %s, %s)",
        (incident_id, at, event, actor, Jsonb(detail)),
    )


@dataclass(frozen=True, slots=True)
class DueAction:
    id: int
    incident_id: int
    step: int
    round: int
    token: int


@dataclass(frozen=True, slots=True)
class IncidentView:
    id: int
    state: str
    token: int
    resident_id: str | None
    area_id: str | None
    snapshot: PolicySnapshot


@dataclass(frozen=True, slots=True)
class RouterConfig:
    router_id: str
    zone: ZoneInfo


class Router:
    """One router worker. ``run_once`` does all due work; ``run`` loops until stopped."""

    def __init__(
        self,
        database_url: str,
        config: RouterConfig,
        notifiers: Mapping[Channel, Notifier],
        *,
        clock: Clock = utc_now,
    ) -> None:
        self.database_url = database_url
        self.config = config
        self.notifiers = dict(notifiers)
        self.clock = clock
        self.stopping = threading.Event()
        self._conn: Conn | None = None

    # -- connections -----------------------------------------------------------

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, application_name=f"shouhu-router-{self.config.router_id}")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    # -- escalation steps ------------------------------------------------------

    def _claim_action(self, conn: Conn, now: datetime) -> DueAction | None:
        row = conn.execute(
            """
            SELECT id, incident_id, step, round, token FROM escalation_actions
            WHERE state = 'pending' AND due_at <= %s
            ORDER BY due_at, id LIMIT 1 FOR UPDATE SKIP LOCKED
            """,
            (now,),
        ).fetchone()
        return DueAction(*row) if row else None

    def _incident(self, conn: Conn, incident_id: int) -> IncidentView:
        row = conn.execute(
            "SELECT id, state, escalation_token, resident_id, area_id, policy_snapshot"
            " FROM incidents WHERE id = %s FOR UPDATE",
            (incident_id,),
        ).fetchone()
        assert row is not None
        return IncidentView(row[0], row[1], row[2], row[3], row[4], PolicySnapshot.from_json(row[5]))

    def run_due_steps(self) -> int:
        """Run every escalation action due now, one transaction each. Returns how many."""
        done = 0
        while not self.stopping.is_set():
            conn = self._connection()
            with conn.transaction():
                now = self.clock()
                action = self._claim_action(conn, now)
                if action is None:
                    return done
                self._run_action(conn, action, now)
                conn.execute("SELECT pg_notify(%s, 'attempts')", (ESCALATION_CHANNEL,))
            done += 1
        return done

    def _retire(self, conn: Conn, action: DueAction, state: str, now: datetime) -> None:
        conn.execute("UPDATE escalation_actions SET state = %s, done_at = %s WHERE id = %s", (state, now, action.id))

    def _schedule(self, conn: Conn, incident: IncidentView, step: int, round_: int, due: datetime) -> None:
        conn.execute(
            "INSERT INTO escalation_actions (incident_id, step, round, token, due_at)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (incident.id, step, round_, incident.token, due),
        )

    def _run_action(self, conn: Conn, action: DueAction, now: datetime) -> None:
        incident = self._incident(conn, action.incident_id)
        if action.token != incident.token:
            # Fencing: the escalation was re-planned after this action was written.
            self._retire(conn, action, "stale", now)
            return
        if incident.state not in ACTIVE_STATES:
            self._retire(conn, action, "cancelled", now)
            return
        steps = incident.snapshot.steps
        if action.step >= len(steps):
            self._exhausted(conn, incident, action, now)
            return
        step = steps[action.step]
        recipients = resolve(
            conn,
            step.target,
            resident_id=incident.resident_id,
            area_id=incident.area_id,
            at=now,
            zone=self.config.zone,
        )
        created = self._write_attempts(conn, incident, action, step.target, step.channels, recipients, now)
        self._retire(conn, action, "done", now)
        if created:
            STEPS.labels(step.target.value, "paged").inc()
            _event(
                conn,
                incident.id,
                now,
                "step_started",
                self.config.router_id,
                {
                    "step": action.step,
                    "round": action.round,
                    "target": step.target.value,
                    "recipients": [{"id": r.id, "name": r.name, "role": r.role} for r in recipients],
                },
            )
            self._schedule(conn, incident, action.step + 1, action.round, now + timedelta(seconds=step.wait_s))
        else:
            # Never silent: nobody reachable for this step → say so and go on at once.
            STEPS.labels(step.target.value, "no_recipients").inc()
            _event(
                conn,
                incident.id,
                now,
                "no_recipients",
                self.config.router_id,
                {
                    "step": action.step,
                    "round": action.round,
                    "target": step.target.value,
                    "channels": [c.value for c in step.channels],
                },
            )
            self._schedule(conn, incident, action.step + 1, action.round, now)

    def _exhausted(self, conn: Conn, incident: IncidentView, action: DueAction, now: datetime) -> None:
        """Every step ran and nobody took it: unreached, alarm the operators, start over."""
        conn.execute(
            "UPDATE incidents SET state = 'unreached', updated_at = %s WHERE id = %s AND state = 'open'",
            (now, incident.id),
        )
        _event(conn, incident.id, now, "unreached", self.config.router_id, {"round": action.round})
        operators = resolve(
            conn, EscalationTarget.OPERATORS, resident_id=None, area_id=None, at=now, zone=self.config.zone
        )
        self._write_attempts(
            conn, incident, action, EscalationTarget.OPERATORS, (Channel.VOICE, Channel.SMS), operators, now
        )
        self._retire(conn, action, "done", now)
        self._schedule(conn, incident, 0, action.round + 1, now)

    def _write_attempts(
        self,
        conn: Conn,
        incident: IncidentView,
        action: DueAction,
        target: EscalationTarget,
        channels: tuple[Channel, ...],
        recipients: list[Recipient],
        now: datetime,
    ) -> int:
        created = 0
        for recipient in recipients:
            for channel in channels:
                if channel not in self.notifiers:
                    continue
                conn.execute(
                    """
                    INSERT INTO notification_attempts (incident_id, action_id, round, step,
                        recipient_kind, recipient_id, address, channel, attempt, state, created_at)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 1, 'pending', %s)
                    ON CONFLICT DO NOTHING
                    """,
                    (
                        incident.id,
                        action.id,
                        action.round,
                        action.step,
                        recipient.kind,
                        recipient.id,
                        recipient.phone,
                        channel.value,
                        now,
                    ),
                )
                created += 1
        if created == 0 and recipients:
            log.error("step %s of incident %s: no notifier for %s", action.step, incident.id, channels)
        return created

    # -- sending ---------------------------------------------------------------

    def send_pending(self) -> int:
        """Send every pending attempt, each under its own row lock. Returns how many."""
        sent = 0
        while not self.stopping.is_set():
            conn = self._connection()
            with conn.transaction():
                row = conn.execute(
                    """
                    SELECT a.id, a.incident_id, a.channel, a.address, a.step, a.round,
                           i.code, i.kind, i.opened_at, coalesce(r.name, '未登记手环'),
                           coalesce(r.address, ''), r.phone
                    FROM notification_attempts a
                    JOIN incidents i ON i.id = a.incident_id
                    LEFT JOIN residents r ON r.id = i.resident_id
                    WHERE a.state = 'pending'
                    ORDER BY a.created_at, a.id LIMIT 1
                    FOR UPDATE OF a SKIP LOCKED
                    """
                ).fetchone()
                if row is None:
                    return sent
                self._send(conn, row)
            sent += 1
        return sent

    def _send(self, conn: Conn, row: tuple[Any, ...]) -> None:
        (
            attempt_id,
            incident_id,
            channel,
            address,
            step,
            round_,
            code,
            kind,
            opened_at,
            name,
            resident_address,
            resident_phone,
        ) = row
        notifier = self.notifiers[Channel(channel)]
        delivery = Delivery(
            attempt_id,
            Channel(channel),
            address,
            Message(incident_id, code, kind, name, resident_address, resident_phone or ""),
        )
        first = conn.execute(
            "SELECT NOT EXISTS (SELECT 1 FROM notification_attempts WHERE incident_id = %s AND sent_at IS NOT NULL)",
            (incident_id,),
        ).fetchone()
        started = self.clock()
        if first and first[0]:
            PRESS_TO_FIRST_REQUEST.observe(max((started - opened_at).total_seconds(), 0.0))
        try:
            result = notifier.send(delivery)
        except Exception as exc:  # a notifier must not take the router down
            log.exception("notifier for %s raised", channel)
            result = SendResult(SendOutcome.FAILED, error=repr(exc)[:500])
        finished = self.clock()
        ATTEMPTS.labels(channel, result.outcome.value).inc()
        conn.execute(
            "UPDATE notification_attempts SET state = %s, provider_id = %s, error = %s,"
            " sent_at = %s, updated_at = %s WHERE id = %s",
            (
                result.outcome.value,
                result.provider_id,
                result.error,
                finished if result.outcome is SendOutcome.SENT else None,
                finished,
                attempt_id,
            ),
        )
        _event(
            conn,
            incident_id,
            finished,
            "attempt_" + result.outcome.value,
            self.config.router_id,
            {
                "attempt_id": attempt_id,
                "channel": channel,
                "to": address,
                "step": step,
                "round": round_,
                "provider_id": result.provider_id,
                "error": result.error,
            },
        )

    # -- loop ------------------------------------------------------------------

    def run_once(self) -> None:
        self.run_due_steps()
        self.send_pending()

    def run(self, poll_s: float = 0.25) -> None:
        """Loop until ``stop()``: wake on NOTIFY from the hub, or every ``poll_s``."""
        listener: Conn | None = None
        while not self.stopping.is_set():
            try:
                if listener is None or listener.closed:
                    listener = psycopg.connect(self.database_url, autocommit=True)
                    listener.execute(f"LISTEN {ESCALATION_CHANNEL}")
                self.run_once()
                select.select([listener.fileno()], [], [], poll_s)
                for _ in listener.notifies(timeout=0, stop_after=100):
                    pass
            except psycopg.OperationalError as exc:
                log.warning("database unavailable (%s); retrying", exc)
                self.close()
                self._conn = None
                if listener is not None:
                    listener.close()
                listener = None
                self.stopping.wait(1.0)
        if listener is not None:
            listener.close()
        self.close()

    def stop(self) -> None:
        self.stopping.set()
