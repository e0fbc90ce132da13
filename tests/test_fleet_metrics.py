"""api/fleet_metrics.py against a real database: devices by township, and camera uptime
(在线率) equal to the uptime report's, read at most once per refresh."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.types.json import Jsonb

from api.fleet_metrics import FleetCollector, camera_uptime, devices_by_township
from devices.kinds import AreaLevel, DeviceKind
from shouhu.db import Conn
from tests.support.builders import SmallCounty, add_area, add_device, add_resident, add_small_county, set_device_state

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def conn(database_url: str) -> Iterator[Conn]:
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


@pytest.fixture
def county(conn: Conn) -> SmallCounty:
    tree = add_small_county(conn)
    add_area(conn, "T2", level=AreaLevel.TOWNSHIP, parent=tree.county)
    return tree


def went(conn: Conn, device: str, at: datetime, online: bool) -> None:
    """A transition as hub/liveness.py writes it."""
    conn.execute(
        "INSERT INTO device_events (device_id, at, event, reason, detail) VALUES (%s, %s, %s, %s, %s)",
        (device, at, "online" if online else "offline", None if online else "silent", Jsonb({})),
    )


def test_devices_are_counted_by_kind_liveness_and_township(conn: Conn, county: SmallCounty) -> None:
    add_resident(conn, "R", grid=county.grid_b)
    add_device(conn, "W", kind=DeviceKind.WRISTBAND, resident="R")  # no area: its resident's grid
    add_device(conn, "CAM-1", kind=DeviceKind.CAMERA, area=county.micro_a)
    add_device(conn, "CAM-2", kind=DeviceKind.CAMERA, area=county.grid_a)
    add_device(conn, "CAM-3", kind=DeviceKind.CAMERA, area="T2")
    add_device(conn, "CAM-C", kind=DeviceKind.CAMERA, area=county.county)  # above any township
    add_device(conn, "CAM-OLD", kind=DeviceKind.CAMERA, area=county.grid_a, active=False)
    set_device_state(conn, "W", online=True, last_seen=NOW)
    set_device_state(conn, "CAM-1", online=True, last_seen=NOW)
    set_device_state(conn, "CAM-2", online=False, last_seen=NOW)
    set_device_state(conn, "CAM-OLD", online=True, last_seen=NOW)

    assert devices_by_township(conn) == {
        ("wristband", "online", county.township): 1,
        ("camera", "online", county.township): 1,
        ("camera", "offline", county.township): 1,
        ("camera", "unknown", "T2"): 1,
        ("camera", "unknown", county.county): 1,
    }


def test_camera_uptime_is_the_days_time_weighted_share_by_township_and_county(
    conn: Conn, county: SmallCounty
) -> None:
    add_device(conn, "CAM-1", kind=DeviceKind.CAMERA, area=county.grid_a)
    add_device(conn, "CAM-2", kind=DeviceKind.CAMERA, area="T2")
    add_device(conn, "CAM-3", kind=DeviceKind.CAMERA, area="T2")
    went(conn, "CAM-1", NOW - timedelta(days=2), online=True)
    went(conn, "CAM-1", NOW - timedelta(hours=6), online=False)  # 18 of 24 h online
    went(conn, "CAM-2", NOW - timedelta(days=2), online=True)  # 24 of 24 h; CAM-3 never heard: not monitored

    assert camera_uptime(conn, NOW) == pytest.approx(
        {(county.township, "township"): 0.75, ("T2", "township"): 1.0, (county.county, "county"): 42 / 48}
    )


def test_the_collector_reads_uptime_once_per_refresh(conn: Conn, county: SmallCounty) -> None:
    add_device(conn, "CAM-1", kind=DeviceKind.CAMERA, area=county.grid_a)
    went(conn, "CAM-1", NOW - timedelta(days=2), online=True)

    @contextmanager
    def connect() -> Iterator[Conn]:
        yield conn

    def ratios(collector: FleetCollector) -> dict[str, float]:
        family = next(f for f in collector.collect() if f.name == "shouhu_camera_uptime_ratio")
        return {s.labels["area"]: s.value for s in family.samples}

    cached = FleetCollector(connect, clock=lambda: NOW, refresh_s=3600)
    fresh = FleetCollector(connect, clock=lambda: NOW, refresh_s=0)
    assert ratios(cached) == ratios(fresh) == {county.township: 1.0, county.county: 1.0}
    went(conn, "CAM-1", NOW - timedelta(hours=12), online=False)
    assert ratios(cached)[county.township] == 1.0, "read again inside the refresh"
    assert ratios(fresh)[county.township] == pytest.approx(0.5)
