"""Residents (the elders): personal data under PIPL, shown by role and audited on every read."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from api import access
from api.deps import API_PREFIX, ConnDep, CurrentToken, Now, Scope, not_found
from api.routes.devices import DEVICE_ROWS, DevicePublic, device_public

router = APIRouter(prefix=f"{API_PREFIX}/residents", tags=["residents"])


class GuardianPublic(BaseModel):
    id: str
    name: str
    relation: str
    priority: int
    phone: str


class ResidentPublic(BaseModel):
    id: str
    name: str
    grid_id: str
    address: str
    lives_alone: bool
    phone: str | None
    active: bool
    medical_notes: str | None = None
    """Present only for roles that may read health data."""
    lat: float | None = None
    """Present only for roles that may read location."""
    lon: float | None = None
    """Present only for roles that may read location."""
    guardians: list[GuardianPublic]
    """Active guardians, in the order they are called."""
    devices: list[DevicePublic]
    """Active devices worn by the resident."""


@router.get("/{resident_id}", response_model_exclude_unset=True)
def read_resident(
    conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, resident_id: str
) -> ResidentPublic:
    """Read one resident with guardians and devices; the read is audited."""
    # Read through the module so the role sets stay the single source of truth.
    if token.role not in access.RESIDENT_READERS:
        raise not_found("resident", resident_id)
    sensitive = token.role in access.SENSITIVE_READERS
    # The read and its audit row commit together, or neither does.
    with conn.transaction():
        row = conn.execute(
            """
            SELECT id, name, grid_id, address, lives_alone, phone, active,
                   medical_notes, lat, lon
            FROM residents WHERE id = %s
            """,
            (resident_id,),
        ).fetchone()
        if row is None or not scope.allows(row["grid_id"]):
            raise not_found("resident", resident_id)
        guardians = conn.execute(
            """
            SELECT id, name, relation, priority, phone FROM guardians
            WHERE resident_id = %s AND active
            ORDER BY priority, id
            """,
            (resident_id,),
        ).fetchall()
        devices = conn.execute(
            DEVICE_ROWS + " WHERE d.resident_id = %s AND d.active ORDER BY d.id",
            (resident_id,),
        ).fetchall()
        conn.execute(
            """
            INSERT INTO audit_log (at, token_id, role, action, subject, detail, actor, actor_name)
            VALUES (%s, %s, %s, 'read_resident', %s, %s, %s, %s)
            """,
            (
                now, token.id, token.role.value, resident_id, Jsonb({"sensitive": sensitive}),
                token.owner.key, token.owner.name,
            ),
        )
    # Sensitive fields are set only for roles that may read them; the route drops
    # unset fields, so for other roles they are absent rather than null.
    sensitive_fields: dict[str, Any] = (
        {"medical_notes": row["medical_notes"], "lat": row["lat"], "lon": row["lon"]}
        if sensitive
        else {}
    )
    return ResidentPublic(
        id=row["id"],
        name=row["name"],
        grid_id=row["grid_id"],
        address=row["address"],
        lives_alone=row["lives_alone"],
        phone=row["phone"],
        active=row["active"],
        guardians=[GuardianPublic(**g) for g in guardians],
        devices=[device_public(d) for d in devices],
        **sensitive_fields,
    )
