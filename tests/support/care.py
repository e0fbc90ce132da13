"""Shared helpers for the care tests: device sightings as the hub records them, and
sweeps at a time the test chooses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from alerts.acknowledge import Actor
from alerts.care_sweep import CareReport, CareRules, sweep
from devices.kinds import DeviceKind
from hub.liveness import LivenessDefaults, record_sightings
from hub.sightings import Sighting
from shouhu.db import Conn
from tests.support.escalation import ZONE

# Tuesday 10:00 in Asia/Shanghai: day shifts are on.
T0 = datetime(2026, 11, 24, 10, 0, tzinfo=ZONE).astimezone(UTC)
RULES = CareRules(
    visit_offline_hold=timedelta(hours=1),
    not_worn_hold=timedelta(hours=6),
    visit_due=timedelta(hours=4),
    camera_offline_hold=timedelta(seconds=300),
    repair_due=timedelta(hours=48),
    battery_low=20,
    battery_critical=10,
    zone=ZONE,
)
LOCK = 0x7E57_0C0E  # not the production key: the suite may share a cluster
WORKER = Actor("staff", "gw-test", "测试网格员", None, "grid_worker")


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def heard(conn: Conn, device_id: str, at: datetime, **fields: Any) -> None:
    """A message from the device as the hub records it (refreshing unless told otherwise)."""
    kind = DeviceKind.CAMERA if device_id.startswith("cam-") else DeviceKind.WRISTBAND
    refreshes = fields.pop("refreshes", True)
    sighting = Sighting(device_id=device_id, kind=kind, received_at=at, refreshes=refreshes, **fields)
    with conn.transaction():
        record_sightings(conn, [sighting], LivenessDefaults(60, 3))


def last_will(conn: Conn, device_id: str, at: datetime) -> None:
    heard(conn, device_id, at, refreshes=False, reported_online=False, reported_reason="last_will")


def run(conn: Conn, at: datetime) -> CareReport:
    return sweep(conn, at, RULES, lock_key=LOCK)


