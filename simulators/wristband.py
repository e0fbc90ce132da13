"""A simulated wristband: publishes SOS presses, cancels and falls per contract v1."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from hub.mqtt import BrokerAddress


def alarm_payload(channel: str, *, action: str | None = None, msg_id: str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "msg_id": msg_id or str(uuid.uuid4()),
        "ts": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }
    if channel == "sos":
        body["action"] = action or "press"
    return json.dumps(body).encode()


def publish_raw(url: str, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
    """Publish one message and wait for the broker's acknowledgement."""
    address = BrokerAddress.parse(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    if address.username:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set()
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def publish_alarm(url: str, device_id: str, channel: str, *, action: str | None = None) -> str:
    """Publish an SOS (press or cancel) or a fall from ``device_id``; returns its msg_id."""
    msg_id = str(uuid.uuid4())
    publish_raw(url, f"shouhu/v1/wristband/{device_id}/{channel}", alarm_payload(channel, action=action, msg_id=msg_id))
    return msg_id
