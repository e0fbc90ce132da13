"""simulators/watch.py and `shouhu simulate watch`: a simulated 4G watch speaking raw TCP
frames to the real gateway, broker, hub and router, end to end to the phone network."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shouhu.embedded.postgres import free_port
from simulators.watch import PressResult, fleet_ids, frame, press_alarm
from tests.support.hub import query, start_hub, wait_until
from tests.support.services import SHOUHU_BIN, Mosquitto, shouhu_env, shouhu_stack
from tests.support.watch import BAND, CHINA, WATCH, gateway_process, serving

SIMULATED = "8600000062"  # wb-0062's watch in the demo county


@pytest.fixture
def stack(database_url: str, mosquitto: Mosquitto) -> Iterator[dict[str, Any]]:
    yield from shouhu_stack(database_url, mosquitto, name="watch-e2e")


def simulate_watch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SHOUHU_BIN, "simulate", "watch", *args], env=shouhu_env(), capture_output=True, text=True, timeout=90
    )


def test_a_simulated_watch_press_reaches_the_phone_through_the_gateway(
    stack: dict[str, Any], mosquitto: Mosquitto
) -> None:
    """watch → `shouhu gateway watch` → broker → `shouhu hub` → incident → `shouhu router`
    → the phone network's first call, to whom the router paged for this incident."""
    url = stack["database_url"]
    port = free_port()
    gateway = gateway_process(mosquitto, f"e2e-gateway-{port}", port).start()
    try:
        before = len(httpx.get(f"{stack['phone']}/_sim/calls").json())
        result = simulate_watch("--press", SIMULATED, "--gateway", f"127.0.0.1:{port}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{SIMULATED}: SOS press answered (AL) after 1 send(s)" in result.stdout
        # Answered only after the hub's receipt: the incident is there already.
        [(incident_id, kind)] = query(url, "SELECT id, kind FROM incidents WHERE device_id = 'wb-0062'")
        assert kind == "sos"
        calls = wait_until(
            lambda: httpx.get(f"{stack['phone']}/_sim/calls").json()[before:], timeout=15, what="the first call"
        )
    finally:
        gateway.stop()
    attempts = query(url, "SELECT address FROM notification_attempts WHERE incident_id = %s", incident_id)
    assert calls[0]["to"] in {address for (address,) in attempts}


def test_a_fleet_heartbeats_and_every_heartbeat_is_answered(broker: Mosquitto) -> None:
    port = free_port()
    gateway = gateway_process(broker, f"fleet-gateway-{port}", port).start()
    try:
        result = simulate_watch(
            "--fleet", "4", "--heartbeats", "2", "--interval", "0.05", "--gateway", f"127.0.0.1:{port}"
        )
    finally:
        gateway.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fleet: 4 watches from 8600000061" in result.stdout
    assert "fleet: 4 connected, 8 of 8 heartbeats answered" in result.stdout


def test_a_fleet_runs_until_sigterm_and_prints_its_counts(broker: Mosquitto) -> None:
    port = free_port()
    gateway = gateway_process(broker, f"fleet-gateway-{port}", port).start()
    assert gateway.ready_url is not None
    metrics = gateway.ready_url.replace("/readyz", "/metrics")
    fleet = subprocess.Popen(
        [SHOUHU_BIN, "simulate", "watch", "--fleet", "2", "--interval", "0.05", "--gateway", f"127.0.0.1:{port}"],
        env=shouhu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        heartbeats = 'shouhu_watch_gateway_events_total{event="published:telemetry"} '
        wait_until(
            lambda: heartbeats in (text := httpx.get(metrics).text)
            and float(text.split(heartbeats)[1].split()[0]) >= 6,
            what="three heartbeats from each watch",
        )
        fleet.send_signal(signal.SIGTERM)
        out, err = fleet.communicate(timeout=15)
    finally:
        fleet.kill()
        gateway.stop()
    assert fleet.returncode == 0, out + err
    assert "fleet: stopped" in out
    assert "fleet: 2 connected" in out
    assert "Traceback" not in err


def test_an_unregistered_fleet_goes_unanswered_and_says_so(broker: Mosquitto) -> None:
    port = free_port()
    gateway = gateway_process(broker, f"fleet-gateway-{port}", port).start()
    try:
        # 8600000070 is the demo's last watch; 8600000071 is no one's: never answered.
        result = simulate_watch(
            "--fleet", "2", "--first-id", "8600000070", "--heartbeats", "1", "--answer-timeout", "1",
            "--gateway", f"127.0.0.1:{port}",
        )
    finally:
        gateway.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fleet: 2 connected, 1 of 2 heartbeats answered" in result.stdout
    assert "8600000071" in result.stderr


def test_the_watch_resends_its_alarm_until_it_is_answered(county_url: str, broker: Mosquitto) -> None:
    """No hub at first: the gateway publishes but cannot answer; the watch re-sends the
    same frame; once a hub stores it, the next copy is answered. One incident."""
    with serving(broker) as gateway:
        assert gateway.port is not None
        port = gateway.port
        results: list[PressResult] = []
        pressing = threading.Thread(
            target=lambda: results.append(
                asyncio.run(press_alarm("127.0.0.1", port, WATCH, zone=CHINA, resend_s=0.3, timeout_s=30))
            )
        )
        pressing.start()
        wait_until(lambda: gateway.counts["published:sos"] >= 2, what="a re-sent alarm")
        worker, thread = start_hub(county_url, broker.url)
        try:
            pressing.join(30)
        finally:
            worker.stop()
            thread.join(10)
    [result] = results
    assert result.answered
    assert result.sends >= 3  # two before the hub, at least one after
    assert query(county_url, "SELECT kind, device_id, urgency FROM incidents") == [("sos", BAND, 1)]


def test_the_frames_are_the_protocol_not_the_gateways_codec() -> None:
    assert frame("8600000061", "LK") == b"[3G*8600000061*0002*LK]"
    assert fleet_ids("0141110013327", 2) == ["0141110013327", "0141110013328"]
    with pytest.raises(ValueError, match="past 15 digits"):
        fleet_ids("999999999999999", 2)


def test_bad_options_are_named() -> None:
    assert "--press" in simulate_watch("--press", "12ab").stderr
    assert "--gateway" in simulate_watch("--press", WATCH, "--gateway", "nowhere").stderr
    assert "--fleet" in simulate_watch().stderr
