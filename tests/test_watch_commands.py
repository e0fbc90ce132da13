"""POST /api/v1/devices/{id}/commands against a real Mosquitto, a real database (the demo
county) and the watch gateway in-process: the command crosses the broker, the gateway
writes its frames to the connected watch and the API says honestly whether it did."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from fastapi.testclient import TestClient

from api import deps
from api.main import create_app
from api.routes import commands
from devices.commands import command_topic, result_topic
from devices.contract import is_outbound
from gateway.watch_server import WatchServer
from launch.wiring import push_sos_numbers
from shouhu.settings import DEFAULT_TIMEZONE, Settings
from shouhu.tokens import Role, create_token
from tests.support.hub import wait_until
from tests.support.services import SHOUHU_BIN, Mosquitto, shouhu_env
from tests.support.watch import BAND, DEMO_COUNTY, WATCH, Watch, frame, serving

ZONE = ZoneInfo(DEFAULT_TIMEZONE)
# A Wednesday: at noon gw-019 is on duty for xiguan-01-g1 (08:00-20:00), at 03:00 gw-023
# (20:00-08:00); wb-0061's wearer r-0061 lives in its micro-grid m1, which has no shift of its own.
NOON = datetime(2026, 12, 2, 12, 0, tzinfo=ZONE)
NIGHT = datetime(2026, 12, 2, 3, 0, tzinfo=ZONE)
DAY_WORKER = "+12075550129"  # gw-019
NIGHT_WORKER = "+12065550167"  # gw-023
GUARDIANS = ["+12055550167", "+12055550131"]  # r-0061-g1, r-0061-g2 by priority
PATH = f"/api/v1/devices/{BAND}/commands"

Headers = dict[str, str]


def bearer(url: str, role: Role, areas: tuple[str, ...] = ()) -> Headers:
    with psycopg.connect(url, autocommit=True) as conn:
        secret = create_token(
            conn, role=role, areas=list(areas), label="test", now=NOON - timedelta(days=1), expires_at=None
        )
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def gateway(broker: Mosquitto) -> Iterator[WatchServer]:
    with serving(broker) as server:
        yield server


@pytest.fixture
def api(county_url: str, broker: Mosquitto) -> Iterator[TestClient]:
    app = create_app(Settings(_env_file=None, database_url=county_url, mqtt_url=broker.url))  # type: ignore[call-arg]
    app.dependency_overrides[deps.get_now] = lambda: NOON
    with TestClient(app) as client:
        yield client


@pytest.fixture
def operator(county_url: str) -> Headers:
    return bearer(county_url, Role.OPERATOR)


@pytest.fixture
def watch(gateway: WatchServer) -> Iterator[Watch]:
    """wb-0061's watch, connected: its heartbeat answered, so the gateway knows where it is."""
    connected = Watch(gateway.port or 0)
    connected.send(frame("LK"))
    assert connected.answer() == b"[3G*8600000061*0002*LK]"
    yield connected
    connected.close()


def post(api: TestClient, headers: Headers, body: dict[str, Any], path: str = PATH) -> Any:
    return api.post(path, json=body, headers=headers)


def test_locate_reaches_the_connected_watch(api: TestClient, operator: Headers, watch: Watch, county_url: str) -> None:
    response = post(api, operator, {"command": "locate"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["delivered"] is True
    assert body["reason"] is None
    assert watch.answer() == f"[3G*{WATCH}*0002*CR]".encode()
    with psycopg.connect(county_url) as conn:
        row = conn.execute(
            "SELECT role, action, subject, detail FROM audit_log WHERE action = 'device_command'"
        ).fetchone()
    assert row is not None
    assert row[:3] == ("operator", "device_command", f"device:{BAND}")
    assert row[3]["command"] == "locate"
    assert row[3]["delivered"] is True
    assert row[3]["command_id"] == body["command_id"]


def sos_frames(numbers: list[str]) -> list[bytes]:
    return [
        f"[3G*{WATCH}*{len(content):04X}*{content}]".encode()
        for content in (f"SOS{slot},{phone}" for slot, phone in enumerate(numbers, start=1))
    ]


def test_sos_numbers_are_the_grid_worker_on_duty_then_the_guardians(
    api: TestClient, operator: Headers, watch: Watch
) -> None:
    response = post(api, operator, {"command": "set_sos_numbers"})
    assert response.status_code == 202, response.text
    assert response.json()["delivered"] is True
    assert [watch.answer() for _ in range(3)] == sos_frames([DAY_WORKER, *GUARDIANS])


def test_sos_numbers_at_night_are_the_night_worker(api: TestClient, operator: Headers, watch: Watch) -> None:
    api.app.dependency_overrides[deps.get_now] = lambda: NIGHT  # type: ignore[attr-defined]
    response = post(api, operator, {"command": "set_sos_numbers"})
    assert response.status_code == 202, response.text
    assert response.json()["delivered"] is True
    assert [watch.answer() for _ in range(3)] == sos_frames([NIGHT_WORKER, *GUARDIANS])


def test_a_registry_load_sends_the_connected_watches_their_sos_numbers(
    county_url: str, broker: Mosquitto, watch: Watch, capsys: pytest.CaptureFixture[str]
) -> None:
    """wb-0061's watch is connected, wb-0062's is not; wb-0001 has no watch id."""
    settings = Settings(_env_file=None, database_url=county_url, mqtt_url=broker.url)  # type: ignore[call-arg]
    push_sos_numbers(county_url, settings, [BAND, "wb-0062"], at=NOON)
    assert [watch.answer() for _ in range(3)] == sos_frames([DAY_WORKER, *GUARDIANS])
    said = capsys.readouterr().out
    assert "sent to 1 connected, 1 not connected or not written, 0 unanswered" in said


def test_a_registry_load_with_no_gateway_running_says_so_and_loads(
    county_url: str, broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(_env_file=None, database_url=county_url, mqtt_url=broker.url)  # type: ignore[call-arg]
    push_sos_numbers(county_url, settings, [BAND], at=NOON)
    assert "not sent: no watch gateway answered within 1 s" in capsys.readouterr().out


def test_the_verb_sends_the_numbers_after_loading(county_url: str, broker: Mosquitto, watch: Watch) -> None:
    """At whatever hour the suite runs, someone is on duty for wb-0061 and it has two
    guardians: three numbers, SOS1 to SOS3."""
    env = shouhu_env(SHOUHU_DATABASE_URL=county_url, SHOUHU_MQTT_URL=broker.url)
    load = subprocess.run(
        [SHOUHU_BIN, "registry", "load", str(DEMO_COUNTY)], env=env, capture_output=True, text=True, timeout=120
    )
    assert load.returncode == 0, load.stderr
    assert "watches' SOS numbers: sent to 1 connected, 9 not connected" in load.stdout
    answers = [watch.answer() for _ in range(3)]
    assert [answer.split(b"*")[3][:5] for answer in answers] == [b"SOS1,", b"SOS2,", b"SOS3,"]


def test_upload_interval_reaches_the_watch(api: TestClient, operator: Headers, watch: Watch) -> None:
    response = post(api, operator, {"command": "set_upload_interval", "seconds": 60})
    assert response.status_code == 202, response.text
    assert response.json()["delivered"] is True
    assert watch.answer() == f"[3G*{WATCH}*0009*UPLOAD,60]".encode()


def test_a_watch_not_connected_is_not_delivered(api: TestClient, operator: Headers, gateway: WatchServer) -> None:
    response = post(api, operator, {"command": "locate"})
    assert response.status_code == 202, response.text
    assert response.json()["delivered"] is False
    assert response.json()["reason"] == "not_connected"
    # A watch that spoke and hung up is not connected either.
    gone = Watch(gateway.port or 0)
    gone.send(frame("LK"))
    gone.answer()
    gone.close()
    # Its link is dropped once the gateway reads the close: await the answer that says so.
    wait_until(
        lambda: post(api, operator, {"command": "locate"}).json()["reason"] == "not_connected",
        what="the closed connection forgotten",
    )


def test_the_command_goes_in_the_watchs_own_maker_and_index(
    api: TestClient, operator: Headers, gateway: WatchServer
) -> None:
    zj = Watch(gateway.port or 0)
    try:
        zj.send(f"[ZJ*{WATCH}*00A1*0002*LK]".encode())
        assert zj.answer() == f"[ZJ*{WATCH}*00A1*0002*LK]".encode()
        assert post(api, operator, {"command": "locate"}).json()["delivered"] is True
        assert zj.answer() == f"[ZJ*{WATCH}*00A1*0002*CR]".encode()
    finally:
        zj.close()


def test_no_gateway_answering_is_not_delivered(
    api: TestClient, operator: Headers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands, "RESULT_TIMEOUT_S", 0.5)
    response = post(api, operator, {"command": "locate"})
    assert response.status_code == 202, response.text
    assert response.json()["delivered"] is False
    assert response.json()["reason"] == "no_gateway"


def test_a_command_that_reaches_the_gateway_after_its_wait_is_not_sent(
    api: TestClient, operator: Headers, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway was down: the API answered no_gateway, and the broker kept the command
    in the gateway's persistent session. Back up, the gateway must not send it now."""
    session = f"test-watch-gateway-{uuid.uuid4().hex[:8]}"
    with serving(broker, client_id=session):
        pass  # its session and subscriptions stay with the broker
    monkeypatch.setattr(commands, "RESULT_TIMEOUT_S", 0.3)
    response = post(api, operator, {"command": "locate"})
    assert response.json()["reason"] == "no_gateway"
    with serving(broker, client_id=session) as gateway:
        wait_until(lambda: gateway.counts["command:expired"] == 1)
        assert gateway.counts["command:not_connected"] == 0
        assert gateway.counts["command:delivered"] == 0


@pytest.mark.parametrize(
    ("role", "status"),
    [(Role.ADMIN, 202), (Role.OPERATOR, 202), (Role.GRID_WORKER, 403), (Role.TECHNICIAN, 403), (Role.PLATFORM, 403)],
)
def test_admins_and_operators_may_command(
    api: TestClient, county_url: str, gateway: WatchServer, role: Role, status: int
) -> None:
    response = post(api, bearer(county_url, role), {"command": "locate"})
    assert response.status_code == status, response.text


def test_a_wristband_outside_the_tokens_areas_is_not_found(
    api: TestClient, county_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands, "RESULT_TIMEOUT_S", 0.5)  # no gateway here: do not wait 5 s
    elsewhere = bearer(county_url, Role.OPERATOR, ("xiguan-02",))
    response = post(api, elsewhere, {"command": "locate"})
    assert response.status_code == 404, response.text
    within = bearer(county_url, Role.OPERATOR, ("xiguan-01",))
    assert post(api, within, {"command": "set_upload_interval", "seconds": 60}).status_code == 202


def test_a_camera_or_unknown_device_is_not_found(api: TestClient, operator: Headers, county_url: str) -> None:
    with psycopg.connect(county_url) as conn:
        row = conn.execute("SELECT id FROM devices WHERE kind = 'camera' LIMIT 1").fetchone()
    assert row is not None
    assert post(api, operator, {"command": "locate"}, f"/api/v1/devices/{row[0]}/commands").status_code == 404
    assert post(api, operator, {"command": "locate"}, "/api/v1/devices/no-such/commands").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"command": "reboot"}, "command"),
        ({}, "command"),
        ({"command": "set_upload_interval"}, "seconds"),
        ({"command": "set_upload_interval", "seconds": 0}, "seconds"),
        ({"command": "set_upload_interval", "seconds": 86_401}, "seconds"),
        ({"command": "locate", "seconds": 60}, "seconds"),
    ],
)
def test_a_bad_body_is_422_naming_the_field(
    api: TestClient, operator: Headers, body: dict[str, Any], field: str
) -> None:
    response = post(api, operator, body)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]


def test_the_hub_takes_commands_and_results_as_outbound_never_as_data() -> None:
    # The hub's bulk subscription `shouhu/v1/#` sees both; neither may become a dead letter.
    assert is_outbound(command_topic(BAND))
    assert is_outbound(result_topic(BAND))
    assert not is_outbound(f"shouhu/v1/wristband/{BAND}/telemetry")
