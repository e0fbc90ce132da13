"""devices/traccar.py: Traccar's forwarded JSON → v1 messages, pure and table-driven."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from devices.contract import DEVICE_ID, DeviceMessage, parse_message
from devices.traccar import TraccarForward, map_forward, unregistered_device_id

NOW = datetime(2026, 12, 4, 2, 30, tzinfo=UTC)
EVENT_TIME = "2026-12-04T02:29:58.000+00:00"
UNIQUE = "868618052108909"
BAND = "wb-0061"


def forward(
    alarm: str | None = None, *, event_type: str = "alarm", with_position: bool = True, **extra: Any
) -> TraccarForward:
    body: dict[str, Any] = {"device": {"id": 385, "uniqueId": UNIQUE, "name": "Grandma", "status": "online"}}
    if alarm is not None or event_type != "alarm":
        body["event"] = {
            "id": 43334,
            "type": event_type,
            "eventTime": EVENT_TIME,
            "deviceId": 385,
            "positionId": 9001,
            "attributes": {"alarm": alarm} if alarm is not None else {},
        }
    if with_position:
        body["position"] = {
            "id": 9001,
            "deviceId": 385,
            "protocol": "gt06",
            "fixTime": "2026-12-04T02:29:50.000+00:00",
            "valid": True,
            "latitude": 30.274085,
            "longitude": 120.15507,
            "attributes": {"batteryLevel": 64, "steps": 1520, "heartRate": 72, "ignition": False},
        }
    for key, value in extra.items():
        body[key] = {**body.get(key, {}), **value}
    return TraccarForward.model_validate_json(json.dumps(body))


def payloads(result_forward: TraccarForward, band: str | None = BAND) -> list[tuple[str, dict[str, Any]]]:
    mapped = map_forward(result_forward, band, NOW)
    found = []
    for publication in mapped.publications:
        parsed = parse_message(str(publication.topic), publication.payload)
        assert isinstance(parsed, DeviceMessage), parsed  # every message is valid v1
        body = json.loads(publication.payload)
        assert body["msg_id"] == publication.msg_id
        found.append((str(publication.topic), {k: v for k, v in body.items() if k != "msg_id"}))
    return found


TOPIC = f"shouhu/v1/wristband/{BAND}"
WHERE = {"lat": 30.274085, "lon": 120.15507}
TS = "2026-12-04T02:29:58+00:00"  # the event's time
FIX = "2026-12-04T02:29:50+00:00"  # its position's: an alarm's time


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (forward("sos"), [(f"{TOPIC}/sos", {"ts": FIX, "action": "press", **WHERE, "battery": 64})]),
        (forward("fall"), [(f"{TOPIC}/fall", {"ts": FIX, **WHERE})]),
        (forward("fallDown"), [(f"{TOPIC}/fall", {"ts": FIX, **WHERE})]),
        (
            forward("lowBattery"),
            [(f"{TOPIC}/telemetry", {"ts": TS, "battery": 64, **WHERE, "traccar_alarm": "lowBattery"})],
        ),
        (
            forward("removing"),
            [(f"{TOPIC}/telemetry", {"ts": TS, "battery": 64, "worn": False, **WHERE, "traccar_alarm": "removing"})],
        ),
        (
            forward("sos,lowBattery"),
            [
                (f"{TOPIC}/sos", {"ts": FIX, "action": "press", **WHERE, "battery": 64}),
                (f"{TOPIC}/telemetry", {"ts": TS, "battery": 64, **WHERE, "traccar_alarm": "lowBattery"}),
            ],
        ),
        # A position without an event: telemetry stamped with its fix time.
        (
            forward(),
            [
                (
                    f"{TOPIC}/telemetry",
                    {"ts": FIX, "battery": 64, **WHERE, "heart_rate": 72, "steps": 1520},
                )
            ],
        ),
        # A position whose own attributes name alarms (position forwarding): read as well.
        (
            forward(None, position={"attributes": {"alarm": "removing", "batteryLevel": 64}}),
            [(f"{TOPIC}/telemetry", {"ts": FIX, "battery": 64, "worn": False, **WHERE, "traccar_alarm": "removing"})],
        ),
        # No valid fix: no position, the rest still.
        (forward("sos", position={"valid": False}), [(f"{TOPIC}/sos", {"ts": FIX, "action": "press", "battery": 64})]),
        # An SOS without a position at all still pages.
        (forward("sos", with_position=False), [(f"{TOPIC}/sos", {"ts": TS, "action": "press"})]),
        # A value out of the contract's range is left out, never costing the SOS.
        (
            forward("sos", position={"latitude": 91.0, "attributes": {"batteryLevel": 140}}),
            [(f"{TOPIC}/sos", {"ts": FIX, "action": "press"})],
        ),
        # Events and alarms Shouhu does not read: nothing.
        (forward(event_type="deviceOnline"), []),
        (forward(event_type="geofenceEnter"), []),
        (forward("overspeed"), []),
        (forward(None, event={"type": "alarm"}), []),
    ],
)
def test_a_registered_wristband(given: TraccarForward, expected: list[tuple[str, dict[str, Any]]]) -> None:
    assert payloads(given) == expected


STRANGER = f"shouhu/v1/wristband/traccar-{UNIQUE}"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (forward("sos"), [(f"{STRANGER}/sos", {"ts": FIX, "action": "press", **WHERE, "battery": 64})]),
        (forward("fallDown"), [(f"{STRANGER}/fall", {"ts": FIX, **WHERE})]),
        (forward("sos,removing"), [(f"{STRANGER}/sos", {"ts": FIX, "action": "press", **WHERE, "battery": 64})]),
        (
            forward(None, position={"attributes": {"alarm": "sos"}}),
            [(f"{STRANGER}/sos", {"ts": FIX, "action": "press", **WHERE})],
        ),
        # The hub would only dead-letter an unknown device's telemetry.
        (forward("lowBattery"), []),
        (forward("removing"), []),
        (forward(), []),
    ],
)
def test_an_unregistered_device_pages_only_its_alarms(
    given: TraccarForward, expected: list[tuple[str, dict[str, Any]]]
) -> None:
    mapped = map_forward(given, None, NOW)
    assert mapped.unregistered
    assert mapped.device_id == f"traccar-{UNIQUE}"
    assert payloads(given, None) == expected
    assert (mapped.ignored is None) == bool(expected)


def test_a_retry_publishes_the_same_msg_ids_and_bytes() -> None:
    first = map_forward(forward("sos,lowBattery"), BAND, NOW)
    again = map_forward(forward("sos,lowBattery"), BAND, datetime(2026, 12, 4, 3, 0, tzinfo=UTC))
    assert first == again
    assert len({p.msg_id for p in first.publications}) == 2


@pytest.mark.parametrize(
    "other",
    [
        forward("sos", position={"id": 9002}),
        forward("sos", position={"fixTime": "2026-12-04T02:31:00.000+00:00"}),
        forward("sos", device={"uniqueId": "868618052108910"}),
    ],
)
def test_another_alarm_has_another_msg_id(other: TraccarForward) -> None:
    [first] = map_forward(forward("sos"), BAND, NOW).publications
    [second] = map_forward(other, BAND, NOW).publications
    assert first.msg_id != second.msg_id


def test_an_alarm_forwarded_as_event_and_as_position_is_one_message() -> None:
    """With both forwardings on, Traccar sends an alarm twice: in the event, and in the
    ``attributes.alarm`` of its position. Both give the same SOS, msg_id and bytes."""
    as_event = map_forward(forward("sos", position={"attributes": {"alarm": "sos", "batteryLevel": 64}}), BAND, NOW)
    as_position = map_forward(forward(None, position={"attributes": {"alarm": "sos", "batteryLevel": 64}}), BAND, NOW)
    assert [p.topic.channel for p in as_event.publications] == ["sos"]
    assert [p.topic.channel for p in as_position.publications] == ["sos", "telemetry"]
    assert as_event.publications[0] == as_position.publications[0]
    # The telemetry has its own msg_id.
    assert as_position.publications[1].msg_id != as_event.publications[0].msg_id


def test_a_forward_without_any_time_is_stamped_now() -> None:
    given = TraccarForward.model_validate(
        {"device": {"uniqueId": UNIQUE}, "event": {"type": "alarm", "attributes": {"alarm": "sos"}}}
    )
    [publication] = map_forward(given, BAND, NOW).publications
    assert json.loads(publication.payload)["ts"] == NOW.isoformat()


@pytest.mark.parametrize("unique_id", ["has space", "a/b", "x" * 60, "设备一"])
def test_a_unique_id_the_topic_cannot_hold_is_named_by_its_digest(unique_id: str) -> None:
    device_id = unregistered_device_id(unique_id)
    assert DEVICE_ID.fullmatch(device_id)
    assert device_id.startswith("traccar-")
    assert device_id == unregistered_device_id(unique_id)
    assert device_id != unregistered_device_id(unique_id + "2")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, ("device",)),
        ({"device": {}}, ("device", "uniqueId")),
        ({"device": {"uniqueId": ""}}, ("device", "uniqueId")),
        ({"device": {"uniqueId": UNIQUE}, "event": {"attributes": {}}}, ("event", "type")),
        (
            {"device": {"uniqueId": UNIQUE}, "event": {"type": "alarm", "eventTime": "2026-12-04T02:29:58"}},
            ("event", "eventTime"),
        ),
        ({"device": {"uniqueId": UNIQUE}, "position": {"latitude": "north"}}, ("position", "latitude")),
    ],
)
def test_what_is_not_traccars_json_names_the_field(body: dict[str, Any], field: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        TraccarForward.model_validate_json(json.dumps(body))
    assert [tuple(error["loc"]) for error in caught.value.errors()] == [field]


def test_now_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        map_forward(forward("sos"), BAND, datetime(2026, 12, 4, 2, 30))  # noqa: DTZ001


def _timeless(body: dict[str, Any]) -> TraccarForward:
    return TraccarForward.model_validate({"device": {"uniqueId": UNIQUE}, **body})


TIMELESS = [
    _timeless({"event": {"type": "alarm", "attributes": {"alarm": "sos"}}}),
    _timeless({"event": {"id": 1, "type": "alarm", "attributes": {"alarm": "sos"}}, "position": {"id": 5}}),
    _timeless({"position": {"id": 5, "attributes": {"alarm": "sos,removing"}}}),
    _timeless(
        {"event": {"type": "alarm", "eventTime": EVENT_TIME, "attributes": {"alarm": "fall"}}, "position": {"id": 5}}
    ),
    _timeless({"position": {"id": 5, "attributes": {"alarm": "fall"}}}),
    forward("sos,lowBattery"),
    forward(None, position={"attributes": {"alarm": "sos,lowBattery", "batteryLevel": 64}}),
    forward(),
]


def test_one_msg_id_is_never_two_payloads() -> None:
    """The hub dead-letters a msg_id re-used with other bytes: whatever Traccar leaves out,
    at whatever time it is mapped, a msg_id always carries the same payload."""
    seen: dict[str, bytes] = {}
    for given in TIMELESS:
        for now in (NOW, datetime(2026, 12, 4, 3, 0, tzinfo=UTC)):
            for publication in map_forward(given, BAND, now).publications:
                assert seen.setdefault(publication.msg_id, publication.payload) == publication.payload
    assert len(seen) > len(TIMELESS)


def test_a_later_forward_of_a_device_has_a_greater_msg_id() -> None:
    """The message's time leads its msg_id: a device's ledger keys grow (devices/msg_ids.py)."""
    [earlier] = map_forward(forward("sos", position={"id": 9002}), BAND, NOW).publications
    [later] = map_forward(
        forward("sos", position={"id": 9003, "fixTime": "2026-12-04T02:31:00.000+00:00"}), BAND, NOW
    ).publications
    assert earlier.msg_id is not None
    assert later.msg_id is not None
    assert earlier.msg_id < later.msg_id
