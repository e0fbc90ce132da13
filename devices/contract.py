"""MQTT contract, version 1: topics and payloads (DESIGN.md "MQTT contract").

``parse_message`` turns a raw (topic, bytes) into a typed message or a
``Rejected`` with the dead-letter reason. It never raises on bad input: the hub
dead-letters what it cannot read and keeps going.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from devices.kinds import DeviceKind

TOPIC_PREFIX = "shouhu/v1"
MAX_PAYLOAD_BYTES = 64 * 1024
DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Deeper than any honest payload, far shallower than Python's recursion limit: a
# payload nested 10,000 deep must be a dead letter, not a RecursionError in a lane.
MAX_JSON_DEPTH = 32
# Column ranges (shouhu/migrations/0001_core.sql): checked here, before SQL, so a
# value the column cannot hold is this message's dead letter, never a failed COPY
# (or, worse, a silently wrapped integer).
INT4_MAX = 2**31 - 1
FLOAT4_MAX = 3.4e38
# Channels devices receive on and the hub publishes to, and the watch gateway's answers
# to commands (devices/commands.py): never data for the hub.
OUTBOUND_CHANNELS = frozenset({"receipt", "command", "command_result"})


class MqttChannel(StrEnum):
    SOS = "sos"
    FALL = "fall"
    TELEMETRY = "telemetry"
    HEALTH = "health"
    STATUS = "status"


CHANNELS_OF_KIND: dict[DeviceKind, frozenset[MqttChannel]] = {
    DeviceKind.WRISTBAND: frozenset({MqttChannel.SOS, MqttChannel.FALL, MqttChannel.TELEMETRY, MqttChannel.STATUS}),
    DeviceKind.CAMERA: frozenset({MqttChannel.HEALTH, MqttChannel.STATUS}),
}

# The priority lane: these open incidents and are never batched behind telemetry.
ALARM_CHANNELS = frozenset({MqttChannel.SOS, MqttChannel.FALL})


class RejectReason(StrEnum):
    """Dead-letter reasons; also the label of the dead-letter metric."""

    BAD_TOPIC = "bad_topic"
    OVERSIZED = "oversized"
    NOT_UTF8 = "not_utf8"
    MALFORMED_JSON = "malformed_json"
    TOO_DEEP = "too_deep"  # JSON nested deeper than MAX_JSON_DEPTH
    NUMBER_OUT_OF_RANGE = "number_out_of_range"  # an integer past 4,300 digits, or Infinity/NaN
    BAD_TEXT = "bad_text"  # a NUL or a lone surrogate: PostgreSQL text and jsonb cannot hold them
    UNKNOWN_TOPIC = "unknown_topic"  # under shouhu/v1/ but not a topic of the contract
    SCHEMA = "schema"
    UNKNOWN_DEVICE = "unknown_device"
    REUSED_MSG_ID = "reused_msg_id"
    STORE_FAILED = "store_failed"  # valid input the hub failed to store (a bug); kept here
    # What a gateway could not turn into v1 messages, sent on for the dead letters with
    # the device's own bytes (``gateway_dead_letter_topic``):
    UNKNOWN_WATCH = "unknown_watch"  # a watch frame from an id the registry does not know
    UNREADABLE_FRAME = "unreadable_frame"  # a known command whose fields cannot be read
    BAD_FRAME = "bad_frame"  # bytes that are not a frame: wrong length, garbage, oversize


# What a gateway may put in a dead letter it sends on (``GatewayDeadLetter.reason``).
GATEWAY_REASONS = frozenset({RejectReason.UNKNOWN_WATCH, RejectReason.UNREADABLE_FRAME, RejectReason.BAD_FRAME})
GATEWAY_KIND = "gateway"
DEAD_LETTER_CHANNEL = "dead_letter"
# The device's bytes a gateway keeps in one dead letter; longer ones are cut (and say so).
MAX_GATEWAY_RAW_BYTES = 4096


class _Payload(BaseModel):
    # Unknown extra fields are kept, not rejected (contract v1).
    model_config = ConfigDict(extra="allow", frozen=True)

    msg_id: Annotated[str, Field(min_length=1, max_length=64)]
    ts: AwareDatetime

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


Latitude = Annotated[float, Field(ge=-90, le=90)]
Longitude = Annotated[float, Field(ge=-180, le=180)]


class SosPayload(_Payload):
    action: Literal["press", "cancel"]
    lat: Latitude | None = None
    lon: Longitude | None = None
    battery: Annotated[float, Field(ge=0, le=100)] | None = None


class FallPayload(_Payload):
    confidence: Annotated[float, Field(ge=0, le=1)] | None = None
    lat: Latitude | None = None
    lon: Longitude | None = None


class TelemetryPayload(_Payload):
    battery: Annotated[float, Field(ge=0, le=100)] | None = None
    heart_rate: Annotated[float, Field(ge=0, le=400)] | None = None
    spo2: Annotated[float, Field(ge=0, le=100)] | None = None
    worn: bool | None = None
    lat: Latitude | None = None
    lon: Longitude | None = None
    steps: Annotated[int, Field(ge=0, le=INT4_MAX)] | None = None


class HealthPayload(_Payload):
    online: bool
    reason: str | None = None
    fps: Annotated[float, Field(ge=0, le=FLOAT4_MAX)] | None = None
    bitrate_kbps: Annotated[float, Field(ge=0, le=FLOAT4_MAX)] | None = None
    storage_ok: bool | None = None


PAYLOAD_MODELS: dict[MqttChannel, type[_Payload]] = {
    MqttChannel.SOS: SosPayload,
    MqttChannel.FALL: FallPayload,
    MqttChannel.TELEMETRY: TelemetryPayload,
    MqttChannel.HEALTH: HealthPayload,
}


@dataclass(frozen=True, slots=True)
class Topic:
    kind: DeviceKind
    device_id: str
    channel: MqttChannel

    def __str__(self) -> str:
        return f"{TOPIC_PREFIX}/{self.kind}/{self.device_id}/{self.channel}"


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message the hub cannot store as data; it goes to the dead-letter table."""

    reason: RejectReason
    detail: str
    topic: Topic | None = None
    # What to keep instead of the MQTT payload: a gateway's dead letter keeps the
    # bytes the device sent, not the envelope they came in.
    raw: bytes | None = None


class GatewayDeadLetter(BaseModel):
    """The payload on ``shouhu/v1/gateway/{gateway_id}/dead_letter``: bytes from a device
    that the gateway could not turn into v1 messages, for the hub's dead letters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: RejectReason
    detail: Annotated[str, Field(max_length=500)]
    device: Annotated[str, Field(max_length=64)] = ""  # the id the device claimed, if any
    peer: Annotated[str, Field(max_length=100)] = ""  # where it connected from
    raw_base64: Annotated[str, Field(max_length=(MAX_GATEWAY_RAW_BYTES + 2) // 3 * 4)]


_GATEWAY_TOPICS = f"{TOPIC_PREFIX}/{GATEWAY_KIND}/"


def gateway_dead_letter_topic(gateway_id: str) -> str:
    return f"{TOPIC_PREFIX}/{GATEWAY_KIND}/{gateway_id}/{DEAD_LETTER_CHANNEL}"


def gateway_dead_letter(topic: str, raw: bytes) -> Rejected | None:
    """A gateway's dead letter, as the hub stores it; None when ``topic`` is not one.

    An envelope that does not read is itself a dead letter (``schema``), kept whole."""
    if not topic.startswith(_GATEWAY_TOPICS):  # every device message: one cheap test
        return None
    parts = topic.split("/")
    if len(parts) != 5 or parts[4] != DEAD_LETTER_CHANNEL or not DEVICE_ID.fullmatch(parts[3]):
        return None
    try:
        letter = GatewayDeadLetter.model_validate_json(raw)
        device_bytes = base64.b64decode(letter.raw_base64, validate=True)
    except (ValidationError, binascii.Error) as exc:
        return Rejected(RejectReason.SCHEMA, f"a gateway dead letter that does not read: {str(exc)[:200]}")
    if letter.reason not in GATEWAY_REASONS:
        return Rejected(RejectReason.SCHEMA, f"a gateway dead letter's reason must be one of {sorted(GATEWAY_REASONS)}")
    origin = ", ".join(part for part in (f"device {letter.device}" if letter.device else "", letter.peer) if part)
    detail = f"gateway {parts[3]}" + (f" ({origin})" if origin else "") + f": {letter.detail}"
    return Rejected(letter.reason, detail, raw=device_bytes)


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    topic: Topic
    payload: _Payload
    payload_hash: bytes


@dataclass(frozen=True, slots=True)
class StatusMessage:
    topic: Topic
    online: bool


def payload_hash(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


# Topics repeat (one per device and channel): their verdicts are kept, short ones only,
# so that a flood of long hostile topics cannot grow the cache's memory.
_TOPIC_CACHE_MAX = 100_000
_TOPIC_CACHE_LENGTH = 160
_topic_verdicts: dict[str, Topic | Rejected] = {}


def parse_topic(topic: str) -> Topic | Rejected:
    """``classify_topic``, remembered for topics seen before (both results are immutable)."""
    verdict = _topic_verdicts.get(topic)
    if verdict is None:
        verdict = classify_topic(topic)
        if len(topic) <= _TOPIC_CACHE_LENGTH:
            if len(_topic_verdicts) >= _TOPIC_CACHE_MAX:
                _topic_verdicts.clear()
            _topic_verdicts[topic] = verdict
    return verdict


def classify_topic(topic: str) -> Topic | Rejected:
    """Classify a topic. Under ``shouhu/v1/`` anything that is not a contract topic is
    ``unknown_topic``; an alarm channel of a wristband with extra levels after it
    (``…/wb-1/sos/x``) is rejected too but keeps its ``Topic``, because it still pages."""
    parts = topic.split("/")
    if len(parts) < 3 or "/".join(parts[:2]) != TOPIC_PREFIX:
        return Rejected(RejectReason.BAD_TOPIC, f"not under {TOPIC_PREFIX}/: {topic[:200]!r}")
    if len(parts) < 5:
        return Rejected(RejectReason.UNKNOWN_TOPIC, f"not shouhu/v1/{{kind}}/{{id}}/{{channel}}: {topic[:200]!r}")
    kind, device_id, channel = parts[2], parts[3], parts[4]
    if not DEVICE_ID.fullmatch(device_id):
        return Rejected(RejectReason.BAD_TOPIC, f"device id {device_id[:80]!r} is not [A-Za-z0-9_.-]{{1,64}}")
    try:
        device_kind = DeviceKind(kind)
    except ValueError:
        return Rejected(RejectReason.UNKNOWN_TOPIC, f"unknown device kind {kind[:40]!r}")
    try:
        mqtt_channel = MqttChannel(channel)
    except ValueError:
        return Rejected(RejectReason.UNKNOWN_TOPIC, f"unknown channel {channel[:40]!r}")
    if mqtt_channel not in CHANNELS_OF_KIND[device_kind]:
        return Rejected(RejectReason.UNKNOWN_TOPIC, f"a {device_kind} has no {mqtt_channel} channel")
    parsed = Topic(device_kind, device_id, mqtt_channel)
    if len(parts) > 5:
        detail = f"extra levels after {mqtt_channel}: {topic[:200]!r}"
        return Rejected(RejectReason.UNKNOWN_TOPIC, detail, parsed if mqtt_channel in ALARM_CHANNELS else None)
    return parsed


def is_outbound(topic: str) -> bool:
    """A topic the hub publishes for devices (a receipt): not data, never dead-lettered."""
    parts = topic.split("/")
    return len(parts) == 5 and "/".join(parts[:2]) == TOPIC_PREFIX and parts[4] in OUTBOUND_CHANNELS


def _reject_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange(f"number {text[:40]} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise _OutOfRange(f"{name} is not a number the contract allows")


class _OutOfRange(ValueError):
    pass


# json.loads with hooks builds a decoder per call; one is enough.
_JSON = json.JSONDecoder(parse_float=_reject_float, parse_constant=_reject_constant)


def _hostile_structure(data: Any, *, escapes: bool = True) -> Rejected | None:
    """Depth, text and numbers PostgreSQL can hold, checked without recursion.

    ``escapes`` False: the JSON text held no ``\\u`` escape, the only way a decoded
    string can hold a NUL or a lone surrogate (raw control characters and invalid
    UTF-8 never decode), so the strings need no look.
    """
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return Rejected(RejectReason.TOO_DEEP, f"nested deeper than {MAX_JSON_DEPTH}")
        for item in (*value.keys(), *value.values()) if isinstance(value, dict) else value:
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
            elif escapes and isinstance(item, str):
                if "\x00" in item:
                    return Rejected(RejectReason.BAD_TEXT, "text holds a NUL character")
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return Rejected(RejectReason.BAD_TEXT, "text holds a lone surrogate (\\ud800-\\udfff)")
    return None


def _schema_detail(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in error.errors())[:1000]


def parse_message(topic: str, raw: bytes) -> DeviceMessage | StatusMessage | Rejected:
    """Parse one MQTT message under contract v1; never raises on bad input."""
    sent_on = gateway_dead_letter(topic, raw)
    if sent_on is not None:
        return sent_on
    parsed = parse_topic(topic)
    if isinstance(parsed, Rejected):
        return parsed
    return _parse_payload(parsed, raw)


def _parse_payload(parsed: Topic, raw: bytes) -> DeviceMessage | StatusMessage | Rejected:
    if len(raw) > MAX_PAYLOAD_BYTES:
        return Rejected(RejectReason.OVERSIZED, f"{len(raw)} bytes > {MAX_PAYLOAD_BYTES}", parsed)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected(RejectReason.NOT_UTF8, f"not UTF-8 at byte {exc.start}", parsed)
    if parsed.channel is MqttChannel.STATUS:
        value = text.strip()
        if value not in ("online", "offline"):
            return Rejected(RejectReason.SCHEMA, f"status must be online or offline, got {value[:40]!r}", parsed)
        return StatusMessage(parsed, value == "online")
    try:
        data = _JSON.decode(text)
    except json.JSONDecodeError as exc:
        return Rejected(RejectReason.MALFORMED_JSON, f"{exc.msg} at {exc.pos}", parsed)
    except RecursionError:
        return Rejected(RejectReason.TOO_DEEP, f"nested deeper than {MAX_JSON_DEPTH}", parsed)
    except ValueError as exc:  # _OutOfRange, or Python's 4,300-digit limit on integers
        return Rejected(RejectReason.NUMBER_OUT_OF_RANGE, str(exc)[:200], parsed)
    if not isinstance(data, dict):
        return Rejected(RejectReason.SCHEMA, "payload must be a JSON object", parsed)
    hostile = _hostile_structure(data, escapes="\\u" in text)
    if hostile is not None:
        return Rejected(hostile.reason, hostile.detail, parsed)
    try:
        payload = PAYLOAD_MODELS[parsed.channel].model_validate(data)
    except ValidationError as exc:
        return Rejected(RejectReason.SCHEMA, _schema_detail(exc), parsed)
    except (ValueError, OverflowError) as exc:  # a number no validator was ready for
        return Rejected(RejectReason.NUMBER_OUT_OF_RANGE, repr(exc)[:200], parsed)
    return DeviceMessage(parsed, payload, payload_hash(raw))
