"""Visits from the seeds: a follow-up visit after an SOS or a fall, recurring visits,
and the month's visit rate.

- An SOS or a fall that is resolved gets one follow-up visit (网格员探视) for the
  grid worker(s) of the resident's grid, due ``SHOUHU_FOLLOW_UP_DUE_S`` after the
  resolution; a false alarm gets none unless ``SHOUHU_FOLLOW_UP_FALSE_ALARMS`` says so.
- A resident the registry marks ``visits: monthly`` or ``weekly`` gets one visit per
  calendar month or ISO week (local time, ``SHOUHU_TIMEZONE``), due by the period's end.
- The visit rate of a month: visits whose deadline fell in it and has passed, and of
  those the ones a person closed by the deadline (target 100 %).

Both kinds of visit are care tasks (``alerts/care.py`` writes them) opened by the care
sweeper (``alerts/care_sweep.py``): every rule is a query over the database, so it does
not matter which path resolved the incident (console, REST, the platform), and a
sweeper that restarts finds what is still missing. Idempotent by the database: one
task per incident, one per resident and period. Nothing here reads the clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from alerts.care import open_care_incident, open_visit
from devices.kinds import IncidentKind, PlannedVisit, VisitFrequency
from shouhu.db import Conn

# The policy target for the visit rate (every elder in special difficulty visited, 100 %).
VISIT_RATE_TARGET = 1.0
PLANNED = tuple(p.value for p in PlannedVisit)


@dataclass(frozen=True, slots=True)
class Period:
    """One period of a recurring visit: [start, end) in UTC, named by ``key``."""

    frequency: VisitFrequency
    key: str  # '2026-12' (monthly) or '2026-W49' (ISO week)
    start: datetime
    end: datetime


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), zone).astimezone(UTC)


def period_of(frequency: VisitFrequency, at: datetime, zone: ZoneInfo) -> Period:
    """The month or ISO week (local to ``zone``) that ``at`` falls in.

    Raises:
        ValueError: ``at`` is naive.
    """
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at!r}: periods are computed from timezone-aware times")
    local = at.astimezone(zone).date()
    if frequency is VisitFrequency.MONTHLY:
        first = local.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
        return Period(frequency, f"{first:%Y-%m}", _midnight(first, zone), _midnight(following, zone))
    monday = local - timedelta(days=local.weekday())
    year, week, _ = monday.isocalendar()
    return Period(frequency, f"{year}-W{week:02d}", _midnight(monday, zone), _midnight(monday + timedelta(7), zone))


_MONTH = re.compile(r"(\d{4})-(\d{2})")


def parse_month(text: str, zone: ZoneInfo) -> Period:
    """``YYYY-MM`` as its monthly period.

    Raises:
        ValueError: not a month written ``YYYY-MM``.
    """
    match = _MONTH.fullmatch(text)
    if not match or not 1 <= int(match.group(2)) <= 12 or int(match.group(1)) < 1970:
        raise ValueError(f"{text!r} is not a month written YYYY-MM (e.g. 2026-12)")
    first = date(int(match.group(1)), int(match.group(2)), 1)
    return period_of(VisitFrequency.MONTHLY, _midnight(first, zone) + timedelta(hours=12), zone)


# -- follow-ups after an SOS or a fall ----------------------------------------------

# Resolved within the last due window and without a task yet. The window is what makes
# an upgrade quiet (incidents resolved long ago get no visit born overdue); a sweeper
# down for longer than the window is a router down for a day, which pages louder.
FOLLOW_UPS_MISSING = """
    SELECT i.id, i.code, i.kind, i.resident_id, r.grid_id, i.resolved_at, r.name, r.address
    FROM incidents i JOIN residents r ON r.id = i.resident_id
    WHERE i.kind IN ('sos', 'fall') AND i.state = 'resolved' AND i.resolved_at > %(since)s
      AND (i.outcome IS DISTINCT FROM 'false_alarm' OR %(false_alarms)s)
      AND NOT EXISTS (SELECT 1 FROM care_tasks t WHERE t.incident_id = i.id)
    ORDER BY i.resolved_at, i.id LIMIT %(limit)s
"""


def open_follow_up(conn: Conn, row: tuple[Any, ...], due: timedelta, now: datetime, zone: ZoneInfo) -> int | None:
    """The follow-up visit for one row of :data:`FOLLOW_UPS_MISSING`, on the SOS's own incident.

    Due ``due`` after the resolution, however late the sweep came. None: it exists already.
    """
    incident_id, code, kind, resident_id, grid_id, resolved_at, name, address = row
    what = "一键求助" if kind == IncidentKind.SOS.value else "跌倒报警"
    deadline = resolved_at + due
    text = (
        f"【守护】回访探视{code}：{name}（{address}）的{what}已处置，"
        f"请于{deadline.astimezone(zone):%m-%d %H:%M}前上门回访，并在控制台销号。"
    )
    return open_visit(
        conn,
        int(incident_id),
        PlannedVisit.FOLLOW_UP,
        resident_id=resident_id,
        grid_id=grid_id,
        since=resolved_at,
        deadline=deadline,
        period=None,
        now=now,
        zone=zone,
        text=text,
    )


# -- recurring visits ---------------------------------------------------------------

# Residents due a visit this period that have none yet. A maintenance window on their
# band (in hospital) or on their grid or above holds it back until the window ends, as
# it holds every care rule but an SOS or a fall; the deadline stays the period's end.
SCHEDULED_MISSING = """
    WITH RECURSIVE up(area_id, ancestor) AS (
        SELECT id, id FROM areas
        UNION ALL
        SELECT up.area_id, a.parent_id FROM up JOIN areas a ON a.id = up.ancestor WHERE a.parent_id IS NOT NULL
    ),
    windows AS (
        SELECT device_id, area_id FROM maintenance_windows
        WHERE cancelled_at IS NULL AND starts_at <= %(now)s AND ends_at > %(now)s
    ),
    silenced AS (
        SELECT d.resident_id AS id FROM windows w JOIN devices d ON d.id = w.device_id
        WHERE d.resident_id IS NOT NULL
        UNION
        SELECT r.id FROM residents r JOIN up ON up.area_id = r.grid_id JOIN windows w ON w.area_id = up.ancestor
    )
    SELECT r.id, r.grid_id, r.visit_frequency FROM residents r
    WHERE r.active AND r.visit_frequency IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM care_tasks t WHERE t.resident_id = r.id
             AND t.period = CASE r.visit_frequency WHEN 'monthly' THEN %(month)s ELSE %(week)s END)
      AND r.id NOT IN (SELECT id FROM silenced WHERE id IS NOT NULL)
    ORDER BY r.id LIMIT %(limit)s
"""


def scheduled_params(now: datetime, zone: ZoneInfo, limit: int) -> dict[str, Any]:
    return {
        "month": period_of(VisitFrequency.MONTHLY, now, zone).key,
        "week": period_of(VisitFrequency.WEEKLY, now, zone).key,
        "now": now,
        "limit": limit,
    }


def open_scheduled(conn: Conn, row: tuple[Any, ...], now: datetime, zone: ZoneInfo) -> int | None:
    """This period's visit for one row of :data:`SCHEDULED_MISSING`: a blue incident and its task.

    Nobody is texted when it opens (at the first sweep after midnight on the 1st or
    on a Monday): it waits on the grid console; its owners are told if it runs late.
    None: another sweeper opened it first (its incident is rolled back with it).
    """
    resident_id, grid_id, frequency = row
    period = period_of(VisitFrequency(frequency), now, zone)
    opened: int | None = None
    with conn.transaction():  # raising Rollback undoes this block's incident, and ends here
        incident_id = open_care_incident(
            conn,
            IncidentKind.SCHEDULED_VISIT,
            device_id=None,
            resident_id=resident_id,
            area_id=grid_id,
            at=now,
            detail={"frequency": frequency, "period": period.key, "due_at": period.end.isoformat()},
        )
        assert incident_id is not None  # no device: nothing to join
        opened = open_visit(
            conn,
            incident_id,
            PlannedVisit.SCHEDULED,
            resident_id=resident_id,
            grid_id=grid_id,
            since=period.start,
            deadline=period.end,
            period=period.key,
            now=now,
            zone=zone,
            text=None,
        )
        if opened is None:
            raise psycopg.Rollback()
    return opened


# -- the visit rate -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VisitRate:
    area_id: str
    area_name: str
    due: int  # deadline in the month and passed
    on_time: int  # of those, closed at or before the deadline (only a person closes a visit without a device)
    late: int  # of those, closed after it
    missed: int  # of those, still open
    upcoming: int  # deadline in the month, not yet passed (not counted in the rate)

    @property
    def rate(self) -> float | None:
        return self.on_time / self.due if self.due else None


_RATES = """
    SELECT t.area_id, coalesce(a.name, t.area_id) AS area_name,
           count(*) FILTER (WHERE t.deadline <= %(now)s) AS due,
           count(*) FILTER (WHERE t.deadline <= %(now)s AND t.state = 'closed' AND t.closed_at <= t.deadline)
               AS on_time,
           count(*) FILTER (WHERE t.deadline <= %(now)s AND t.state = 'closed' AND t.closed_at > t.deadline)
               AS late,
           count(*) FILTER (WHERE t.deadline <= %(now)s AND t.state <> 'closed') AS missed,
           count(*) FILTER (WHERE t.deadline > %(now)s) AS upcoming
    FROM care_tasks t LEFT JOIN areas a ON a.id = t.area_id
    WHERE t.kind = 'visit' AND t.reason = ANY(%(planned)s)
      AND t.deadline > %(start)s AND t.deadline <= %(end)s
      AND (%(scope)s::text[] IS NULL OR t.area_id = ANY(%(scope)s))
      AND (%(within)s::text[] IS NULL OR t.area_id = ANY(%(within)s))
    GROUP BY t.area_id, a.name
    ORDER BY t.area_id
"""


def visit_rates(
    conn: psycopg.Connection[Any],
    month: Period,
    now: datetime,
    *,
    scope: list[str] | None,
    within: list[str] | None = None,
) -> list[VisitRate]:
    """Follow-up and recurring visits by the grid they are for, for the month.

    A deadline at the very end of the month (a monthly visit's) belongs to that month.
    """
    rows = conn.execute(
        _RATES,
        {
            "now": now,
            "start": month.start,
            "end": month.end,
            "scope": scope,
            "within": within,
            "planned": list(PLANNED),
        },
    ).fetchall()
    return [VisitRate(*(row.values() if isinstance(row, dict) else row)) for row in rows]


def total(rates: list[VisitRate]) -> VisitRate:
    return VisitRate(
        "",
        "",
        sum(r.due for r in rates),
        sum(r.on_time for r in rates),
        sum(r.late for r in rates),
        sum(r.missed for r in rates),
        sum(r.upcoming for r in rates),
    )
