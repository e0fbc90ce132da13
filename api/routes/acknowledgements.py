"""Acknowledge and resolve an incident through the API or a console (DESIGN.md "Acknowledging").

The emergency platform acknowledges with a ``platform``-role token. Every
acknowledgement and resolution is written to the audit log in the transaction
that makes it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field

from alerts.acknowledge import Result, acknowledge, resolve
from api.access import ACKNOWLEDGERS, may_see_incident
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
from devices.kinds import IncidentState, Outcome

router = APIRouter(prefix=f"{API_PREFIX}/incidents", tags=["incidents"])



class AcknowledgeBody(BaseModel):
    note: str = Field(default="", max_length=500, description="Free text kept on the timeline.")


class ResolveBody(BaseModel):
    outcome: Outcome = Field(description="How it ended: false_alarm, visited_fine, sent_to_hospital, …")
    note: str = Field(default="", max_length=2000)


class IncidentActionPublic(BaseModel):
    id: int
    state: IncidentState
    result: Result
    """done; already (you did it before); taken (someone else acknowledged first); closed."""
    acknowledged_by: str | None


def _check(conn: ConnDep, token: CurrentToken, scope: Scope, incident_id: int, *, acknowledging: bool) -> None:
    row = conn.execute(
        "SELECT i.kind, i.severity, i.area_id, t.id AS task_id FROM incidents i"
        " LEFT JOIN care_tasks t ON t.incident_id = i.id WHERE i.id = %s",
        (incident_id,),
    ).fetchone()
    if row is None or not may_see_incident(token.role, scope, row["kind"], row["area_id"]):
        raise not_found("incident", str(incident_id))
    if token.role not in ACKNOWLEDGERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot act on this incident")
    # A visit or repair is taken and closed through its task, which records what was
    # found; a blue notice asks nobody to come, so there is nothing to acknowledge. (A
    # red incident's task is its follow-up visit, opened once it is resolved.)
    if row["task_id"] is not None and row["severity"] != "red":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"incident {incident_id} is a {row['kind']} task: use /api/v1/tasks/{row['task_id']}/start and /close",
        )
    if acknowledging and row["severity"] != "red":
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"incident {incident_id} is a {row['severity']} notice: resolve it instead"
        )


def _answer(conn: ConnDep, incident_id: int, result: Result) -> IncidentActionPublic:
    row = conn.execute("SELECT state, acknowledged_by_name FROM incidents WHERE id = %s", (incident_id,)).fetchone()
    assert row is not None
    answer = IncidentActionPublic(
        id=incident_id, state=IncidentState(row["state"]), result=result, acknowledged_by=row["acknowledged_by_name"]
    )
    if result in (Result.TAKEN, Result.CLOSED):
        detail = (
            f"incident {incident_id} was already taken by {row['acknowledged_by_name']}"
            if result is Result.TAKEN
            else f"incident {incident_id} is already {row['state']}"
        )
        raise HTTPException(status.HTTP_409_CONFLICT, detail)
    return answer


def _audit(conn: ConnDep, token: CurrentToken, now: Any, action: str, incident_id: int, detail: dict[str, Any]) -> None:
    write_audit(conn, token, now, action, f"incident:{incident_id}", detail)


@router.post("/{incident_id}/ack")
def acknowledge_incident(
    settings: SettingsDep,
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
    now: Now,
    incident_id: int,
    body: AcknowledgeBody | None = None,
) -> IncidentActionPublic:
    """Take an incident: the escalation stops and everyone already paged is told who took it."""
    _check(conn, token, scope, incident_id, acknowledging=True)
    actor = token_actor(conn, token)
    note = (body or AcknowledgeBody()).note
    with conn.transaction():
        with tuple_rows(conn) as plain:
            result = acknowledge(plain, incident_id, actor, "api", now, resolve_timeout_s=settings.resolve_timeout_s)
        _audit(conn, token, now, "acknowledge", incident_id, {"result": result.value, "note": note})
    return _answer(conn, incident_id, result)


@router.post("/{incident_id}/resolve")
def resolve_incident(
    conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, incident_id: int, body: ResolveBody
) -> IncidentActionPublic:
    """Close an incident with its outcome (false alarm, visited and fine, sent to hospital, …)."""
    _check(conn, token, scope, incident_id, acknowledging=False)
    actor = token_actor(conn, token)
    with conn.transaction():
        with tuple_rows(conn) as plain:
            result = resolve(plain, incident_id, body.outcome, body.note, actor, now)
        _audit(conn, token, now, "resolve", incident_id, {"result": result.value, "outcome": body.outcome.value})
    return _answer(conn, incident_id, result)
