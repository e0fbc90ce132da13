"""Who is paged: resolved when each step fires, from rosters in SHOUHU_TIMEZONE.

"On duty" is a roster shift covering the local time now. A grid with nobody on
duty falls back up the area tree (grid → community → township → county), so a
page always has somewhere to go when anyone in the chain is on duty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from devices.kinds import EscalationTarget, StaffRole
from shouhu.db import Conn


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


@dataclass(frozen=True, slots=True)
class Shift:
    """One active shift of an active staff member on an area."""

    area_id: str
    staff_id: str
    name: str
    phone: str
    role: str
    weekdays: tuple[int, ...]
    start: time
    end: time


@dataclass(frozen=True, slots=True)
class RosterData:
    """Everything ``Rosters`` reads, read ahead: the areas' chains, the shifts, the operators.

    For a resolver that cannot reach the database: the hub's spool pages from this
    while PostgreSQL is down (hub/spool.py). Shifts, not who is on duty, so it is
    evaluated at the moment it is asked about and stays right as the hours pass.
    """

    chains: Mapping[str, tuple[str, ...]]  # area → itself and its ancestors, nearest first
    shifts: Mapping[str, tuple[Shift, ...]]  # area → its active shifts of active staff
    operator_areas: tuple[str, ...]
    operators: tuple[Recipient, ...]  # every active operator: the fallback when none is on duty
    guardians: Mapping[str, tuple[Recipient, ...]]  # resident → active guardians, by priority


class Rosters:
    """Rosters and guardians as of one moment, each area and resident read at most once.

    The router resolves a whole batch of steps at one moment: ``prepare`` reads all
    that those steps will ask for in a few queries (every area chain in one, every
    shift on those areas in one, every guardian in one) instead of a walk up the tree
    per step. ``resolve`` reads whatever was not prepared, so one step needs no
    ``prepare``; the rules are the same either way. One instance per moment: rosters
    change, so nothing is kept across batches.

    Built from ``RosterData`` with no connection, it reads nothing: what the data
    does not hold is unknown (no chain, no shift, no guardian), and the rules are the
    same.
    """

    def __init__(self, conn: Conn | None, at: datetime, zone: ZoneInfo, *, data: RosterData | None = None) -> None:
        self.conn = conn
        self.local = at.astimezone(zone)
        self._chains: dict[str, list[str]] = {}
        self._shifts: dict[str, list[Shift]] = {}
        self._guardians: dict[str, list[Recipient]] = {}
        self._operator_areas: list[str] | None = None
        self._operators: list[Recipient] | None = None
        self._every_operator: list[Recipient] | None = None
        if data is not None:
            self._chains = {area: list(chain) for area, chain in data.chains.items()}
            self._shifts = {area: list(shifts) for area, shifts in data.shifts.items()}
            self._guardians = {resident: list(people) for resident, people in data.guardians.items()}
            self._operator_areas = list(data.operator_areas)
            self._every_operator = list(data.operators)

    def _rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        # Without a connection (built from RosterData) there is nothing more to read.
        return [] if self.conn is None else self.conn.execute(query, params).fetchall()

    def data(self) -> RosterData:
        """What this instance has read so far, for a resolver without the database."""
        return RosterData(
            chains={area: tuple(chain) for area, chain in self._chains.items()},
            shifts={area: tuple(shifts) for area, shifts in self._shifts.items()},
            operator_areas=tuple(self.operator_areas()),
            operators=tuple(self.every_operator()),
            guardians={resident: tuple(people) for resident, people in self._guardians.items()},
        )

    def prepare(self, wanted: Iterable[tuple[EscalationTarget, str | None, str | None]]) -> None:
        """Read at once what ``resolve`` will need for these (target, resident id, area id)."""
        grids: set[str] = set()
        areas: set[str] = set()
        residents: set[str] = set()
        for target, resident_id, area_id in wanted:
            if target is EscalationTarget.GRID_WORKER and area_id:
                grids.add(area_id)
            elif target is EscalationTarget.TECHNICIANS and area_id:
                areas.add(area_id)
            elif target is EscalationTarget.GUARDIANS and resident_id:
                residents.add(resident_id)
            elif target is EscalationTarget.OPERATORS:
                areas.update(self.operator_areas())
        self._load_chains(grids)
        for grid_id in grids:
            areas.update(self._chains[grid_id])
        self._load_shifts(areas)
        self._load_guardians(residents)

    def resolve(self, target: EscalationTarget, *, resident_id: str | None, area_id: str | None) -> list[Recipient]:
        """The people a step's target means now. Empty when nobody is reachable."""
        if target is EscalationTarget.GRID_WORKER:
            return self.duty_chain(area_id) if area_id else []
        if target is EscalationTarget.GUARDIANS:
            return self.guardians(resident_id) if resident_id else []
        if target is EscalationTarget.OPERATORS:
            return self.operators()
        if target is EscalationTarget.TECHNICIANS:
            return self.on_duty(area_id, {StaffRole.TECHNICIAN.value}) if area_id else []
        return []

    def on_duty(self, area_id: str, roles: set[str] | None = None) -> list[Recipient]:
        """Active staff with an active shift on ``area_id`` covering the moment, by staff id."""
        self._load_shifts({area_id})
        found: dict[str, Recipient] = {}
        for shift in self._shifts[area_id]:
            if roles is not None and shift.role not in roles:
                continue
            if shift_covers(list(shift.weekdays), shift.start, shift.end, self.local):
                found.setdefault(
                    shift.staff_id, Recipient("staff", shift.staff_id, shift.name, shift.phone, shift.role, area_id)
                )
        return list(found.values())

    def duty_chain(self, grid_id: str) -> list[Recipient]:
        """The grid workers on duty for the grid; nobody → the nearest area above with anyone on duty."""
        self._load_chains({grid_id})
        for depth, area_id in enumerate(self._chains[grid_id]):
            roles = {StaffRole.GRID_WORKER.value} if depth == 0 else None
            people = self.on_duty(area_id, roles)
            if people:
                return people
        return []

    def guardians(self, resident_id: str) -> list[Recipient]:
        """The resident's active guardians, in priority order."""
        self._load_guardians({resident_id})
        return list(self._guardians[resident_id])

    def operator_areas(self) -> list[str]:
        """Every area an active operator is attached to."""
        if self._operator_areas is None:
            rows = self._rows(
                """
                SELECT DISTINCT sa.area_id FROM staff s JOIN staff_areas sa ON sa.staff_id = s.id
                WHERE s.role = 'operator' AND s.active ORDER BY 1
                """
            )
            self._operator_areas = [r[0] for r in rows]
        return self._operator_areas

    def every_operator(self) -> list[Recipient]:
        """Every active operator, on duty or not."""
        if self._every_operator is None:
            rows = self._rows("SELECT id, name, phone FROM staff WHERE role = 'operator' AND active ORDER BY id")
            self._every_operator = [Recipient("staff", sid, name, phone, "operator") for sid, name, phone in rows]
        return list(self._every_operator)

    def operators(self) -> list[Recipient]:
        """County operators on duty; when the roster shows none, every active operator.

        Operators are the last human line: paging all beats paging nobody.
        """
        if self._operators is None:
            people: dict[str, Recipient] = {}
            for area_id in self.operator_areas():
                for person in self.on_duty(area_id, {StaffRole.OPERATOR.value}):
                    people.setdefault(person.id, person)
            if not people:
                people = {person.id: person for person in self.every_operator()}
            self._operators = list(people.values())
        return list(self._operators)

    def _load_chains(self, grid_ids: set[str]) -> None:
        """Each area and its ancestors, nearest first, for the areas not read yet."""
        missing = sorted(grid_ids - self._chains.keys())
        if not missing:
            return
        rows = self._rows(
            """
            WITH RECURSIVE up(start, id, parent_id, depth) AS (
                SELECT id, id, parent_id, 0 FROM areas WHERE id = ANY(%s)
                UNION ALL
                SELECT up.start, a.id, a.parent_id, up.depth + 1 FROM areas a JOIN up ON a.id = up.parent_id
            )
            SELECT start, id FROM up ORDER BY start, depth
            """,
            (missing,),
        )
        for grid_id in missing:
            self._chains[grid_id] = []
        for start, area_id in rows:
            self._chains[start].append(area_id)

    def _load_shifts(self, area_ids: set[str]) -> None:
        missing = sorted(area_ids - self._shifts.keys())
        if not missing:
            return
        rows = self._rows(
            """
            SELECT d.area_id, s.id, s.name, s.phone, s.role, d.weekdays, d.start_time, d.end_time
            FROM duty_shifts d JOIN staff s ON s.id = d.staff_id
            WHERE d.area_id = ANY(%s) AND d.active AND s.active
            ORDER BY d.area_id, s.id
            """,
            (missing,),
        )
        for area_id in missing:
            self._shifts[area_id] = []
        for area_id, staff_id, name, phone, role, weekdays, start, end in rows:
            self._shifts[area_id].append(Shift(area_id, staff_id, name, phone, role, tuple(weekdays), start, end))

    def _load_guardians(self, resident_ids: set[str]) -> None:
        missing = sorted(resident_ids - self._guardians.keys())
        if not missing:
            return
        rows = self._rows(
            "SELECT resident_id, id, name, phone FROM guardians WHERE resident_id = ANY(%s) AND active"
            " ORDER BY resident_id, priority, id",
            (missing,),
        )
        for resident_id in missing:
            self._guardians[resident_id] = []
        for resident_id, gid, name, phone in rows:
            self._guardians[resident_id].append(Recipient("guardian", gid, name, phone, "guardian"))


def read_roster_data(conn: Conn) -> RosterData:
    """Every area's chain and shifts, the operators and every resident's guardians, read now.

    The same queries ``Rosters`` runs for one step, for all areas and residents at once.
    """
    rosters = Rosters(conn, datetime.now(UTC), ZoneInfo("UTC"))
    areas = {str(r[0]) for r in conn.execute("SELECT id FROM areas").fetchall()}
    residents = {str(r[0]) for r in conn.execute("SELECT id FROM residents").fetchall()}
    rosters._load_chains(areas)
    rosters._load_shifts(areas)
    rosters._load_guardians(residents)
    return rosters.data()


def on_duty(conn: Conn, area_id: str, at: datetime, zone: ZoneInfo, roles: set[str] | None = None) -> list[Recipient]:
    """Active staff with an active shift on ``area_id`` covering ``at``."""
    return Rosters(conn, at, zone).on_duty(area_id, roles)


def duty_chain(conn: Conn, grid_id: str, at: datetime, zone: ZoneInfo) -> list[Recipient]:
    """The grid workers on duty for the grid; nobody → the nearest area above with anyone on duty."""
    return Rosters(conn, at, zone).duty_chain(grid_id)


def guardians(conn: Conn, resident_id: str) -> list[Recipient]:
    """The resident's active guardians, in priority order (no roster: any moment will do)."""
    return Rosters(conn, datetime.now(UTC), ZoneInfo("UTC")).guardians(resident_id)


def operators(conn: Conn, at: datetime, zone: ZoneInfo) -> list[Recipient]:
    """County operators on duty; when the roster shows none, every active operator."""
    return Rosters(conn, at, zone).operators()


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
    return Rosters(conn, at, zone).resolve(target, resident_id=resident_id, area_id=area_id)
