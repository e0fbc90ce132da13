"""POST /callbacks/traccar against a real Mosquitto and a real hub over the demo county:
Traccar-shaped JSON in, v1 messages out, incidents opened by the hub."""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from api.main import create_app
from api.routes import traccar
from api.routes.traccar import SECRET_HEADER, TRACCAR_CALLBACK_PATH
from devices.contract import DEVICE_ID
from hub.service import Hub
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from tests.support.hub import query, wait_until
from tests.support.services import Mosquitto
from tests.support.watch import BAND, DEMO_COUNTY, WATCH

SECRET = "traccar-shared-secret-for-tests"
STRANGER = "359710049990001"  # a uniqueId the registry does not have
RECEIVE_S = 15


def bridge(database_url: str, mqtt_url: str, secret: str = SECRET, registry_file: str = "") -> TestClient:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=database_url,
        mqtt_url=mqtt_url,
        traccar_secret=secret,
        registry_file=registry_file,
    )
    return TestClient(create_app(settings))


@pytest.fixture
def api(county_url: str, broker: Mosquitto) -> Iterator[TestClient]:
    with bridge(county_url, broker.url) as client:
        yield client


def alarm(unique_id: str, name: str, event_id: int = 7001) -> dict[str, Any]:
    """An alarm event as Traccar's ``event.forward.url`` posts it."""
    now = datetime.now(UTC).isoformat()
    return {
        "event": {
            "id": event_id,
            "attributes": {"alarm": name},
            "deviceId": 12,
            "type": "alarm",
            "eventTime": now,
            "positionId": 880,
            "geofenceId": 0,
            "maintenanceId": 0,
        },
        "position": {
            "id": 880,
            "attributes": {"alarm": name, "batteryLevel": 57},
            "deviceId": 12,
            "protocol": "gt06",
            "fixTime": now,
            "valid": True,
            "latitude": 30.274085,
            "longitude": 120.15507,
        },
        "device": {"id": 12, "attributes": {}, "name": "wristband", "uniqueId": unique_id, "status": "online"},
    }


def position(unique_id: str) -> dict[str, Any]:
    """A position as Traccar's ``forward.url`` (``forward.type`` json) posts it: no event, no alarm."""
    body = alarm(unique_id, "sos")
    del body["event"]
    body["position"]["attributes"] = {"batteryLevel": 57, "steps": 1520}
    return body


def post(api: TestClient, body: Any, secret: str | None = SECRET) -> Any:
    headers = {"Content-Type": "application/json"}  # as Traccar sends it
    if secret is not None:
        headers[SECRET_HEADER] = secret
    return api.post(TRACCAR_CALLBACK_PATH, content=json.dumps(body), headers=headers)


class Listener:
    """A subscriber to the broker, to see what the bridge published and the hub receipted."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        subscribed: queue.Queue[bool] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"listener-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.put(True)
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, json.loads(m.payload)))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert subscribed.get(timeout=RECEIVE_S)

    def next(self) -> tuple[str, dict[str, Any]]:
        return self.messages.get(timeout=RECEIVE_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_an_sos_opens_an_incident_and_a_retried_post_is_the_same_one(
    hub: Hub, api: TestClient, broker: Mosquitto, county_url: str
) -> None:
    receipts = Listener(broker, f"shouhu/v1/wristband/{BAND}/receipt")
    body = alarm(BAND, "sos")
    try:
        answer = post(api, body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"device_id": BAND, "unregistered": False, "published": ["sos"], "ignored": None}
        _topic, first = receipts.next()
        assert query(county_url, "SELECT kind, device_id, state FROM incidents") == [("sos", BAND, "open")]
        # Traccar retries (its answer was lost): the same msg_id, receipted again, one incident.
        assert post(api, body).status_code == 200
        _topic, second = receipts.next()
        # The same alarm by position forwarding (its position's attributes.alarm): the same SOS.
        as_position = {key: value for key, value in body.items() if key != "event"}
        assert post(api, as_position).json()["published"] == ["sos", "telemetry"]
        _topic, third = receipts.next()
    finally:
        receipts.close()
    assert second == first
    assert third == first
    assert query(county_url, "SELECT count(*) FROM incidents") == [(1,)]
    sos = "SELECT count(*) FROM message_ledger WHERE device_id = %s AND channel = 'sos'"
    assert query(county_url, sos, BAND) == [(1,)]


def test_an_unknown_devices_sos_pages_the_county_as_unregistered(hub: Hub, api: TestClient, county_url: str) -> None:
    answer = post(api, alarm(STRANGER, "sos"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["device_id"] == f"traccar-{STRANGER}"
    assert answer.json()["unregistered"] is True
    wait_until(lambda: query(county_url, "SELECT count(*) FROM incidents") == [(1,)], RECEIVE_S, "the incident")
    assert query(county_url, "SELECT kind, device_id, area_id, state FROM incidents") == [
        ("sos_unregistered", f"traccar-{STRANGER}", "county", "open")
    ]
    # A uniqueId no topic can hold (a NUL, a slash) pages under its digest, never a 500;
    # text PostgreSQL cannot hold elsewhere (a tracker's attribute) is no 422 here either.
    body = alarm("imei/\u0000/1", "sos", event_id=7003)
    body["position"]["attributes"]["driverName"] = "\u0000"
    odd = post(api, body)
    assert odd.status_code == 200, odd.text
    assert odd.json()["unregistered"] is True
    assert DEVICE_ID.fullmatch(odd.json()["device_id"])
    # Its position is nobody's: not published, and still 200 (Traccar must not retry it).
    assert post(api, position(STRANGER)).json() == {
        "device_id": f"traccar-{STRANGER}",
        "unregistered": True,
        "published": [],
        "ignored": "the registry has no wristband with this uniqueId",
    }


def test_a_watch_id_of_the_registry_file_is_its_wristband(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    """A 4G watch sent through Traccar (its ``watch`` protocol): the uniqueId is the watch id."""
    with bridge(county_url, broker.url, registry_file=str(DEMO_COUNTY)) as api:
        answer = post(api, alarm(WATCH, "sos"))
    assert answer.json() == {"device_id": BAND, "unregistered": False, "published": ["sos"], "ignored": None}
    wait_until(lambda: query(county_url, "SELECT count(*) FROM incidents") == [(1,)], RECEIVE_S, "the incident")
    assert query(county_url, "SELECT kind, device_id FROM incidents") == [("sos", BAND)]


def test_a_position_and_a_removed_band_become_telemetry(hub: Hub, api: TestClient, county_url: str) -> None:
    assert post(api, position(BAND)).json()["published"] == ["telemetry"]
    wait_until(lambda: query(county_url, "SELECT battery FROM device_state WHERE device_id = %s", BAND) == [(57,)])
    assert post(api, alarm(BAND, "removing", event_id=7002)).json()["published"] == ["telemetry"]
    wait_until(lambda: query(county_url, "SELECT worn FROM device_state WHERE device_id = %s", BAND) == [(False,)])
    assert query(county_url, "SELECT count(*) FROM incidents WHERE kind IN ('sos', 'fall')") == [(0,)]


def test_a_wrong_or_missing_secret_is_refused_and_nothing_is_published(
    api: TestClient, broker: Mosquitto, county_url: str
) -> None:
    published = Listener(broker, "shouhu/v1/#")
    try:
        assert post(api, alarm(BAND, "sos"), secret="not-the-secret").status_code == 403
        assert post(api, alarm(BAND, "sos"), secret=SECRET + "x").status_code == 403
        assert post(api, alarm(BAND, "sos"), secret=None).status_code == 401
        # The refused requests were not even read: bad JSON behind a wrong secret is 403 too.
        assert api.post(TRACCAR_CALLBACK_PATH, content=b"{", headers={SECRET_HEADER: "no"}).status_code == 403
        # A forward with the secret, after them: the first and only message the broker carries.
        assert post(api, alarm(BAND, "fall")).json()["published"] == ["fall"]
        topic, _payload = published.next()
        assert topic == f"shouhu/v1/wristband/{BAND}/fall"
        assert published.messages.empty()
    finally:
        published.close()
    # With no secret configured every request is refused, even one carrying an empty header.
    with bridge(county_url, broker.url, secret="") as unconfigured:
        assert post(unconfigured, alarm(BAND, "sos"), secret="").status_code == 403
        assert post(unconfigured, alarm(BAND, "sos"), secret=SECRET).status_code == 403


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (json.dumps({"event": {"type": "alarm"}}).encode(), "device"),
        (json.dumps({"device": {"uniqueId": ""}}).encode(), "uniqueId"),
        (
            json.dumps({"device": {"uniqueId": BAND}, "event": {"type": "alarm", "eventTime": "yesterday"}}).encode(),
            "eventTime",
        ),
    ],
)
def test_what_is_not_traccars_json_is_422_naming_the_field(
    county_url: str, broker: Mosquitto, body: bytes, field: str
) -> None:
    with bridge(county_url, broker.url) as api:
        answer = api.post(TRACCAR_CALLBACK_PATH, content=body, headers={SECRET_HEADER: SECRET})
    assert answer.status_code == 422
    assert field in answer.json()["detail"]


def test_no_puback_is_503_so_traccar_retries(county_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(traccar, "PUBACK_TIMEOUT_S", 0.5)
    nobody = f"mqtt://127.0.0.1:{free_port()}"  # no broker listens here
    with bridge(county_url, nobody) as api:
        answer = post(api, alarm(BAND, "sos"))
    assert answer.status_code == 503
    assert "send it again" in answer.json()["detail"]
