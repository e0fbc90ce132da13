"""The simulated fleets against a real Mosquitto and PostgreSQL: the hub stores what
they publish, cameras' outages show with their reasons, the uptime figures fill, and
the care sweeper opens repair orders, not-worn visits and offline visits from them.

The fleets run on a clock the test moves (their payloads' ``ts``), published at once
through one real MQTT connection; the hub stamps ``received_at`` itself. The care
sweeper is then asked at a time the test chooses, past each hold.
"""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest

from alerts.care_sweep import sweep
from devices.uptime import Span
from devices.uptime_store import uptime_report
from hub.service import Hub
from simulators.camera_fleet import CameraFleet, CameraPace, Outage
from simulators.fleet import MqttPublisher, Publish, RateBound, Receipt, json_message, read_registry, run_fleet
from simulators.wristband_fleet import Habit, WristbandFleet, WristbandPace
from tests.support.care import LOCK, RULES
from tests.support.hub import count, query, wait_until
from tests.support.services import SHOUHU_BIN, Mosquitto, shouhu_env

DEMO_COUNTY = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
ZONE = ZoneInfo("Asia/Shanghai")


class SteppedClock:
    """Moves only when the fleet waits; says stop after ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.now = datetime.now(UTC)
        self.end = self.now + timedelta(seconds=seconds)

    def __call__(self) -> datetime:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += timedelta(seconds=seconds)
        return self.now >= self.end


def publish_fleet(fleet: CameraFleet | WristbandFleet, broker: Mosquitto, url: str, seconds: float) -> list[Publish]:
    """Run ``fleet`` for ``seconds`` of its clock through a real MQTT connection; what it sent.

    The fleet's clock runs ahead of the wall clock, so a device's status and its data
    leave within microseconds of each other, and the hub takes them on two lanes
    (status on the alarm connection, data on the bulk one) that keep no order between
    them. In the field they are seconds apart; here a camera's status waits until the
    hub has taken it, and a Last Will until the hub has stored everything sent before.
    """
    clock = SteppedClock(seconds)
    publisher = MqttPublisher(broker.url, f"test-fleet-{fleet.name}")
    sent: list[Publish] = []
    table = "camera_health" if isinstance(fleet, CameraFleet) else "telemetry"

    def publish(message: Publish) -> None:
        if message.payload == b"offline":  # a Last Will comes after the device's last word
            data = sum(1 for m in sent if m.channel != "status")
            assert publisher.flush()
            wait_until(lambda: count(url, table) == data, 20, "the data before a Last Will stored")
        sent.append(message)
        publisher.publish(message)
        if message.channel == "status" and isinstance(fleet, CameraFleet):  # its health report comes after it
            wait_until(
                lambda: (
                    query(url, "SELECT online FROM device_state WHERE device_id = %s", message.device_id) == [(True,)]
                ),
                20,
                f"{message.device_id}'s status taken",
            )

    try:
        run_fleet(fleet, publish, clock=clock, wait=clock.wait, bound=RateBound(10_000), report=lambda _r: None)
        assert publisher.flush(), "the broker did not acknowledge every message"
    finally:
        publisher.close()
    return sent


def test_the_hub_stores_the_cameras_and_the_board_has_uptime_reasons_and_orders(
    hub: Hub, county_url: str, broker: Mosquitto
) -> None:
    cameras = read_registry(DEMO_COUNTY).cameras
    fleet = CameraFleet(
        cameras, seed=5, start=datetime.now(UTC), zone=ZONE, boot_id="it", pace=CameraPace(interval_s=10)
    )
    sent = publish_fleet(fleet, broker, county_url, 35)
    health = [m for m in sent if m.channel == "health"]
    wait_until(lambda: count(county_url, "camera_health") == len(health), 20, "every health report stored")
    assert count(county_url, "dead_letters") == 0
    out = fleet.offline()
    assert out, "seed 5 starts with cameras out"
    # Every camera is known; each one out is offline with the reason it gave.
    states = {
        row[0]: (row[1], row[2])
        for row in query(county_url, "SELECT device_id, online, offline_reason FROM device_state")
    }
    assert {c.id for c in cameras} <= set(states)
    for camera in cameras:
        online, reason = states[camera.id]
        if camera.id in out:
            assert (online, reason) == (False, f"reported:{out[camera.id]}")
        else:
            assert online is True
    # 在线率 by area: time-weighted from the transitions the hub wrote.
    now = datetime.now(UTC)
    with psycopg.connect(county_url) as conn:
        report = uptime_report(
            conn, roots=None, window=Span(now - timedelta(hours=1), now), now=now, zone=ZONE, by_day=False
        )
    ratios = {a.area.id: a.buckets[0].ratio for a in report.areas}
    assert ratios["county"] is not None
    assert 0 < ratios["county"] < 1
    assert report.totals[0].outages >= 1
    # Past the hold, every camera still out has a repair order with its reason.
    with psycopg.connect(county_url) as conn:
        opened = sweep(conn, now + RULES.camera_offline_hold + timedelta(seconds=1), RULES, lock_key=LOCK)
    orders = {
        row[0]: row[1] for row in query(county_url, "SELECT device_id, reason FROM care_tasks WHERE kind = 'repair'")
    }
    assert len(opened.opened) == len(orders) == len(out)
    assert orders == {device: f"reported:{reason}" for device, reason in out.items()}
    assert set(out.values()) & {Outage.POWER, Outage.NETWORK, Outage.VIDEO_LOST, Outage.STORAGE}


def test_the_hub_stores_the_wristbands_and_not_worn_and_dead_bands_get_visits(
    hub: Hub, county_url: str, broker: Mosquitto
) -> None:
    bands = read_registry(DEMO_COUNTY).wristbands
    fleet = WristbandFleet(
        bands, seed=1, start=datetime.now(UTC), zone=ZONE, boot_id="it", pace=WristbandPace(interval_s=10)
    )
    sent = publish_fleet(fleet, broker, county_url, 75)  # long enough for every failing battery to die
    telemetry = [m for m in sent if m.channel == "telemetry"]
    wait_until(lambda: count(county_url, "telemetry") == len(telemetry), 30, "every telemetry message stored")
    assert count(county_url, "dead_letters") == 0
    habits = fleet.habits()
    drawer = {d for d, h in habits.items() if h is Habit.DRAWER}
    failing = {d for d, h in habits.items() if h is Habit.FAILING}
    rows = query(county_url, "SELECT device_id, online, offline_reason, worn, battery, lat FROM device_state")
    state = {r[0]: r[1:] for r in rows}
    assert {b.id for b in bands} == set(state)
    for device in drawer:
        assert state[device][0] is True
        assert state[device][2] is False
    for device in failing:
        assert state[device][:2] == (False, "last_will")
        assert state[device][3] == 0
    assert all(state[b.id][4] is not None for b in bands)  # positions
    # A heart rate and steps are stored for worn bands.
    worn_rows = query(county_url, "SELECT count(*) FROM telemetry WHERE worn AND heart_rate IS NOT NULL")
    assert worn_rows[0][0] > 0
    # Past the holds: a not-worn visit for each band in a drawer, an offline visit for each dead band.
    later = datetime.now(UTC) + max(RULES.not_worn_hold, RULES.visit_offline_hold) + timedelta(seconds=1)
    with psycopg.connect(county_url) as conn:
        sweep(conn, later, RULES, lock_key=LOCK)
    visits = query(county_url, "SELECT device_id, reason FROM care_tasks WHERE kind = 'visit'")
    assert {d for d, reason in visits if reason == "not_worn"} == drawer
    assert {d for d, reason in visits if reason == "last_will"} == failing
    # And the low batteries are blue incidents.
    low = query(county_url, "SELECT count(*) FROM incidents WHERE kind = 'low_battery'")
    assert low[0][0] >= len(failing)


@pytest.mark.parametrize(
    ("verb", "kind", "devices"),
    [(["cameras"], "camera", 67), (["wristbands", "--fleet", "--falls-per-hour", "3000"], "wristband", 240)],
)
def test_the_fleet_verbs_print_their_rate_and_stop_on_sigint(
    hub: Hub, county_url: str, broker: Mosquitto, verb: list[str], kind: str, devices: int
) -> None:
    process = subprocess.Popen(
        [SHOUHU_BIN, "simulate", *verb, "--rate", "100", "--seed", "3", "--interval", "5"],
        env=shouhu_env(SHOUHU_MQTT_URL=broker.url, SHOUHU_DATABASE_URL=county_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    name = f"{kind}s"
    try:
        banner = process.stdout.readline()
        assert f"{name}: {devices} from demo_county.yaml" in banner
        assert "at most 100/s (--rate)" in banner
        # Every device is heard, within the first interval.
        wait_until(
            lambda: (
                query(
                    county_url,
                    "SELECT count(*) FROM device_state s JOIN devices d ON d.id = s.device_id"
                    " WHERE d.kind = %s AND s.online IS NOT NULL",
                    kind,
                )[0][0]
                == devices
            ),
            30,
            f"every {kind} heard",
        )
    finally:
        process.send_signal(2)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    [last] = [line for line in output.splitlines() if line.startswith(f"{name}: published")]
    assert "/s, at most 100/s)" in last
    if kind == "wristband":  # its falls, each receipted by the hub
        assert re.search(r"wb-\d+: fall \S+: receipt: incident [A-Z0-9]{5} \(open\)", output), output


def test_fleet_falls_are_receipted_by_the_hub_and_open_incidents(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    bands = read_registry(DEMO_COUNTY).wristbands[:60]
    fleet = WristbandFleet(
        bands,
        seed=2,
        start=datetime.now(UTC),
        zone=ZONE,
        boot_id="falls",
        pace=WristbandPace(interval_s=10, falls_per_hour=2000),
    )
    receipts: list[Receipt] = []
    publisher = MqttPublisher(broker.url, "test-fleet-falls", on_receipt=receipts.append)
    clock = SteppedClock(60)
    try:
        run_fleet(
            fleet, publisher.publish, clock=clock, wait=clock.wait, bound=RateBound(10_000), report=lambda _r: None
        )
        assert fleet.falls > 0
        wait_until(lambda: len(receipts) == fleet.falls, 30, "a receipt for every fall")
        assert publisher.unreceipted == []
    finally:
        publisher.close()
    assert all(r.incident and r.state == "open" for r in receipts)
    fallen = {r.device_id for r in receipts}
    # One red incident per resident: a second fall of the same band joins the first.
    incidents = query(county_url, "SELECT device_id FROM incidents WHERE kind = 'fall'")
    assert {row[0] for row in incidents} == fallen
    assert len(incidents) == len(fallen)


def test_an_alarm_goes_out_again_the_same_bytes_until_its_receipt(broker: Mosquitto) -> None:
    # No hub listens: no receipt ever comes, and the fall keeps going out.
    copies: list[bytes] = []
    listener = MqttPublisher(broker.url, "test-listener")
    listener.client.on_message = lambda _c, _u, message: copies.append(bytes(message.payload))
    listener.client.subscribe("shouhu/v1/wristband/wb-0001/fall", qos=1)
    sender = MqttPublisher(broker.url, "test-resender", resend_s=0.2)
    try:
        wait_until(listener.client.is_connected, 10, "the listener connected")
        fall = json_message("wristband", "wb-0001", "fall", {"msg_id": "f-1", "ts": "2026-11-24T10:00:00+08:00"})
        sender.publish(fall)
        wait_until(lambda: len(copies) >= 3, 10, "three copies of the fall")
        assert set(copies) == {fall.payload}
        assert sender.unreceipted == [("wb-0001", "f-1")]
    finally:
        sender.close()
        listener.close()
