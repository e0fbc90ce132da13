"""The care sweeper: turns device state into visits, repairs and battery notices, and
keeps every task moving until somebody closes it.

Rules (docs/escalation.md, "Between emergencies"):

- a wristband offline longer than ``SHOUHU_VISIT_OFFLINE_HOLD_S``, or online but
  reporting not worn for longer than ``SHOUHU_NOT_WORN_HOLD_S`` → a yellow incident and
  a visit for the grid worker; the device coming back closes the visit only if nobody
  has started it;
- a camera offline longer than ``SHOUHU_CAMERA_OFFLINE_HOLD_S`` → a yellow incident and
  a repair work order for the area's technicians; the order closes by itself once the
  camera has stayed back for the same hold (a camera flapping inside that keeps its one
  order), with its time to repair;
- a task past due → one level up the area tree, with a new deadline;
- an SOS or a fall resolved → a follow-up visit, and a resident with ``visits:`` in
  the registry → one visit per month or week (``alerts/visits.py``);
- battery at or below ``SHOUHU_BATTERY_LOW_PCT`` → a blue incident; the guardian is
  told at most once a local day, the grid worker too at ``SHOUHU_BATTERY_CRITICAL_PCT``;
  quiet hours hold those notices until the morning;
- a maintenance window on the device or its area silences all of it (nothing opens,
  nothing escalates) — never an SOS or a fall, which do not pass through here.

Runs in the router process, one leader at a time (an advisory lock); every rule is a
query over the database, so a sweeper that dies loses nothing. The clock is passed in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from prometheus_client import Counter

from alerts import visits
from alerts.acknowledge import Actor
from alerts.attempts import cancel_pending, queue_notice
from alerts.care import (
    TaskRow,
    close_task,
    escalate_task,
    lock_task,
    open_care_incident,
    open_task,
    tell_owners,
    timeline_detail,
)
from alerts.recipients import duty_chain, guardians
from alerts.silence import active_window, send_after
from alerts.states import OPEN_SQL, IncidentState
from alerts.timeline import add_event, wake_routers
from devices.kinds import IncidentKind, Outcome, TaskKind, TaskOutcome, TaskState
from shouhu.db import Conn
from shouhu.settings import DEFAULT_FOLLOW_UP_DUE_S, Settings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# (…0001 migrations, …0002 the escalation router, …0003 liveness, …0004 partition upkeep.)
CARE_LOCK_KEY = 0x5348_4F55_4855_0005
CARE_SWEEP_INTERVAL_S = 10.0
# A battery must climb this far above the low mark to count as charged, so a reading
# wobbling around the mark does not open and close an incident every minute.
BATTERY_HYSTERESIS_PCT = 5
# Rows each rule handles per sweep; the rest wait for the next sweep, seconds later.
BATCH = 500
SYSTEM = Actor("system", "care", "守护系统", None, "system")

CARE_EVENTS = Counter("shouhu_care_events_total", "Care sweeper actions, by what was done", ["action"])


@dataclass(frozen=True, slots=True)
class CareRules:
    visit_offline_hold: timedelta
    not_worn_hold: timedelta
    visit_due: timedelta
    camera_offline_hold: timedelta
    repair_due: timedelta
    battery_low: int
    battery_critical: int
    zone: ZoneInfo
    follow_up_due: timedelta = timedelta(seconds=DEFAULT_FOLLOW_UP_DUE_S)
    follow_up_false_alarms: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> CareRules:
        return cls(
            visit_offline_hold=timedelta(seconds=settings.visit_offline_hold_s),
            not_worn_hold=timedelta(seconds=settings.not_worn_hold_s),
            visit_due=timedelta(seconds=settings.visit_due_s),
            camera_offline_hold=timedelta(seconds=settings.camera_offline_hold_s),
            repair_due=timedelta(seconds=settings.repair_due_s),
            battery_low=settings.battery_low_pct,
            battery_critical=min(settings.battery_critical_pct, settings.battery_low_pct),
            zone=settings.zone,
            follow_up_due=timedelta(seconds=settings.follow_up_due_s),
            follow_up_false_alarms=settings.follow_up_false_alarms,
        )

    def due(self, kind: TaskKind) -> timedelta:
        return self.visit_due if kind is TaskKind.VISIT else self.repair_due

    def sweep_interval_s(self) -> float:
        """Sweep well inside the shortest hold, and never busier than twice a second."""
        shortest = min(self.visit_offline_hold, self.not_worn_hold, self.camera_offline_hold).total_seconds()
        return max(0.5, min(CARE_SWEEP_INTERVAL_S, shortest / 5))


@dataclass(slots=True)
class CareReport:
    leader: bool = False
    opened: list[int] = field(default_factory=list)  # task ids
    closed: list[int] = field(default_factory=list)
    escalated: list[int] = field(default_factory=list)
    silenced: list[str] = field(default_factory=list)  # overdue tasks left alone under maintenance
    battery_incidents: list[int] = field(default_factory=list)
    battery_notices: int = 0
    charged: list[int] = field(default_factory=list)
    follow_ups: list[int] = field(default_factory=list)  # task ids: visits after an SOS or a fall
    scheduled: list[int] = field(default_factory=list)  # task ids: this month's or week's visits


# Devices a maintenance window covers now: its own window, or one on its area or any
# area above. Filtered in SQL, so a township's 500 dark cameras under a power window
# never fill a batch and hold back repair orders elsewhere.
_SILENCED = """
    silenced AS (
        WITH RECURSIVE up(area_id, ancestor) AS (
            SELECT id, id FROM areas
            UNION ALL
            SELECT up.area_id, a.parent_id FROM up JOIN areas a ON a.id = up.ancestor WHERE a.parent_id IS NOT NULL
        ),
        windows AS (
            SELECT device_id, area_id FROM maintenance_windows
            WHERE cancelled_at IS NULL AND starts_at <= %(now)s AND ends_at > %(now)s
        )
        SELECT w.device_id AS id FROM windows w WHERE w.device_id IS NOT NULL
        UNION
        SELECT d.id FROM devices d LEFT JOIN residents r ON r.id = d.resident_id
        JOIN up ON up.area_id = coalesce(d.area_id, r.grid_id)
        JOIN windows w ON w.area_id = up.ancestor
    )
"""
# Each rule reads its candidates and skips what an open incident of its kind already
# covers. A task somebody closed while the device is still down restarts the hold from
# the close: "repaired" but still dark a hold later is a new order, not an instant one.
# Rows from before a column existed (state_at, worn_since NULL) are left alone.
# A band has one visit open at a time: a band left off the wrist whose battery then
# runs out is the same trip to the same elder, not a second visit (it was).
_OFFLINE_WRISTBANDS = (
    "WITH"
    + _SILENCED
    + f"""
    SELECT d.id, d.resident_id, r.grid_id, s.state_at, s.offline_reason
    FROM device_state s JOIN devices d ON d.id = s.device_id JOIN residents r ON r.id = d.resident_id
    WHERE d.kind = 'wristband' AND d.active AND r.active AND s.online = false AND s.state_at IS NOT NULL
      AND greatest(s.state_at, (SELECT max(closed_at) FROM care_tasks t WHERE t.device_id = d.id)) <= %(cutoff)s
      AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.device_id = d.id
                      AND i.kind IN ('wristband_offline', 'not_worn') AND i.state IN {OPEN_SQL})
      AND d.id NOT IN (SELECT id FROM silenced)
    ORDER BY s.state_at LIMIT %(limit)s
"""
)
_UNWORN_WRISTBANDS = (
    "WITH"
    + _SILENCED
    + f"""
    SELECT d.id, d.resident_id, r.grid_id, s.worn_since, 'not_worn'
    FROM device_state s JOIN devices d ON d.id = s.device_id JOIN residents r ON r.id = d.resident_id
    WHERE d.kind = 'wristband' AND d.active AND r.active AND s.online AND s.worn = false
      AND s.worn_since IS NOT NULL
      AND greatest(s.worn_since, (SELECT max(closed_at) FROM care_tasks t WHERE t.device_id = d.id)) <= %(cutoff)s
      AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.device_id = d.id
                      AND i.kind IN ('wristband_offline', 'not_worn') AND i.state IN {OPEN_SQL})
      AND d.id NOT IN (SELECT id FROM silenced)
    ORDER BY s.worn_since LIMIT %(limit)s
"""
)
_OFFLINE_CAMERAS = (
    "WITH"
    + _SILENCED
    + f"""
    SELECT d.id, NULL, d.area_id, s.state_at, s.offline_reason
    FROM device_state s JOIN devices d ON d.id = s.device_id
    WHERE d.kind = 'camera' AND d.active AND s.online = false AND s.state_at IS NOT NULL
      AND greatest(s.state_at, (SELECT max(closed_at) FROM care_tasks t WHERE t.device_id = d.id)) <= %(cutoff)s
      AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.device_id = d.id AND i.kind = 'camera_offline'
                      AND i.state IN {OPEN_SQL})
      AND d.id NOT IN (SELECT id FROM silenced)
    ORDER BY s.state_at LIMIT %(limit)s
"""
)
# Open tasks that need something now — their device came back, went again, or the
# task is past due — with what the device says: back (online, and worn for a not-worn
# visit) or not. A started visit whose band is back is read once (to note it on the
# timeline), then waits for its worker without being read again every sweep.
_BACK = """
    coalesce(CASE WHEN t.kind = 'visit' AND t.reason = 'not_worn' THEN s.online AND s.worn ELSE s.online END, false)
"""
_OPEN_TASKS = f"""
    SELECT t.id, {_BACK} AS back,
           CASE WHEN t.kind = 'visit' AND t.reason = 'not_worn' THEN s.worn_since ELSE s.state_at END AS back_at
    FROM care_tasks t LEFT JOIN device_state s ON s.device_id = t.device_id
    WHERE t.state <> 'closed' AND (
        (t.due_at <= %(now)s AND NOT {_BACK})
        OR (t.recovered_at IS NULL AND {_BACK})
        OR (t.recovered_at IS NOT NULL AND (t.kind = 'repair' OR NOT {_BACK}))
    )
    ORDER BY t.due_at, t.id LIMIT %(limit)s
"""


def _isolated(conn: Conn, what: str, key: object, work: Callable[[], None]) -> None:
    """Run one row's work in a savepoint: a bad row costs only itself, not every other elder's care.

    A database that is gone (OperationalError) is not a bad row: the whole sweep stops
    and the sweeper retries.
    """
    try:
        with conn.transaction():
            work()
    except psycopg.OperationalError:
        raise
    except Exception:
        log.exception("care sweep: %s %s failed; the other rows go on", what, key)
        CARE_EVENTS.labels("row_failed").inc()


def _open(
    conn: Conn,
    report: CareReport,
    rules: CareRules,
    now: datetime,
    *,
    query: str,
    hold: timedelta,
    incident_kind: IncidentKind,
    task_kind: TaskKind,
) -> None:
    rows = conn.execute(query, {"cutoff": now - hold, "now": now, "limit": BATCH}).fetchall()
    for row in rows:
        _isolated(
            conn,
            f"opening a {task_kind.value} for",
            row[0],
            partial(_open_one, conn, report, rules, now, row, incident_kind, task_kind),
        )


def _open_one(
    conn: Conn,
    report: CareReport,
    rules: CareRules,
    now: datetime,
    row: tuple[Any, ...],
    incident_kind: IncidentKind,
    task_kind: TaskKind,
) -> None:
    device_id, resident_id, area_id, since, reason = row
    reason_text = str(reason or "unknown")
    incident_id = open_care_incident(
        conn,
        incident_kind,
        device_id=device_id,
        resident_id=resident_id,
        area_id=area_id,
        at=now,
        detail={"reason": reason_text, "since": since.isoformat()},
    )
    if incident_id is None:
        return  # another sweeper got there first
    task_id = open_task(
        conn,
        incident_id,
        task_kind,
        device_id=device_id,
        resident_id=resident_id,
        area_id=area_id,
        reason=reason_text,
        problem_since=since,
        now=now,
        due=rules.due(task_kind),
        zone=rules.zone,
    )
    CARE_EVENTS.labels(f"{task_kind.value}_opened").inc()
    report.opened.append(task_id)


def _follow_tasks(conn: Conn, report: CareReport, rules: CareRules, now: datetime) -> None:
    """Devices back, flaps, and overdue tasks."""
    for row in conn.execute(_OPEN_TASKS, {"limit": BATCH, "now": now}).fetchall():
        _isolated(conn, "following task", row[0], partial(_follow_one, conn, report, rules, now, row))


def _follow_one(conn: Conn, report: CareReport, rules: CareRules, now: datetime, row: tuple[Any, ...]) -> None:
    # Whether the device is back (and since when) comes from _OPEN_TASKS's one rule.
    task_id, back, back_at = row
    # Decide from the locked row: a worker may have started the visit since the read.
    task = lock_task(conn, task_id)
    if task is None or task.state is TaskState.CLOSED:
        return
    kind, state, due_at = task.kind, task.state, task.due_at
    recovered_at = task.recovered_at
    if back and recovered_at is None:
        conn.execute("UPDATE care_tasks SET recovered_at = %s WHERE id = %s", (back_at or now, task_id))
        add_event(conn, task.incident_id, now, "device_back", "care", timeline_detail(task))
        recovered_at = back_at or now
    elif not back and recovered_at is not None:
        # Gone again before the order closed: the same order, one more flap.
        conn.execute("UPDATE care_tasks SET recovered_at = NULL, flaps = flaps + 1 WHERE id = %s", (task_id,))
        add_event(conn, task.incident_id, now, "flapped", "care", timeline_detail(task))
        recovered_at = None
    if back and _closes_itself(kind, state, recovered_at, now, rules):
        _close_recovered(conn, task, now)
        report.closed.append(task_id)
        return
    if due_at <= now and not back:
        # A visit to a person (no device) has no maintenance window of its own.
        if task.device_id is not None and active_window(conn, task.device_id, now) is not None:
            report.silenced.append(task.device_id)
            return
        escalate_task(conn, task, now, rules.due(kind), rules.zone)
        CARE_EVENTS.labels(f"{kind.value}_escalated").inc()
        report.escalated.append(task_id)


def _closes_itself(
    kind: TaskKind, state: TaskState, recovered_at: datetime | None, now: datetime, rules: CareRules
) -> bool:
    if kind is TaskKind.VISIT:
        # Somebody on the way records what they found; only an unstarted visit is withdrawn.
        return state is TaskState.OPEN
    return recovered_at is not None and now - recovered_at >= rules.camera_offline_hold


def _close_recovered(conn: Conn, task: TaskRow, now: datetime) -> None:
    close_task(
        conn,
        task.id,
        TaskOutcome.DEVICE_RECOVERED,
        "设备已恢复",
        SYSTEM,
        now,
        incident_outcome=Outcome.DEVICE_RECOVERED,
    )
    label = "探视任务" if task.kind is TaskKind.VISIT else "维修工单"
    event = add_event(conn, task.incident_id, now, "owners_told", "care", timeline_detail(task))
    tell_owners(conn, task, event, f"【守护】{label}{task.code}：{task.device_id}已恢复，任务自动销号。", now)
    wake_routers(conn, "care")
    CARE_EVENTS.labels(f"{task.kind.value}_recovered").inc()


def _follow_ups(conn: Conn, report: CareReport, rules: CareRules, now: datetime) -> None:
    """A follow-up visit for each SOS or fall resolved without one yet."""
    params = {"since": now - rules.follow_up_due, "false_alarms": rules.follow_up_false_alarms, "limit": BATCH}
    for row in conn.execute(visits.FOLLOW_UPS_MISSING, params).fetchall():
        _isolated(conn, "follow-up visit for incident", row[0], partial(_follow_up_one, conn, report, rules, now, row))


def _follow_up_one(conn: Conn, report: CareReport, rules: CareRules, now: datetime, row: tuple[Any, ...]) -> None:
    task_id = visits.open_follow_up(conn, row, rules.follow_up_due, now, rules.zone)
    if task_id is not None:
        CARE_EVENTS.labels("follow_up_opened").inc()
        report.follow_ups.append(task_id)


def _scheduled_visits(conn: Conn, report: CareReport, rules: CareRules, now: datetime) -> None:
    """This month's or this week's visit for each resident the registry asks it for."""
    params = visits.scheduled_params(now, rules.zone, BATCH)
    for row in conn.execute(visits.SCHEDULED_MISSING, params).fetchall():
        _isolated(conn, "recurring visit for resident", row[0], partial(_scheduled_one, conn, report, rules, now, row))


def _scheduled_one(conn: Conn, report: CareReport, rules: CareRules, now: datetime, row: tuple[Any, ...]) -> None:
    task_id = visits.open_scheduled(conn, row, now, rules.zone)
    if task_id is not None:
        CARE_EVENTS.labels("scheduled_visit_opened").inc()
        report.scheduled.append(task_id)


# Bands low now that still have someone to tell today (a notice claimed for today, or
# for tomorrow morning, counts), so the same told bands never fill every batch.
_LOW_BATTERIES = (
    "WITH"
    + _SILENCED
    + """
    SELECT d.id, d.resident_id, r.grid_id, s.battery, r.name
    FROM device_state s JOIN devices d ON d.id = s.device_id JOIN residents r ON r.id = d.resident_id
    WHERE d.kind = 'wristband' AND d.active AND r.active AND s.battery <= %(low)s
      AND d.id NOT IN (SELECT id FROM silenced)
      AND (NOT EXISTS (SELECT 1 FROM battery_notices n WHERE n.device_id = d.id AND n.audience = 'guardian'
                       AND n.local_day >= %(today)s)
           OR (s.battery <= %(critical)s
               AND NOT EXISTS (SELECT 1 FROM battery_notices n WHERE n.device_id = d.id
                               AND n.audience = 'grid_worker' AND n.local_day >= %(today)s)))
    ORDER BY s.battery, d.id LIMIT %(limit)s
"""
)


def _batteries(conn: Conn, report: CareReport, rules: CareRules, now: datetime) -> None:
    params = {
        "low": rules.battery_low,
        "critical": rules.battery_critical,
        "today": now.astimezone(rules.zone).date(),
        "now": now,
        "limit": BATCH,
    }
    for row in conn.execute(_LOW_BATTERIES, params).fetchall():
        _isolated(conn, "battery of", row[0], partial(_battery_one, conn, report, rules, now, row))


def _battery_one(conn: Conn, report: CareReport, rules: CareRules, now: datetime, row: tuple[Any, ...]) -> None:
    device_id, resident_id, grid_id, battery, name = row
    incident_id = _battery_incident(conn, report, device_id, resident_id, grid_id, battery, now)
    if incident_id is None:
        return
    after = send_after(conn, grid_id, now, rules.zone)
    day = after.astimezone(rules.zone).date()
    audiences = [("guardian", guardians(conn, resident_id))]
    if battery <= rules.battery_critical:
        audiences.append(("grid_worker", duty_chain(conn, grid_id, after, rules.zone)))
    for audience, people in audiences:
        claimed = conn.execute(
            """
            INSERT INTO battery_notices (device_id, local_day, audience, incident_id, battery, queued_at,
                send_after)
            VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1
            """,
            (device_id, day, audience, incident_id, battery, now, after),
        ).fetchone()
        if claimed is None:
            continue  # told today already
        cause = add_event(
            conn,
            incident_id,
            now,
            "battery_notice",
            "care",
            {"audience": audience, "battery": battery, "send_after": after.isoformat(), "day": day.isoformat()},
        )
        text = (
            f"【守护】提醒：{name}的手环电量{battery}%，请提醒老人及时充电。"
            if audience == "guardian"
            else f"【守护】{name}的手环电量仅剩{battery}%，即将关机，请联系老人或上门协助充电。"
        )
        contacts = [(p.kind, p.id, p.phone) for p in people if p.phone]
        queue_notice(conn, incident_id, cause, text, contacts, now, not_before=after if after > now else None)
        report.battery_notices += len(contacts)
        CARE_EVENTS.labels(f"battery_notice_{audience}").inc()
    wake_routers(conn, "care")


def _battery_incident(
    conn: Conn, report: CareReport, device_id: str, resident_id: str, grid_id: str, battery: int, now: datetime
) -> int | None:
    opened = open_care_incident(
        conn,
        IncidentKind.LOW_BATTERY,
        device_id=device_id,
        resident_id=resident_id,
        area_id=grid_id,
        at=now,
        detail={"battery": battery},
    )
    if opened is not None:
        report.battery_incidents.append(opened)
        return opened
    row = conn.execute(
        "SELECT id FROM incidents WHERE device_id = %s AND kind = 'low_battery'"
        f" AND state IN {OPEN_SQL}",
        (device_id,),
    ).fetchone()
    # None: resolved between the two statements (charged, or by hand); the next sweep looks again.
    return int(row[0]) if row else None


def _charged(conn: Conn, report: CareReport, rules: CareRules, now: datetime) -> None:
    # NO KEY UPDATE, and attempts a sender holds skipped: a sender recording an attempt
    # takes a key-share lock on the incident, which FOR UPDATE would wait on (deadlock).
    rows = conn.execute(
        f"""
        SELECT i.id, s.battery FROM incidents i JOIN device_state s ON s.device_id = i.device_id
        WHERE i.kind = 'low_battery' AND i.state IN {OPEN_SQL}
          AND s.battery >= %s
        ORDER BY i.id LIMIT %s FOR NO KEY UPDATE OF i SKIP LOCKED
        """,
        (rules.battery_low + BATTERY_HYSTERESIS_PCT, BATCH),
    ).fetchall()
    for incident_id, battery in rows:
        conn.execute(
            "UPDATE incidents SET state = %s, resolved_at = %s, outcome = 'battery_charged', updated_at = %s"
            " WHERE id = %s",
            (IncidentState.RESOLVED, now, now, incident_id),
        )
        # Notices still waiting for the morning are moot now; their claims go with them,
        # so a band low again later that day is told again.
        cancel_pending(conn, incident_id, now, pages_only=False)
        conn.execute("DELETE FROM battery_notices WHERE incident_id = %s AND send_after > %s", (incident_id, now))
        add_event(conn, incident_id, now, "resolved", "care", {"outcome": "battery_charged", "battery": battery})
        report.charged.append(int(incident_id))


def sweep(conn: Conn, now: datetime, rules: CareRules, *, lock_key: int = CARE_LOCK_KEY) -> CareReport:
    """Apply every care rule once, in one transaction, if this process leads.

    Raises:
        ValueError: ``now`` is naive.
    """
    if now.tzinfo is None:
        raise ValueError(f"naive datetime {now!r}: the care sweeper works in timezone-aware UTC")
    report = CareReport()
    with conn.transaction():
        (leader,) = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (lock_key,)).fetchone() or (False,)
        if not leader:
            return report
        report.leader = True
        _follow_tasks(conn, report, rules, now)
        for query, hold, incident_kind, task_kind in (
            (_OFFLINE_WRISTBANDS, rules.visit_offline_hold, IncidentKind.WRISTBAND_OFFLINE, TaskKind.VISIT),
            (_UNWORN_WRISTBANDS, rules.not_worn_hold, IncidentKind.NOT_WORN, TaskKind.VISIT),
            (_OFFLINE_CAMERAS, rules.camera_offline_hold, IncidentKind.CAMERA_OFFLINE, TaskKind.REPAIR),
        ):
            _open(
                conn,
                report,
                rules,
                now,
                query=query,
                hold=hold,
                incident_kind=incident_kind,
                task_kind=task_kind,
            )
        _charged(conn, report, rules, now)
        _batteries(conn, report, rules, now)
    return report


def sweep_visits(conn: Conn, now: datetime, rules: CareRules, *, lock_key: int = CARE_LOCK_KEY) -> CareReport:
    """Open the visits from the seeds once, in one transaction, if this process leads:
    follow-ups after an SOS or a fall, and this month's and week's recurring visits.

    A pass of its own beside :func:`sweep` (the same leader lock, taken in turn), so the
    device rules are read and tested without the registry's visit calendar.

    Raises:
        ValueError: ``now`` is naive.
    """
    if now.tzinfo is None:
        raise ValueError(f"naive datetime {now!r}: the care sweeper works in timezone-aware UTC")
    report = CareReport()
    with conn.transaction():
        (leader,) = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (lock_key,)).fetchone() or (False,)
        if not leader:
            return report
        report.leader = True
        _follow_ups(conn, report, rules, now)
        _scheduled_visits(conn, report, rules, now)
    return report


class CareSweeper:
    """Runs :func:`sweep` every few seconds on its own connection until stopped."""

    def __init__(self, database_url: str, rules: CareRules, *, clock: Clock | None = None) -> None:
        self.database_url = database_url
        self.rules = rules
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self.stopping = threading.Event()

    def run(self, interval_s: float | None = None) -> None:
        interval_s = interval_s or self.rules.sweep_interval_s()
        conn: Conn | None = None
        while not self.stopping.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.database_url, application_name="shouhu-care")
                sweep(conn, self.clock(), self.rules)
                sweep_visits(conn, self.clock(), self.rules)
            except psycopg.OperationalError as exc:
                log.warning("care sweeper: database unavailable (%s); retrying", exc)
                if conn is not None:
                    conn.close()
                conn = None
            except Exception:  # rows fail alone (savepoints); this is the sweep itself
                log.exception("care sweep failed; next sweep in %.0f s on a new connection", interval_s)
                if conn is not None:
                    conn.close()
                conn = None
            self.stopping.wait(interval_s)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
