"""The SOS path end to end, as an operator runs it: separate `shouhu` processes, a press
published with `mosquitto_pub`, and the grid worker's phone ringing in the simulator."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.services import (
    SHOUHU_BIN,
    Mosquitto,
    press_and_wait_for_ring,
    shouhu_env,
    shouhu_stack,
    wristband_with_grid_worker_on_duty,
)


@pytest.fixture
def stack(database_url: str, mosquitto: Mosquitto) -> Iterator[dict[str, Any]]:
    yield from shouhu_stack(database_url, mosquitto, name="e2e")


def test_a_press_rings_the_right_grid_worker_within_a_second(stack: dict[str, Any]) -> None:
    device_id, expected = wristband_with_grid_worker_on_duty(stack["database_url"])
    mosquitto: Mosquitto = stack["mosquitto"]
    ring = press_and_wait_for_ring(mosquitto.port, device_id, stack["phone"])
    assert ring.call["to"] in expected
    assert ring.seconds < 1.0, f"first ring after {ring.seconds:.3f}s"
    metrics = httpx.get(f"http://127.0.0.1:{stack['router_metrics']}/metrics").text
    assert "shouhu_sos_press_to_first_request_seconds_count 1.0" in metrics


def test_the_router_refuses_to_start_without_twilio(database_url: str) -> None:
    result = subprocess.run(
        [SHOUHU_BIN, "router"],
        env=shouhu_env(SHOUHU_DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "SHOUHU_TWILIO_ACCOUNT_SID" in result.stderr
