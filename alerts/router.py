"""``shouhu router``: runs escalation steps as they fall due, then sends their attempts.

Two kinds of durable work, both rows claimed with ``FOR UPDATE SKIP LOCKED`` so any
number of routers share them without a coordinator:

1. a due ``escalation_actions`` row: resolve the step's recipients *now* (rosters
   in SHOUHU_TIMEZONE), write one ``notification_attempts`` row per recipient and
   channel, schedule the next step, all in one transaction; a stale fencing token
   or a closed incident retires the action instead;
2. a ``pending`` attempt: lease it (a committed claim), call the provider with no
   lock or transaction held, then record the provider's id (``alerts/attempts.py``).
   A router that dies mid-call leaves its leases, which the next sender takes over
   and re-sends under the same keys: at most the attempts in flight are sent twice,
   none a third time, and no step is skipped. Each channel has its own senders.
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
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from alerts.dispatch import PRESS_TO_FIRST_REQUEST, Dispatcher
from alerts.notifiers.base import Notifier
from alerts.notifiers.platform import PlatformNotifier
from alerts.policy import PolicySnapshot
from alerts.recipients import Recipient, Rosters
from alerts.timeline import ESCALATION_CHANNEL, add_event, wake_routers
from devices.kinds import AttemptPurpose, Channel, EscalationTarget
from shouhu.db import Conn

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

__all__ = ["PRESS_TO_FIRST_REQUEST", "Router", "RouterConfig"]

STEPS = Counter("shouhu_router_steps_total", "Escalation steps run, by target and result", ["target", "result"])
INVARIANT_BREACHES = Counter(
    "shouhu_router_invariant_breaches_total",
    "Open red incidents found with no pending escalation action (repaired)",
)
SWEEP_INTERVAL_S = 5.0
# Due actions run per transaction. One transaction for many steps saves most of
# their round trips (bench/escalation.py, docs/BENCHMARKS.md). Small, because a batch
# holds its incidents' row locks until it commits, and an acknowledgement, or the hub
# joining a press to an open incident, waits for that lock: a few tens of
# milliseconds, not seconds.
STEP_BATCH = 25
# Threads sending attempts per phone channel in `shouhu router` (the webhook gets half,
# the console one, each channel one more for first pages only): provider calls are
# I/O-bound, so a few threads multiply what one process sends (bench/escalation.py).
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


class _Writes:
    """The rows one batch of actions writes, gathered so they go out in a few statements."""

    def __init__(self, now: datetime, actor: str) -> None:
        self.now = now
        self.actor = actor
        self.attempts: list[tuple[Any, ...]] = []
        self.retired: list[tuple[int, str]] = []
        self.events: list[tuple[Any, ...]] = []
        self.scheduled: list[tuple[Any, ...]] = []
        self.unreached: list[int] = []

    def attempt(
        self, incident: IncidentView, action: DueAction, purpose: AttemptPurpose, recipient: Recipient, channel: Channel
    ) -> None:
        self.attempts.append(
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
                self.now,
            )
        )

    def retire(self, action: DueAction, state: str) -> None:
        self.retired.append((action.id, state))

    def event(self, incident_id: int, event: str, detail: dict[str, Any]) -> None:
        self.events.append((incident_id, self.now, event, self.actor, Jsonb(detail)))

    def schedule(self, incident: IncidentView, step: int, round_: int, due: datetime) -> None:
        self.scheduled.append((incident.id, step, round_, incident.token, due))

    def flush_attempts(self, conn: Conn) -> None:
        """Incidents left unreached, the attempts, the retired actions: all the next reads depend on."""
        if self.unreached:
            conn.execute(
                "UPDATE incidents SET state = 'unreached', updated_at = %s WHERE id = ANY(%s) AND state = 'open'",
                (self.now, self.unreached),
            )
        if self.attempts:
            conn.cursor().executemany(
                """
                INSERT INTO notification_attempts (incident_id, action_id, purpose, round, step,
                    recipient_kind, recipient_id, address, channel, attempt, state, created_at)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 1, 'pending', %s)
                ON CONFLICT DO NOTHING
                """,
                self.attempts,
            )
        if self.retired:
            conn.execute(
                """
                UPDATE escalation_actions a SET state = r.state, done_at = %s
                FROM unnest(%s::bigint[], %s::text[]) AS r(id, state) WHERE a.id = r.id
                """,
                (self.now, [i for i, _s in self.retired], [s for _i, s in self.retired]),
            )

    def flush_rest(self, conn: Conn) -> None:
        """The timeline entries, in the order they were decided, and the next actions."""
        if self.events:
            # add_event's row, many at once (alerts/timeline.py).
            conn.cursor().executemany(
                "INSERT INTO incident_events (incident_id, at, event, actor, detail) VALUES (%s, %s, %s, %s, %s)",
                self.events,
            )
        if self.scheduled:
            conn.cursor().executemany(
                "INSERT INTO escalation_actions (incident_id, step, round, token, due_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                self.scheduled,
            )


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
        self._wakeups: list[threading.Event] = []
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

    def _claim_actions(self, conn: Conn, now: datetime, limit: int) -> list[DueAction]:
        """Due actions, locked, at most one per incident; new incidents' first steps before any other.

        A batch of first steps is run on its own, so a new SOS's first pages never
        wait for other incidents' later steps to be written. A second due action of
        an incident already in the batch is left for the next batch (its lock is held
        till this one commits), so each batch sees every incident as one step left it.
        """
        for first_steps_only in (True, False):
            rows = conn.cursor(row_factory=class_row(DueAction)).execute(
                """
                SELECT id, incident_id, step, round, token, kind FROM escalation_actions
                WHERE state = 'pending' AND due_at <= %(now)s
                  AND (NOT %(first)s OR (kind = 'step' AND step = 0 AND round = 0))
                ORDER BY due_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
                """,
                {"now": now, "first": first_steps_only, "limit": limit},
            ).fetchall()
            if rows:
                actions: dict[int, DueAction] = {}
                for action in rows:
                    actions.setdefault(action.incident_id, action)
                return list(actions.values())
        return []

    def _lock_incidents(self, conn: Conn, incident_ids: list[int]) -> dict[int, IncidentView]:
        # In id order: two routers whose batches share an incident (two due actions
        # of one incident, claimed by each) wait for each other instead of deadlocking.
        rows = conn.execute(
            "SELECT id, state, escalation_token, resident_id, area_id, policy_snapshot"
            " FROM incidents WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
            (incident_ids,),
        ).fetchall()
        return {
            row[0]: IncidentView(row[0], row[1], row[2], row[3], row[4], PolicySnapshot.from_json(row[5]))
            for row in rows
        }

    def run_due_steps(self, limit: int = 100) -> int:
        """Run escalation actions due now, in batches of one transaction each, at most ``limit``.

        Returns how many. The limit keeps sends flowing between batches of steps.
        """
        done = 0
        while not self.stopping.is_set() and done < limit:
            conn = self._connection()
            with conn.transaction():
                now = self.clock()
                actions = self._claim_actions(conn, now, min(STEP_BATCH, limit - done))
                if not actions:
                    return done
                self._run_actions(conn, actions, now)
                wake_routers(conn, "attempts")
            # Sender threads in this process start on the new attempts at once.
            self._wake()
            done += len(actions)
        return done

    def _run_actions(self, conn: Conn, actions: list[DueAction], now: datetime) -> None:
        """Run one batch of claimed actions: read all they need, decide each, then write all at once.

        Each action is decided as when actions ran one per transaction (the batch
        holds one action per incident, so no decision depends on another's writes);
        only the reads and writes are gathered, to save round trips. The batch has
        one moment, ``now``: rosters are read, and ``done_at`` stamped, as of its claim.
        """
        incidents = self._lock_incidents(conn, [a.incident_id for a in actions])
        rosters = Rosters(conn, now, self.config.zone)
        wanted: list[tuple[EscalationTarget, str | None, str | None]] = []
        for action in actions:
            incident = incidents[action.incident_id]
            if action.token != incident.token or action.kind != "step" or incident.state not in ACTIVE_STATES:
                continue
            steps = incident.snapshot.steps
            target = steps[action.step].target if action.step < len(steps) else EscalationTarget.OPERATORS
            wanted.append((target, incident.resident_id, incident.area_id))
        rosters.prepare(wanted)
        spooled = self._spooled_first_pages(conn, actions)
        writes = _Writes(now, self.config.router_id)
        exhausted: list[tuple[IncidentView, DueAction]] = []
        for action in actions:
            incident = incidents[action.incident_id]
            if self._run_action(conn, rosters, writes, action, incident, now, spooled.get(incident.id)):
                exhausted.append((incident, action))
        with conn.pipeline():
            writes.flush_attempts(conn)
            paged = self._paged_rounds(conn, exhausted)
            for incident, action in exhausted:
                self._after_round(writes, incident, action, (incident.id, action.round) in paged, now)
            writes.flush_rest(conn)

    def _spooled_first_pages(self, conn: Conn, actions: list[DueAction]) -> dict[int, datetime]:
        """When the hub's spool sent the first step's pages, for the incidents it paged.

        While the database was down the hub paged from its spool (hub/spool.py), and
        reconciling wrote those pages as the first step's attempts before the step
        ran. The step then pages only whom the spool did not (the attempts' key makes
        the others no-ops) and its wait runs from the spool's first page, not from now.
        """
        first = [a.incident_id for a in actions if a.kind == "step" and a.step == 0 and a.round == 0]
        if not first:
            return {}
        rows = conn.execute(
            "SELECT incident_id, min(created_at) FROM notification_attempts"
            " WHERE incident_id = ANY(%s) AND purpose = 'page' AND round = 0 AND step = 0 GROUP BY incident_id",
            (first,),
        ).fetchall()
        return {int(incident_id): started for incident_id, started in rows}

    def _run_action(
        self,
        conn: Conn,
        rosters: Rosters,
        writes: _Writes,
        action: DueAction,
        incident: IncidentView,
        now: datetime,
        spooled_at: datetime | None = None,
    ) -> bool:
        """Decide one action, queueing its writes. True when the chain is exhausted (see ``_after_round``).

        ``spooled_at``: when the hub's spool already paged this step (``_spooled_first_pages``).
        """
        if action.token != incident.token:
            # Fencing: the escalation was re-planned after this action was written.
            writes.retire(action, "stale")
            return False
        if action.kind == "resolve_check":
            self._resolve_check(conn, incident, action, now)
            return False
        if incident.state not in ACTIVE_STATES:
            writes.retire(action, "cancelled")
            return False
        steps = incident.snapshot.steps
        if action.step >= len(steps):
            self._exhausted(rosters, writes, incident, action)
            return True
        step = steps[action.step]
        if step.target is EscalationTarget.EMERGENCY_PLATFORM:
            recipients = [PLATFORM] if self.dispatcher.platform is not None else []
        else:
            recipients = rosters.resolve(step.target, resident_id=incident.resident_id, area_id=incident.area_id)
        created = self._write_attempts(writes, incident, action, step.target, step.channels, recipients)
        writes.retire(action, "done")
        if created or spooled_at is not None:
            STEPS.labels(step.target.value, "paged").inc()
            detail: dict[str, Any] = {
                "step": action.step,
                "round": action.round,
                "target": step.target.value,
                "recipients": [{"id": r.id, "name": r.name, "role": r.role} for r in recipients],
            }
            if spooled_at is not None:
                detail["spooled_at"] = spooled_at.isoformat()
            writes.event(incident.id, "step_started", detail)
            started = min(now, spooled_at) if spooled_at is not None else now
            writes.schedule(incident, action.step + 1, action.round, started + timedelta(seconds=step.wait_s))
        else:
            # Never silent: nobody reachable for this step → say so and go on at once.
            STEPS.labels(step.target.value, "no_recipients").inc()
            writes.event(
                incident.id,
                "no_recipients",
                {
                    "step": action.step,
                    "round": action.round,
                    "target": step.target.value,
                    "channels": [c.value for c in step.channels],
                },
            )
            writes.schedule(incident, action.step + 1, action.round, now)
        return False

    def _exhausted(self, rosters: Rosters, writes: _Writes, incident: IncidentView, action: DueAction) -> None:
        """Every step ran and nobody took it: unreached, alarm the operators; ``_after_round`` starts over."""
        writes.unreached.append(incident.id)
        writes.event(incident.id, "unreached", {"round": action.round})
        operators = rosters.resolve(EscalationTarget.OPERATORS, resident_id=None, area_id=None)
        self._write_attempts(
            writes, incident, action, EscalationTarget.OPERATORS, (Channel.VOICE, Channel.SMS), operators
        )
        writes.retire(action, "done")

    def _paged_rounds(self, conn: Conn, exhausted: list[tuple[IncidentView, DueAction]]) -> set[tuple[int, int]]:
        """The exhausted (incident, round) pairs with any page attempt, the operators' just written included."""
        if not exhausted:
            return set()
        rows = conn.execute(
            """
            SELECT DISTINCT a.incident_id, a.round
            FROM notification_attempts a
            JOIN unnest(%s::bigint[], %s::integer[]) AS r(incident_id, round)
              ON a.incident_id = r.incident_id AND a.round = r.round
            WHERE a.purpose = 'page'
            """,
            ([i.id for i, _a in exhausted], [a.round for _i, a in exhausted]),
        ).fetchall()
        return {(int(incident_id), int(round_)) for incident_id, round_ in rows}

    def _after_round(
        self, writes: _Writes, incident: IncidentView, action: DueAction, paged: bool, now: datetime
    ) -> None:
        """Start the next round: at once if this one paged anyone, else after the first step's wait."""
        if paged:
            writes.schedule(incident, 0, action.round + 1, now)
            return
        # A whole round found nobody to page, operators included: repeat, but after
        # the first step's wait, not at once — a tight loop would starve every other
        # incident's pages.
        log.critical("incident %s: round %s reached nobody at all", incident.id, action.round)
        STEPS.labels("round", "nobody_reachable").inc()
        writes.event(incident.id, "nobody_reachable", {"round": action.round})
        wait = incident.snapshot.steps[0].wait_s if incident.snapshot.steps else 60
        writes.schedule(incident, 0, action.round + 1, now + timedelta(seconds=wait))

    def _resolve_check(self, conn: Conn, incident: IncidentView, action: DueAction, now: datetime) -> None:
        """Acknowledged but still unresolved after SHOUHU_RESOLVE_TIMEOUT_S: back on the chain.

        Rare, so written at once rather than gathered with the batch's writes.
        """
        conn.execute("UPDATE escalation_actions SET state = 'done', done_at = %s WHERE id = %s", (now, action.id))
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
        conn.execute(
            "INSERT INTO escalation_actions (incident_id, step, round, token, due_at)"
            " VALUES (%s, 0, %s, %s, %s) ON CONFLICT DO NOTHING",
            (incident.id, next_round, incident.token, now),
        )

    def _write_attempts(
        self,
        writes: _Writes,
        incident: IncidentView,
        action: DueAction,
        target: EscalationTarget,
        channels: tuple[Channel, ...],
        recipients: list[Recipient],
    ) -> int:
        created = 0
        available = self.dispatcher.channels()
        for recipient in recipients:
            for channel in channels:
                if channel not in available:
                    continue
                purpose = AttemptPurpose.CAP_ALERT if channel is Channel.WEBHOOK else AttemptPurpose.PAGE
                writes.attempt(incident, action, purpose, recipient, channel)
                created += 1
        if created == 0 and recipients:
            log.error("step %s of incident %s: no notifier for %s", action.step, incident.id, channels)
        return created

    # -- sending ---------------------------------------------------------------

    def send_pending(self) -> int:
        """Send every due attempt of every channel, one after another, in this thread. Returns how many.

        What tests and ``run_once`` use; ``run(senders=…)`` gives each channel its own threads.
        """
        sent = 0
        while not self.stopping.is_set():
            conn = self._connection()
            claimed = self.dispatcher.send_due(conn)
            if not claimed:
                return sent
            sent += claimed
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

        With ``senders`` > 0 each channel gets its own bounded pool of sender threads
        (``senders`` each for voice and SMS, fewer for the webhook and the console, plus
        one per channel that only sends incidents' first pages), while this loop runs
        the steps: a provider's latency, or a hung provider, then holds only its own
        channel's threads, never another channel's pages or the next steps.
        """
        threads = [
            threading.Thread(
                target=self._send_loop, args=(channel, poll_s, first_only), name=f"sender-{channel}-{n}", daemon=True
            )
            for channel, size in self._pool_sizes(senders).items()
            for n, first_only in enumerate([True] + [False] * size)
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
        self._wake()
        # A sender in a provider call ends within its hard timeout; do not wait longer
        # than that for all of them together (they are daemon threads).
        deadline = time.monotonic() + 12
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        if listener is not None:
            listener.close()
        self.close()

    def _pool_sizes(self, senders: int) -> dict[Channel, int]:
        if senders <= 0:
            return {}
        sizes = {
            Channel.VOICE: senders,
            Channel.SMS: senders,
            Channel.WEBHOOK: max(senders // 2, 1),
            Channel.CONSOLE: 1,
        }
        return {channel: size for channel, size in sizes.items() if channel in self.dispatcher.channels()}

    def _wake(self) -> None:
        with self._connections_lock:
            for event in self._wakeups:
                event.set()

    def _steps_only(self) -> None:
        if time.monotonic() - self._last_sweep >= SWEEP_INTERVAL_S:
            self._last_sweep = time.monotonic()
            self.sweep()
        while self.run_due_steps():
            self._wake()
        self._wake()  # attempts may also come from acknowledgements, retries, callbacks

    def _send_loop(self, channel: Channel, poll_s: float, first_only: bool) -> None:
        wakeup = threading.Event()
        with self._connections_lock:
            self._wakeups.append(wakeup)
        while not self.stopping.is_set():
            try:
                while not self.stopping.is_set() and self.dispatcher.send_due(
                    self._connection(), channel, first_pages_only=first_only
                ):
                    pass
            except psycopg.OperationalError as exc:
                log.warning("database unavailable while sending (%s); retrying", exc)
                self._drop_connection()
                self.stopping.wait(1.0)
                continue
            except Exception:
                log.exception("sender %s failed; going on", threading.current_thread().name)
                self._drop_connection()
                self.stopping.wait(poll_s)
                continue
            wakeup.wait(poll_s)
            wakeup.clear()

    def stop(self) -> None:
        self.stopping.set()
