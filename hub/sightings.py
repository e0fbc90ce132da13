"""What the writer tells liveness: that a device was heard from, and what it said.

The batch writer (``hub/ingest.py``) collects one ``Sighting`` per stored message and
hands them to ``hub/liveness.py`` ``record_sightings`` inside the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from devices.kinds import DeviceKind


@dataclass(frozen=True, slots=True)
class Sighting:
    device_id: str
    kind: DeviceKind
    received_at: datetime  # the hub's clock: liveness never trusts device clocks
    refreshes: bool  # False for retained deliveries and `offline` status: they prove nothing
    battery: float | None = None
    worn: bool | None = None
    lat: float | None = None
    lon: float | None = None
    # What the device says of itself: True/False from a camera's health report or a
    # status message, None when the message does not say.
    reported_online: bool | None = None
    reported_reason: str | None = None  # a camera's own offline reason; `last_will` for a will
