"""A signed-in staff member's own view: the grids they are rostered for, whether they are on
duty there now, and the calls and texts Shouhu sent to their phone about each incident.

The incidents themselves are the grid console's list (``queries.open_incidents``, within
the session's areas, which are the staff member's areas in the registry); this module
only reorders it (on duty now first) and adds what was sent to them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from alerts.recipients import shift_covers
from shouhu.db import DictConn

# What an attempt to the person came to, in the list's words (anything else: as stored).
ATTEMPT_WORDS: dict[str, tuple[str, str]] = {
    "pending": ("待发送", "queued"),
    "sent": ("已发出", "sent"),
    "delivered": ("已送达", "delivered"),
    "answered": ("已接听", "answered"),
    "no_answer": ("未接听", "no answer"),
    "no_keypress": ("接听未按键", "answered, no key pressed"),
    "busy": ("占线", "busy"),
    "failed": ("失败", "failed"),
    "undelivered": ("未送达", "undelivered"),
    "cancelled": ("已取消", "cancelled"),
}
CHANNEL_WORDS: dict[str, tuple[str, str]] = {"voice": ("电话", "Call"), "sms": ("短信", "SMS")}


def my_grids(conn: DictConn, staff_id: str, now: datetime, zone: ZoneInfo) -> list[dict[str, Any]]:
    """The areas the staff member is assigned in the registry, each with ``on_duty`` now, on duty first."""
    local = now.astimezone(zone)
    shifts: dict[str, list[tuple[list[int], Any, Any]]] = {}
    for row in conn.execute(
        "SELECT area_id, weekdays, start_time, end_time FROM duty_shifts WHERE staff_id = %s AND active", (staff_id,)
    ).fetchall():
        shifts.setdefault(row["area_id"], []).append((list(row["weekdays"]), row["start_time"], row["end_time"]))
    grids = [
        {
            "area_id": row["id"],
            "name": row["name"],
            "on_duty": any(shift_covers(days, start, end, local) for days, start, end in shifts.get(row["id"], [])),
        }
        for row in conn.execute(
            "SELECT a.id, a.name FROM staff_areas sa JOIN areas a ON a.id = sa.area_id"
            " WHERE sa.staff_id = %s ORDER BY a.id",
            (staff_id,),
        ).fetchall()
    ]
    return sorted(grids, key=lambda g: not g["on_duty"])


def on_duty_first(incidents: list[dict[str, Any]], on_duty_areas: frozenset[str]) -> list[dict[str, Any]]:
    """The list with the incidents of areas on duty now first; each keeps its order otherwise."""
    for incident in incidents:
        incident["on_duty"] = incident["area_id"] in on_duty_areas
    return sorted(incidents, key=lambda i: not i["on_duty"])


def attempts_to(conn: DictConn, staff_id: str, incident_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Every call and text sent to the staff member about these incidents, oldest first, by incident."""
    found: dict[int, list[dict[str, Any]]] = {}
    if not incident_ids:
        return found
    for row in conn.execute(
        """
        SELECT incident_id, channel, purpose, state, created_at, sent_at FROM notification_attempts
        WHERE recipient_kind = 'staff' AND recipient_id = %s AND incident_id = ANY(%s)
          AND channel IN ('voice', 'sms')
        ORDER BY created_at, id
        """,
        (staff_id, incident_ids),
    ).fetchall():
        found.setdefault(row["incident_id"], []).append(dict(row))
    return found
