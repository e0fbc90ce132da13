"""Wristbands and cameras with their latest known state, scoped to the token's areas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.access import may_see_device, visible_device_kinds
from api.deps import (
    API_PREFIX,
    ConnDep,
    CurrentToken,
    Page,
    Scope,
    area_filter,
    not_found,
)
from devices.kinds import DeviceKind
from hub.liveness import Liveness

router = APIRouter(prefix=f"{API_PREFIX}/devices", tags=["devices"])


class DeviceStatePublic(BaseModel):
    online: bool | None
    last_seen: datetime | None
    battery: int | None
    worn: bool | None
    offline_reason: str | None


class DevicePublic(BaseModel):
    id: str
    kind: DeviceKind
    model: str
    active: bool
    resident_id: str | None
    """Wristbands: who wears it."""
    grid_id: str | None
    """Wristbands: the wearer's grid."""
    area_id: str | None
    """Cameras: where it is mounted."""
    state: DeviceStatePublic | None
    """The latest known state; null when the device has never been heard from."""


class DevicesPublic(BaseModel):
    data: list[DevicePublic]
    count: int


# One row per device with the area that scopes it: a wristband belongs to its
# wearer's grid, a camera to the area it is mounted in. Device location is left
# out: a wristband's position is its wearer's, sensitive under PIPL.
DEVICE_ROWS = """
    SELECT d.id, d.kind, d.model, d.active, d.resident_id, r.grid_id, d.area_id,
           CASE WHEN d.kind = 'wristband' THEN r.grid_id ELSE d.area_id END AS scope_area,
           s.device_id IS NOT NULL AS seen,
           s.online, s.last_seen, s.battery, s.worn, s.offline_reason
    FROM devices d
    LEFT JOIN residents r ON r.id = d.resident_id
    LEFT JOIN device_state s ON s.device_id = d.id
"""

_WHERE = """
    WHERE v.kind = ANY(%(kinds)s)
      AND (%(scope)s::text[] IS NULL OR v.scope_area = ANY(%(scope)s))
      AND (%(within)s::text[] IS NULL OR v.scope_area = ANY(%(within)s))
      AND (%(include_inactive)s OR v.active)
      AND (%(liveness)s::text IS NULL
           OR (%(liveness)s = 'online' AND v.online)
           OR (%(liveness)s = 'offline' AND NOT v.online)
           OR (%(liveness)s = 'unknown' AND v.online IS NULL))
"""


def device_public(row: dict[str, Any]) -> DevicePublic:
    """The public shape of a ``DEVICE_ROWS`` row."""
    kind = DeviceKind(row["kind"])
    state = (
        DeviceStatePublic(
            online=row["online"],
            last_seen=row["last_seen"],
            battery=row["battery"],
            worn=row["worn"],
            offline_reason=row["offline_reason"],
        )
        if row["seen"]
        else None
    )
    wristband = kind is DeviceKind.WRISTBAND
    # Every field is set explicitly: the residents route drops unset fields.
    return DevicePublic(
        id=row["id"],
        kind=kind,
        model=row["model"],
        active=row["active"],
        resident_id=row["resident_id"] if wristband else None,
        grid_id=row["grid_id"] if wristband else None,
        area_id=None if wristband else row["area_id"],
        state=state,
    )


@router.get("")
def read_devices(
    *,
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
    page: Page,
    kind: Annotated[DeviceKind | None, Query(description="Only this kind of device.")] = None,
    area: Annotated[
        str | None, Query(description="Only devices in this area and its descendants.")
    ] = None,
    include_inactive: Annotated[
        bool, Query(description="Also list deactivated devices.")
    ] = False,
    liveness: Annotated[
        Liveness | None, Query(description="online, offline, or unknown (never heard from, or nothing known).")
    ] = None,
) -> DevicesPublic:
    """List the devices the token may see, with their latest state."""
    kinds = visible_device_kinds(token.role)
    if kind is not None:
        kinds = kinds & {kind}
    within = area_filter(conn, scope, area)
    params = {
        "kinds": sorted(k.value for k in kinds),
        "scope": scope.as_param(),
        "within": within,
        "include_inactive": include_inactive,
        "liveness": liveness.value if liveness else None,
        "limit": page.limit,
        "offset": page.offset,
    }
    subquery = "(" + DEVICE_ROWS + ") AS v"
    with conn.transaction():
        count_row = conn.execute(
            "SELECT count(*) AS n FROM " + subquery + _WHERE, params
        ).fetchone()
        rows = conn.execute(
            "SELECT v.* FROM "
            + subquery
            + _WHERE
            + " ORDER BY v.id LIMIT %(limit)s OFFSET %(offset)s",
            params,
        ).fetchall()
    assert count_row is not None
    return DevicesPublic(data=[device_public(row) for row in rows], count=count_row["n"])


@router.get("/{device_id}")
def read_device(conn: ConnDep, token: CurrentToken, scope: Scope, device_id: str) -> DevicePublic:
    """Read one device and its latest state."""
    row = conn.execute(DEVICE_ROWS + " WHERE d.id = %s", (device_id,)).fetchone()
    if row is None or not may_see_device(token.role, scope, row["kind"], row["scope_area"]):
        raise not_found("device", device_id)
    return device_public(row)
