"""Frames of the 4G watch protocol → messages of the v1 MQTT contract (docs/contract.md).

``map_frame`` is pure: the watch id → wristband lookup, the gateway's clock (``now``) and
the watches' time zone are passed in. It never raises on a frame's content. Each frame
gives one of:

- ``Mapped``: the v1 messages to publish for a registered wristband, and the answer the
  watch is owed (``LK`` at once; ``AL`` once the hub has receipted the alarms in it);
- ``Ignored``: a command Shouhu does not read, or a reading that holds nothing;
- ``DeadLetter``: a watch the registry does not know, or a frame whose fields cannot be
  read; with the raw bytes.

An SOS or a fall from a watch the registry does not know is the exception: when in doubt
about an SOS, page. Its alarms (and only they) are ``Mapped`` to the wristband id
``unregistered_device_id(watch id)`` (``watch-<id>``), which the registry has not either,
so the hub opens its ``sos_unregistered`` incident for the county's operators exactly as
for an unknown MQTT wristband; ``Mapped.unregistered`` says so, and the ``AL`` is still
answered only after the hub's receipt.

What is read:

- ``LK[,steps,rolls,battery]``: the heartbeat → telemetry (``steps``, ``battery``).
- ``UD``, ``UD2``, ``UD_LTE``, ``UD_WCDMA``: a position report → telemetry.
- ``AL``, ``AL_LTE``: an alarm, the same body → an SOS and/or a fall from the status word,
  and telemetry. Only these two page: a position report's status word is kept, not paged.
- ``bphrt``, ``BLOOD``, ``heart``, ``oxygen``, ``btemp2``: health readings → telemetry.

A position body is ``date(ddmmyy),time(hhmmss),A|V,lat,N|S,lon,E|W,speed,course,altitude,
satellites,gsm,battery,steps,rolls,status,…`` (cell and Wi-Fi towers follow, unread). The
status is a hex word of flags: bit 16 SOS, bits 21–22 fall, bit 20 band removed, bit 0 or
17 low battery, bit 14 power cut.

``msg_id`` is derived from the watch id, the channel, the frame's content (which holds
the watch's own date and time) — and, for frames without the watch's time (``LK``, the
health readings, an unreadable date), the gateway's ``now``. So a watch re-sending the same
alarm re-sends the same ``msg_id`` and the same payload bytes: the hub's ledger folds it
into a redelivery and receipts it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from devices.contract import ALARM_CHANNELS, PAYLOAD_MODELS, MqttChannel, Topic
from devices.kinds import DeviceKind
from devices.msg_ids import derived_msg_id
from gateway.watch_frames import WatchFrame, answer_alarm, answer_heartbeat

# Watch id → the registry's wristband id, or None for a watch the registry does not have.
WristbandLookup = Callable[[str], str | None]

HEARTBEAT = "LK"
POSITIONS = frozenset({"UD", "UD2", "UD_LTE", "UD_WCDMA"})
ALARMS = frozenset({"AL", "AL_LTE"})
HEALTH = frozenset({"bphrt", "BLOOD", "heart", "oxygen", "btemp2"})

# The status word's flags.
SOS_BIT = 16
FALL_BITS = (21, 22)
REMOVED_BIT = 20
LOW_BATTERY_BITS = (0, 17)
POWER_CUT_BIT = 14

DECIMAL = re.compile(r"[-+]?[0-9]{1,30}(?:\.[0-9]{0,30})?")
WHOLE = re.compile(r"[0-9]{1,18}")

# Fields of a position body, up to and including the status word.
POSITION_FIELDS = 16


class IgnoreReason(StrEnum):
    UNKNOWN_COMMAND = "unknown_command"  # a command Shouhu does not read (TK, TKQ, INIT, WT …)
    NO_READING = "no_reading"  # a health frame whose values are all 0 (the measurement failed)


class DeadLetterReason(StrEnum):
    UNKNOWN_WATCH = "unknown_watch"  # the registry has no wristband with this watch id
    UNREADABLE = "unreadable"  # a known command whose fields cannot be read (or are not ASCII)


class AnswerWhen(StrEnum):
    NOW = "now"  # as soon as the frame is read (LK; an AL that pages nothing)
    AFTER_RECEIPTS = "after_receipts"  # once the hub has receipted every alarm msg_id in it


@dataclass(frozen=True, slots=True)
class Answer:
    frame: bytes
    when: AnswerWhen
    receipt_msg_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Publication:
    """One v1 message: QoS 1, not retained."""

    topic: Topic
    msg_id: str | None  # None only for an unreadable alarm (its payload is not JSON)
    payload: bytes

    @property
    def alarm(self) -> bool:
        return self.topic.channel in ALARM_CHANNELS


@dataclass(frozen=True, slots=True)
class Mapped:
    wristband_id: str
    publications: tuple[Publication, ...]
    answer: Answer | None
    # The watch is not in the registry: only its alarms are here, under the derived id.
    unregistered: bool = False


@dataclass(frozen=True, slots=True)
class Ignored:
    reason: IgnoreReason
    detail: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: DeadLetterReason
    detail: str
    watch_id: str
    raw: bytes


MapResult = Mapped | Ignored | DeadLetter


class _Unreadable(ValueError):
    """A field of a known command that cannot be read."""


@dataclass(frozen=True, slots=True)
class _Position:
    ts: datetime | None  # None: the watch's date or time is not a real one
    valid: bool
    lat: float
    lon: float
    battery: int
    steps: int
    status: int


def _hemisphere(value: str, hemisphere: str, negative: str, name: str) -> float:
    number = _float(value, name)
    # Some watches send the sign and the hemisphere both (``-33.48,N``): a minus stays.
    return -abs(number) if hemisphere == negative else number


def _float(text: str, name: str) -> float:
    # Plain decimals only: Python's float() would also take "1_0", "inf" and "nan".
    if not DECIMAL.fullmatch(text.strip()):
        raise _Unreadable(f"{name} {text[:20]!r} is not a number")
    value = float(text.strip())
    if not math.isfinite(value):  # more digits than a double holds
        raise _Unreadable(f"{name} {text[:20]!r} is out of range")
    return value


def _int(text: str, name: str) -> int:
    # At most 18 digits: a count no watch reaches, and far below Python's 4,300-digit limit.
    if not WHOLE.fullmatch(text.strip()):
        raise _Unreadable(f"{name} {text[:20]!r} is not a whole number (at most 18 digits)")
    return int(text.strip())


def _watch_time(date: str, time: str, watch_tz: tzinfo) -> datetime | None:
    try:
        return datetime.strptime(date + time, "%d%m%y%H%M%S").replace(tzinfo=watch_tz)
    except ValueError:
        return None


def _position(body: str, watch_tz: tzinfo) -> _Position:
    fields = body.split(",")
    if len(fields) < POSITION_FIELDS:
        raise _Unreadable(f"a position needs {POSITION_FIELDS} fields, got {len(fields)}")
    date, time, validity, lat, ns, lon, ew = fields[:7]
    if validity not in ("A", "V"):
        raise _Unreadable(f"validity {validity[:10]!r} is not A or V")
    if ns not in ("N", "S") or ew not in ("E", "W", ""):
        raise _Unreadable(f"hemispheres {ns[:5]!r}/{ew[:5]!r} are not N|S and E|W")
    status = fields[15].strip()
    if not 1 <= len(status) <= 8 or any(c not in "0123456789abcdefABCDEF" for c in status):
        raise _Unreadable(f"status {status[:20]!r} is not a hex word")
    return _Position(
        ts=_watch_time(date, time, watch_tz),
        valid=validity == "A",
        lat=_hemisphere(lat, ns, "S", "latitude"),
        lon=_hemisphere(lon, ew, "W", "longitude"),
        battery=_int(fields[12], "battery"),
        steps=_int(fields[13], "steps"),
        status=int(status, 16),
    )


def _bit(status: int, *bits: int) -> bool:
    return any(status >> bit & 1 for bit in bits)


UNREGISTERED_PREFIX = "watch-"


def unregistered_device_id(watch_id: str) -> str:
    """The v1 device id an unregistered watch's alarms are published under: stable, so a
    re-sent alarm joins the same ``sos_unregistered`` incident, and it names the watch."""
    return f"{UNREGISTERED_PREFIX}{watch_id}"


def make_msg_id(watch_id: str, channel: MqttChannel, content: bytes, at: datetime, clock: str = "") -> str:
    """The v1 ``msg_id`` of what a frame says on ``channel``: the same for a re-sent frame.

    ``at`` is the time the message carries (the watch's own, else the gateway's), first in
    the id so that a watch's ids grow (devices/msg_ids.py); ``clock`` is the gateway's time
    for frames that carry no time of the watch's own."""
    digest = hashlib.sha256(b"\0".join([watch_id.encode(), channel.encode(), content, clock.encode()]))
    return derived_msg_id("watch", at, digest.hexdigest())


def _payload(channel: MqttChannel, fields: dict[str, Any]) -> bytes:
    """The JSON of a v1 payload; a value out of its contract range (a battery of 140) is
    left out rather than costing the whole message. Keys keep their order, so the same
    frame always gives the same bytes."""
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
                raise  # a required field is wrong: a bug here, not the watch's input
            data = {key: value for key, value in data.items() if key not in bad}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class _Builder:
    """The publications of one frame of one wristband."""

    def __init__(self, frame: WatchFrame, wristband_id: str, ts: datetime, clock: str) -> None:
        self.frame = frame
        self.wristband_id = wristband_id
        self.at = ts
        self.ts = ts.isoformat()
        self.clock = clock
        self.publications: list[Publication] = []

    def add(self, channel: MqttChannel, fields: dict[str, Any]) -> str:
        msg_id = make_msg_id(self.frame.device_id, channel, self.frame.content, self.at, self.clock)
        payload = _payload(channel, {"msg_id": msg_id, "ts": self.ts, **fields})
        self.publications.append(Publication(Topic(DeviceKind.WRISTBAND, self.wristband_id, channel), msg_id, payload))
        return msg_id


def _status_fields(position: _Position) -> dict[str, Any]:
    """Telemetry fields of a position body: position only from a valid (``A``) fix."""
    alarms = [
        name
        for name, bits in (("low_battery", LOW_BATTERY_BITS), ("power_cut", (POWER_CUT_BIT,)))
        if _bit(position.status, *bits)
    ]
    return {
        "battery": position.battery,
        "steps": position.steps,
        "worn": not _bit(position.status, REMOVED_BIT),
        "lat": position.lat if position.valid else None,
        "lon": position.lon if position.valid else None,
        # Kept beside the known fields (contract v1 keeps telemetry's extra fields).
        "watch_status": f"{position.status:08X}",
        "watch_alarms": alarms or None,
    }


def _map_position(
    frame: WatchFrame, body: str, wristband_id: str, now: datetime, watch_tz: tzinfo, registered: bool = True
) -> Mapped:
    position = _position(body, watch_tz)
    clock = "" if position.ts else now.isoformat()
    build = _Builder(frame, wristband_id, position.ts or now, clock)
    where = {"lat": position.lat, "lon": position.lon} if position.valid else {}
    receipts: list[str] = []
    if frame.command in ALARMS:
        if _bit(position.status, SOS_BIT):
            receipts.append(build.add(MqttChannel.SOS, {"action": "press", **where, "battery": position.battery}))
        if _bit(position.status, *FALL_BITS):
            receipts.append(build.add(MqttChannel.FALL, where))
    if registered:  # an unregistered watch's telemetry would only be dead-lettered by the hub
        build.add(MqttChannel.TELEMETRY, _status_fields(position))
    answer = None
    if frame.command in ALARMS:
        when = AnswerWhen.AFTER_RECEIPTS if receipts else AnswerWhen.NOW
        answer = Answer(answer_alarm(frame), when, tuple(receipts))
    return Mapped(wristband_id, tuple(build.publications), answer, unregistered=not registered)


def _numbers(body: str, name: str) -> list[float]:
    """The leading numeric fields of a health body (empty trailing fields are common)."""
    values = []
    for field in body.split(","):
        if not field.strip():
            break
        values.append(_float(field, name))
    if not values:
        raise _Unreadable(f"{name} has no value")
    return values


def _health_fields(command: str, body: str) -> dict[str, Any]:
    values = _numbers(body, command)
    if command in ("bphrt", "BLOOD"):
        if len(values) < 2:
            raise _Unreadable(f"{command} needs systolic and diastolic pressure")
        rate = values[2] if len(values) > 2 else 0
        return {
            "heart_rate": rate or None,
            "bp_systolic": values[0] or None,
            "bp_diastolic": values[1] or None,
        }
    if command == "heart":
        return {"heart_rate": values[0] or None}
    if command == "oxygen":
        return {"spo2": values[0] or None}
    # btemp2: a flag (0: no reading), then the body temperature in °C.
    if len(values) < 2:
        return {}
    return {"body_temp_c": values[1] if values[0] > 0 else None}


def _map_health(frame: WatchFrame, body: str, wristband_id: str, now: datetime) -> Mapped | Ignored:
    fields = {key: value for key, value in _health_fields(frame.command, body).items() if value is not None}
    if not fields:
        return Ignored(IgnoreReason.NO_READING, f"{frame.command} without a value: {body[:40]!r}")
    build = _Builder(frame, wristband_id, now, now.isoformat())
    build.add(MqttChannel.TELEMETRY, fields)
    return Mapped(wristband_id, tuple(build.publications), None)


def _map_heartbeat(frame: WatchFrame, body: str, wristband_id: str, now: datetime) -> Mapped:
    fields: dict[str, Any] = {}
    values = body.split(",") if body else []
    # ``LK,steps,rolls,battery``; a heartbeat with other fields still proves the watch alive.
    if len(values) >= 3 and all(WHOLE.fullmatch(value.strip()) for value in values[:3]):
        fields = {"battery": int(values[2]), "steps": int(values[0])}
    build = _Builder(frame, wristband_id, now, now.isoformat())
    build.add(MqttChannel.TELEMETRY, fields)
    return Mapped(wristband_id, tuple(build.publications), Answer(answer_heartbeat(frame), AnswerWhen.NOW))


def _unreadable_alarm(frame: WatchFrame, wristband_id: str, registered: bool = True) -> Mapped:
    """An ``AL`` whose body cannot be read may still be an SOS: it goes to the SOS topic as
    it came, so the hub pages it as ``payload_unreadable`` and keeps its bytes."""
    topic = Topic(DeviceKind.WRISTBAND, wristband_id, MqttChannel.SOS)
    # No msg_id can come back in the hub's receipt: the watch is answered at once.
    answer = Answer(answer_alarm(frame), AnswerWhen.NOW)
    return Mapped(wristband_id, (Publication(topic, None, frame.raw),), answer, unregistered=not registered)


def _map_unregistered(frame: WatchFrame, now: datetime, watch_tz: tzinfo) -> MapResult:
    """A frame of a watch the registry does not know: an alarm that may be an SOS or a fall
    pages under the derived id; everything else is a dead letter."""
    letter = DeadLetter(DeadLetterReason.UNKNOWN_WATCH, f"watch {frame.device_id}", frame.device_id, frame.raw)
    if frame.command not in ALARMS:
        return letter
    device_id = unregistered_device_id(frame.device_id)
    try:
        mapped = _map_position(frame, frame.body.decode("ascii"), device_id, now, watch_tz, registered=False)
    except (UnicodeDecodeError, _Unreadable):
        return _unreadable_alarm(frame, device_id, registered=False)
    # An alarm without SOS or fall bits (low battery, band removed) pages nobody.
    return mapped if mapped.publications else letter


def map_frame(frame: WatchFrame, lookup: WristbandLookup, now: datetime, watch_tz: tzinfo) -> MapResult:
    """What ``frame`` means under contract v1; see the module docstring.

    ``now`` (aware) stamps frames without the watch's own time; ``watch_tz`` is the zone
    the watches' clocks keep (they send local time without an offset)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    wristband_id = lookup(frame.device_id)
    if wristband_id is None:
        return _map_unregistered(frame, now, watch_tz)
    command = frame.command
    if command not in ALARMS | POSITIONS | HEALTH | {HEARTBEAT}:
        return Ignored(IgnoreReason.UNKNOWN_COMMAND, f"command {command[:40]!r}")
    try:
        body = frame.body.decode("ascii")
        if command == HEARTBEAT:
            return _map_heartbeat(frame, body, wristband_id, now)
        if command in HEALTH:
            return _map_health(frame, body, wristband_id, now)
        return _map_position(frame, body, wristband_id, now, watch_tz)
    except (UnicodeDecodeError, _Unreadable) as exc:
        if command in ALARMS:
            return _unreadable_alarm(frame, wristband_id)
        detail = "not ASCII" if isinstance(exc, UnicodeDecodeError) else str(exc)
        return DeadLetter(DeadLetterReason.UNREADABLE, f"{command}: {detail}", frame.device_id, frame.raw)
