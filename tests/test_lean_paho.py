"""hub/lean_paho.py against a real Mosquitto: the buffered reads, the direct PUBLISH
path and the batched PUBACKs deliver exactly what paho's own path delivers.

Each case queues messages for a persistent session while the client is away, so that
the broker sends them back to back (many packets per read, packets split across
reads), then checks every topic, payload, QoS, retain flag and order; and that what
``ack_many`` acknowledged is gone while what it left out comes again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hub.lean_paho import READ_SIZE, LeanClient
from tests.support.hub import wait_until
from tests.support.services import Mosquitto

Delivery = tuple[bytes, bytes, int, bool, int]


class Receiver:
    """A LeanClient on a persistent session that records what it is handed."""

    def __init__(self, broker: Mosquitto, client_id: str, protocol: MQTTProtocolVersion) -> None:
        self.broker, self.client_id, self.protocol = broker, client_id, protocol
        self.got: list[Delivery] = []
        self.subscribed = threading.Event()
        v5 = protocol == MQTTProtocolVersion.MQTTv5
        self.client = LeanClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        self.client.on_publish_received = lambda *delivery: self.got.append(delivery)
        self.client.on_subscribe = lambda *_args: self.subscribed.set()
        self.gone = threading.Event()
        self.client.on_disconnect = lambda *_args: self.gone.set()
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 3600
            properties.ReceiveMaximum = 5000
        self.client.connect("127.0.0.1", broker.port, clean_start=False if v5 else 3, properties=properties)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10)

    def close(self) -> None:
        # paho writes DISCONNECT after everything queued before it (the PUBACKs), and
        # calls on_disconnect once it is written: only then may its thread stop.
        self.client.disconnect()
        assert self.gone.wait(10)
        self.client.loop_stop()


def publish(broker: Mosquitto, messages: list[tuple[str, bytes, int, bool]]) -> None:
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    sender.max_queued_messages_set(0)
    sender.max_inflight_messages_set(1000)
    sender.connect("127.0.0.1", broker.port)
    sender.loop_start()
    try:
        infos = [sender.publish(topic, payload, qos=qos, retain=retain) for topic, payload, qos, retain in messages]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        sender.disconnect()
        sender.loop_stop()


@pytest.fixture(scope="module")
def broker() -> Iterator[Mosquitto]:
    """One broker for the module, letting 5,000 QoS 1 messages be in flight to a client
    on 3.1.1 as on 5 (the shipped configuration allows 1,000; Mosquitto's default, 20)."""
    own = Mosquitto(max_inflight=5000)
    own.start()
    yield own
    own.remove()


@pytest.fixture(params=[MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311], ids=["mqtt5", "mqtt311"])
def protocol(request: pytest.FixtureRequest) -> MQTTProtocolVersion:
    version: MQTTProtocolVersion = request.param
    return version


@pytest.fixture
def session(broker: Mosquitto, protocol: MQTTProtocolVersion) -> tuple[str, str]:
    client_id, prefix = f"lean-{uuid.uuid4().hex[:8]}", f"lean/{uuid.uuid4().hex[:8]}"
    first = Receiver(broker, client_id, protocol)
    first.subscribe(f"{prefix}/#")
    first.close()
    return client_id, prefix


def test_a_burst_arrives_whole_and_in_order_with_packets_split_across_reads(
    broker: Mosquitto, protocol: MQTTProtocolVersion, session: tuple[str, str]
) -> None:
    client_id, prefix = session
    # Small messages many to a read; two larger than one read, so a packet spans reads.
    sizes = [40] * 1500 + [READ_SIZE + 1234] + [7] * 300 + [2 * READ_SIZE + 1] + [90] * 200
    sent = [
        (f"{prefix}/d-{index % 13}/telemetry", bytes([index % 251]) * size, 1, False)
        for index, size in enumerate(sizes)
    ]
    publish(broker, sent)
    receiver = Receiver(broker, client_id, protocol)
    try:
        wait_until(lambda: len(receiver.got) >= len(sent), timeout=30, what=f"{len(sent)} messages")
        assert [(t.decode(), bytes(p), q, r) for t, p, q, r, _mid in receiver.got] == sent
        assert all(mid > 0 for *_rest, mid in receiver.got)
    finally:
        receiver.close()


def test_what_ack_many_acknowledged_is_gone_and_the_rest_comes_again(
    broker: Mosquitto, protocol: MQTTProtocolVersion, session: tuple[str, str]
) -> None:
    client_id, prefix = session
    sent = [(f"{prefix}/m/{index}", f"payload {index}".encode(), 1, False) for index in range(600)]
    publish(broker, sent)
    receiver = Receiver(broker, client_id, protocol)
    try:
        wait_until(lambda: len(receiver.got) >= 600, timeout=30, what="600 messages")
        acked = receiver.got[:400]
        receiver.client.ack_many(mid for *_rest, mid in acked)
        # An empty batch is no packet at all.
        receiver.client.ack_many([])
        # A barrier: the broker reads a connection's packets in order, so once it has
        # answered this PUBLISH it has taken the PUBACKs written before it.
        receiver.client.publish(f"{prefix}-barrier", b"x", qos=1).wait_for_publish(10)
    finally:
        receiver.close()
    again = Receiver(broker, client_id, protocol)
    try:
        wait_until(lambda: len(again.got) >= 200, timeout=30, what="the 200 left unacknowledged")
        topics = [t.decode() for t, *_rest in again.got]
        assert topics == [topic for topic, *_rest in sent[400:]]
    finally:
        again.close()


def test_qos0_and_retained_messages_keep_their_flags(
    broker: Mosquitto, protocol: MQTTProtocolVersion, session: tuple[str, str]
) -> None:
    client_id, prefix = session
    publish(broker, [(f"{prefix}/kept", b"retained", 1, True)])
    fresh = Receiver(broker, f"{client_id}-2", protocol)
    try:
        fresh.subscribe(f"{prefix}/#")
        wait_until(lambda: len(fresh.got) >= 1, timeout=10, what="the retained message")
        publish(broker, [(f"{prefix}/live", b"at most once", 0, False)])
        wait_until(lambda: len(fresh.got) >= 2, timeout=10, what="the QoS 0 message")
        (t1, p1, q1, r1, _m1), (t2, p2, q2, r2, m2) = fresh.got[:2]
        assert (t1.decode(), bytes(p1), q1, r1) == (f"{prefix}/kept", b"retained", 1, True)
        assert (t2.decode(), bytes(p2), q2, r2, m2) == (f"{prefix}/live", b"at most once", 0, False, 0)
    finally:
        fresh.close()
        publish(broker, [(f"{prefix}/kept", b"", 1, True)])  # clear the retained message
