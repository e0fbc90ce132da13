"""Care end to end, as it runs: separate `shouhu hub` and `shouhu router` processes, a
camera reporting itself offline and back over MQTT with `mosquitto_pub`, and the
technicians' phones receiving the repair order and its close in the simulator."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from tests.services import Mosquitto, shouhu_stack


@pytest.fixture
def stack(database_url: str, mosquitto: Mosquitto) -> Iterator[dict[str, Any]]:
    # Short holds so the loop closes in seconds; the router sweeps well inside them.
    yield from shouhu_stack(database_url, mosquitto, name="care-e2e", SHOUHU_CAMERA_OFFLINE_HOLD_S="2")


def publish_health(port: int, camera: str, *, online: bool, reason: str | None = None) -> None:
    payload: dict[str, Any] = {"msg_id": str(uuid.uuid4()), "ts": datetime.now(UTC).isoformat(), "online": online}
    if reason:
        payload["reason"] = reason
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
         "-t", f"shouhu/v1/camera/{camera}/health", "-m", json.dumps(payload)],
        check=True,
        timeout=10,
    )


def wait_for(found: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def sms_containing(phone: str, text: str) -> list[dict[str, Any]]:
    return [m for m in httpx.get(f"{phone}/_sim/messages").json() if text in m["body"]]


def test_a_camera_dark_past_the_hold_reaches_its_technicians_and_closes_when_back(stack: dict[str, Any]) -> None:
    port = stack["mosquitto"].port
    publish_health(port, "cam-005", online=True)
    publish_health(port, "cam-005", online=False, reason="video_lost")
    orders = wait_for(lambda: sms_containing(stack["phone"], "维修工单"), "the repair order's SMS")
    assert all("cam-005" in m["body"] and "video_lost" in m["body"] for m in orders)
    with psycopg.connect(stack["database_url"]) as conn:
        technicians = {
            r[0] for r in conn.execute("SELECT phone FROM staff WHERE role = 'technician'").fetchall()
        }
        assert {m["to"] for m in orders} <= technicians
    publish_health(port, "cam-005", online=True)
    wait_for(lambda: sms_containing(stack["phone"], "自动销号"), "the order closing itself")
    with psycopg.connect(stack["database_url"]) as conn:
        row = conn.execute("SELECT state, outcome, flaps FROM care_tasks WHERE device_id = 'cam-005'").fetchone()
    assert row == ("closed", "device_recovered", 0)
