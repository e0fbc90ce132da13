"""Brokers and publishers for the fault tests: Mosquitto on the shipped configuration,
and a fleet gateway that publishes QoS 1 and reconnects by itself."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from simulators.wristband import alarm_payload
from tests.support.services import wait_for_port

SHIPPED_CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"


def telemetry(msg_id: str | None = None) -> bytes:
    body = {"msg_id": msg_id or str(uuid.uuid4()), "ts": datetime.now(UTC).isoformat(), "battery": 50}
    return json.dumps(body).encode()


class Fleet:
    """A publisher that reconnects by itself, as a fleet gateway does."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fleet-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        self.client.max_inflight_messages_set(500)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def telemetry(self, count: int, offset: int = 0) -> None:
        for index in range(offset, offset + count):
            self.client.publish(f"shouhu/v1/wristband/wb-{index % 240 + 1:04d}/telemetry", telemetry(), qos=1)

    def marker(self, msg_id: str, device: str = "wb-0001") -> None:
        """One telemetry message with a known ``msg_id``, queued behind everything published
        so far: a hub that has stored it has stored all it was given before it."""
        self.client.publish(f"shouhu/v1/wristband/{device}/telemetry", telemetry(msg_id), qos=1)

    def sos(self, device: str) -> None:
        self.client.publish(f"shouhu/v1/wristband/{device}/sos", alarm_payload("sos"), qos=1)

    def wait_published(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.client._out_messages and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def shipped_broker(directory: Path, port: int) -> Path:
    """The shipped configuration with only its paths, listeners and credentials made local."""
    kept = []
    for line in SHIPPED_CONF.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in (
            "listener",
            "persistence_location",
            "password_file",
            "allow_anonymous",
            "log_dest",
            "per_listener_settings",
            "acl_file",
            "cafile",
            "certfile",
            "keyfile",
            "tls_version",
        ):
            continue
        kept.append(line)
    data = directory / "data"
    data.mkdir(exist_ok=True)
    data.chmod(0o777)
    conf = directory / "shipped.conf"
    conf.write_text(
        "\n".join(kept) + f"\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence_location {data}/\n"
    )
    return conf


def run_shipped_broker(conf: Path, port: int) -> subprocess.Popen[bytes]:
    """Mosquitto on a configuration from ``shipped_broker``, listening before this returns."""
    process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_port(port)
    return process
