"""What the consoles show, read within the viewer's areas.

Every query takes the viewer's area scope (``None``: the whole county) and filters by
it in SQL, as the REST routes do; nothing here decides who may see what on its own
— the pages pass the same scope and role sets the API uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from alerts.recipients import shift_covers
from alerts.states import OPEN, OPEN_SQL, IncidentState
from alerts.supervise import FIRST_WAIT_SQL
from shouhu.db import DictConn

SEVERITY_ORDER = {"red": 0, "yellow": 1, "blue": 2}
OPEN_STATES = tuple(s.value for s in OPEN)


def open_incidents(
    conn: DictConn, scope: list[str] | None, kinds: Sequence[str], limit: int = 200
) -> list[dict[str, Any]]:
    """Open incidents, reddest then newest first, with the resident's name for the list; a
    resolved SOS whose follow-up visit is still open stays on the list with its visit."""
    rows = conn.execute(
        f"""
        SELECT i.id, i.code, i.kind, i.severity, i.state, i.opened_at, i.urgency, i.area_id,
               i.acknowledged_by_name, i.acknowledged_at, {FIRST_WAIT_SQL} AS first_wait_s, i.device_id,
               r.name AS resident_name, a.name AS area_name,
               t.id AS task_id, t.kind AS task_kind, t.state AS task_state, t.due_at, t.level
        FROM incidents i
        LEFT JOIN residents r ON r.id = i.resident_id
        LEFT JOIN areas a ON a.id = i.area_id
        LEFT JOIN care_tasks t ON t.incident_id = i.id
        WHERE i.id IN (SELECT id FROM incidents WHERE state = ANY(%(states)s)
                       UNION SELECT incident_id FROM care_tasks WHERE state <> 'closed')
          AND i.kind = ANY(%(kinds)s)
          AND (%(scope)s::text[] IS NULL OR i.area_id = ANY(%(scope)s))
        ORDER BY CASE i.severity WHEN 'red' THEN 0 WHEN 'yellow' THEN 1 ELSE 2 END,
                 (i.state = '{IncidentState.ACKNOWLEDGED}'), i.opened_at DESC, i.id DESC
        LIMIT %(limit)s
        """,
        {"states": list(OPEN_STATES), "kinds": list(kinds), "scope": scope, "limit": limit},
    ).fetchall()
    return [dict(r) for r in rows]


def incident(conn: DictConn, incident_id: int) -> dict[str, Any] | None:
    row = conn.execute(
        f"""
        SELECT i.*, {FIRST_WAIT_SQL} AS first_wait_s, r.name AS resident_name, r.address AS resident_address,
               r.phone AS resident_phone, r.medical_notes, a.name AS area_name, t.id AS task_id
        FROM incidents i
        LEFT JOIN residents r ON r.id = i.resident_id
        LEFT JOIN areas a ON a.id = i.area_id
        LEFT JOIN care_tasks t ON t.incident_id = i.id
        WHERE i.id = %s
        """,
        (incident_id,),
    ).fetchone()
    return dict(row) if row else None


@dataclass(frozen=True, slots=True)
class EventRow:
    """One timeline entry (``alerts/timeline.py``), with the person behind its actor when there is one."""

    id: int
    at: datetime
    event: str
    actor: str | None
    detail: dict[str, Any]
    actor_name: str | None  # the name the event recorded, else the staff member's, guardian's or token's
    actor_role: str | None  # a staff role, "guardian", or the token's role


def timeline(conn: DictConn, incident_id: int) -> list[EventRow]:
    """The incident's timeline, oldest first."""
    rows = conn.execute(
        """
        SELECT e.id, e.at, e.event, e.actor, e.detail,
               coalesce(nullif(e.detail->>'name', ''), s.name, g.name, nullif(t.label, ''),
                        CASE WHEN e.actor LIKE 'integration:%%' THEN substr(e.actor, 13) END) AS actor_name,
               coalesce(nullif(e.detail->>'role', ''), s.role, CASE WHEN g.id IS NOT NULL THEN 'guardian' END,
                        t.role) AS actor_role
        FROM incident_events e
        LEFT JOIN staff s ON e.actor = 'staff:' || s.id
        LEFT JOIN guardians g ON e.actor = 'guardian:' || g.id
        LEFT JOIN api_tokens t ON e.actor = 'token:' || t.id::text
        WHERE e.incident_id = %s ORDER BY e.at, e.id
        """,
        (incident_id,),
    ).fetchall()
    return [EventRow(**r) for r in rows]


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One notification attempt (``alerts/attempts.py``): to whom, on which channel, how it ended."""

    id: int
    created_at: datetime  # queued
    due_at: datetime  # when it was to go out: a retry waits its backoff
    settled_at: datetime  # the row's last change: its outcome once settled
    purpose: str
    round: int
    step: int
    channel: str
    attempt: int  # 1, or the retry's number
    state: str
    in_flight: bool
    error: str | None
    recipient_kind: str
    recipient_id: str
    recipient_name: str | None
    recipient_role: str | None  # a staff role, "guardian" or "platform"
    digit: str | None  # the key pressed on a call (1 going, 2 cannot), if any


def attempts(conn: DictConn, incident_id: int) -> list[AttemptRow]:
    """Every call, SMS, console page and platform message of the incident, in the order they were queued."""
    # greatest() skips a NULL not_before: due when queued.
    rows = conn.execute(
        """
        SELECT a.id, a.created_at, greatest(a.created_at, a.not_before) AS due_at, a.updated_at AS settled_at,
               a.purpose, a.round, a.step, a.channel, a.attempt,
               a.state, (a.state = 'pending' AND a.leased_by IS NOT NULL) AS in_flight, a.error,
               a.recipient_kind, a.recipient_id, coalesce(s.name, g.name) AS recipient_name,
               CASE WHEN s.id IS NOT NULL THEN s.role WHEN g.id IS NOT NULL THEN 'guardian'
                    WHEN a.recipient_kind = 'platform' THEN 'platform' END AS recipient_role,
               (SELECT k.detail->>'digit' FROM incident_events k
                WHERE k.incident_id = a.incident_id AND k.event = 'keypress'
                  AND k.detail->>'attempt_id' = a.id::text AND k.detail->>'digit' IN ('1', '2')
                ORDER BY k.id DESC LIMIT 1) AS digit
        FROM notification_attempts a
        LEFT JOIN staff s ON a.recipient_kind = 'staff' AND s.id = a.recipient_id
        LEFT JOIN guardians g ON a.recipient_kind = 'guardian' AND g.id = a.recipient_id
        WHERE a.incident_id = %s
        ORDER BY a.created_at, a.id
        """,
        (incident_id,),
    ).fetchall()
    return [AttemptRow(**r) for r in rows]


@dataclass(frozen=True, slots=True)
class NextStep:
    """The escalation step an open incident waits for (``escalation_actions``), and whom it pages."""

    due_at: datetime
    round: int
    step: int
    target: str | None  # the frozen policy's target; None past its last step (the operators)


def next_step(conn: DictConn, incident_id: int) -> NextStep | None:
    """The next step due, while the incident escalates (a step under an older fencing token will not run)."""
    row = conn.execute(
        f"""
        SELECT a.due_at, a.round, a.step, i.policy_snapshot->'steps'->a.step->>'target' AS target
        FROM escalation_actions a JOIN incidents i ON i.id = a.incident_id
        WHERE a.incident_id = %s AND a.state = 'pending' AND a.kind = 'step' AND a.token = i.escalation_token
          AND i.state IN ('{IncidentState.OPEN}', '{IncidentState.UNREACHED}')
        ORDER BY a.due_at, a.id LIMIT 1
        """,
        (incident_id,),
    ).fetchone()
    return NextStep(**row) if row else None


def guardians(conn: DictConn, resident_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT name, phone, relation, priority FROM guardians WHERE resident_id = %s AND active ORDER BY priority, id",
        (resident_id,),
    ).fetchall()
    return [dict(r) for r in rows]


def task(conn: DictConn, task_id: int) -> dict[str, Any] | None:
    row = conn.execute(
        """
        SELECT t.*, i.code, i.severity, i.kind AS incident_kind, r.name AS resident_name,
               r.address AS resident_address, a.name AS area_name
        FROM care_tasks t JOIN incidents i ON i.id = t.incident_id
        LEFT JOIN residents r ON r.id = t.resident_id
        LEFT JOIN areas a ON a.id = t.area_id
        WHERE t.id = %s
        """,
        (task_id,),
    ).fetchone()
    return dict(row) if row else None


def cameras_by_area(conn: DictConn, scope: list[str] | None, now: datetime) -> list[dict[str, Any]]:
    """Each area with cameras: how many, how many online now, and the offline ones with reason and duration."""
    rows = conn.execute(
        """
        SELECT d.id, d.area_id, a.name AS area_name, s.online, s.offline_reason, s.state_at,
               extract(epoch FROM %(now)s - s.state_at) AS offline_s
        FROM devices d JOIN areas a ON a.id = d.area_id
        LEFT JOIN device_state s ON s.device_id = d.id
        WHERE d.kind = 'camera' AND d.active AND (%(scope)s::text[] IS NULL OR d.area_id = ANY(%(scope)s))
        ORDER BY d.area_id, d.id
        """,
        {"scope": scope, "now": now},
    ).fetchall()
    areas: dict[str, dict[str, Any]] = {}
    for row in rows:
        area = areas.setdefault(
            row["area_id"],
            {"area_id": row["area_id"], "area_name": row["area_name"], "cameras": 0, "online": 0, "offline": []},
        )
        area["cameras"] += 1
        if row["online"]:
            area["online"] += 1
        elif row["online"] is False:
            area["offline"].append(dict(row))
    return list(areas.values())


def open_orders(conn: DictConn, scope: list[str] | None) -> list[dict[str, Any]]:
    """Open repair orders, oldest first."""
    rows = conn.execute(
        """
        SELECT t.id, t.device_id, t.area_id, a.name AS area_name, t.reason, t.state, t.opened_at, t.due_at,
               t.level, t.flaps, i.code
        FROM care_tasks t JOIN incidents i ON i.id = t.incident_id JOIN areas a ON a.id = t.area_id
        WHERE t.kind = 'repair' AND t.state <> 'closed'
          AND (%(scope)s::text[] IS NULL OR t.area_id = ANY(%(scope)s))
        ORDER BY t.opened_at, t.id
        """,
        {"scope": scope},
    ).fetchall()
    return [dict(r) for r in rows]


def reached_platform(conn: DictConn, scope: list[str] | None, since: datetime, until: datetime) -> int:
    """How many SOS and falls of the period went as far as the emergency platform (a CAP alert).

    The rest of the response figures (taken within 60 s / 180 s, median and P90, unreached)
    come from ``alerts/response.py``, the one source for the overview, REST and /metrics.
    """
    row = conn.execute(
        """
        SELECT count(DISTINCT a.incident_id) AS platform
        FROM incidents i JOIN notification_attempts a ON a.incident_id = i.id
        WHERE i.kind IN ('sos', 'fall', 'sos_unregistered') AND i.opened_at >= %(since)s
          AND i.opened_at < %(until)s AND (%(scope)s::text[] IS NULL OR i.area_id = ANY(%(scope)s))
          AND a.purpose = 'cap_alert'
        """,
        {"since": since, "until": until, "scope": scope},
    ).fetchone()
    return int(row["platform"]) if row else 0


def incidents_by_severity_and_area(
    conn: DictConn, scope: list[str] | None, since: datetime, until: datetime
) -> list[dict[str, Any]]:
    """Per township-or-lower area: open now and opened in the period, by 红黄蓝 severity."""
    rows = conn.execute(
        f"""
        SELECT coalesce(a.name, '—') AS area_name, i.area_id, i.severity,
               count(*) FILTER (WHERE i.state IN {OPEN_SQL}) AS open_now,
               count(*) FILTER (WHERE i.opened_at >= %(since)s AND i.opened_at < %(until)s) AS in_period
        FROM incidents i LEFT JOIN areas a ON a.id = i.area_id
        WHERE (%(scope)s::text[] IS NULL OR i.area_id = ANY(%(scope)s))
          AND (i.state IN {OPEN_SQL} OR i.opened_at >= %(since)s)
        GROUP BY 1, 2, 3
        ORDER BY 1, 3
        """,
        {"scope": scope, "since": since, "until": until},
    ).fetchall()
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = table.setdefault(
            row["area_id"] or "",
            {"area_name": row["area_name"], "red": [0, 0], "yellow": [0, 0], "blue": [0, 0]},
        )
        entry[row["severity"]] = [int(row["open_now"]), int(row["in_period"])]
    return sorted(table.values(), key=lambda e: (-e["red"][0], -e["red"][1], e["area_name"]))


def devices_offline_by_area(conn: DictConn, scope: list[str] | None) -> list[dict[str, Any]]:
    rows = conn.execute(
        """
        SELECT coalesce(d.area_id, r.grid_id) AS area_id, a.name AS area_name, d.kind,
               count(*) FILTER (WHERE s.online = false) AS offline, count(*) AS total
        FROM devices d LEFT JOIN residents r ON r.id = d.resident_id
        LEFT JOIN device_state s ON s.device_id = d.id
        LEFT JOIN areas a ON a.id = coalesce(d.area_id, r.grid_id)
        WHERE d.active AND (%(scope)s::text[] IS NULL OR coalesce(d.area_id, r.grid_id) = ANY(%(scope)s))
        GROUP BY 1, 2, 3 HAVING count(*) FILTER (WHERE s.online = false) > 0
        ORDER BY 4 DESC, 2
        """,
        {"scope": scope},
    ).fetchall()
    return [dict(r) for r in rows]


def uncovered_tonight(conn: DictConn, scope: list[str] | None, now: datetime, zone: ZoneInfo) -> list[dict[str, Any]]:
    """Grids whose own grid workers are off duty at some hour of the coming night (20:00–08:00 local)."""
    local = now.astimezone(zone)
    evening = datetime.combine(local.date() if local.hour >= 8 else local.date() - timedelta(days=1), time(20), zone)
    hours = [evening + timedelta(hours=h) for h in range(12)]
    shifts: dict[str, list[tuple[list[int], time, time]]] = {}
    for row in conn.execute(
        """
        SELECT d.area_id, d.weekdays, d.start_time, d.end_time FROM duty_shifts d JOIN staff s ON s.id = d.staff_id
        WHERE d.active AND s.active AND s.role = 'grid_worker'
        """
    ).fetchall():
        shifts.setdefault(row["area_id"], []).append((list(row["weekdays"]), row["start_time"], row["end_time"]))
    gaps = []
    for grid in conn.execute(
        # Grids only: a micro-grid is looked after by its grid's workers.
        "SELECT id, name FROM areas WHERE active AND level = 'grid'"
        " AND (%(scope)s::text[] IS NULL OR id = ANY(%(scope)s)) ORDER BY id",
        {"scope": scope},
    ).fetchall():
        own = shifts.get(grid["id"], [])
        missing = [h for h in hours if not any(shift_covers(days, s, e, h) for days, s, e in own)]
        if missing:
            gaps.append(
                {
                    "area_id": grid["id"],
                    "area_name": grid["name"],
                    "hours": len(missing),
                    "from": min(missing).strftime("%H:%M"),
                    "to": (max(missing) + timedelta(hours=1)).strftime("%H:%M"),
                }
            )
    return gaps
