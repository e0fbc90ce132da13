"""Maintenance windows: a camera under repair, a resident in hospital.

A window silences non-SOS incidents for a device, or for every device in an area and
below, and is left out of camera uptime. It never touches an SOS or a fall. A
technician may set windows on cameras, a grid worker on wristbands (a resident in
hospital), operators and admins on anything, areas included — all within their
areas. A window starts now or later, never in the past.
Ending a window early keeps what already passed, so uptime stays true.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field, model_validator

from api.access import AREA_SETTERS, MAINTAINED_KINDS_OF_ROLE
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
    write_audit,
)
from devices.kinds import DeviceKind

router = APIRouter(prefix=f"{API_PREFIX}/maintenance", tags=["maintenance"])

# How far back a window may start: clock skew, not rewriting history (uptime excludes it).
BACKDATE_ALLOWANCE = timedelta(minutes=5)


class MaintenanceCreate(BaseModel):
    device_id: str | None = Field(default=None, description="One device; or give area_id instead.")
    area_id: str | None = Field(default=None, description="Every device in this area and below.")
    starts_at: Rfc3339 | None = Field(default=None, description="Default: now.")
    ends_at: Rfc3339
    reason: str = Field(min_length=1, max_length=500, examples=["摄像头更换中", "老人住院"])

    @model_validator(mode="after")
    def _one_target(self) -> MaintenanceCreate:
        if (self.device_id is None) == (self.area_id is None):
            raise ValueError("give exactly one of device_id and area_id")
        return self


class MaintenancePublic(BaseModel):
    id: int
    device_id: str | None
    area_id: str | None
    starts_at: datetime
    ends_at: datetime
    reason: str
    created_by: str
    created_at: datetime
    cancelled_at: datetime | None
    active: bool


class MaintenanceListPublic(BaseModel):
    data: list[MaintenancePublic]
    count: int


_SELECT = """
    SELECT m.id, m.device_id, m.area_id, m.starts_at, m.ends_at, m.reason, m.created_by, m.created_at,
           m.cancelled_at, (m.cancelled_at IS NULL AND m.starts_at <= %(now)s AND m.ends_at > %(now)s) AS active,
           coalesce(m.area_id, d.area_id, r.grid_id) AS scope_area, d.kind AS device_kind
    FROM maintenance_windows m
    LEFT JOIN devices d ON d.id = m.device_id
    LEFT JOIN residents r ON r.id = d.resident_id
"""


def _public(row: dict[str, Any]) -> MaintenancePublic:
    return MaintenancePublic(**{name: row[name] for name in MaintenancePublic.model_fields})


def _device_scope(conn: ConnDep, device_id: str) -> tuple[str | None, DeviceKind] | None:
    row = conn.execute(
        "SELECT coalesce(d.area_id, r.grid_id) AS area, d.kind FROM devices d"
        " LEFT JOIN residents r ON r.id = d.resident_id WHERE d.id = %s",
        (device_id,),
    ).fetchone()
    return (row["area"], DeviceKind(row["kind"])) if row else None


@router.post("", status_code=status.HTTP_201_CREATED)
def create_maintenance(
    conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, body: MaintenanceCreate
) -> MaintenancePublic:
    """Silence non-SOS incidents for a device or an area until ``ends_at`` (an SOS is never silenced)."""
    kinds = MAINTAINED_KINDS_OF_ROLE[token.role]
    if body.device_id is not None:
        found = _device_scope(conn, body.device_id)
        if found is None or not scope.allows(found[0]) or found[1] not in kinds:
            raise not_found("device", body.device_id)
    else:
        assert body.area_id is not None
        area_filter(conn, scope, body.area_id)  # 404 outside the token's areas
        if token.role not in AREA_SETTERS:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot silence a whole area")
    starts_at = body.starts_at or now
    if starts_at < now - BACKDATE_ALLOWANCE:
        raise HTTPException(
            422, "body field 'starts_at': a window cannot start in the past (it would erase downtime from uptime)"
        )
    if body.ends_at <= starts_at:
        raise HTTPException(422, "body field 'ends_at': must be after starts_at")
    with conn.transaction():
        row = conn.execute(
            """
            INSERT INTO maintenance_windows (device_id, area_id, starts_at, ends_at, reason, created_by, created_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id
            """,
            (body.device_id, body.area_id, starts_at, body.ends_at, body.reason, token.owner.key, now),
        ).fetchone()
        assert row is not None
        write_audit(
            conn,
            token,
            now,
            "maintenance_create",
            f"maintenance:{row['id']}",
            {"device_id": body.device_id, "area_id": body.area_id, "reason": body.reason},
        )
    created = conn.execute(_SELECT + " WHERE m.id = %(id)s", {"id": row["id"], "now": now}).fetchone()
    assert created is not None
    return _public(created)


@router.get("")
def read_maintenance(
    *,
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
    page: Page,
    now: Now,
    area: Annotated[str | None, Query(description="An area id: it and everything below it.")] = None,
    active: Annotated[bool, Query(description="Only windows in force now.")] = False,
) -> MaintenanceListPublic:
    """Maintenance windows within the token's areas, newest first."""
    params = {
        "now": now,
        "scope": scope.as_param(),
        "within": area_filter(conn, scope, area),
        "active": active,
        "kinds": sorted(k.value for k in MAINTAINED_KINDS_OF_ROLE[token.role]),
        "limit": page.limit,
        "offset": page.offset,
    }
    where = """
        WHERE (%(scope)s::text[] IS NULL OR coalesce(m.area_id, d.area_id, r.grid_id) = ANY(%(scope)s))
          AND (%(within)s::text[] IS NULL OR coalesce(m.area_id, d.area_id, r.grid_id) = ANY(%(within)s))
          AND (m.device_id IS NULL OR d.kind = ANY(%(kinds)s))
          AND (NOT %(active)s OR (m.cancelled_at IS NULL AND m.starts_at <= %(now)s AND m.ends_at > %(now)s))
    """
    rows = conn.execute(
        _SELECT + where + " ORDER BY m.starts_at DESC, m.id DESC LIMIT %(limit)s OFFSET %(offset)s", params
    ).fetchall()
    count = conn.execute(
        "SELECT count(*) AS n FROM maintenance_windows m LEFT JOIN devices d ON d.id = m.device_id"
        " LEFT JOIN residents r ON r.id = d.resident_id" + where,
        params,
    ).fetchone()
    return MaintenanceListPublic(data=[_public(r) for r in rows], count=count["n"] if count else 0)


@router.post("/{window_id}/end")
def end_maintenance(conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, window_id: int) -> MaintenancePublic:
    """End a window now: one not yet begun is cancelled; one running ends here, its past kept."""
    row = conn.execute(_SELECT + " WHERE m.id = %(id)s", {"id": window_id, "now": now}).fetchone()
    kind_ok = row is not None and (
        row["device_kind"] is None or DeviceKind(row["device_kind"]) in MAINTAINED_KINDS_OF_ROLE[token.role]
    )
    if row is None or not kind_ok or not scope.allows(row["scope_area"]):
        raise not_found("maintenance window", str(window_id))
    if row["device_id"] is None and token.role not in AREA_SETTERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot end an area's window")
    if row["cancelled_at"] is not None or row["ends_at"] <= now:
        raise HTTPException(status.HTTP_409_CONFLICT, f"maintenance window {window_id} is already over")
    with conn.transaction():
        if row["starts_at"] >= now:
            conn.execute("UPDATE maintenance_windows SET cancelled_at = %s WHERE id = %s", (now, window_id))
        else:
            conn.execute("UPDATE maintenance_windows SET ends_at = %s WHERE id = %s", (now, window_id))
        write_audit(conn, token, now, "maintenance_end", f"maintenance:{window_id}", {})
    ended = conn.execute(_SELECT + " WHERE m.id = %(id)s", {"id": window_id, "now": now}).fetchone()
    assert ended is not None
    return _public(ended)
