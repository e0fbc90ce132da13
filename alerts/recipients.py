"""Who is paged: resolved when each step fires, from rosters in SHOUHU_TIMEZONE.

"On duty" is a roster shift covering the local time now. A grid with nobody on
duty falls back up the area tree (grid → community → township → county), so a
page always has somewhere to go when anyone in the chain is on duty.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from devices.kinds import EscalationTarget, StaffRole

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Recipient:
    kind: str  # "staff" or "guardian"
    id: str
    name: str
    phone: str
    role: str
    area_id: str | None = None


def shift_covers(weekdays: list[int], start: time, end: time, local: datetime) -> bool:
    """Whether a recurring shift covers the local moment ``local``.

    A shift with ``end <= start`` runs past midnight; its weekday is the day it starts.
    """
    now = local.time().replace(tzinfo=None)
    today = local.isoweekday()
    yesterday = (local - timedelta(days=1)).isoweekday()
    if start < end:
        return today in weekdays and start <= now < end
    return (today in weekdays and now >= start) or (yesterday in weekdays and now < end)


def _area_chain(conn: Conn, area_id: str) -> list[str]:
    rows = conn.execute(
        """
        WITH RECURSIVE up(id, parent_id, depth) AS (
            SELECT id, parent_id, 0 FROM areas WHERE id = %s
            UNION ALL
            SELECT a.id, a.parent_id, up.depth + 1 FROM areas a JOIN up ON a.id = up.parent_id
        )
        SELECT id FROM up ORDER BY depth
        """,
        (area_id,),
    ).fetchall()
    return [r[0] for r in rows]


def on_duty(conn: Conn, area_id: str, at: datetime, zone: ZoneInfo, roles: set[str] | None = None) -> list[Recipient]:
    """Active staff with an active shift on ``area_id`` covering ``at``."""
    local = at.astimezone(zone)
    rows = conn.execute(
        """
        SELECT s.id, s.name, s.phone, s.role, d.weekdays, d.start_time, d.end_time
        FROM duty_shifts d JOIN staff s ON s.id = d.staff_id
        WHERE d.area_id = %s AND d.active AND s.active
        ORDER BY s.id
        """,
        (area_id,),
    ).fetchall()
    found: dict[str, Recipient] = {}
    for staff_id, name, phone, role, weekdays, start, end in rows:
        if roles is not None and role not in roles:
            continue
        if shift_covers(list(weekdays), start, end, local):
            found.setdefault(staff_id, Recipient("staff", staff_id, name, phone, role, area_id))
    return list(found.values())


def duty_chain(conn: Conn, grid_id: str, at: datetime, zone: ZoneInfo) -> list[Recipient]:
    """The grid workers on duty for the grid; nobody → the nearest area above with anyone on duty."""
    chain = _area_chain(conn, grid_id)
    for depth, area_id in enumerate(chain):
        roles = {StaffRole.GRID_WORKER.value} if depth == 0 else None
        people = on_duty(conn, area_id, at, zone, roles)
        if people:
            return people
    return []


def guardians(conn: Conn, resident_id: str) -> list[Recipient]:
    rows = conn.execute(
        "SELECT id, name, phone FROM guardians WHERE resident_id = %s AND active ORDER BY priority, id",
        (resident_id,),
    ).fetchall()
    return [Recipient("guardian", gid, name, phone, "guardian") for gid, name, phone in rows]


def operators(conn: Conn, at: datetime, zone: ZoneInfo) -> list[Recipient]:
    """County operators on duty; when the roster shows none, every active operator.

    Operators are the last human line: paging all beats paging nobody.
    """
    rows = conn.execute(
        """
        SELECT DISTINCT sa.area_id FROM staff s JOIN staff_areas sa ON sa.staff_id = s.id
        WHERE s.role = 'operator' AND s.active ORDER BY 1
        """
    ).fetchall()
    people: dict[str, Recipient] = {}
    for (area_id,) in rows:
        for person in on_duty(conn, area_id, at, zone, {StaffRole.OPERATOR.value}):
            people.setdefault(person.id, person)
    if people:
        return list(people.values())
    everyone = conn.execute(
        "SELECT id, name, phone FROM staff WHERE role = 'operator' AND active ORDER BY id"
    ).fetchall()
    return [Recipient("staff", sid, name, phone, "operator") for sid, name, phone in everyone]


def resolve(
    conn: Conn,
    target: EscalationTarget,
    *,
    resident_id: str | None,
    area_id: str | None,
    at: datetime,
    zone: ZoneInfo,
) -> list[Recipient]:
    """The people a step's target means now. Empty when nobody is reachable."""
    if target is EscalationTarget.GRID_WORKER:
        return duty_chain(conn, area_id, at, zone) if area_id else []
    if target is EscalationTarget.GUARDIANS:
        return guardians(conn, resident_id) if resident_id else []
    if target is EscalationTarget.OPERATORS:
        return operators(conn, at, zone)
    if target is EscalationTarget.TECHNICIANS:
        return on_duty(conn, area_id, at, zone, {StaffRole.TECHNICIAN.value}) if area_id else []
    return []
