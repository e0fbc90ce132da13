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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from prometheus_client import Counter

from alerts.dispatch import PRESS_TO_FIRST_REQUEST, Dispatcher
from alerts.notifiers.base import Notifier
from alerts.notifiers.platform import PlatformNotifier
from alerts.policy import PolicySnapshot
from alerts.recipients import Recipient, resolve
from alerts.timeline import ESCALATION_CHANNEL, add_event, wake_routers
from devices.kinds import AttemptPurpose, Channel, EscalationTarget

log = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[Any, ...]]
Clock = Callable[[], datetime]

__all__ = ["PRESS_TO_FIRST_REQUEST", "Router", "RouterConfig"]

STEPS = Counter("shouhu_router_steps_total", "Escalation steps run, by target and result", ["target", "result"])
INVARIANT_BREACHES = Counter(
    "shouhu_router_invariant_breaches_total",
    "Open red incidents found with no pending escalation action (repaired)",
)
SWEEP_INTERVAL_S = 5.0
# Threads sending attempts in `shouhu router`: provider calls are I/O-bound, so a few
# threads multiply what one process sends (bench/escalation.py).
DEFAULT_SENDERS = 4
SWEEPER_LOCK_KEY = 0x5348_4F55_4855_0002
PLATFORM = Recipient("platform", "emergency-platform", "应急呼叫平台", "", "platform")

ACTIVE_STATES = ("open", "unreached")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class DueAction:
    id: int
    incident_id: int
    step: int
    round: int
    token: int
    kind: str = "step"


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
        platform: PlatformNotifier | None = None,
        clock: Clock = utc_now,
        exercise: bool = False,
    ) -> None:
        self.database_url = database_url
        self.config = config
        self.clock = clock
        self.dispatcher = Dispatcher(notifiers, platform, worker_id=config.router_id, clock=clock, exercise=exercise)
        self.stopping = threading.Event()
        # One connection per thread: the loop and each sender thread hold their own.
        self._local = threading.local()
        self._connections: list[Conn] = []
        self._connections_lock = threading.Lock()
        self._work = threading.Event()
        self._last_sweep = float("-inf")

    # -- connections -----------------------------------------------------------

    def _connection(self) -> Conn:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.database_url, application_name=f"shouhu-router-{self.config.router_id}")
            self._local.conn = conn
            with self._connections_lock:
                self._connections = [c for c in self._connections if not c.closed]
                self._connections.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # -- escalation steps ------------------------------------------------------

    def _claim_action(self, conn: Conn, now: datetime) -> DueAction | None:
        """The next due action, locked; a new incident's first step before any other."""
        for first_step_only in (True, False):
            row = conn.execute(
                """
                SELECT id, incident_id, step, round, token, kind FROM escalation_actions
                WHERE state = 'pending' AND due_at <= %(now)s
                  AND (NOT %(first)s OR (kind = 'step' AND step = 0 AND round = 0))
                ORDER BY due_at, id LIMIT 1 FOR UPDATE SKIP LOCKED
                """,
                {"now": now, "first": first_step_only},
            ).fetchone()
            if row:
                return DueAction(*row)
        return None

    def _incident(self, conn: Conn, incident_id: int) -> IncidentView:
        row = conn.execute(
            "SELECT id, state, escalation_token, resident_id, area_id, policy_snapshot"
            " FROM incidents WHERE id = %s FOR UPDATE",
            (incident_id,),
        ).fetchone()
        assert row is not None
        return IncidentView(row[0], row[1], row[2], row[3], row[4], PolicySnapshot.from_json(row[5]))

    def run_due_steps(self, limit: int = 100) -> int:
        """Run escalation actions due now, one transaction each, at most ``limit``. Returns how many.

        The limit keeps sends flowing between batches of steps.
        """
        done = 0
        while not self.stopping.is_set() and done < limit:
            conn = self._connection()
            with conn.transaction():
                now = self.clock()
                action = self._claim_action(conn, now)
                if action is None:
                    return done
                self._run_action(conn, action, now)
                wake_routers(conn, "attempts")
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
        if action.kind == "resolve_check":
            self._resolve_check(conn, incident, action, now)
            return
        if incident.state not in ACTIVE_STATES:
            self._retire(conn, action, "cancelled", now)
            return
        steps = incident.snapshot.steps
        if action.step >= len(steps):
            self._exhausted(conn, incident, action, now)
            return
        step = steps[action.step]
        if step.target is EscalationTarget.EMERGENCY_PLATFORM:
            recipients = [PLATFORM] if self.dispatcher.platform is not None else []
        else:
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
            add_event(
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
            add_event(
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
        add_event(conn, incident.id, now, "unreached", self.config.router_id, {"round": action.round})
        operators = resolve(
            conn, EscalationTarget.OPERATORS, resident_id=None, area_id=None, at=now, zone=self.config.zone
        )
        self._write_attempts(
            conn, incident, action, EscalationTarget.OPERATORS, (Channel.VOICE, Channel.SMS), operators, now
        )
        self._retire(conn, action, "done", now)
        paged = conn.execute(
            "SELECT count(*) FROM notification_attempts WHERE incident_id = %s AND round = %s AND purpose = 'page'",
            (incident.id, action.round),
        ).fetchone()
        if paged and paged[0]:
            self._schedule(conn, incident, 0, action.round + 1, now)
            return
        # A whole round found nobody to page, operators included: repeat, but after
        # the first step's wait, not at once — a tight loop would starve every other
        # incident's pages.
        log.critical("incident %s: round %s reached nobody at all", incident.id, action.round)
        STEPS.labels("round", "nobody_reachable").inc()
        add_event(conn, incident.id, now, "nobody_reachable", self.config.router_id, {"round": action.round})
        wait = incident.snapshot.steps[0].wait_s if incident.snapshot.steps else 60
        self._schedule(conn, incident, 0, action.round + 1, now + timedelta(seconds=wait))

    def _resolve_check(self, conn: Conn, incident: IncidentView, action: DueAction, now: datetime) -> None:
        """Acknowledged but still unresolved after SHOUHU_RESOLVE_TIMEOUT_S: back on the chain."""
        self._retire(conn, action, "done", now)
        if incident.state != "acknowledged":
            return
        conn.execute("UPDATE incidents SET state = 'open', updated_at = %s WHERE id = %s", (now, incident.id))
        last_round = conn.execute(
            "SELECT coalesce(max(round), 0) FROM escalation_actions WHERE incident_id = %s AND kind = 'step'",
            (incident.id,),
        ).fetchone()
        next_round = (int(last_round[0]) if last_round else 0) + 1
        add_event(
            conn,
            incident.id,
            now,
            "reescalated",
            self.config.router_id,
            {"reason": "acknowledged but not resolved in time", "round": next_round},
        )
        self._schedule(conn, incident, 0, next_round, now)

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
                if channel not in self.dispatcher.channels():
                    continue
                purpose = AttemptPurpose.CAP_ALERT if channel is Channel.WEBHOOK else AttemptPurpose.PAGE
                conn.execute(
                    """
                    INSERT INTO notification_attempts (incident_id, action_id, purpose, round, step,
                        recipient_kind, recipient_id, address, channel, attempt, state, created_at)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 1, 'pending', %s)
                    ON CONFLICT DO NOTHING
                    """,
                    (
                        incident.id,
                        action.id,
                        purpose.value,
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
                attempt = self.dispatcher.claim(conn, self.clock())
                if attempt is None:
                    return sent
                self.dispatcher.send(conn, attempt)
            sent += 1
        return sent

    # -- the invariant -------------------------------------------------------

    def sweep(self) -> list[int]:
        """Every open red incident has a pending action: find any that has none, repair, report.

        One router sweeps at a time (an advisory lock); the others skip. A breach
        is a bug or a hand edit; it is repaired by restarting the chain from the
        first step, because paging again beats paging nobody.
        """
        conn = self._connection()
        repaired: list[int] = []
        with conn.transaction():
            locked = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (SWEEPER_LOCK_KEY,)).fetchone()
            if not locked or not locked[0]:
                return repaired
            now = self.clock()
            rows = conn.execute(
                """
                SELECT i.id, i.escalation_token FROM incidents i
                WHERE i.severity = 'red' AND i.state IN ('open', 'unreached', 'acknowledged')
                  AND NOT EXISTS (SELECT 1 FROM escalation_actions a WHERE a.incident_id = i.id AND a.state = 'pending')
                FOR UPDATE OF i SKIP LOCKED
                """
            ).fetchall()
            for incident_id, token in rows:
                INVARIANT_BREACHES.inc()
                log.error("incident %s had no pending escalation action: restarting its chain", incident_id)
                last = conn.execute(
                    "SELECT coalesce(max(round), 0) FROM escalation_actions WHERE incident_id = %s", (incident_id,)
                ).fetchone()
                next_round = (int(last[0]) if last else 0) + 1
                conn.execute(
                    "INSERT INTO escalation_actions (incident_id, step, round, token, due_at)"
                    " VALUES (%s, 0, %s, %s, %s)",
                    (incident_id, next_round, token, now),
                )
                conn.execute(
                    "UPDATE incidents SET state = 'open', updated_at = %s WHERE id = %s AND state = 'acknowledged'",
                    (now, incident_id),
                )
                add_event(
                    conn,
                    incident_id,
                    now,
                    "invariant_repaired",
                    self.config.router_id,
                    {"reason": "no pending escalation action", "round": next_round},
                )
                repaired.append(int(incident_id))
            if repaired:
                wake_routers(conn, "repaired")
        return repaired

    # -- loop ------------------------------------------------------------------

    def run_once(self) -> None:
        """Sweep (every few seconds), run due steps, send pending attempts; until nothing is due."""
        if time.monotonic() - self._last_sweep >= SWEEP_INTERVAL_S:
            self._last_sweep = time.monotonic()
            self.sweep()
        while self.run_due_steps() + self.send_pending():
            pass

    def run(self, poll_s: float = 0.25, *, senders: int = 0) -> None:
        """Loop until ``stop()``: wake on NOTIFY from the hub, or every ``poll_s``.

        With ``senders`` > 0, that many threads send attempts concurrently (each under
        its own row lock, so they never send one twice) while this loop runs the steps:
        a provider's latency then no longer holds up the next steps or other
        incidents' pages.
        """
        threads = [
            threading.Thread(target=self._send_loop, args=(poll_s,), name=f"sender-{n}", daemon=True)
            for n in range(senders)
        ]
        for thread in threads:
            thread.start()
        listener: Conn | None = None
        while not self.stopping.is_set():
            try:
                if listener is None or listener.closed:
                    listener = psycopg.connect(self.database_url, autocommit=True)
                    listener.execute(f"LISTEN {ESCALATION_CHANNEL}")
                if senders:
                    self._steps_only()
                else:
                    self.run_once()
                select.select([listener.fileno()], [], [], poll_s)
                for _ in listener.notifies(timeout=0, stop_after=100):
                    pass
            except psycopg.OperationalError as exc:
                log.warning("database unavailable (%s); retrying", exc)
                self._drop_connection()
                if listener is not None:
                    listener.close()
                listener = None
                self.stopping.wait(1.0)
        self._work.set()
        for thread in threads:
            thread.join(15)
        if listener is not None:
            listener.close()
        self.close()

    def _steps_only(self) -> None:
        if time.monotonic() - self._last_sweep >= SWEEP_INTERVAL_S:
            self._last_sweep = time.monotonic()
            self.sweep()
        while self.run_due_steps():
            self._work.set()
        self._work.set()  # attempts may also come from acknowledgements, retries, callbacks

    def _send_loop(self, poll_s: float) -> None:
        while not self.stopping.is_set():
            try:
                self.send_pending()
            except psycopg.OperationalError as exc:
                log.warning("database unavailable while sending (%s); retrying", exc)
                self._drop_connection()
                self.stopping.wait(1.0)
                continue
            self._work.wait(poll_s)
            self._work.clear()

    def stop(self) -> None:
        self.stopping.set()
