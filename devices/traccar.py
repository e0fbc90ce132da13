"""Traccar's JSON forwarding → messages of the v1 MQTT contract (docs/contract.md, "Traccar").

Traccar decodes some 250 tracker protocols (GT06, JT/T 808, …) and forwards what it
decodes as one JSON object per HTTP POST: ``event.forward.url`` sends an event
(``{"event", "position", "device"}``), ``forward.url`` with ``forward.type`` ``json`` a
position (``{"position", "device"}``). ``map_forward`` is pure: the wristband lookup's
answer and the clock are passed in.

What is read:

- the alarms an ``alarm`` event names in ``attributes.alarm`` — or, for a position
  without an event, the position's own ``attributes.alarm`` (Traccar writes the decoded
  alarm there too): ``sos`` → an SOS press; ``fall`` (Traccar writes ``fallDown``) → a
  fall; ``lowBattery`` and ``removing`` → telemetry (``battery`` when the position carries
  ``batteryLevel``; ``worn`` false for ``removing``), the alarm kept as ``traccar_alarm``.
  Several alarms come comma-separated.
- a position without an event → telemetry: ``lat``/``lon`` from a valid fix,
  ``battery`` (``batteryLevel``), ``steps``, ``heart_rate`` (``heartRate``).
- any other event (``deviceOnline``, ``geofenceEnter``, ``overspeed`` …) → nothing.

A device the registry does not have pages only its SOS and fall, under
``traccar-<uniqueId>``: the hub opens ``sos_unregistered`` for the county (when in doubt
about an SOS, page). Its other messages are dropped.

``msg_id`` is derived from the device, the channel, Traccar's own ids and times and the
message's fields (one ``msg_id`` is never two payloads), and the payload holds only what
Traccar sent: a retried POST publishes the same ``msg_id``
with the same bytes, which the hub's ledger folds into one message. An SOS or a fall is
keyed and stamped by the position it was decoded from (its ``id`` and ``fixTime``), so
the copy in the event and the copy in the forwarded position are one message too.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from devices.contract import ALARM_CHANNELS, DEVICE_ID, PAYLOAD_MODELS, MqttChannel, Topic
from devices.kinds import DeviceKind
from devices.msg_ids import derived_msg_id

UNREGISTERED_PREFIX = "traccar-"
ALARM_EVENT = "alarm"


class TraccarAlarm(StrEnum):
    SOS = "sos"
    FALL = "fall"
    LOW_BATTERY = "lowBattery"
    REMOVING = "removing"


# Traccar's names for the alarms Shouhu reads; ``fallDown`` is Traccar's own spelling.
ALARM_NAMES: dict[str, TraccarAlarm] = {
    "sos": TraccarAlarm.SOS,
    "fall": TraccarAlarm.FALL,
    "fallDown": TraccarAlarm.FALL,
    "lowBattery": TraccarAlarm.LOW_BATTERY,
    "removing": TraccarAlarm.REMOVING,
}


class _Traccar(BaseModel):
    # Field names are Traccar's own (camelCase), so its JSON validates as it comes.
    # Traccar sends many more fields (and adds some each release): they are ignored.
    model_config = ConfigDict(extra="ignore", frozen=True)


class TraccarDevice(_Traccar):
    uniqueId: Annotated[str, Field(min_length=1, max_length=128)]


class TraccarEvent(_Traccar):
    id: int | None = None
    type: Annotated[str, Field(min_length=1, max_length=64)]
    eventTime: AwareDatetime | None = None
    serverTime: AwareDatetime | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)


class TraccarPosition(_Traccar):
    id: int | None = None
    valid: bool = True
    latitude: float | None = None
    longitude: float | None = None
    fixTime: AwareDatetime | None = None
    deviceTime: AwareDatetime | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)


class TraccarForward(_Traccar):
    """One POST of Traccar's event or position forwarding."""

    device: TraccarDevice
    event: TraccarEvent | None = None
    position: TraccarPosition | None = None


@dataclass(frozen=True, slots=True)
class Publication:
    """One v1 message: QoS 1, not retained."""

    topic: Topic
    msg_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Mapped:
    device_id: str
    publications: tuple[Publication, ...]
    unregistered: bool
    ignored: str | None = None  # why nothing is published, for the answer and the log


def unregistered_device_id(unique_id: str) -> str:
    """The v1 device id an unregistered Traccar device's alarms are published under: stable,
    so a retried alarm joins the same ``sos_unregistered`` incident; a uniqueId the topic
    cannot hold (a space, a slash, too long) is named by its digest instead."""
    candidate = f"{UNREGISTERED_PREFIX}{unique_id}"
    if DEVICE_ID.fullmatch(candidate):
        return candidate
    return f"{UNREGISTERED_PREFIX}{hashlib.sha256(unique_id.encode()).hexdigest()[:40]}"


def _alarm_names(attributes: dict[str, Any]) -> list[TraccarAlarm]:
    names = str(attributes.get("alarm", "")).split(",")
    found = [ALARM_NAMES[name.strip()] for name in names if name.strip() in ALARM_NAMES]
    return list(dict.fromkeys(found))


def alarms_of(forward: TraccarForward) -> list[TraccarAlarm]:
    """The alarms a forward names that Shouhu reads, in order, once each: an ``alarm``
    event's, or (a position without an event) the position's own ``attributes.alarm``."""
    if forward.event is not None:
        return _alarm_names(forward.event.attributes) if forward.event.type == ALARM_EVENT else []
    return _alarm_names(forward.position.attributes) if forward.position is not None else []


def make_msg_id(device_id: str, channel: MqttChannel, key: str, at: datetime) -> str:
    """The v1 ``msg_id`` of what one forwarded object says on ``channel``: the same for a
    retry. ``at``, the message's ``ts``, comes first so that a device's ids grow
    (devices/msg_ids.py)."""
    digest = hashlib.sha256(b"\0".join([device_id.encode(), channel.encode(), key.encode()]))
    return derived_msg_id("traccar", at, digest.hexdigest())


@dataclass(frozen=True, slots=True)
class _Identity:
    """What identifies a forward's messages across retries, and the time they carry."""

    alarm_key: str  # the SOS and the fall: the same from the event and from its position
    key: str  # the telemetry: this forward's own
    alarm_ts: datetime
    ts: datetime


def _identity(forward: TraccarForward, now: datetime) -> _Identity:
    event, position = forward.event, forward.position
    device = f"device:{forward.device.uniqueId}"
    event_part = f"event:{event.id}:{event.type}:{event.eventTime}:{event.attributes.get('alarm')}" if event else ""
    position_time = (position.fixTime or position.deviceTime) if position else None
    event_time = (event.eventTime or event.serverTime) if event else None
    key = "|".join([device, event_part, f"position:{position.id}:{position.fixTime}" if position else ""])
    ts = event_time or position_time
    if ts is None:
        # Nothing of Traccar's own time: a retry cannot be told from a new one.
        key += f"|now:{now.isoformat()}"
    if position is not None and (position.id is not None or position.fixTime is not None):
        # An alarm comes twice when both forwardings are on: in the event and in the
        # position it was decoded from. Keyed and stamped by that position, both copies
        # are one message to the hub's ledger.
        alarm_key = f"{device}|alarm-position:{position.id}:{position.fixTime}"
        alarm_ts = position_time or ts
        if alarm_ts is None:
            alarm_key += f"|now:{now.isoformat()}"  # as above: never one msg_id for two payloads
        return _Identity(alarm_key, key, alarm_ts or now, ts or now)
    return _Identity(key, key, ts or now, ts or now)


def _number(attributes: dict[str, Any], name: str) -> float | None:
    value = attributes.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _where(position: TraccarPosition | None) -> dict[str, Any]:
    if position is None or not position.valid or position.latitude is None or position.longitude is None:
        return {}
    return {"lat": position.latitude, "lon": position.longitude}


def _payload(channel: MqttChannel, fields: dict[str, Any]) -> bytes:
    """The JSON of a v1 payload; a value out of its contract range (a latitude of 91) is
    left out rather than costing the message. Keys keep their order: the same forward
    always gives the same bytes."""
    data = {key: value for key, value in fields.items() if value is not None}
    model = PAYLOAD_MODELS[channel]
    while True:
        try:
            model.model_validate(data)
            break
        except ValidationError as exc:
            bad = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
            if bad & {"lat", "lon"}:
                bad |= {"lat", "lon"}  # half a position is no position
            if not bad & (set(data) - {"msg_id", "ts", "action"}):
                raise  # a required field is wrong: a bug here, not Traccar's input
            data = {key: value for key, value in data.items() if key not in bad}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def map_forward(forward: TraccarForward, wristband_id: str | None, now: datetime) -> Mapped:
    """The v1 messages of one forwarded object; see the module docstring.

    ``wristband_id`` is the registry's wristband for ``forward.device.uniqueId`` (None:
    not registered); ``now`` (aware) stamps a forward that carries no time of its own."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    registered = wristband_id is not None
    device_id = wristband_id if wristband_id is not None else unregistered_device_id(forward.device.uniqueId)
    identity = _identity(forward, now)
    position = forward.position
    attributes = position.attributes if position else {}
    where = _where(position)
    battery = _number(attributes, "batteryLevel")
    publications: list[Publication] = []

    def add(channel: MqttChannel, fields: dict[str, Any]) -> None:
        alarm = channel in ALARM_CHANNELS
        ts = identity.alarm_ts if alarm else identity.ts
        # What the message says is part of its msg_id too: one msg_id is never two payloads
        # (the hub dead-letters that), whatever ids and times Traccar left out.
        said = json.dumps({"ts": ts.isoformat(), **fields}, sort_keys=True, ensure_ascii=False)
        msg_id = make_msg_id(device_id, channel, f"{identity.alarm_key if alarm else identity.key}|{said}", ts)
        payload = _payload(channel, {"msg_id": msg_id, "ts": ts.isoformat(), **fields})
        publications.append(Publication(Topic(DeviceKind.WRISTBAND, device_id, channel), msg_id, payload))

    event = forward.event
    alarms = alarms_of(forward)
    if event is not None and not alarms:
        return Mapped(device_id, (), not registered, ignored=f"event {event.type[:64]!r} is not read")
    if TraccarAlarm.SOS in alarms:
        add(MqttChannel.SOS, {"action": "press", **where, "battery": battery})
    if TraccarAlarm.FALL in alarms:
        add(MqttChannel.FALL, where)
    # An unregistered device's telemetry would only be dead-lettered by the hub.
    others = [alarm for alarm in alarms if alarm in (TraccarAlarm.LOW_BATTERY, TraccarAlarm.REMOVING)]
    fields: dict[str, Any] = {
        "battery": battery,
        "worn": False if TraccarAlarm.REMOVING in others else None,
        **where,
        "traccar_alarm": ",".join(others) or None,
    }
    if registered and event is not None and others:
        add(MqttChannel.TELEMETRY, fields)
    elif registered and event is None and position is not None:
        steps = _number(attributes, "steps")
        fields["heart_rate"] = _number(attributes, "heartRate")
        fields["steps"] = int(steps) if steps is not None and float(steps).is_integer() else None
        add(MqttChannel.TELEMETRY, fields)
    if not publications:
        why = "the registry has no wristband with this uniqueId" if not registered else "nothing to read"
        return Mapped(device_id, (), not registered, ignored=why)
    return Mapped(device_id, tuple(publications), not registered)
