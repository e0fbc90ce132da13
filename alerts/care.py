"""Care incidents and their tasks: a visit (网格员探视) or a camera repair work order.

Each is a closed loop with an owner, a deadline and an outcome (seed 004: 任务书、
时间表、责任人, closed one by one — 逐一销号). A yellow incident carries one task; the
task's owner is the area whose people hold it now — the resident's grid (or the
camera's technicians) first, one level up each time it is overdue. Everything runs in
the caller's transaction and writes the incident's timeline; people are told by SMS
notices the router sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.rows import kwargs_row
from psycopg.types.json import Jsonb

from alerts.acknowledge import Actor, Result
from alerts.attempts import queue_notice
from alerts.incidents import draw_code
from alerts.recipients import Recipient, Rosters
from alerts.silence import area_chain
from alerts.states import ACTIVE, OPEN_SQL, IncidentState, sql_in
from alerts.timeline import add_event, wake_routers
from devices.kinds import (
    REPAIR_OUTCOMES,
    SEVERITY_OF_KIND,
    VISIT_OUTCOMES,
    IncidentKind,
    Outcome,
    PlannedVisit,
    StaffRole,
    TaskKind,
    TaskOutcome,
    TaskState,
)
from devices.reasons import how_long_text, offline_reason_text
from shouhu.db import Conn

# Care incidents have no escalation chain of steps; their task's due time is the
# escalation. The snapshot still names a policy so every incident reads the same way.
CARE_SNAPSHOT = {"policy_id": "care-task", "steps": []}
LABEL = {TaskKind.VISIT: "探视任务", TaskKind.REPAIR: "维修工单"}
PLANNED_LABEL = {PlannedVisit.FOLLOW_UP.value: "求助后回访", PlannedVisit.SCHEDULED.value: "定期探视"}


@dataclass(frozen=True, slots=True)
class TaskRow:
    id: int
    incident_id: int
    kind: TaskKind
    device_id: str | None  # None: a visit to a person (PlannedVisit), not about a device
    area_id: str
    owner_area_id: str
    level: int
    state: TaskState
    due_at: datetime
    code: str
    reason: str
    recovered_at: datetime | None


def open_care_incident(
    conn: Conn,
    kind: IncidentKind,
    *,
    device_id: str | None,
    resident_id: str | None,
    area_id: str,
    at: datetime,
    detail: dict[str, Any],
) -> int | None:
    """A yellow or blue incident for the device; None when one of this kind is already open.

    Without a device (a recurring visit) nothing is joined: each call opens one.
    """
    severity = SEVERITY_OF_KIND[kind]
    while True:
        try:
            with conn.transaction():
                row = conn.execute(
                    f"""
                    INSERT INTO incidents (code, kind, severity, resident_id, device_id, area_id, opened_at,
                        policy_snapshot)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                    ON CONFLICT (device_id, kind) WHERE severity <> 'red'
                        AND state IN {OPEN_SQL} DO NOTHING
                    RETURNING id
                    """,
                    (
                        draw_code(),
                        kind.value,
                        severity.value,
                        resident_id,
                        device_id,
                        area_id,
                        at,
                        Jsonb(CARE_SNAPSHOT),
                    ),
                ).fetchone()
        except psycopg.errors.UniqueViolation:
            continue  # the random code collided; draw another
        if row is None:
            return None
        add_event(conn, int(row[0]), at, "opened", "care", {"kind": kind.value, "severity": severity.value, **detail})
        return int(row[0])


def task_owners(conn: Conn, kind: TaskKind, area_id: str, level: int, at: datetime, zone: ZoneInfo) -> list[Recipient]:
    """Who holds a task at ``area_id`` now.

    Level 0: a visit goes to the grid workers on duty for the grid (nobody → up the
    tree, as for an SOS); a repair to the technicians on duty nearest up the tree.
    An escalated task (level ≥ 1) goes to whoever is on duty at its area, any role,
    walking further up if nobody is. Nobody anywhere: the county operators — never
    silent.
    """
    rosters = Rosters(conn, at, zone)  # one read of each roster, however far up the walk goes
    people: list[Recipient] = []
    if level == 0 and kind is TaskKind.VISIT:
        people = rosters.duty_chain(area_id)
    else:
        roles = {StaffRole.TECHNICIAN.value} if level == 0 else None
        for area in area_chain(conn, area_id):
            people = rosters.on_duty(area, roles)
            if people:
                break
    return people or rosters.operators()


def _contacts(people: list[Recipient]) -> list[tuple[str, str, str]]:
    return [(p.kind, p.id, p.phone) for p in people if p.phone]


def _local(at: datetime, zone: ZoneInfo) -> str:
    return at.astimezone(zone).strftime("%m-%d %H:%M")


def _subject(conn: Conn, kind: TaskKind, device_id: str, resident_id: str | None, area_id: str) -> str:
    if kind is TaskKind.VISIT and resident_id:
        row = conn.execute("SELECT name, address FROM residents WHERE id = %s", (resident_id,)).fetchone()
        if row:
            return f"{row[0]}（{row[1]}）的手环{device_id}"
    area = conn.execute("SELECT name FROM areas WHERE id = %s", (area_id,)).fetchone()
    return f"摄像头{device_id}（{area[0] if area else area_id}）"


def open_task(
    conn: Conn,
    incident_id: int,
    kind: TaskKind,
    *,
    device_id: str,
    resident_id: str | None,
    area_id: str,
    reason: str,
    problem_since: datetime,
    now: datetime,
    due: timedelta,
    zone: ZoneInfo,
) -> int:
    """The task for a care incident, given to its first owners, who are told by SMS."""
    people = task_owners(conn, kind, area_id, 0, now, zone)
    owner_area = next((p.area_id for p in people if p.area_id), area_id)
    due_at = now + due
    row = conn.execute(
        """
        INSERT INTO care_tasks (incident_id, kind, device_id, resident_id, area_id, owner_area_id, reason,
            opened_at, problem_since, due_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
        """,
        (incident_id, kind.value, device_id, resident_id, area_id, owner_area, reason, now, problem_since, due_at),
    ).fetchone()
    assert row is not None
    task_id = int(row[0])
    code = _code(conn, incident_id)
    cause = add_event(
        conn,
        incident_id,
        now,
        "task_opened",
        "care",
        {
            "task_id": task_id,
            "task": kind.value,
            "reason": reason,
            "owner_area": owner_area,
            "due_at": due_at.isoformat(),
            "owners": [{"id": p.id, "name": p.name, "role": p.role} for p in people],
        },
    )
    if kind is TaskKind.REPAIR:
        what = f"离线原因：{offline_reason_text(reason)}"
    else:
        what = _visit_reason(reason, now - problem_since)
    text = (
        f"【守护】{LABEL[kind]}{code}：{_subject(conn, kind, device_id, resident_id, area_id)}{what}，"
        f"请于{_local(due_at, zone)}前{'上门查看' if kind is TaskKind.VISIT else '处理'}。"
    )
    queue_notice(conn, incident_id, cause, text, _contacts(people), now)
    wake_routers(conn, "care")
    return task_id


def grid_workers(conn: Conn, grid_id: str) -> list[Recipient]:
    """The active grid workers assigned to the grid (staff_areas), on duty now or not."""
    rows = conn.execute(
        """
        SELECT s.id, s.name, s.phone FROM staff s JOIN staff_areas sa ON sa.staff_id = s.id
        WHERE sa.area_id = %s AND s.role = %s AND s.active ORDER BY s.id
        """,
        (grid_id, StaffRole.GRID_WORKER.value),
    ).fetchall()
    return [Recipient("staff", sid, name, phone, StaffRole.GRID_WORKER.value, grid_id) for sid, name, phone in rows]


def open_visit(
    conn: Conn,
    incident_id: int,
    purpose: PlannedVisit,
    *,
    resident_id: str,
    grid_id: str,
    since: datetime,
    deadline: datetime,
    period: str | None,
    now: datetime,
    zone: ZoneInfo,
    text: str | None,
) -> int | None:
    """A visit to a person (after an SOS, or a recurring one): no device, so nothing but its
    worker closes it. Given to the grid workers of the resident's grid (none: whoever
    :func:`task_owners` finds); ``text``, if any, is texted to them.

    Returns None when it exists already: one per incident, one per resident and period.
    """
    people = grid_workers(conn, grid_id) or task_owners(conn, TaskKind.VISIT, grid_id, 0, now, zone)
    owner_area = next((p.area_id for p in people if p.area_id), grid_id)
    row = conn.execute(
        """
        INSERT INTO care_tasks (incident_id, kind, device_id, resident_id, area_id, owner_area_id, reason,
            opened_at, problem_since, due_at, deadline, period)
        VALUES (%s, 'visit', NULL, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT DO NOTHING RETURNING id
        """,
        (incident_id, resident_id, grid_id, owner_area, purpose.value, now, since, deadline, deadline, period),
    ).fetchone()
    if row is None:
        return None
    task_id = int(row[0])
    cause = add_event(
        conn,
        incident_id,
        now,
        "task_opened",
        "care",
        {
            "task_id": task_id,
            "task": TaskKind.VISIT.value,
            "reason": purpose.value,
            "period": period,
            "owner_area": owner_area,
            "due_at": deadline.isoformat(),
            "owners": [{"id": p.id, "name": p.name, "role": p.role} for p in people],
        },
    )
    if text:
        queue_notice(conn, incident_id, cause, text, _contacts(people), now)
        wake_routers(conn, "care")
    return task_id


def _visit_reason(reason: str, how_long: timedelta) -> str:
    # The time as it is: a hold shorter than an hour is not "1小时".
    since = how_long_text(how_long)
    return f"已{since}未佩戴" if reason == "not_worn" else f"已离线约{since}"


def _code(conn: Conn, incident_id: int) -> str:
    row = conn.execute("SELECT code FROM incidents WHERE id = %s", (incident_id,)).fetchone()
    assert row is not None
    return str(row[0])


def lock_task(conn: Conn, task_id: int) -> TaskRow | None:
    return conn.cursor(row_factory=kwargs_row(_task_row)).execute(
        """
        SELECT t.id, t.incident_id, t.kind, t.device_id, t.area_id, t.owner_area_id, t.level, t.state, t.due_at,
               i.code, t.reason, t.recovered_at
        FROM care_tasks t JOIN incidents i ON i.id = t.incident_id
        WHERE t.id = %s FOR NO KEY UPDATE OF t, i
        """,
        (task_id,),
    ).fetchone()


def clear_task_notes(conn: Conn, cutoff: datetime, limit: int) -> int:
    """Clear the notes of at most ``limit`` tasks closed before ``cutoff``, oldest first; returns how many.

    The outcome, who closed it and when stay. Its incident's resolution note and
    timeline are cleared with the incident's contacts (``hub/retention.py``).
    """
    return conn.execute(
        """
        UPDATE care_tasks SET note = ''
        WHERE id = ANY(ARRAY(
            SELECT id FROM care_tasks WHERE note <> '' AND closed_at < %(cutoff)s
            ORDER BY closed_at LIMIT %(limit)s
        ))
        """,
        {"cutoff": cutoff, "limit": limit},
    ).rowcount


def _task_row(*, kind: str, state: str, **columns: Any) -> TaskRow:
    return TaskRow(kind=TaskKind(kind), state=TaskState(state), **columns)


def start_task(conn: Conn, task_id: int, actor: Actor, now: datetime) -> Result:
    """Somebody is on the way: the incident is acknowledged, and the device coming back no
    longer closes a visit — whoever started it records what they found."""
    task = lock_task(conn, task_id)
    if task is None or task.state is TaskState.CLOSED:
        return Result.CLOSED
    if task.state is TaskState.STARTED:
        return Result.ALREADY
    conn.execute(
        "UPDATE care_tasks SET state = 'started', started_at = %s, started_by = %s, started_by_name = %s"
        " WHERE id = %s",
        (now, actor.key, actor.label, task.id),
    )
    conn.execute(
        f"""
        UPDATE incidents SET state = %s, acknowledged_at = %s, acknowledged_by = %s,
            acknowledged_by_name = %s, acknowledged_via = 'task', updated_at = %s
        WHERE id = %s AND state IN {sql_in(ACTIVE)}
        """,
        (IncidentState.ACKNOWLEDGED, now, actor.key, actor.label, now, task.incident_id),
    )
    add_event(
        conn,
        task.incident_id,
        now,
        "task_started",
        actor.key,
        {"task_id": task.id, "name": actor.name, "role": actor.role},
    )
    return Result.DONE


def close_task(
    conn: Conn,
    task_id: int,
    outcome: TaskOutcome,
    note: str,
    actor: Actor,
    now: datetime,
    *,
    incident_outcome: Outcome = Outcome.TASK_COMPLETED,
) -> Result:
    """Close the task with its outcome and resolve its incident.

    Raises:
        ValueError: the outcome does not fit the task (a visit "repaired").
    """
    task = lock_task(conn, task_id)
    if task is None or task.state is TaskState.CLOSED:
        return Result.CLOSED
    allowed = VISIT_OUTCOMES if task.kind is TaskKind.VISIT else REPAIR_OUTCOMES
    if outcome not in allowed and outcome is not TaskOutcome.DEVICE_RECOVERED:
        raise ValueError(
            f"outcome {outcome.value!r} does not fit a {task.kind.value} task;"
            f" expected one of {sorted(o.value for o in allowed)}"
        )
    conn.execute(
        "UPDATE care_tasks SET state = 'closed', closed_at = %s, closed_by = %s, closed_by_name = %s,"
        " outcome = %s, note = %s WHERE id = %s",
        (now, actor.key, actor.label, outcome.value, note, task.id),
    )
    conn.execute(
        "UPDATE incidents SET state = %s, resolved_at = %s, outcome = %s, resolution_note = %s,"
        f" updated_at = %s WHERE id = %s AND state IN {OPEN_SQL}",
        (IncidentState.RESOLVED, now, incident_outcome.value, note, now, task.incident_id),
    )
    repair = conn.execute(
        "SELECT extract(epoch FROM coalesce(recovered_at, closed_at) - problem_since) FROM care_tasks WHERE id = %s",
        (task.id,),
    ).fetchone()
    add_event(
        conn,
        task.incident_id,
        now,
        "task_closed",
        actor.key,
        {
            "task_id": task.id,
            "name": actor.name,
            "role": actor.role,
            "outcome": outcome.value,
            "note": note,
            "time_to_repair_s": round(float(repair[0])) if repair and repair[0] is not None else None,
        },
    )
    return Result.DONE


def escalate_task(conn: Conn, task: TaskRow, now: datetime, due: timedelta, zone: ZoneInfo) -> str:
    """Overdue: the task goes one level up the area tree with a new deadline; returns the new owner area."""
    chain = area_chain(conn, task.owner_area_id)
    above = chain[1] if len(chain) > 1 else task.owner_area_id  # the county has nobody above: stays, re-told
    level = task.level + 1
    people = task_owners(conn, task.kind, above, level, now, zone)
    due_at = now + due
    conn.execute(
        "UPDATE care_tasks SET owner_area_id = %s, level = %s, due_at = %s WHERE id = %s",
        (above, level, due_at, task.id),
    )
    cause = add_event(
        conn,
        task.incident_id,
        now,
        "task_escalated",
        "care",
        {
            "task_id": task.id,
            "from_area": task.owner_area_id,
            "to_area": above,
            "level": level,
            "due_at": due_at.isoformat(),
            "owners": [{"id": p.id, "name": p.name, "role": p.role} for p in people],
        },
    )
    subject = task.device_id or PLANNED_LABEL.get(task.reason, task.reason)
    text = (
        f"【守护】{LABEL[task.kind]}{task.code}逾期未完成，已升级由您督办"
        f"（{subject}，原责任区域{task.owner_area_id}），请于{_local(due_at, zone)}前落实。"
    )
    queue_notice(conn, task.incident_id, cause, text, _contacts(people), now)
    wake_routers(conn, "care")
    return above


def tell_owners(conn: Conn, task: TaskRow, event_id: int, text: str, now: datetime) -> int:
    """An SMS to everyone the task was given to so far (the device is back, the order closed)."""
    people = conn.execute(
        """
        SELECT DISTINCT recipient_kind, recipient_id, address FROM notification_attempts
        WHERE incident_id = %s AND purpose = 'notice' AND channel = 'sms' ORDER BY 1, 2
        """,
        (task.incident_id,),
    ).fetchall()
    return queue_notice(conn, task.incident_id, event_id, text, [(str(k), str(i), str(a)) for k, i, a in people], now)


def timeline_detail(task: TaskRow) -> dict[str, Any]:
    return {"task_id": task.id, "task": task.kind.value, "device_id": task.device_id}
