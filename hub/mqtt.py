"""The hub's MQTT connection: session, subscriptions, and acknowledgement after commit.

- A stable client id (``SHOUHU_HUB_ID``) and a persistent session: MQTT 5 with
  ``clean_start`` off and a 7-day session expiry, or MQTT 3.1.1 with clean session
  off when the broker refuses 5 (the embedded broker does).
- ``manual_ack``: paho sends no PUBACK by itself. ``on_message`` only enqueues; the
  writer calls ``ack`` after its transaction commits.
- A packet id is only valid on the connection that delivered it. Each message
  carries the connection's generation, and ``ack`` refuses one from an earlier
  connection: the broker redelivers it on the new session, and the ledger makes
  that copy a no-op.
- ``sos``, ``fall`` and ``status`` are subscribed directly, never shared: a shared
  subscription parks a dead member's share, and an SOS must not wait for a dead hub.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from hub import metrics

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
DIRECT_SUBSCRIPTIONS = (
    "shouhu/v1/wristband/+/sos",
    "shouhu/v1/wristband/+/fall",
    "shouhu/v1/+/+/status",
)
# Telemetry and camera health: shared among the hubs when the broker supports it.
BULK_TOPICS = ("shouhu/v1/+/+/telemetry", "shouhu/v1/+/+/health")
SHARE_GROUP = "shouhu"
ALARM_SUFFIXES = ("/sos", "/fall")
UNSUPPORTED_PROTOCOL = 132  # CONNACK reason code (MQTT 5) for "Unsupported protocol version"


def probe_topic(hub_id: str) -> str:
    return f"shouhu/hub/{hub_id}/probe"


def share_probe_topic(hub_id: str) -> str:
    return f"shouhu/hub/{hub_id}/share-probe"


def bulk_subscriptions(shared: bool) -> tuple[str, ...]:
    return tuple(f"$share/{SHARE_GROUP}/{t}" for t in BULK_TOPICS) if shared else BULK_TOPICS


@dataclass(frozen=True, slots=True)
class Received:
    """One message as the network thread handed it over."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    generation: int
    received_at: datetime
    monotonic: float


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        return cls(
            parts.hostname or "127.0.0.1",
            parts.port or (8883 if tls else 1883),
            tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )


class BrokerRefused(Exception):
    """The broker refused the connection for a reason a retry will not fix."""


class HubConnection:
    """A paho client that feeds ``inbox`` and acknowledges only when told to."""

    def __init__(
        self, url: str, client_id: str, alarm_inbox: queue.Queue[Received], bulk_inbox: queue.Queue[Received]
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.alarm_inbox = alarm_inbox
        self.bulk_inbox = bulk_inbox
        # Set once the hub knows whether the broker shares subscriptions.
        self.bulk_topics: tuple[str, ...] = ()
        # From an MQTT 5 CONNACK; None on 3.1.1, where only a probe can tell.
        self.shares_available: bool | None = None
        self.protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
        self.generation = 0
        self.connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._connack_event = threading.Event()
        self._lock = threading.Lock()
        self.client = self._make_client(MQTTProtocolVersion.MQTTv5)

    def _make_client(self, protocol: MQTTProtocolVersion) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            clean_session=False if protocol != MQTTProtocolVersion.MQTTv5 else None,
            manual_ack=True,
        )
        if self.address.username:
            client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            client.tls_set()
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties | None:
        if self.protocol != MQTTProtocolVersion.MQTTv5:
            return None
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        # Receive Maximum bounds what the broker sends before our acknowledgements.
        properties.ReceiveMaximum = min(self.bulk_inbox.maxsize or 1000, 65535)
        return properties

    def start(self, timeout: float = 30.0) -> None:
        """Connect (MQTT 5, else 3.1.1), subscribe, and start the network thread."""
        for protocol in (MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311):
            if protocol != self.protocol:
                self.protocol = protocol
                self.client = self._make_client(protocol)
            self._connack = None
            self._connack_event.clear()
            self._connect_with_retry(timeout)
            self.client.loop_start()
            answered = self._connack_event.wait(
                timeout if protocol == MQTTProtocolVersion.MQTTv311 else min(timeout, 5.0)
            )
            code = self._connack
            if answered and code is not None and not code.is_failure:
                return
            self.client.loop_stop()
            self.client.disconnect()
            if protocol == MQTTProtocolVersion.MQTTv5 and (code is None or code.value in (UNSUPPORTED_PROTOCOL, 1)):
                # Refused, or the connection dropped without a CONNACK (amqtt does
                # that to an MQTT 5 CONNECT with properties): try 3.1.1.
                log.info("broker refused MQTT 5 (%s); falling back to MQTT 3.1.1", code)
                continue
            if code is None:
                raise TimeoutError(f"no CONNACK from {self.address.host}:{self.address.port}")
            raise BrokerRefused(f"broker refused the connection: {code}")
        raise BrokerRefused("broker speaks neither MQTT 5 nor 3.1.1")

    def _connect_with_retry(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.connect(
                    self.address.host,
                    self.address.port,
                    keepalive=30,
                    clean_start=False
                    if self.protocol == MQTTProtocolVersion.MQTTv5
                    else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                    properties=self._connect_properties(),
                )
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cannot reach the broker: {exc}") from exc
                time.sleep(0.5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connack = reason_code
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            # MQTT 5 says it in the CONNACK: an absent property means "available".
            self.shares_available = bool(getattr(properties, "SharedSubscriptionAvailable", 1))
        self._connack_event.set()
        if reason_code.is_failure:
            return
        with self._lock:
            self.generation += 1
        if self.generation > 1 and not flags.session_present:
            # The broker lost our session: whatever it queued for us while we were
            # away is gone. Counted and logged; the ledger covers duplicates only.
            metrics.SESSIONS_LOST.inc()
            log.warning("reconnected without a session: messages queued meanwhile were lost")
        for topic in (
            *DIRECT_SUBSCRIPTIONS,
            probe_topic(self.client_id),
            f"$share/{SHARE_GROUP}-probe/{share_probe_topic(self.client_id)}",
            *self.bulk_topics,
        ):
            client.subscribe(topic, qos=1)
        self.connected.set()

    def unsubscribe_bulk(self) -> None:
        """Stop taking telemetry and health (a graceful stop: no new shares parked for us)."""
        for topic in self.bulk_topics:
            self.client.unsubscribe(topic)
        self.bulk_topics = ()

    def subscribe_bulk(self, shared: bool) -> None:
        """Subscribe to telemetry and health, shared or direct; kept for every reconnect.

        Going direct, first drop any shared subscription an earlier run left in the
        session, or the hub would get its share of telemetry twice.
        """
        if not shared:
            for topic in bulk_subscriptions(True):
                self.client.unsubscribe(topic)
        self.bulk_topics = bulk_subscriptions(shared)
        for topic in self.bulk_topics:
            self.client.subscribe(topic, qos=1)

    def _on_disconnect(self, *_args: Any) -> None:
        self.connected.clear()
        # Closed before any CONNACK: let start() decide (fallback or failure) at once.
        self._connack_event.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Only enqueue: storing happens on the writer threads. Alarms (and the hub's
        # own probes) take their own lane so they never queue behind telemetry. A
        # full inbox blocks the network thread: the back-pressure we want.
        alarm = message.topic.endswith(ALARM_SUFFIXES) or message.topic.startswith("shouhu/hub/")
        (self.alarm_inbox if alarm else self.bulk_inbox).put(
            Received(
                topic=message.topic,
                payload=bytes(message.payload),
                qos=message.qos,
                retain=bool(message.retain),
                mid=message.mid,
                generation=self.generation,
                received_at=datetime.now(UTC),
                monotonic=time.monotonic(),
            )
        )

    def ack(self, message: Received) -> bool:
        """PUBACK ``message``, unless it came on an earlier connection."""
        if message.qos == 0:
            return True
        with self._lock:
            if message.generation != self.generation:
                metrics.STALE_ACKS.inc()
                return False
            self.client.ack(message.mid, message.qos)
        return True

    def publish_probe(self, token: str, *, shared: bool = False) -> None:
        topic = share_probe_topic(self.client_id) if shared else probe_topic(self.client_id)
        self.client.publish(topic, token.encode(), qos=1)
