"""The numbers a watch's own SOS key dials (SOS1 … SOS3): the people an SOS pages
first, resolved now as the escalation resolves them — the grid workers on duty for the
wearer's grid (or the nearest area above with anyone on duty), then the wearer's
guardians by priority; distinct numbers, at most three (docs/contract.md, "Commands").

Used by ``POST /api/v1/devices/{id}/commands`` for one watch and by
`shouhu registry load` for every watch of the registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from zoneinfo import ZoneInfo

from alerts.recipients import Rosters
from devices.commands import MAX_SOS_NUMBERS
from devices.kinds import DeviceKind
from shouhu.db import Conn


def sos_numbers(rosters: Rosters, grid_id: str | None, resident_id: str | None) -> list[str]:
    """The grid workers on duty, then the guardians: distinct numbers, at most three."""
    people = (rosters.duty_chain(grid_id) if grid_id else []) + (
        rosters.guardians(resident_id) if resident_id else []
    )
    numbers: list[str] = []
    for person in people:
        phone = person.phone.replace(" ", "").replace("-", "")
        if phone and phone not in numbers:
            numbers.append(phone)
    return numbers[:MAX_SOS_NUMBERS]


def sos_numbers_of(conn: Conn, wristbands: Iterable[str], at: datetime, zone: ZoneInfo) -> dict[str, list[str]]:
    """Each active wristband's SOS numbers as of ``at`` (absent: not an active wristband)."""
    rows = conn.execute(
        "SELECT d.id, d.resident_id, r.grid_id FROM devices d LEFT JOIN residents r ON r.id = d.resident_id"
        " WHERE d.id = ANY(%s) AND d.active AND d.kind = %s ORDER BY d.id",
        (sorted(set(wristbands)), DeviceKind.WRISTBAND.value),
    ).fetchall()
    rosters = Rosters(conn, at, zone)
    return {band: sos_numbers(rosters, grid_id, resident_id) for band, resident_id, grid_id in rows}
