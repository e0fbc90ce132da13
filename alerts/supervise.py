"""Due times and supervision (督办): when an open incident or task should have been dealt
with, and what one click on an overdue one does.

Due times (:func:`incident_due_at`, pure):

- a red incident not yet taken (open, unreached) was due to be taken when its first
  step's wait ran out: ``opened_at`` + the frozen policy's first wait
  (``SHOUHU_ACK_TIMEOUT_S`` in the built-in policy);
- a red incident taken but not resolved is due to be resolved
  ``SHOUHU_RESOLVE_TIMEOUT_S`` after its acknowledgement (when it goes back on the chain);
- a care incident is due when its task is (visits ``SHOUHU_VISIT_DUE_S``, repairs
  ``SHOUHU_REPAIR_DUE_S``, renewed each time it rises a level);
- a blue notice, and anything closed, has no due time.

Supervising an overdue one (an operator's 一键督办) records ``supervised`` on its
timeline naming who, then makes it rise one level through the owners of the rows it
touches: a red incident's next pending escalation action is made due now
(:func:`alerts.escalation.bring_forward`; the router pages the next level at once), a
task goes one level up the area tree with a new deadline and its new owners are texted
(:func:`alerts.care.escalate_task`). Not overdue, or closed: nothing is written.
Lock order as everywhere: the incident (or the task with its incident) first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from alerts.acknowledge import Actor
from alerts.care import escalate_task, lock_task
from alerts.escalation import bring_forward
from alerts.locks import lock_incident
from alerts.states import CLOSED, OPEN_SQL, IncidentState
from alerts.timeline import add_event, wake_routers
from devices.kinds import Severity, TaskState
from shouhu.db import Conn

SUPERVISED_EVENT = "supervised"

__all__ = [
    "FIRST_WAIT_SQL",
    "SUPERVISED_EVENT",
    "Supervised",
    "Supervision",
    "SupervisionCounts",
    "incident_due_at",
    "is_overdue",
    "supervise_incident",
    "supervise_task",
    "supervision_counts",
]


class Supervised(StrEnum):
    DONE = "done"
    NOT_OVERDUE = "not_overdue"
    CLOSED = "closed"
    NO_DUE_TIME = "no_due_time"  # a blue notice: nothing to be late for
    HAS_TASK = "has_task"  # a care incident: its task is what is supervised
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class Supervision:
    """What a supervision did: the result, the due time it was judged by, and what rose."""

    result: Supervised
    due_at: datetime | None = None
    raised: str = ""  # what rose: "step 2 of round 0", "resolve check", "to area dongguan"
    task_id: int | None = None


def incident_due_at(
    severity: Severity,
    state: IncidentState,
    opened_at: datetime,
    acknowledged_at: datetime | None,
    first_wait_s: int,
    resolve_timeout_s: int,
    task_due_at: datetime | None,
) -> datetime | None:
    """When an incident should have been taken (or resolved) by; None when it has no due time."""
    if state in CLOSED:
        return None
    if severity is not Severity.RED:
        return task_due_at
    if state is IncidentState.ACKNOWLEDGED and acknowledged_at is not None:
        return acknowledged_at + timedelta(seconds=resolve_timeout_s)
    return opened_at + timedelta(seconds=first_wait_s)


def is_overdue(due_at: datetime | None, now: datetime) -> bool:
    """Past its due time (an item with no due time never is)."""
    return due_at is not None and due_at <= now


# The first step's wait from the frozen snapshot; a policy with no steps falls back to the setting.
FIRST_WAIT_SQL = "(i.policy_snapshot->'steps'->0->>'wait_s')::int"


def supervise_incident(
    conn: Conn, incident_id: int, actor: Actor, now: datetime, *, ack_timeout_s: int, resolve_timeout_s: int
) -> Supervision:
    """Supervise an overdue red incident: its next step is paged now. In the caller's transaction."""
    if lock_incident(conn, incident_id) is None:
        return Supervision(Supervised.NOT_FOUND)
    row = conn.execute(
        f"""
        SELECT i.severity, i.state, i.opened_at, i.acknowledged_at, {FIRST_WAIT_SQL}, t.id, t.due_at
        FROM incidents i LEFT JOIN care_tasks t ON t.incident_id = i.id WHERE i.id = %s
        """,
        (incident_id,),
    ).fetchone()
    assert row is not None
    severity, state, opened_at, acknowledged_at, first_wait, task_id, task_due = row
    state = IncidentState(state)
    due_at = incident_due_at(
        Severity(severity),
        state,
        opened_at,
        acknowledged_at,
        ack_timeout_s if first_wait is None else int(first_wait),
        resolve_timeout_s,
        task_due,
    )
    if state in CLOSED:
        return Supervision(Supervised.CLOSED)
    if task_id is not None:
        return Supervision(Supervised.HAS_TASK, due_at, task_id=int(task_id))
    if due_at is None:
        return Supervision(Supervised.NO_DUE_TIME)
    if not is_overdue(due_at, now):
        return Supervision(Supervised.NOT_OVERDUE, due_at)
    moved = bring_forward(conn, incident_id, now)
    if moved is None:
        raised = "already escalating"  # a router holds its next step now, or it is due already
    else:
        kind, step, round_ = moved
        raised = f"step {step + 1} of round {round_}" if kind == "step" else "resolve check"
    add_event(
        conn,
        incident_id,
        now,
        SUPERVISED_EVENT,
        actor.key,
        {"name": actor.name, "role": actor.role, "due_at": due_at.isoformat(), "raised": raised},
    )
    wake_routers(conn, "supervised")
    return Supervision(Supervised.DONE, due_at, raised)


def supervise_task(
    conn: Conn, task_id: int, actor: Actor, now: datetime, *, due: timedelta, zone: ZoneInfo
) -> Supervision:
    """Supervise an overdue visit or repair order: one level up, its new owners texted. In the caller's transaction."""
    task = lock_task(conn, task_id)
    if task is None:
        return Supervision(Supervised.NOT_FOUND)
    if task.state is TaskState.CLOSED:
        return Supervision(Supervised.CLOSED, task_id=task.id)
    if not is_overdue(task.due_at, now):
        return Supervision(Supervised.NOT_OVERDUE, task.due_at, task_id=task.id)
    add_event(
        conn,
        task.incident_id,
        now,
        SUPERVISED_EVENT,
        actor.key,
        {"name": actor.name, "role": actor.role, "task_id": task.id, "due_at": task.due_at.isoformat()},
    )
    above = escalate_task(conn, task, now, due, zone)
    return Supervision(Supervised.DONE, task.due_at, f"to area {above}", task.id)


@dataclass(frozen=True, slots=True)
class SupervisionCounts:
    in_period: int  # incidents (and tasks, by their incident) supervised in the period
    open_now: int  # of all incidents ever supervised, those still open


def supervision_counts(conn: Conn, areas: list[str] | None, since: datetime, until: datetime) -> SupervisionCounts:
    """How many items were supervised in [since, until), and how many supervised ones are still open."""
    row = conn.execute(
        f"""
        SELECT count(DISTINCT i.id) FILTER (WHERE e.at >= %(since)s AND e.at < %(until)s),
               count(DISTINCT i.id) FILTER (WHERE i.state IN {OPEN_SQL})
        FROM incident_events e JOIN incidents i ON i.id = e.incident_id
        WHERE e.event = '{SUPERVISED_EVENT}' AND (%(areas)s::text[] IS NULL OR i.area_id = ANY(%(areas)s))
        """,
        # The event written out, not a parameter: the query must match the partial index (migration 18).
        {"since": since, "until": until, "areas": areas},
    ).fetchone()
    return SupervisionCounts(int(row[0]), int(row[1])) if row else SupervisionCounts(0, 0)
