"""Loading the registry into the database: one transaction, upsert, deactivate the missing.

An entry missing from the file is deactivated, never deleted, so the incidents,
attempts and audit rows that name it stay whole; incidents themselves are never
touched. Loading the same file twice changes nothing (not even ``updated_at``).

A person (resident, guardian, staff member) deactivated for ``SHOUHU_REGISTRY_DAYS``
is anonymised by the hubs' retention pass (:func:`anonymise_removed`): the id, the
area and the links stay, the rest is cleared. A later load that lists them again
fills everything in again, as for anyone else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from devices.kinds import AreaLevel, StaffRole
from devices.registry_file import RegistryFile, RosterEntry

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class TableChange:
    upserted: int
    deactivated: int


@dataclass(frozen=True, slots=True)
class CoverageGap:
    """A grid with hours no grid worker is on duty; ``uncovered_after_fallback``
    counts the hours nobody up the area tree is on duty either."""

    grid_id: str
    uncovered_hours_per_week: float
    uncovered_after_fallback: float


@dataclass(frozen=True, slots=True)
class LoadReport:
    changes: dict[str, TableChange]
    residents_without_guardian: tuple[str, ...]
    coverage_gaps: tuple[CoverageGap, ...]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(c.upserted or c.deactivated for c in self.changes.values())


def _upsert(conn: psycopg.Connection, table: str, keys: Sequence[str], rows: list[Row], *, active: bool = True) -> int:
    """Insert or update ``rows``, reactivating them (``active``: the table has that flag);
    unchanged rows are left alone."""
    if not rows:
        return 0
    columns = list(rows[0])
    updated = [c for c in columns if c not in keys]
    flag = sql.SQL(", active") if active else sql.SQL("")
    true = sql.SQL(", true") if active else sql.SQL("")
    statement = sql.SQL(
        "INSERT INTO {table} ({cols}{flag}) VALUES ({vals}{true}) "
        "ON CONFLICT ({keys}) DO UPDATE SET {sets}{reactivate}, updated_at = now() "
        "WHERE ({old}{old_flag}) IS DISTINCT FROM ({new}{true})"
    ).format(
        table=sql.Identifier(table),
        cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
        flag=flag,
        vals=sql.SQL(", ").join(sql.Placeholder(c) for c in columns),
        true=true,
        keys=sql.SQL(", ").join(map(sql.Identifier, keys)),
        sets=sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in updated),
        reactivate=sql.SQL(", active = true") if active else sql.SQL(""),
        old=sql.SQL(", ").join(
            sql.SQL("{t}.{c}").format(t=sql.Identifier(table), c=sql.Identifier(c)) for c in updated
        ),
        old_flag=sql.SQL(", {t}.active").format(t=sql.Identifier(table)) if active else sql.SQL(""),
        new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in updated),
    )
    with conn.cursor() as cur:
        cur.executemany(statement, rows)
        return max(cur.rowcount, 0)


def _deactivate(conn: psycopg.Connection, table: str, keep: list[str]) -> int:
    cur = conn.execute(
        sql.SQL("UPDATE {} SET active = false, updated_at = now() WHERE active AND NOT (id = ANY(%s))").format(
            sql.Identifier(table)
        ),
        (keep,),
    )
    return max(cur.rowcount, 0)


def _sync(conn: psycopg.Connection, table: str, rows: list[Row]) -> TableChange:
    upserted = _upsert(conn, table, ["id"], rows)
    return TableChange(upserted, _deactivate(conn, table, [r["id"] for r in rows]))


def _weekdays(roster: RosterEntry) -> list[int]:
    return sorted({d.iso for d in roster.days})


def _sync_staff_areas(conn: psycopg.Connection, registry: RegistryFile) -> TableChange:
    wanted = {(s.id, a) for s in registry.staff for a in s.areas}
    have = {(s, a) for s, a in conn.execute("SELECT staff_id, area_id FROM staff_areas").fetchall()}
    with conn.cursor() as cur:
        cur.executemany("DELETE FROM staff_areas WHERE staff_id = %s AND area_id = %s", sorted(have - wanted))
        cur.executemany("INSERT INTO staff_areas (staff_id, area_id) VALUES (%s, %s)", sorted(wanted - have))
    return TableChange(len(wanted - have), len(have - wanted))


def _sync_rosters(conn: psycopg.Connection, registry: RegistryFile) -> TableChange:
    rows = [(r.staff, r.area, _weekdays(r), r.start, r.end) for r in registry.rosters]
    upserted = 0
    ids: list[int] = []
    for row in rows:
        cur = conn.execute(
            """
            INSERT INTO duty_shifts (staff_id, area_id, weekdays, start_time, end_time)
            VALUES (%s, %s, %s::smallint[], %s, %s)
            ON CONFLICT (staff_id, area_id, weekdays, start_time, end_time)
            DO UPDATE SET active = true WHERE NOT duty_shifts.active
            RETURNING id
            """,
            row,
        )
        found = cur.fetchone()
        if found is None:
            existing = conn.execute(
                "SELECT id FROM duty_shifts WHERE staff_id = %s AND area_id = %s"
                " AND weekdays = %s::smallint[] AND start_time = %s AND end_time = %s",
                row,
            ).fetchone()
            assert existing is not None
            ids.append(existing[0])
        else:
            upserted += 1
            ids.append(found[0])
    cur = conn.execute("UPDATE duty_shifts SET active = false WHERE active AND NOT (id = ANY(%s))", (ids,))
    return TableChange(upserted, max(cur.rowcount, 0))


def load_registry(conn: psycopg.Connection, registry: RegistryFile) -> LoadReport:
    """Upsert ``registry`` and deactivate what it no longer lists, in one transaction."""
    depth = {a.id: a.level.depth for a in registry.areas}
    changes: dict[str, TableChange] = {}
    with conn.transaction():
        # Serialise concurrent loads; the second waits and then finds nothing to do.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('shouhu.registry'))")
        changes["areas"] = _sync(
            conn,
            "areas",
            [
                {"id": a.id, "parent_id": a.parent, "level": a.level.value, "name": a.name}
                for a in sorted(registry.areas, key=lambda a: depth[a.id])
            ],
        )
        changes["residents"] = _sync(
            conn,
            "residents",
            [
                {
                    "id": r.id,
                    "name": r.name,
                    "grid_id": r.grid,
                    "address": r.address,
                    "lives_alone": r.lives_alone,
                    "phone": r.phone,
                    "medical_notes": r.medical_notes,
                    "lat": r.lat,
                    "lon": r.lon,
                    "visit_frequency": r.visits.value if r.visits else None,
                    "anonymised_at": None,
                }
                for r in registry.residents
            ],
        )
        changes["guardians"] = _sync(
            conn,
            "guardians",
            [
                {
                    "id": g.id,
                    "resident_id": r.id,
                    "name": g.name,
                    "phone": g.phone,
                    "relation": g.relation,
                    "priority": g.priority,
                    "anonymised_at": None,
                }
                for r in registry.residents
                for g in r.guardians
            ],
        )
        changes["staff"] = _sync(
            conn,
            "staff",
            [
                {"id": s.id, "name": s.name, "role": s.role.value, "phone": s.phone, "anonymised_at": None}
                for s in registry.staff
            ],
        )
        changes["staff_areas"] = _sync_staff_areas(conn, registry)
        changes["duty_shifts"] = _sync_rosters(conn, registry)
        changes["devices"] = _sync(
            conn,
            "devices",
            [
                {
                    "id": d.id,
                    "kind": d.kind.value,
                    "resident_id": d.resident,
                    "area_id": d.area,
                    "model": d.model,
                    "heartbeat_interval_s": d.heartbeat_interval_s,
                    "heartbeat_misses": d.heartbeat_misses,
                }
                for d in registry.devices
            ],
        )
        changes["escalation_policies"] = _sync(
            conn,
            "escalation_policies",
            [
                {
                    "id": p.id,
                    "kind": p.kind.value,
                    "area_id": p.area,
                    "steps": json.dumps([s.model_dump(mode="json") for s in p.steps]),
                }
                for p in registry.policies
            ],
        )
        changes["heartbeat_policies"] = _sync_heartbeats(conn, registry)
        changes["quiet_hours"] = _sync_quiet_hours(conn, registry)
        changes["area_phone_providers"] = _sync_phone_providers(conn, registry)
        return LoadReport(
            changes=changes,
            residents_without_guardian=residents_without_guardian(conn),
            coverage_gaps=coverage_gaps(conn),
            counts=_counts(conn),
        )


# An open incident or task still needs the person: an open incident of the resident (a
# guardian's resident), one a staff member or guardian took, a task of the resident or
# one a staff member started. Open: as alerts/states.py's OPEN (open, acknowledged,
# unreached), the partial indexes of migration 22.
_OPEN = "('open', 'acknowledged', 'unreached')"
_ANONYMISE = {
    "residents": f"""
        UPDATE residents SET name = '', address = '', phone = NULL, medical_notes = '', lat = NULL, lon = NULL,
            anonymised_at = %(now)s
        WHERE id = ANY(ARRAY(
            SELECT r.id FROM residents r
            WHERE NOT r.active AND r.anonymised_at IS NULL AND r.updated_at < %(cutoff)s
              AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.resident_id = r.id AND i.state IN {_OPEN})
              AND NOT EXISTS (SELECT 1 FROM care_tasks t WHERE t.resident_id = r.id AND t.state <> 'closed')
            ORDER BY r.updated_at LIMIT %(limit)s
        ))
    """,
    "guardians": f"""
        UPDATE guardians SET name = '', phone = '', relation = '', anonymised_at = %(now)s
        WHERE id = ANY(ARRAY(
            SELECT g.id FROM guardians g
            WHERE NOT g.active AND g.anonymised_at IS NULL AND g.updated_at < %(cutoff)s
              AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.resident_id = g.resident_id AND i.state IN {_OPEN})
              AND NOT EXISTS (SELECT 1 FROM incidents i
                              WHERE i.acknowledged_by = 'guardian:' || g.id AND i.state IN {_OPEN})
            ORDER BY g.updated_at LIMIT %(limit)s
        ))
    """,
    "staff": f"""
        UPDATE staff SET name = '', phone = '', anonymised_at = %(now)s
        WHERE id = ANY(ARRAY(
            SELECT s.id FROM staff s
            WHERE NOT s.active AND s.anonymised_at IS NULL AND s.updated_at < %(cutoff)s
              AND NOT EXISTS (SELECT 1 FROM incidents i
                              WHERE i.acknowledged_by = 'staff:' || s.id AND i.state IN {_OPEN})
              AND NOT EXISTS (SELECT 1 FROM care_tasks t
                              WHERE t.started_by = 'staff:' || s.id AND t.state <> 'closed')
            ORDER BY s.updated_at LIMIT %(limit)s
        ))
    """,
}


def anonymise_removed(conn: psycopg.Connection[Any], cutoff: datetime, now: datetime, limit: int) -> int:
    """Anonymise at most ``limit`` residents, guardians and staff each, deactivated before ``cutoff``.

    Name, phone, address, medical notes, home position and a guardian's relation are
    cleared; the id, the grid or role, the links and ``active = false`` stay. Someone
    with an open incident or task waits until it closes. A row's ``updated_at`` is when
    it was deactivated: nothing else writes an inactive row, and this leaves it as it
    was. Returns how many, all three together (a full batch of any one means more).
    """
    params = {"cutoff": cutoff, "now": now, "limit": limit}
    return sum(conn.execute(statement, params).rowcount for statement in _ANONYMISE.values())


def _sync_heartbeats(conn: psycopg.Connection, registry: RegistryFile) -> TableChange:
    """Per-kind liveness windows: configuration, not entities, so a kind left out is
    removed and falls back to SHOUHU_HEARTBEAT_*."""
    kinds = [kind.value for kind in registry.heartbeats]
    removed = conn.execute("DELETE FROM heartbeat_policies WHERE NOT (kind = ANY(%s))", (kinds,)).rowcount
    upserted = 0
    for kind, entry in registry.heartbeats.items():
        upserted += conn.execute(
            """
            INSERT INTO heartbeat_policies (kind, interval_s, misses) VALUES (%s, %s, %s)
            ON CONFLICT (kind) DO UPDATE SET interval_s = EXCLUDED.interval_s, misses = EXCLUDED.misses,
                updated_at = now()
            WHERE (heartbeat_policies.interval_s, heartbeat_policies.misses) IS DISTINCT FROM
                  (EXCLUDED.interval_s, EXCLUDED.misses)
            """,
            (kind.value, entry.interval_s, entry.misses),
        ).rowcount
    return TableChange(max(upserted, 0), max(removed, 0))


def _sync_quiet_hours(conn: psycopg.Connection, registry: RegistryFile) -> TableChange:
    rows = [{"area_id": q.area, "start_time": q.start, "end_time": q.end} for q in registry.quiet_hours]
    return _sync_per_area(conn, "quiet_hours", rows)


def _sync_phone_providers(conn: psycopg.Connection, registry: RegistryFile) -> TableChange:
    rows = [
        {"area_id": p.area, "primary_provider": p.primary, "secondary_provider": p.secondary}
        for p in registry.phone_providers
    ]
    return _sync_per_area(conn, "area_phone_providers", rows)


def _sync_per_area(conn: psycopg.Connection, table: str, rows: list[Row]) -> TableChange:
    """Per-area settings (quiet hours, phone providers) are configuration, not entities:
    an area left out has none of its own (its row is deleted); an unchanged row is left alone."""
    listed = [row["area_id"] for row in rows]
    removed = conn.execute(
        sql.SQL("DELETE FROM {} WHERE NOT (area_id = ANY(%s))").format(sql.Identifier(table)), (listed,)
    ).rowcount
    upserted = _upsert(conn, table, ["area_id"], rows, active=False)
    return TableChange(upserted, max(removed, 0))


def _counts(conn: psycopg.Connection) -> dict[str, int]:
    counts = {}
    for table in ("areas", "residents", "guardians", "staff", "devices"):
        row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE active").format(sql.Identifier(table))).fetchone()
        counts[table] = int(row[0]) if row else 0
    return counts


def residents_without_guardian(conn: psycopg.Connection) -> tuple[str, ...]:
    """Active residents with no active guardian to call."""
    rows = conn.execute(
        """
        SELECT r.id FROM residents r
        WHERE r.active AND NOT EXISTS (
            SELECT 1 FROM guardians g WHERE g.resident_id = r.id AND g.active)
        ORDER BY r.id
        """
    ).fetchall()
    return tuple(r[0] for r in rows)


@dataclass(frozen=True, slots=True)
class ActiveWristband:
    device_id: str
    resident_name: str
    grid_id: str


def active_wristbands(conn: psycopg.Connection[Any]) -> list[ActiveWristband]:
    """Every active wristband with its resident's name and grid, by device id."""
    with conn.cursor(row_factory=class_row(ActiveWristband)) as cur:
        return cur.execute(
            "SELECT d.id AS device_id, r.name AS resident_name, r.grid_id FROM devices d"
            " JOIN residents r ON r.id = d.resident_id"
            " WHERE d.kind = 'wristband' AND d.active ORDER BY d.id"
        ).fetchall()


SLOT_MINUTES = 30
SLOTS_PER_DAY = 24 * 60 // SLOT_MINUTES
WEEK_SLOTS = 7 * SLOTS_PER_DAY


def shift_slots(weekdays: Sequence[int], start: time, end: time) -> set[int]:
    """The half-hour slots of the week (Monday 00:00 = 0) a recurring shift covers."""
    first = (start.hour * 60 + start.minute) // SLOT_MINUTES
    last = (end.hour * 60 + end.minute) // SLOT_MINUTES
    length = last - first if last > first else SLOTS_PER_DAY - first + last
    covered: set[int] = set()
    for day in weekdays:
        base = (day - 1) * SLOTS_PER_DAY + first
        covered.update((base + i) % WEEK_SLOTS for i in range(length))
    return covered


def coverage_gaps(conn: psycopg.Connection) -> tuple[CoverageGap, ...]:
    """Grids with hours no grid worker is on duty, and how much the fallback covers."""
    parent: dict[str, str | None] = dict(conn.execute("SELECT id, parent_id FROM areas WHERE active").fetchall())
    grids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM areas WHERE active AND level = ANY(%s) ORDER BY id",
            ([AreaLevel.GRID.value, AreaLevel.MICRO_GRID.value],),
        ).fetchall()
    ]
    slots: dict[tuple[str, bool], set[int]] = {}
    for area_id, role, weekdays, start, end in conn.execute(
        """
        SELECT d.area_id, s.role, d.weekdays, d.start_time, d.end_time
        FROM duty_shifts d JOIN staff s ON s.id = d.staff_id
        WHERE d.active AND s.active
        """
    ).fetchall():
        key = (area_id, role == StaffRole.GRID_WORKER.value)
        slots.setdefault(key, set()).update(shift_slots(weekdays, start, end))
    gaps = []
    hours_per_slot = SLOT_MINUTES / 60
    for grid in grids:
        own = slots.get((grid, True), set())
        uncovered = set(range(WEEK_SLOTS)) - own
        if not uncovered:
            continue
        # The fallback walks up the tree: anyone on duty on an ancestor (or a
        # non-grid-worker on the grid itself) is reached.
        fallback: set[int] = set(slots.get((grid, False), set()))
        node = parent.get(grid)
        while node is not None:
            fallback |= slots.get((node, True), set()) | slots.get((node, False), set())
            node = parent.get(node)
        gaps.append(
            CoverageGap(
                grid,
                len(uncovered) * hours_per_slot,
                len(uncovered - fallback) * hours_per_slot,
            )
        )
    return tuple(gaps)
