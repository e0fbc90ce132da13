"""Per-device broker accounts, ACLs and TLS against a real Mosquitto on the shipped
configuration, with the files `shouhu broker credentials` writes and a CA made here."""

from __future__ import annotations

import csv
import json
import shutil
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from typer.testing import CliRunner

from api.main import create_app
from devices.command_exchange import exchange
from devices.commands import CommandName, WatchCommand
from gateway.watch_server import WatchServer, WatchServerConfig
from hub.service import Hub
from launch.cli import app
from launch.wiring import api_server_config
from shouhu.embedded.postgres import LocalPostgres, free_port
from shouhu.mosquitto_passwd import line_matches
from shouhu.mqtt_address import BrokerAddress
from shouhu.settings import Settings
from simulators.wristband import Wristband, alarm_payload, publish_raw
from tests.support.broker import telemetry
from tests.support.database import fresh_database
from tests.support.hub import query, start_hub, wait_until
from tests.support.secure_broker import SecureBroker
from tests.support.services import scratch_dir
from tests.support.tls import make_pki
from tests.support.watch import BAND, CHINA, SOS_BODY, WATCH, Watch, frame

DEMO = Path(__file__).resolve().parents[1] / "simulators" / "demo_county.yaml"
SECRET = "test-device-secret-0123456789"
GATEWAY = "gw-test-1"
API = "shouhu-api"


def write_credentials(registry: Path, broker: SecureBroker, hub_id: str, csv_path: Path) -> dict[str, str]:
    """Run the verb; the accounts' passwords from its CSV."""
    result = CliRunner().invoke(
        app,
        [
            "broker", "credentials", str(registry),
            "--password-file", str(broker.password_file), "--acl-file", str(broker.acl_file),
            "--out-credentials", str(csv_path), "--hub", hub_id, "--gateway", GATEWAY, "--api", API,
        ],
        env={"SHOUHU_DEVICE_SECRET": SECRET},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with csv_path.open(newline="") as handle:
        return {row["account"]: row["password"] for row in csv.DictReader(handle)}


def connack(url: str, client_id: str | None = None) -> Any:
    """The broker's answer to a 3.1.1 CONNECT with the URL's account (0: accepted)."""
    address = BrokerAddress.parse(url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id or uuid.uuid4().hex, protocol=MQTTProtocolVersion.MQTTv311
    )
    address.configure(client)
    answered = threading.Event()
    codes: list[Any] = []

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, *_rest: Any) -> None:
        codes.append(reason)
        answered.set()

    client.on_connect = on_connect
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        assert answered.wait(5), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


@pytest.fixture(scope="module")
def county(postgres: LocalPostgres) -> Iterator[str]:
    import psycopg

    from devices.registry import load_registry
    from devices.registry_file import parse_registry

    for url in fresh_database(postgres):
        with psycopg.connect(url) as conn:
            load_registry(conn, parse_registry(DEMO))
        yield url


@pytest.fixture(scope="module")
def secure() -> Iterator[tuple[SecureBroker, dict[str, str], str]]:
    directory = scratch_dir("shouhu-secure-mqtt-")
    broker = SecureBroker(directory, make_pki(directory), free_port(), free_port())
    hub_id = f"test-hub-{uuid.uuid4().hex[:8]}"
    passwords = write_credentials(DEMO, broker, hub_id, directory / "credentials.csv")
    broker.start()
    yield broker, passwords, hub_id
    broker.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_hub(county: str, secure: tuple[SecureBroker, dict[str, str], str]) -> Iterator[Hub]:
    """A hub on its own account, over TLS trusting the session's CA."""
    broker, passwords, hub_id = secure
    hub, thread = start_hub(county, broker.url(hub_id, passwords[hub_id], tls=True), hub_id)
    yield hub
    hub.stop()
    thread.join(10)


def test_our_hash_is_mosquitto_passwd_s(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "wb-0001", "p@ss:word"], check=True)
    line = path.read_text()
    assert line_matches(line, "wb-0001", "p@ss:word")
    assert not line_matches(line, "wb-0001", "p@ss:worD")


def test_a_device_cannot_publish_as_another_and_the_hub_sees_its_own(
    county: str, secure: tuple[SecureBroker, dict[str, str], str], tls_hub: Hub
) -> None:
    broker, passwords, _hub_id = secure
    camera = broker.url("cam-001", passwords["cam-001"], tls=True)
    # A camera cannot raise an SOS, not even under its own id; its health goes through.
    publish_raw(camera, "shouhu/v1/wristband/cam-001/sos", alarm_payload("sos"))
    health = {"msg_id": uuid.uuid4().hex, "ts": datetime.now(UTC).isoformat(), "online": True}
    publish_raw(camera, "shouhu/v1/camera/cam-001/health", json.dumps(health).encode())
    band = Wristband(broker.url("wb-0001", passwords["wb-0001"], tls=True), "wb-0001", resend_s=1)
    try:
        # As wb-0002, and a camera's channel under its own id: the broker drops both.
        band.client.publish("shouhu/v1/wristband/wb-0002/sos", alarm_payload("sos"), qos=1).wait_for_publish(5)
        band.client.publish("shouhu/v1/camera/wb-0001/health", json.dumps(health).encode(), qos=1).wait_for_publish(5)
        band.client.publish("shouhu/v1/wristband/wb-0001/telemetry", telemetry(), qos=1).wait_for_publish(5)
        # Its own press, after them all: receipted by the hub (its receipt topic readable),
        # so the alarms that came before it have been through the hub.
        receipt = band.wait_for_receipt(band.alarm("sos"), 10)
    finally:
        band.close()
    assert receipt is not None
    assert receipt["state"] == "open"
    ledger = "SELECT device_id, channel FROM message_ledger WHERE device_id IN ('wb-0001', 'cam-001') ORDER BY 1, 2"
    wait_until(lambda: len(query(county, ledger)) == 3, what="the devices' own messages stored")
    assert query(county, ledger) == [("cam-001", "health"), ("wb-0001", "sos"), ("wb-0001", "telemetry")]
    opened = "SELECT device_id, kind FROM incidents WHERE device_id IN ('wb-0001', 'wb-0002', 'cam-001')"
    assert query(county, opened) == [("wb-0001", "sos")]
    assert query(county, "SELECT count(*) FROM message_ledger WHERE device_id = 'wb-0002'") == [(0,)]
    assert query(county, "SELECT count(*) FROM dead_letters WHERE topic LIKE %s", "%wb-0001%") == [(0,)]


def test_wrong_passwords_and_clients_without_the_ca_are_refused(
    secure: tuple[SecureBroker, dict[str, str], str],
) -> None:
    broker, passwords, _hub_id = secure
    assert connack(broker.url("wb-0001", passwords["wb-0001"])) == 0
    assert connack(broker.url("wb-0001", passwords["wb-0002"])) != 0
    assert connack(broker.url("nobody", passwords["wb-0001"])) != 0
    assert connack(broker.url("wb-0001", passwords["wb-0001"], tls=True)) == 0
    with pytest.raises(ssl.SSLCertVerificationError):
        connack(broker.url("wb-0001", passwords["wb-0001"], tls=True, ca=False))


def test_the_watch_gateway_and_the_api_work_on_their_accounts_over_tls(
    county: str, secure: tuple[SecureBroker, dict[str, str], str], tls_hub: Hub
) -> None:
    broker, passwords, _hub_id = secure
    config = WatchServerConfig(
        mqtt_url=broker.url(GATEWAY, passwords[GATEWAY], tls=True),
        client_id=GATEWAY,
        watch_tz=CHINA,
        host="127.0.0.1",
        port=0,
    )
    server = WatchServer(config, {WATCH: BAND}.get)
    thread = server.run_in_thread()
    try:
        assert server.port is not None
        watch = Watch(server.port)
        try:
            # The watch's SOS, published by the gateway for wb-0061: answered once the hub's
            # receipt came back to the gateway.
            watch.send(frame(f"AL,{SOS_BODY}"))
            assert watch.answer() == f"[3G*{WATCH}*0002*AL]".encode()
            # The API's account commands the watch and reads the gateway's result.
            command = WatchCommand(command_id=uuid.uuid4().hex, command=CommandName.LOCATE)
            results = exchange(broker.url(API, passwords[API], tls=True), [(BAND, command)], 5)
            assert results[command.command_id].delivered
            assert watch.answer() == f"[3G*{WATCH}*0002*CR]".encode()
            # Garbage: the gateway's dead letter, on its own topic, reaches the hub.
            watch.send(b"garbage" + frame("LK"))
            assert watch.answer() == f"[3G*{WATCH}*0002*LK]".encode()
        finally:
            watch.close()
    finally:
        server.stop()
        thread.join(15)
    assert query(county, "SELECT count(*) FROM incidents WHERE device_id = %s", BAND) == [(1,)]
    wait_until(
        lambda: query(
            county, "SELECT reason FROM dead_letters WHERE topic = %s", f"shouhu/v1/gateway/{GATEWAY}/dead_letter"
        ),
        what="the gateway's dead letter",
    )


def test_a_gateway_cannot_write_another_gateways_dead_letters(
    county: str, secure: tuple[SecureBroker, dict[str, str], str], tls_hub: Hub
) -> None:
    broker, passwords, _hub_id = secure
    address = BrokerAddress.parse(broker.url(GATEWAY, passwords[GATEWAY]))
    gateway = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{GATEWAY}-raw", protocol=MQTTProtocolVersion.MQTTv311
    )
    address.configure(gateway)
    gateway.connect(address.host, address.port)
    gateway.loop_start()
    letter = {"reason": "bad_frame", "detail": "marker", "device": "", "peer": "x:1", "raw_base64": ""}
    try:
        # In this order on one connection: once the second is stored, the first had its chance.
        for gateway_id in ("gw-other", GATEWAY):
            gateway.publish(f"shouhu/v1/gateway/{gateway_id}/dead_letter", json.dumps(letter), qos=1)
        wait_until(
            lambda: query(county, "SELECT count(*) FROM dead_letters WHERE detail LIKE %s", "%marker%") == [(1,)],
            what="the gateway's own dead letter",
        )
    finally:
        gateway.disconnect()
        gateway.loop_stop()
    assert query(county, "SELECT count(*) FROM dead_letters WHERE topic LIKE %s", "%gw-other%") == [(0,)]


def test_a_deactivated_device_is_locked_out_after_a_reload(
    secure: tuple[SecureBroker, dict[str, str], str], tmp_path: Path
) -> None:
    broker, passwords, hub_id = secure
    registry = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    registry["devices"] = [d for d in registry["devices"] if d["id"] != "wb-0003"]
    # And wb-0004's password rotated alone.
    for device in registry["devices"]:
        if device["id"] == "wb-0004":
            device["credential_version"] = 2
    smaller = tmp_path / "registry.yaml"
    smaller.write_text(yaml.safe_dump(registry, allow_unicode=True), encoding="utf-8")
    band = Wristband(broker.url("wb-0003", passwords["wb-0003"]), "wb-0003")
    try:
        wait_until(band.client.is_connected, what="wb-0003 connected")
        rotated = write_credentials(smaller, broker, hub_id, tmp_path / "credentials.csv")
        assert "wb-0003" not in rotated
        assert rotated["wb-0005"] == passwords["wb-0005"]
        assert rotated["wb-0004"] != passwords["wb-0004"]
        broker.reload()
        # Mosquitto checks the connected clients again at the reload: wb-0003 is dropped.
        wait_until(lambda: not band.client.is_connected(), what="wb-0003 disconnected")
    finally:
        band.close()
    wait_until(lambda: connack(broker.url("wb-0003", passwords["wb-0003"])) != 0, what="wb-0003 refused")
    assert connack(broker.url("wb-0004", passwords["wb-0004"])) != 0
    assert connack(broker.url("wb-0004", rotated["wb-0004"])) == 0
    assert connack(broker.url("wb-0005", passwords["wb-0005"])) == 0


@pytest.mark.parametrize(("proxy", "secure_cookie"), [("10.0.0.5", True), ("10.0.0.6", False)])
def test_behind_a_trusted_tls_proxy_the_session_cookie_is_secure(county: str, proxy: str, secure_cookie: bool) -> None:
    import psycopg

    from shouhu.tokens import create_token

    with psycopg.connect(county) as conn:
        token = create_token(conn, role="admin", areas=[], label="proxy", now=datetime.now(UTC), expires_at=None)
    settings = Settings(_env_file=None, database_url=county, forwarded_allow_ips="10.0.0.5")  # type: ignore[call-arg]
    config = api_server_config(create_app(settings), settings)
    config.load()  # wraps the app in uvicorn's proxy-headers middleware, as the server does
    with TestClient(config.loaded_app, client=(proxy, 40000)) as client:
        answer = client.post("/api/v1/session", json={"token": token}, headers={"X-Forwarded-Proto": "https"})
    assert answer.status_code == 201, answer.text
    assert ("secure" in answer.headers["set-cookie"].lower()) is secure_cookie


def test_tls_files_ride_in_the_broker_url_and_need_mqtts() -> None:
    from pydantic import ValidationError

    from shouhu.mqtt_address import broker_url

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, mqtt_url="mqtts://hub:p%40ss@broker:8883", mqtt_ca_file="/etc/ca dir/ca.pem"
    )
    address = BrokerAddress.parse(broker_url(settings))
    assert (address.host, address.port, address.tls) == ("broker", 8883, True)
    assert (address.username, address.password, address.ca_file) == ("hub", "p@ss", "/etc/ca dir/ca.pem")
    assert address.cert_file is None
    with pytest.raises(ValidationError, match="mqtts"):
        Settings(_env_file=None, mqtt_url="mqtt://broker:1883", mqtt_ca_file="/ca.pem")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="go together"):
        Settings(_env_file=None, mqtt_url="mqtts://broker", mqtt_cert_file="/c.pem")  # type: ignore[call-arg]


def test_the_verb_refuses_a_short_secret_a_bad_file_and_a_name_twice_and_repeats_itself(tmp_path: Path) -> None:
    def run(registry: Path, secret: str, *extra: str) -> Any:
        files = ["--password-file", str(tmp_path / "passwd"), "--acl-file", str(tmp_path / "acl")]
        return CliRunner().invoke(
            app, ["broker", "credentials", str(registry), *files, *extra], env={"SHOUHU_DEVICE_SECRET": secret}
        )

    assert run(DEMO, "too-short").exit_code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices:\n- id: wb-1\n  kind: wristband\n  credential_version: 0\n", encoding="utf-8")
    refused = run(bad, SECRET)
    assert refused.exit_code == 1
    assert "nothing written" in refused.output
    assert run(DEMO, SECRET, "--hub", "wb-0001").exit_code == 1
    assert not (tmp_path / "passwd").exists()
    assert run(DEMO, SECRET).exit_code == 0
    first = (tmp_path / "passwd").read_bytes(), (tmp_path / "acl").read_bytes()
    assert run(DEMO, SECRET).exit_code == 0
    assert ((tmp_path / "passwd").read_bytes(), (tmp_path / "acl").read_bytes()) == first
    assert (tmp_path / "passwd").stat().st_mode & 0o777 == 0o600
