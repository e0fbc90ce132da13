"""The SOS path end to end, as an operator runs it: separate `shouhu` processes, a press
published with `mosquitto_pub`, and the grid worker's phone ringing in the simulator."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shouhu.embedded.postgres import free_port
from tests.services import (
    SHOUHU_BIN,
    Mosquitto,
    ShouhuProcess,
    press_and_wait_for_ring,
    shouhu_env,
    wristband_with_grid_worker_on_duty,
)

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
SID, TOKEN, FROM = "AC" + "1" * 32, "e2e-token", "+12025550100"


@pytest.fixture
def stack(database_url: str, mosquitto: Mosquitto) -> Iterator[dict[str, Any]]:
    phone_port, hub_metrics, router_metrics = free_port(), free_port(), free_port()
    env = shouhu_env(
        SHOUHU_DATABASE_URL=database_url,
        SHOUHU_MQTT_URL=mosquitto.url,
        SHOUHU_HUB_ID=f"e2e-{uuid.uuid4().hex[:8]}",
        SHOUHU_TWILIO_ACCOUNT_SID=SID,
        SHOUHU_TWILIO_AUTH_TOKEN=TOKEN,
        SHOUHU_TWILIO_FROM=FROM,
        SHOUHU_TWILIO_API_BASE=f"http://127.0.0.1:{phone_port}",
    )
    load = subprocess.run([SHOUHU_BIN, "registry", "load", str(DEMO)], env=env, capture_output=True, text=True)
    assert load.returncode == 0, load.stderr
    processes = [
        ShouhuProcess(
            ["simulate", "phone-network", "--port", str(phone_port)],
            env,
            ready_url=f"http://127.0.0.1:{phone_port}/_sim/calls",
        ),
        ShouhuProcess(
            ["hub"],
            {**env, "SHOUHU_METRICS_PORT": str(hub_metrics)},
            ready_url=f"http://127.0.0.1:{hub_metrics}/readyz",
        ),
        ShouhuProcess(
            ["router"],
            {**env, "SHOUHU_METRICS_PORT": str(router_metrics)},
            ready_url=f"http://127.0.0.1:{router_metrics}/readyz",
        ),
    ]
    try:
        for process in processes:
            process.start()
        yield {
            "phone": f"http://127.0.0.1:{phone_port}",
            "router_metrics": router_metrics,
            "database_url": database_url,
            "mosquitto": mosquitto,
            "processes": processes,
        }
    finally:
        for process in processes:
            process.stop()


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
