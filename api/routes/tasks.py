"""Visit tasks and repair work orders: the lists people work from, and closing them.

A grid worker sees visits, a technician repair orders, operators and admins both;
each only within the token's areas. Starting and closing a task is audited.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field

from alerts.acknowledge import Result
from alerts.care import close_task, start_task
from api.access import CAMERA_CARETAKERS, TASK_KINDS_OF_ROLE, may_see_task
from api.deps import (
    API_PREFIX,
    ConnDep,
    CurrentToken,
    Now,
    Page,
    Rfc3339,
    Scope,
    area_filter,
    not_found,
    token_actor,
    tuple_rows,
    write_audit,
)
from devices.kinds import TaskKind, TaskOutcome, TaskState
from shouhu.tokens import Role

router = APIRouter(prefix=f"{API_PREFIX}/tasks", tags=["tasks"])


class TaskPublic(BaseModel):
    id: int
    incident_id: int
    incident_code: str
    kind: TaskKind
    device_id: str | None
    """The device it is about; null for a visit to a person (a follow-up after an SOS, a recurring visit)."""
    resident_id: str | None
    area_id: str
    """The resident's grid or the camera's area."""
    owner_area_id: str
    """Whose it is now: one level up the area tree each time it was overdue."""
    level: int
    """How many times it was escalated for being overdue."""
    reason: str
    """Why it opened: the device's offline reason (no_heartbeat, last_will, reported:video_lost, …), not_worn,
    follow_up (after an SOS or a fall) or scheduled (the registry's monthly or weekly visit)."""
    state: TaskState
    opened_at: datetime
    problem_since: datetime
    due_at: datetime
    overdue: bool
    started_at: datetime | None
    started_by_name: str | None
    recovered_at: datetime | None
    """When the device came back (a repair order closes by itself once it stays back)."""
    flaps: int
    closed_at: datetime | None
    closed_by_name: str | None
    outcome: TaskOutcome | None
    note: str
    time_to_repair_s: int | None
    """From the device going silent to it coming back (or to the close, if it never did)."""


class TasksPublic(BaseModel):
    data: list[TaskPublic]
    count: int


class AreaRoundPublic(BaseModel):
    area_id: str
    area_name: str
    orders: list[TaskPublic]
    """Open repair orders of the area, oldest first."""


class RepairRoundsPublic(BaseModel):
    data: list[AreaRoundPublic]
    """Areas with open orders, the one with the oldest order first (this page's orders)."""
    count: int
    """Open repair orders in all, over every page."""


class CloseTaskBody(BaseModel):
    outcome: TaskOutcome = Field(
        description="A visit: resident_fine, band_charged, band_replaced, band_broken, resident_away, "
        "resident_in_hospital, other. A repair: repaired, replaced, power_restored, network_restored, other."
    )
    note: str = Field(default="", max_length=2000)


class TaskActionPublic(BaseModel):
    id: int
    state: TaskState
    result: Result


_SELECT = """
    SELECT t.id, t.incident_id, i.code AS incident_code, t.kind, t.device_id, t.resident_id, t.area_id,
           t.owner_area_id, t.level, t.reason, t.state, t.opened_at, t.problem_since, t.due_at,
           (t.state <> 'closed' AND t.due_at <= %(now)s) AS overdue, t.started_at, t.started_by_name,
           t.recovered_at, t.flaps, t.closed_at, t.closed_by_name, t.outcome, t.note,
           round(extract(epoch FROM coalesce(t.recovered_at, t.closed_at) - t.problem_since))::int
               AS time_to_repair_s
    FROM care_tasks t JOIN incidents i ON i.id = t.incident_id
"""
_WHERE = """
    WHERE t.kind = ANY(%(kinds)s)
      AND (%(scope)s::text[] IS NULL OR t.area_id = ANY(%(scope)s))
      AND (%(within)s::text[] IS NULL OR t.area_id = ANY(%(within)s))
      AND (%(state)s::text IS NULL OR t.state = %(state)s)
      AND (NOT %(open_only)s OR t.state <> 'closed')
      AND (NOT %(overdue)s OR (t.state <> 'closed' AND t.due_at <= %(now)s))
      AND (%(since)s::timestamptz IS NULL OR t.opened_at >= %(since)s)
      AND (%(until)s::timestamptz IS NULL OR t.opened_at < %(until)s)
"""


def _kinds(role: Role, kind: TaskKind | None) -> list[str]:
    allowed = TASK_KINDS_OF_ROLE[role]
    return sorted(k.value for k in allowed if kind is None or k is kind)


def _public(row: dict[str, Any]) -> TaskPublic:
    return TaskPublic(**{name: row[name] for name in TaskPublic.model_fields})


@router.get("")
def read_tasks(
    *,
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
    page: Page,
    now: Now,
    kind: Annotated[TaskKind | None, Query(description="visit or repair")] = None,
    state: Annotated[TaskState | None, Query()] = None,
    open_only: Annotated[bool, Query(alias="open", description="Only tasks not yet closed.")] = False,
    overdue: Annotated[bool, Query(description="Only open tasks past their due time.")] = False,
    area: Annotated[str | None, Query(description="An area id: it and everything below it.")] = None,
    since: Annotated[Rfc3339 | None, Query(description="Only tasks opened at or after this time.")] = None,
    until: Annotated[Rfc3339 | None, Query(description="Only tasks opened before this time.")] = None,
) -> TasksPublic:
    """Visits and repair orders within the token's areas, oldest first."""
    params = {
        "kinds": _kinds(token.role, kind),
        "scope": scope.as_param(),
        "within": area_filter(conn, scope, area),
        "state": state.value if state else None,
        "open_only": open_only,
        "overdue": overdue,
        "since": since,
        "until": until,
        "now": now,
        "limit": page.limit,
        "offset": page.offset,
    }
    rows = conn.execute(
        _SELECT + _WHERE + " ORDER BY t.opened_at, t.id LIMIT %(limit)s OFFSET %(offset)s", params
    ).fetchall()
    count = conn.execute("SELECT count(*) AS n FROM care_tasks t" + _WHERE, params).fetchone()
    return TasksPublic(data=[_public(r) for r in rows], count=count["n"] if count else 0)


@router.get("/repair-rounds")
def read_repair_rounds(
    *,
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
    page: Page,
    now: Now,
    area: Annotated[str | None, Query(description="An area id: it and everything below it.")] = None,
) -> RepairRoundsPublic:
    """Open repair orders grouped by area, oldest first: a technician's round (维修巡检)."""
    if token.role not in CAMERA_CARETAKERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot read repair orders")
    params = {
        "kinds": [TaskKind.REPAIR.value],
        "scope": scope.as_param(),
        "within": area_filter(conn, scope, area),
        "state": None,
        "open_only": True,
        "overdue": False,
        "since": None,
        "until": None,
        "now": now,
        "limit": page.limit,
        "offset": page.offset,
    }
    rows = conn.execute(
        _SELECT + _WHERE + " ORDER BY t.opened_at, t.id LIMIT %(limit)s OFFSET %(offset)s", params
    ).fetchall()
    count = conn.execute("SELECT count(*) AS n FROM care_tasks t" + _WHERE, params).fetchone()
    names = {r["id"]: r["name"] for r in conn.execute("SELECT id, name FROM areas").fetchall()}
    rounds: dict[str, AreaRoundPublic] = {}
    for row in rows:
        area_round = rounds.setdefault(
            row["area_id"], AreaRoundPublic(area_id=row["area_id"], area_name=names.get(row["area_id"], ""), orders=[])
        )
        area_round.orders.append(_public(row))
    return RepairRoundsPublic(data=list(rounds.values()), count=count["n"] if count else 0)


def _visible(conn: ConnDep, token: CurrentToken, scope: Scope, task_id: int, now: datetime) -> TaskPublic:
    row = conn.execute(_SELECT + " WHERE t.id = %(id)s", {"id": task_id, "now": now}).fetchone()
    if row is None or not may_see_task(token.role, scope, row["kind"], row["area_id"]):
        raise not_found("task", str(task_id))
    return _public(row)


@router.get("/{task_id}")
def read_task(conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, task_id: int) -> TaskPublic:
    """One visit or repair order."""
    return _visible(conn, token, scope, task_id, now)




def _answer(conn: ConnDep, task_id: int, result: Result) -> TaskActionPublic:
    row = conn.execute("SELECT state FROM care_tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    if result is Result.CLOSED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id} is already closed")
    return TaskActionPublic(id=task_id, state=TaskState(row["state"]), result=result)


@router.post("/{task_id}/start")
def start_care_task(conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, task_id: int) -> TaskActionPublic:
    """I am on my way: the device coming back no longer withdraws the visit."""
    _visible(conn, token, scope, task_id, now)
    actor = token_actor(conn, token)
    with conn.transaction():
        with tuple_rows(conn) as plain:
            result = start_task(plain, task_id, actor, now)
        write_audit(conn, token, now, "task_start", f"task:{task_id}", {"result": result.value})
    return _answer(conn, task_id, result)


@router.post("/{task_id}/close")
def close_care_task(
    conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, task_id: int, body: CloseTaskBody
) -> TaskActionPublic:
    """Close a visit or repair with what was found (逐一销号); its incident is resolved."""
    _visible(conn, token, scope, task_id, now)
    actor = token_actor(conn, token)
    with conn.transaction():
        with tuple_rows(conn) as plain:
            try:
                result = close_task(plain, task_id, body.outcome, body.note, actor, now)
            except ValueError as exc:
                raise HTTPException(422, f"body field 'outcome': {exc}") from exc
        detail = {"result": result.value, "outcome": body.outcome.value}
        write_audit(conn, token, now, "task_close", f"task:{task_id}", detail)
    return _answer(conn, task_id, result)
