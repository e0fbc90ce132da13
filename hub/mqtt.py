"""The hub's MQTT connections: sessions, subscriptions, and acknowledgement after commit.

A hub holds two connections, each with its own persistent session:

- the alarm connection (client id ``<SHOUHU_HUB_ID>-alarm``) subscribes directly,
  never shared, to ``sos``, ``fall`` (with any extra levels: an alarm on a malformed
  alarm topic still pages) and ``status``. The broker delivers a session's messages
  in order, so an SOS on its own session never waits behind a telemetry backlog, and
  a shared subscription would park a dead member's share: an SOS must not wait for a
  dead hub. Every hub gets every alarm; the ledger makes the second copy a no-op.
- the bulk connection (client id ``<SHOUHU_HUB_ID>``) subscribes to everything else
  under ``shouhu/v1/#`` — shared among the hubs when the broker supports it — so no
  topic goes unseen: telemetry and health are stored, the rest dead-lettered. Alarm
  and status topics also match ``#`` here; those copies are the alarm connection's
  and are acknowledged at once.

Both use a stable client id and a persistent session: MQTT 5 with ``clean_start``
off and a 7-day session expiry, or MQTT 3.1.1 with clean session off when the
broker refuses 5 (the embedded broker does). A graceful stop keeps the sessions and
their subscriptions, so the broker holds what arrives meanwhile; ``end_session``
(``shouhu hub --leave``) gives them up for good.

``manual_ack``: paho sends no PUBACK by itself. ``on_message`` only enqueues; a
lane calls ``ack`` after its transaction commits. A packet id is only valid on the
connection that delivered it: each message carries the connection's generation,
and ``ack`` refuses one from an earlier connection (the broker redelivers it on the
new session, and the ledger makes that copy a no-op).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from hub import metrics
from hub.lean_paho import LeanClient
from shouhu.mqtt_address import BrokerAddress

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
# The alarm connection's subscriptions, direct: `sos/#` also matches `sos` itself.
ALARM_SUBSCRIPTIONS = (
    "shouhu/v1/+/+/sos/#",
    "shouhu/v1/+/+/fall/#",
    "shouhu/v1/+/+/status",
)
# The bulk connection: everything under the contract's prefix, shared when possible.
BULK_TOPIC = "shouhu/v1/#"
SHARE_GROUP = "shouhu"
# What earlier versions subscribed on the bulk session (client id = the hub id):
# dropped at start, or the old filters would keep delivering second copies.
LEGACY_BULK_SUBSCRIPTIONS = (
    "shouhu/v1/wristband/+/sos",
    "shouhu/v1/wristband/+/fall",
    "shouhu/v1/+/+/status",
    "shouhu/v1/+/+/telemetry",
    "shouhu/v1/+/+/health",
    f"$share/{SHARE_GROUP}/shouhu/v1/+/+/telemetry",
    f"$share/{SHARE_GROUP}/shouhu/v1/+/+/health",
)
UNSUPPORTED_PROTOCOL = 132  # CONNACK reason code (MQTT 5) for "Unsupported protocol version"
# Larger than the shipped broker's limit (deploy/mosquitto/mosquitto.conf), so what
# the broker lets through reaches the hub and is dead-lettered there if over 64 KiB.
MAX_PACKET_BYTES = 4 * 1024 * 1024
# A stop waits this long for paho to write what it queued, the DISCONNECT last.
DISCONNECT_WAIT_S = 2.0


def probe_topic(hub_id: str) -> str:
    return f"shouhu/hub/{hub_id}/probe"


def share_probe_topic(hub_id: str) -> str:
    return f"shouhu/hub/{hub_id}/share-probe"


def alarm_client_id(hub_id: str) -> str:
    return f"{hub_id}-alarm"


def receipt_topic(device_id: str) -> str:
    return f"shouhu/v1/wristband/{device_id}/receipt"


def on_alarm_connection(topic: str) -> bool:
    """Whether ``topic`` matches one of ALARM_SUBSCRIPTIONS (and so is the alarm
    connection's to store)."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "shouhu" or parts[1] != "v1":
        return False
    return parts[4] in ("sos", "fall") or (len(parts) == 5 and parts[4] == "status")


def bulk_subscriptions(shared: bool) -> tuple[str, ...]:
    return (f"$share/{SHARE_GROUP}/{BULK_TOPIC}",) if shared else (BULK_TOPIC,)


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


class BrokerRefused(Exception):
    """The broker refused the connection for a reason a retry will not fix."""


class HubConnection:
    """A paho client that hands every message to ``deliver`` and acknowledges only when told to.

    ``subscriptions`` are made on every (re)connect; ``extra_subscriptions`` too, and
    can change while running (the bulk connection learns whether to share).
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        deliver: Callable[[Received], None],
        subscriptions: tuple[str, ...],
        *,
        receive_maximum: int,
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.deliver = deliver
        self.subscriptions = subscriptions
        self.receive_maximum = max(1, min(receive_maximum, 65535))
        self.extra_subscriptions: tuple[str, ...] = ()
        # From an MQTT 5 CONNACK; None on 3.1.1, where only a probe can tell.
        self.shares_available: bool | None = None
        self.protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
        self.generation = 0
        self.connected = threading.Event()
        # Set when the network thread could not hand a message over: the hub ends
        # rather than run on with a message it will never acknowledge.
        self.failed = threading.Event()
        # Subscriptions the broker refused in its SUBACK (topic → reason): while any is
        # refused the hub is not ready, and says why (an ACL, a broker limit).
        self.refused: dict[str, str] = {}
        self._subscribing: dict[int, str] = {}
        self._connack: ReasonCode | None = None
        self._connack_event = threading.Event()
        self._gone = threading.Event()
        self._lock = threading.Lock()
        self.client = self._make_client(MQTTProtocolVersion.MQTTv5)

    def _make_client(self, protocol: MQTTProtocolVersion, *, clean: bool = False) -> LeanClient:
        client = LeanClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            clean_session=clean if protocol != MQTTProtocolVersion.MQTTv5 else None,
            manual_ack=True,
        )
        self.address.configure(client)
        # Short: after a broker restart every second before we subscribe again is a
        # second of shared-subscription traffic Mosquitto 2.0 drops (docs/contract.md).
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish_received = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_properties(self) -> Properties | None:
        if self.protocol != MQTTProtocolVersion.MQTTv5:
            return None
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        # Receive Maximum bounds what the broker sends before our acknowledgements.
        properties.ReceiveMaximum = self.receive_maximum
        properties.MaximumPacketSize = MAX_PACKET_BYTES
        return properties

    def start(
        self,
        timeout: float = 30.0,
        protocols: tuple[MQTTProtocolVersion, ...] = (MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311),
    ) -> None:
        """Connect (MQTT 5, else 3.1.1, or the ``protocols`` given, in order), subscribe,
        and start the network thread."""
        for protocol in protocols:
            if protocol != self.protocol:
                self.protocol = protocol
                self.client = self._make_client(protocol)
            self._connack = None
            self._connack_event.clear()
            self._connect_with_retry(self.client, timeout)
            self.client.loop_start()
            answered = self._connack_event.wait(
                timeout if protocol == MQTTProtocolVersion.MQTTv311 else min(timeout, 5.0)
            )
            code = self._connack
            if answered and code is not None and not code.is_failure:
                return
            self.client.loop_stop()
            self.client.disconnect()
            fallback = protocol == MQTTProtocolVersion.MQTTv5 and protocol != protocols[-1]
            if fallback and (code is None or code.value in (UNSUPPORTED_PROTOCOL, 1)):
                # Refused, or the connection dropped without a CONNACK (amqtt does
                # that to an MQTT 5 CONNECT with properties): try 3.1.1.
                log.info("broker refused MQTT 5 (%s); falling back to MQTT 3.1.1", code)
                continue
            if code is None:
                raise TimeoutError(f"no CONNACK from {self.address.host}:{self.address.port}")
            raise BrokerRefused(f"broker refused the connection: {code}")
        raise BrokerRefused("broker speaks neither MQTT 5 nor 3.1.1")

    def _connect_with_retry(self, client: mqtt.Client, timeout: float, *, clean: bool = False) -> None:
        deadline = time.monotonic() + timeout
        v5 = self.protocol == MQTTProtocolVersion.MQTTv5
        while True:
            try:
                client.connect(
                    self.address.host,
                    self.address.port,
                    keepalive=30,
                    clean_start=clean if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                    properties=self._connect_properties(),
                )
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cannot reach the broker: {exc}") from exc
                time.sleep(0.5)

    def stop(self) -> None:
        """Disconnect, keeping the session: the broker holds our messages for our return.

        The network thread stops only once the DISCONNECT is written, and with it every
        PUBACK queued before it: a batch acknowledged just before the stop is not
        delivered again to the next start.
        """
        was_connected = self.connected.is_set()
        self._gone.clear()
        self.client.disconnect()
        if was_connected and not self._gone.wait(DISCONNECT_WAIT_S):
            log.warning("%s: the DISCONNECT was not written within %.0fs", self.client_id, DISCONNECT_WAIT_S)
        self.client.loop_stop()

    def end_session(self) -> None:
        """Give the session up for good (``shouhu hub --leave``), after ``stop``.

        MQTT 5 and 3.1.1 alike: connect once more with a clean start and leave; the
        broker then drops the session, its subscriptions and anything queued in it.
        """
        client = self._make_client(self.protocol, clean=True)
        client.on_connect = None
        client.on_message = None
        connected = threading.Event()
        client.on_connect = lambda *_args: connected.set()
        self._connect_with_retry(client, 10.0, clean=True)
        client.loop_start()
        try:
            if not connected.wait(10):
                raise TimeoutError(f"no CONNACK while ending the session of {self.client_id}")
            if self.protocol == MQTTProtocolVersion.MQTTv5:
                properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = 0
                client.disconnect(properties=properties)
            else:
                client.disconnect()
        finally:
            client.loop_stop()

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
            self._subscribing = {}  # SUBACKs owed by an earlier connection never come
        if self.generation > 1 and not flags.session_present:
            # The broker lost our session: whatever it queued for us while we were
            # away is gone. Counted and logged; the ledger covers duplicates only.
            metrics.SESSIONS_LOST.inc()
            log.warning("%s reconnected without a session: messages queued meanwhile were lost", self.client_id)
        for topic in (*self.subscriptions, *self.extra_subscriptions):
            self._subscribe(client, topic)
        self.connected.set()

    def _subscribe(self, client: mqtt.Client, topic: str) -> None:
        # Under the lock: the SUBACK may come back before `subscribe` returns.
        with self._lock:
            result, mid = client.subscribe(topic, qos=1)
            if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._subscribing[mid] = topic

    def subscribed(self) -> bool:
        """Connected, and the broker has answered every subscription of this connection."""
        with self._lock:
            return self.connected.is_set() and not self._subscribing

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        with self._lock:
            topic = self._subscribing.pop(mid, None)
        if topic is None:
            return
        failures = [code for code in reason_codes if code.is_failure]
        if failures:
            self.refused[topic] = str(failures[0])
            log.error(
                "the broker refused %s's subscription to %s (%s): the hub is not ready; check the broker's ACL"
                " and limits for this client",
                self.client_id,
                topic,
                failures[0],
            )
        else:
            self.refused.pop(topic, None)

    def unsubscribe(self, topics: tuple[str, ...]) -> None:
        for topic in topics:
            self.client.unsubscribe(topic)

    def subscribe_extra(self, topics: tuple[str, ...]) -> None:
        """Subscribe now and on every reconnect."""
        self.extra_subscriptions = topics
        for topic in topics:
            self._subscribe(self.client, topic)

    def leave_extra(self, timeout: float = 10.0) -> None:
        """Unsubscribe ``extra_subscriptions`` and wait for the broker to confirm."""
        topics, self.extra_subscriptions = self.extra_subscriptions, ()
        for topic in topics:
            result, mid = self.client.unsubscribe(topic)
            if result == mqtt.MQTT_ERR_SUCCESS:
                self._wait_unsuback(mid, timeout)

    def _wait_unsuback(self, mid: int | None, timeout: float) -> None:
        done = threading.Event()
        previous = self.client.on_unsubscribe

        def confirmed(_client: mqtt.Client, _userdata: Any, acked: int, *_rest: Any) -> None:
            if acked == mid:
                done.set()

        self.client.on_unsubscribe = confirmed
        try:
            if not done.wait(timeout):
                log.warning("no UNSUBACK from the broker within %.0fs", timeout)
        finally:
            self.client.on_unsubscribe = previous

    def _on_disconnect(self, *_args: Any) -> None:
        self.connected.clear()
        self._gone.set()
        # Closed before any CONNACK: let start() decide (fallback or failure) at once.
        self._connack_event.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        # paho's own path (a QoS 2 delivery, a topic alias); LeanClient's is _on_publish.
        self._on_publish(message._topic, message.payload, message.qos, bool(message.retain), message.mid)

    def _on_publish(
        self, topic: bytes | bytearray, payload: bytes | bytearray, qos: int, retain: bool, mid: int
    ) -> None:
        # Only hand over: storing happens on the lanes. Nothing may escape into paho's
        # network thread (it would end it); a message that cannot be handed over is
        # never acknowledged, and the hub ends so the broker redelivers it to a fresh one.
        try:
            self.deliver(
                Received(
                    # paho's `topic` raises on bytes that are not UTF-8; keep what came.
                    topic=topic.decode("utf-8", errors="replace"),
                    payload=bytes(payload),
                    qos=qos,
                    retain=retain,
                    mid=mid,
                    generation=self.generation,
                    received_at=datetime.now(UTC),
                    monotonic=time.monotonic(),
                )
            )
        except Exception:
            log.critical("%s could not hand a message over; the hub ends", self.client_id, exc_info=True)
            self.failed.set()

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

    def ack_all(self, messages: Sequence[Received]) -> int:
        """PUBACK a batch in one write, leaving out what came on an earlier connection.

        Returns how many were left out (the broker redelivers those).
        """
        with self._lock:
            current = [m for m in messages if m.generation == self.generation]
            self.client.ack_many(m.mid for m in current if m.qos == 1)
            for message in current:
                if message.qos == 2:
                    self.client.ack(message.mid, 2)
        stale = sum(1 for m in messages if m.qos and m.generation != self.generation)
        if stale:
            metrics.STALE_ACKS.inc(stale)
        return stale

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos)
