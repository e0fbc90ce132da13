"""Small SQL builders: insert registry rows with sensible defaults, one call per row.

They run on any psycopg connection and leave committing to the caller (tests use
autocommit connections).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from devices.kinds import AreaLevel, DeviceKind
from shouhu.db import Conn


def add_area(
    conn: Conn,
    area_id: str,
    *,
    level: AreaLevel,
    parent: str | None = None,
    name: str | None = None,
    active: bool = True,
) -> str:
    conn.execute(
        "INSERT INTO areas (id, parent_id, level, name, active) VALUES (%s, %s, %s, %s, %s)",
        (area_id, parent, level.value, name or f"Area {area_id}", active),
    )
    return area_id


def add_resident(
    conn: Conn,
    resident_id: str,
    *,
    grid: str,
    name: str | None = None,
    address: str = "1 Test Lane",
    lives_alone: bool = True,
    phone: str | None = None,
    medical_notes: str = "",
    lat: float | None = None,
    lon: float | None = None,
    active: bool = True,
) -> str:
    conn.execute(
        """
        INSERT INTO residents (id, name, grid_id, address, lives_alone, phone,
                               medical_notes, lat, lon, active)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            resident_id, name or f"Resident {resident_id}", grid, address, lives_alone,
            phone, medical_notes, lat, lon, active,
        ),
    )
    return resident_id


def add_guardian(
    conn: Conn,
    guardian_id: str,
    *,
    resident: str,
    name: str | None = None,
    phone: str = "+12025550100",
    relation: str = "",
    priority: int = 1,
    active: bool = True,
) -> str:
    conn.execute(
        """
        INSERT INTO guardians (id, resident_id, name, phone, relation, priority, active)
        VALUES (%s, %s, %s, %s, %s, %s, %s)
        """,
        (guardian_id, resident, name or f"Guardian {guardian_id}", phone, relation, priority,
         active),
    )
    return guardian_id


def add_device(
    conn: Conn,
    device_id: str,
    *,
    kind: DeviceKind,
    resident: str | None = None,
    area: str | None = None,
    model: str = "",
    active: bool = True,
) -> str:
    conn.execute(
        """
        INSERT INTO devices (id, kind, resident_id, area_id, model, active)
        VALUES (%s, %s, %s, %s, %s, %s)
        """,
        (device_id, kind.value, resident, area, model, active),
    )
    return device_id


def set_device_state(
    conn: Conn,
    device_id: str,
    *,
    online: bool | None,
    last_seen: datetime | None,
    battery: int | None = None,
    worn: bool | None = None,
    offline_reason: str | None = None,
) -> None:
    conn.execute(
        """
        INSERT INTO device_state (device_id, online, last_seen, battery, worn, offline_reason)
        VALUES (%s, %s, %s, %s, %s, %s)
        ON CONFLICT (device_id) DO UPDATE SET
            online = EXCLUDED.online, last_seen = EXCLUDED.last_seen,
            battery = EXCLUDED.battery, worn = EXCLUDED.worn,
            offline_reason = EXCLUDED.offline_reason, updated_at = now()
        """,
        (device_id, online, last_seen, battery, worn, offline_reason),
    )


@dataclass(frozen=True, slots=True)
class SmallCounty:
    """County C → township T → community M → grids A and B (A has micro-grid A1)."""

    county: str = "C"
    township: str = "T"
    community: str = "M"
    grid_a: str = "A"
    grid_b: str = "B"
    micro_a: str = "A1"


def add_small_county(conn: Conn) -> SmallCounty:
    """The smallest tree that exercises scoping: two sibling grids, one with a child."""
    tree = SmallCounty()
    add_area(conn, tree.county, level=AreaLevel.COUNTY)
    add_area(conn, tree.township, level=AreaLevel.TOWNSHIP, parent=tree.county)
    add_area(conn, tree.community, level=AreaLevel.COMMUNITY, parent=tree.township)
    add_area(conn, tree.grid_a, level=AreaLevel.GRID, parent=tree.community)
    add_area(conn, tree.grid_b, level=AreaLevel.GRID, parent=tree.community)
    add_area(conn, tree.micro_a, level=AreaLevel.MICRO_GRID, parent=tree.grid_a)
    return tree


def add_incident(
    conn: Conn,
    code: str,
    *,
    kind: str = "sos",
    severity: str = "red",
    state: str = "resolved",
    area: str | None = None,
    resident: str | None = None,
    device: str | None = None,
    opened_at: datetime,
    acknowledged_at: datetime | None = None,
    acknowledged_by_name: str | None = None,
    resolved_at: datetime | None = None,
    outcome: str | None = None,
    lat: float | None = None,
    lon: float | None = None,
) -> int:
    """An incident row as the hub and router leave it (no timeline, no actions); returns its id."""
    row = conn.execute(
        """
        INSERT INTO incidents (code, kind, severity, state, area_id, resident_id, device_id, opened_at,
                               acknowledged_at, acknowledged_by_name, resolved_at, outcome, lat, lon)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
        """,
        (code, kind, severity, state, area, resident, device, opened_at, acknowledged_at, acknowledged_by_name,
         resolved_at, outcome, lat, lon),
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_task(
    conn: Conn,
    incident_id: int,
    *,
    kind: str,
    area: str,
    opened_at: datetime,
    due_at: datetime,
    device: str | None = None,
    resident: str | None = None,
    reason: str = "no_heartbeat",
    closed_at: datetime | None = None,
    outcome: str | None = None,
    deadline: datetime | None = None,
    period: str | None = None,
) -> int:
    """A visit or repair order on ``incident_id``, closed when ``closed_at`` is given; returns its id."""
    row = conn.execute(
        """
        INSERT INTO care_tasks (incident_id, kind, device_id, resident_id, area_id, owner_area_id, reason, state,
                                opened_at, problem_since, due_at, closed_at, closed_by_name, outcome, deadline, period)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
        """,
        (incident_id, kind, device, resident, area, area, reason, "closed" if closed_at else "open", opened_at,
         opened_at, due_at, closed_at, "董思远（网格员）" if closed_at else None, outcome, deadline, period),
    ).fetchone()
    assert row is not None
    return int(row[0])
