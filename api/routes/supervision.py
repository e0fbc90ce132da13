"""Supervise (督办) an overdue incident or task: it rises one level and its owners are told again.

What supervision does is ``alerts/supervise.py``'s; here are who may (``SUPERVISORS``)
and the answers. The consoles' 督办 button calls the same functions. Every supervision
is written to the audit log in the transaction that makes it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel

from alerts.supervise import Supervised, Supervision, supervise_incident, supervise_task
from api.access import SUPERVISORS, may_see_incident, may_see_task
from api.deps import (
    API_PREFIX,
    ConnDep,
    CurrentToken,
    Now,
    Scope,
    SettingsDep,
    not_found,
    token_actor,
    tuple_rows,
    write_audit,
)
from devices.kinds import TaskKind
from shouhu.settings import Settings
from shouhu.tokens import TokenIdentity

router = APIRouter(prefix=API_PREFIX, tags=["supervision"])


class SupervisionPublic(BaseModel):
    id: int
    """The incident's or task's id."""
    result: Supervised
    """done."""
    due_at: datetime
    """The due time it was overdue for."""
    raised: str
    """What rose: the step now paged ("step 2 of round 0"), "resolve check", or the task's new area."""
    supervised_by: str


def _refuse(what: str, ident: int, outcome: Supervision) -> HTTPException:
    due = outcome.due_at.isoformat() if outcome.due_at else ""
    detail = {
        Supervised.NOT_OVERDUE: f"{what} {ident} is not overdue: it is due at {due}",
        Supervised.CLOSED: f"{what} {ident} is closed: there is nothing to supervise",
        Supervised.NO_DUE_TIME: f"{what} {ident} is a blue notice with no due time: there is nothing to supervise",
        Supervised.HAS_TASK: f"{what} {ident} is a task's incident: supervise the task, "
        f"POST /api/v1/tasks/{outcome.task_id}/supervise",
    }.get(outcome.result, f"{what} {ident} cannot be supervised now")
    return HTTPException(status.HTTP_409_CONFLICT, detail)


def supervise_incident_as(
    conn: ConnDep, token: TokenIdentity, scope: Scope, settings: Settings, incident_id: int, now: datetime, via: str
) -> SupervisionPublic:
    """Supervise as ``token``: 403 not a supervisor, 404 unseen, 409 not overdue or closed."""
    # The role first: a refusal that names no object discloses nothing (as repair-rounds).
    if token.role not in SUPERVISORS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot supervise incidents")
    row = conn.execute("SELECT kind, area_id FROM incidents WHERE id = %s", (incident_id,)).fetchone()
    if row is None or not may_see_incident(token.role, scope, row["kind"], row["area_id"]):
        raise not_found("incident", str(incident_id))
    actor = token_actor(conn, token)
    with conn.transaction():
        with tuple_rows(conn) as plain:
            outcome = supervise_incident(
                plain,
                incident_id,
                actor,
                now,
                ack_timeout_s=settings.ack_timeout_s,
                resolve_timeout_s=settings.resolve_timeout_s,
            )
        if outcome.result is not Supervised.DONE:
            raise _refuse("incident", incident_id, outcome)
        write_audit(conn, token, now, "supervise", f"incident:{incident_id}", {"raised": outcome.raised, "via": via})
    assert outcome.due_at is not None
    return SupervisionPublic(
        id=incident_id, result=outcome.result, due_at=outcome.due_at, raised=outcome.raised, supervised_by=actor.name
    )


def supervise_task_as(
    conn: ConnDep, token: TokenIdentity, scope: Scope, settings: Settings, task_id: int, now: datetime, via: str
) -> SupervisionPublic:
    """Supervise a task as ``token``: 403 not a supervisor, 404 unseen, 409 not overdue or closed."""
    if token.role not in SUPERVISORS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot supervise tasks")
    row = conn.execute("SELECT kind, area_id FROM care_tasks WHERE id = %s", (task_id,)).fetchone()
    if row is None or not may_see_task(token.role, scope, row["kind"], row["area_id"]):
        raise not_found("task", str(task_id))
    actor = token_actor(conn, token)
    due = settings.visit_due_s if row["kind"] == TaskKind.VISIT.value else settings.repair_due_s
    with conn.transaction():
        with tuple_rows(conn) as plain:
            outcome = supervise_task(plain, task_id, actor, now, due=_seconds(due), zone=settings.zone)
        if outcome.result is not Supervised.DONE:
            raise _refuse("task", task_id, outcome)
        write_audit(conn, token, now, "supervise", f"task:{task_id}", {"raised": outcome.raised, "via": via})
    assert outcome.due_at is not None
    return SupervisionPublic(
        id=task_id, result=outcome.result, due_at=outcome.due_at, raised=outcome.raised, supervised_by=actor.name
    )


def _seconds(value: int) -> timedelta:
    return timedelta(seconds=value)


@router.post(
    "/incidents/{incident_id}/supervise",
    responses={409: {"description": "Not overdue, closed, a blue notice, or a task's incident (named)."}},
)
def supervise_overdue_incident(
    settings: SettingsDep, conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, incident_id: int
) -> SupervisionPublic:
    """督办 an overdue red incident: its next escalation step is paged now, with a record on the timeline."""
    return supervise_incident_as(conn, token, scope, settings, incident_id, now, "api")


@router.post(
    "/tasks/{task_id}/supervise",
    responses={409: {"description": "Not overdue, or closed."}},
)
def supervise_overdue_task(
    settings: SettingsDep, conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, task_id: int
) -> SupervisionPublic:
    """督办 an overdue visit or repair order: it goes one level up and its new owners are texted."""
    return supervise_task_as(conn, token, scope, settings, task_id, now, "api")
