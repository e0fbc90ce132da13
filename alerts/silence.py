"""Maintenance windows and quiet hours: what may wait, and until when.

Maintenance (a camera under repair, a resident in hospital) silences every non-SOS
incident for a device, or for every device in an area and below. Quiet hours delay
non-urgent (blue) notices until they end. Nothing here is ever consulted on the SOS
or fall path: an alarm bypasses all of it, always.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from psycopg.rows import class_row

from shouhu.db import Conn


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A nightly window in local time; ``end`` at or before ``start`` runs past midnight."""

    start: time
    end: time

    def __post_init__(self) -> None:
        """An empty window would mean "never" and a full one "always": both are mistakes."""
        if self.start == self.end:
            raise ValueError(f"quiet hours start and end are both {self.start}")

    def ends_after(self, at: datetime, zone: ZoneInfo) -> datetime | None:
        """When the quiet period covering ``at`` ends (aware, in ``zone``); None if ``at`` is not quiet."""
        local = at.astimezone(zone)
        now = local.time().replace(tzinfo=None)
        today = local.date()
        if self.start < self.end:
            quiet = self.start <= now < self.end
            end_day = today
        else:
            quiet = now >= self.start or now < self.end
            end_day = today + timedelta(days=1) if now >= self.start else today
        if not quiet:
            return None
        # Built from the local wall clock, so a DST change in zones that have one is honoured.
        return datetime.combine(end_day, self.end, tzinfo=zone)


# The device's own area: a camera's, or its resident's grid.
_DEVICE_AREA = """
    SELECT coalesce(d.area_id, r.grid_id) FROM devices d
    LEFT JOIN residents r ON r.id = d.resident_id WHERE d.id = %s
"""

_AREA_CHAIN = """
    WITH RECURSIVE up(id, parent_id, depth) AS (
        SELECT id, parent_id, 0 FROM areas WHERE id = %s
        UNION ALL
        SELECT a.id, a.parent_id, up.depth + 1 FROM areas a JOIN up ON a.id = up.parent_id
    )
    SELECT id FROM up ORDER BY depth
"""


def area_chain(conn: Conn, area_id: str | None) -> list[str]:
    """``area_id`` and its ancestors, nearest first."""
    if area_id is None:
        return []
    return [row[0] for row in conn.execute(_AREA_CHAIN, (area_id,)).fetchall()]


def device_area(conn: Conn, device_id: str) -> str | None:
    row = conn.execute(_DEVICE_AREA, (device_id,)).fetchone()
    return row[0] if row else None


def active_window(conn: Conn, device_id: str, at: datetime) -> tuple[int, str] | None:
    """(id, reason) of a maintenance window covering the device at ``at``, if any.

    A window on the device itself, or on its area or any area above it.
    """
    chain = area_chain(conn, device_area(conn, device_id))
    row = conn.execute(
        """
        SELECT id, reason FROM maintenance_windows
        WHERE cancelled_at IS NULL AND starts_at <= %(at)s AND ends_at > %(at)s
          AND (device_id = %(device)s OR area_id = ANY(%(chain)s))
        ORDER BY ends_at DESC, id LIMIT 1
        """,
        {"at": at, "device": device_id, "chain": chain},
    ).fetchone()
    return (int(row[0]), str(row[1])) if row else None


def quiet_hours_for(conn: Conn, area_id: str | None) -> QuietHours | None:
    """The quiet hours of the nearest area up the tree that sets them."""
    chain = area_chain(conn, area_id)
    if not chain:
        return None
    return conn.cursor(row_factory=class_row(QuietHours)).execute(
        "SELECT start_time AS start, end_time AS end FROM quiet_hours WHERE area_id = ANY(%s)"
        " ORDER BY array_position(%s, area_id) LIMIT 1",
        (chain, chain),
    ).fetchone()


def send_after(conn: Conn, area_id: str | None, at: datetime, zone: ZoneInfo) -> datetime:
    """When a non-urgent notice for ``area_id`` raised at ``at`` may be sent: now, or the morning."""
    quiet = quiet_hours_for(conn, area_id)
    ends = quiet.ends_after(at, zone) if quiet else None
    return at if ends is None else ends
