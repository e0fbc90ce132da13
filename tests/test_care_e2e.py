"""Care end to end, as it runs: separate `shouhu hub` and `shouhu router` processes, a
camera reporting itself offline and back over MQTT with `mosquitto_pub`, and the
technicians' phones receiving the repair order and its close in the simulator.

The processes resolve who is on duty at the real "now": the test's registry keeps the
demo county's technicians on shift around the clock, so the order's recipients do not
depend on the hour the suite runs at (the demo rosters them 08:00–18:00)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tests.support.services import Mosquitto, shouhu_stack

DEMO_COUNTY = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
# cam-005 sits in a grid of the township dongguan, whose two technicians take its repairs.
TOWNSHIP_TECHNICIANS = {"tech-dongguan-1", "tech-dongguan-2"}


def technicians_around_the_clock(path: Path) -> Path:
    """The demo county with every technician on shift every day, all day (00:00–00:00)."""
    registry = yaml.safe_load(DEMO_COUNTY.read_text(encoding="utf-8"))
    technicians = {s["id"] for s in registry["staff"] if s["role"] == "technician"}
    assert technicians >= TOWNSHIP_TECHNICIANS
    for roster in registry["rosters"]:
        if roster["staff"] in technicians:
            roster.pop("days", None)
            roster.update(start="00:00", end="00:00")
    path.write_text(yaml.safe_dump(registry, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def stack(database_url: str, broker: Mosquitto, tmp_path: Path) -> Iterator[dict[str, Any]]:
    # A broker of its own: camera health travels the hubs' shared subscription, and on
    # the session broker earlier tests' stopped hubs keep their shares parked (as they
    # should: a stop keeps a hub's session), so a report could wait for a hub that is gone.
    # Short holds so the loop closes in seconds; the router sweeps well inside them.
    registry = technicians_around_the_clock(tmp_path / "county.yaml")
    yield from shouhu_stack(
        database_url, broker, name="care-e2e", registry=registry, SHOUHU_CAMERA_OFFLINE_HOLD_S="2"
    )


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
    assert all("cam-005" in m["body"] and "视频丢失" in m["body"] for m in orders)
    with psycopg.connect(stack["database_url"]) as conn:
        technicians = {
            r[0] for r in conn.execute("SELECT phone FROM staff WHERE id = ANY(%s)", (list(TOWNSHIP_TECHNICIANS),))
        }
    # Both of the township's technicians are on shift whatever the hour: both get the order.
    wait_for(lambda: {m["to"] for m in sms_containing(stack["phone"], "维修工单")} == technicians, "both technicians")
    publish_health(port, "cam-005", online=True)
    wait_for(lambda: sms_containing(stack["phone"], "自动销号"), "the order closing itself")
    with psycopg.connect(stack["database_url"]) as conn:
        row = conn.execute("SELECT state, outcome, flaps FROM care_tasks WHERE device_id = 'cam-005'").fetchone()
    assert row == ("closed", "device_recovered", 0)
