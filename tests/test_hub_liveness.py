"""Liveness through the running hub: sightings from every topic, the sweeper in the hub's
upkeep, the device state the API shows, and the gauges."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from api.main import create_app
from hub.service import Hub
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from simulators.wristband import publish_raw
from tests.services import Mosquitto
from tests.test_hub import query, start_hub, wait_until


@pytest.fixture
def hub(county_url: str, broker: Mosquitto) -> Iterator[Hub]:
    worker, thread = start_hub(county_url, broker.url)
    yield worker
    worker.stop()
    thread.join(10)


def body(**fields: object) -> bytes:
    return json.dumps({"msg_id": str(uuid.uuid4()), "ts": datetime.now(UTC).isoformat(), **fields}).encode()


def test_telemetry_shows_in_the_device_state_the_api_serves(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    publish_raw(broker.url, "shouhu/v1/wristband/wb-0001/telemetry", body(battery=77, worn=True, lat=38.7, lon=111.6))
    wait_until(
        lambda: query(county_url, "SELECT battery FROM device_state WHERE device_id = 'wb-0001'") == [(77,)],
        what="the device state",
    )
    with psycopg.connect(county_url) as conn:
        secret = create_token(conn, role=Role.OPERATOR, areas=[], label="t", now=datetime.now(UTC), expires_at=None)
    with TestClient(create_app(Settings(database_url=county_url))) as client:
        device = client.get("/api/v1/devices/wb-0001", headers={"Authorization": f"Bearer {secret}"}).json()
    state = device["state"]
    assert (state["online"], state["battery"], state["worn"]) == (True, 77, True)
    assert state["last_seen"] is not None
    wait_until(
        lambda: query(county_url, "SELECT count(*) FROM ingest_heartbeats WHERE hub_id = %s", hub.hub_id) == [(1,)],
        what="the hub's ingest heartbeat",
    )


def test_a_silent_camera_goes_offline_and_comes_back(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    with psycopg.connect(county_url) as conn:
        conn.execute("UPDATE devices SET heartbeat_interval_s = 1, heartbeat_misses = 1 WHERE id = 'cam-001'")
    publish_raw(broker.url, "shouhu/v1/camera/cam-001/health", body(online=True, fps=25))
    wait_until(
        lambda: query(county_url, "SELECT online FROM device_state WHERE device_id = 'cam-001'") == [(True,)],
        what="online",
    )
    # Nothing more from the camera: the hub's upkeep sweeps it offline after 1 s x 1.
    wait_until(
        lambda: (
            query(county_url, "SELECT online, offline_reason FROM device_state WHERE device_id = 'cam-001'")
            == [(False, "no_heartbeat")]
        ),
        timeout=10,
        what="offline for no heartbeat",
    )
    publish_raw(broker.url, "shouhu/v1/camera/cam-001/health", body(online=False, reason="video_lost"))
    wait_until(
        lambda: (
            query(county_url, "SELECT offline_reason FROM device_state WHERE device_id = 'cam-001'")
            == [("reported:video_lost",)]
        ),
        what="offline as the camera reports",
    )
    publish_raw(broker.url, "shouhu/v1/camera/cam-001/health", body(online=True))
    wait_until(
        lambda: query(county_url, "SELECT online FROM device_state WHERE device_id = 'cam-001'") == [(True,)],
        what="online again",
    )
    events = [
        r[0] for r in query(county_url, "SELECT reason FROM device_events WHERE device_id = 'cam-001' ORDER BY id")
    ]
    assert "no_heartbeat" in events


def test_a_last_will_marks_the_wristband_offline_and_a_retained_one_does_not(
    county_url: str, broker: Mosquitto
) -> None:
    # Retained before the hub subscribes: delivered to it with the retain flag set.
    publish_raw(broker.url, "shouhu/v1/wristband/wb-0003/status", b"offline", retain=True)
    worker, thread = start_hub(county_url, broker.url)
    try:
        publish_raw(broker.url, "shouhu/v1/wristband/wb-0002/telemetry", body(battery=50))
        wait_until(
            lambda: query(county_url, "SELECT online FROM device_state WHERE device_id = 'wb-0002'") == [(True,)],
            what="online",
        )
        publish_raw(broker.url, "shouhu/v1/wristband/wb-0002/status", b"offline")  # its will, live
        wait_until(
            lambda: (
                query(county_url, "SELECT online, offline_reason FROM device_state WHERE device_id = 'wb-0002'")
                == [(False, "last_will")]
            ),
            what="offline by its will",
        )
        retained = query(county_url, "SELECT detail->>'retained' FROM device_events WHERE device_id = 'wb-0003'")
        assert retained == [("true",)]  # stored as an event, flagged retained
        # …but history proves nothing now: wb-0003's liveness is untouched.
        assert query(county_url, "SELECT online FROM device_state WHERE device_id = 'wb-0003'") in ([], [(None,)])
    finally:
        worker.stop()
        thread.join(10)


def test_the_device_gauges_are_published(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    publish_raw(broker.url, "shouhu/v1/wristband/wb-0004/telemetry", body(battery=40))
    wait_until(
        lambda: (REGISTRY.get_sample_value("shouhu_devices", {"kind": "wristband", "state": "online"}) or 0) >= 1,
        timeout=20,
        what="the online wristband gauge",
    )
    unknown = REGISTRY.get_sample_value("shouhu_devices", {"kind": "camera", "state": "unknown"})
    assert unknown is not None
    assert unknown >= 60
