"""A simulated wristband: publishes SOS presses, cancels and falls per contract v1."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from shouhu.mqtt_address import BrokerAddress


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
    address.configure(client)
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


RESEND_S = 5.0


class Wristband:
    """A wristband that follows the alarm receipt protocol (docs/contract.md, "Receipts").

    It keeps a persistent session under its own client id, subscribes to its receipt
    topic, and re-sends each alarm — the same bytes, the same ``msg_id`` — every
    ``resend_s`` until a receipt for that ``msg_id`` arrives, as telecare alarm
    protocols do end to end. A broker that acknowledged a press and then crashed
    before saving it cannot lose it: the press is sent again.
    """

    def __init__(self, url: str, device_id: str, *, resend_s: float = RESEND_S) -> None:
        self.device_id = device_id
        self.resend_s = resend_s
        self.receipts: dict[str, dict[str, Any]] = {}
        self.sends = 0
        self._pending: dict[str, tuple[str, bytes]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        address = BrokerAddress.parse(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        address.configure(self.client)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        self._resender = threading.Thread(target=self._resend_loop, name=f"resend-{device_id}", daemon=True)
        self._resender.start()

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        # Again on every connect: a broker that lost our session lost the subscription too.
        client.subscribe(f"shouhu/v1/wristband/{self.device_id}/receipt", qos=1)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            receipt = json.loads(message.payload)
        except ValueError:
            return
        msg_id = receipt.get("msg_id") if isinstance(receipt, dict) else None
        with self._lock:
            if isinstance(msg_id, str) and self._pending.pop(msg_id, None) is not None:
                self.receipts[msg_id] = receipt
                self._changed.notify_all()

    def alarm(self, channel: str, *, action: str | None = None) -> str:
        """Send an SOS (press or cancel) or a fall; re-sent until its receipt. Returns its msg_id."""
        msg_id = str(uuid.uuid4())
        topic = f"shouhu/v1/wristband/{self.device_id}/{channel}"
        payload = alarm_payload(channel, action=action, msg_id=msg_id)
        with self._lock:
            self._pending[msg_id] = (topic, payload)
        self._send(topic, payload)
        return msg_id

    def _send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)
        self.sends += 1

    def _resend_loop(self) -> None:
        while not self._stopping.wait(self.resend_s):
            with self._lock:
                pending = list(self._pending.values())
            for topic, payload in pending:
                self._send(topic, payload)

    def wait_for_receipt(self, msg_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while msg_id not in self.receipts:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)
            return self.receipts[msg_id]

    @property
    def unreceipted(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def close(self) -> None:
        self._stopping.set()
        self.client.disconnect()
        self.client.loop_stop()
