"""The bulk lane against a real Mosquitto and PostgreSQL: every topic, batches, the ledger,
dead letters, shared subscriptions, and alarms that never wait behind telemetry."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from devices.contract import DeviceMessage, Rejected, StatusMessage, parse_message
from hub.service import Hub, build_hub
from shouhu.embedded.broker import ensure_local_broker
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from simulators.wristband import alarm_payload, publish_raw
from tests.support.hub import count, incidents, query, start_hub, wait_until
from tests.support.services import Mosquitto


def telemetry(msg_id: str | None = None, **fields: Any) -> bytes:
    body = {"msg_id": msg_id or str(uuid.uuid4()), "ts": datetime.now(UTC).isoformat(), **fields}
    return json.dumps(body).encode()


class Publisher:
    """One connection publishing many QoS 1 messages, as a fleet gateway would."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_telemetry_and_health_are_stored_once_each(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    assert hub.shared, "Mosquitto shares subscriptions: the hub should use $share"
    publisher = Publisher(broker.port)
    try:
        for index in range(300):
            publisher.publish(
                f"shouhu/v1/wristband/wb-{index % 240 + 1:04d}/telemetry",
                telemetry(battery=50 + index % 50, worn=True, heart_rate=72.4),
            )
        for index in range(60):
            publisher.publish(
                f"shouhu/v1/camera/cam-{index + 1:03d}/health",
                telemetry(online=index % 7 != 0, reason=None if index % 7 else "video_lost", fps=25),
            )
        wait_until(
            lambda: count(county_url, "telemetry") == 300 and count(county_url, "camera_health") == 60,
            timeout=20,
            what="300 telemetry and 60 health rows",
        )
    finally:
        publisher.close()
    assert count(county_url, "message_ledger") == 360
    assert query(county_url, "SELECT heart_rate FROM telemetry LIMIT 1") == [(72,)]
    offline = query(county_url, "SELECT count(*) FROM camera_health WHERE NOT online AND reason = 'video_lost'")
    assert offline == [(9,)]


def test_redeliveries_reused_ids_and_bad_input_in_one_batch(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    publisher = Publisher(broker.port)
    same = telemetry("boot1-1", battery=80)
    try:
        publisher.publish("shouhu/v1/wristband/wb-0001/telemetry", same)
        publisher.publish("shouhu/v1/wristband/wb-0001/telemetry", same)  # a redelivery
        publisher.publish("shouhu/v1/wristband/wb-0001/telemetry", telemetry("boot1-1", battery=79))  # reused id
        publisher.publish("shouhu/v1/wristband/wb-9999/telemetry", telemetry(battery=10))  # unknown device
        publisher.publish("shouhu/v1/wristband/wb-0002/telemetry", telemetry(battery=250))  # out of range
        publisher.publish("shouhu/v1/wristband/wb-0002/telemetry", b"{not json")
        publisher.publish("shouhu/v1/wristband/wb-0002/telemetry", b"\xff" * 10)
        publisher.publish("shouhu/v1/wristband/wb-0002/telemetry", b"{" + b" " * 70_000 + b"}")
        publisher.publish("shouhu/v1/toaster/t1/telemetry", telemetry())
        publisher.publish("shouhu/v1/camera/cam-001/telemetry", telemetry())  # a camera has no telemetry
        publisher.publish("shouhu/v1/wristband/wb-0003/telemetry", telemetry(battery=33))
        wait_until(
            lambda: count(county_url, "dead_letters") == 8,
            timeout=15,
            what=f"eight dead letters, have {query(county_url, 'SELECT reason FROM dead_letters')}",
        )
        wait_until(lambda: count(county_url, "telemetry") == 2, what="two telemetry rows")
    finally:
        publisher.close()
    reasons = sorted(r[0] for r in query(county_url, "SELECT reason FROM dead_letters"))
    assert reasons == [
        "malformed_json",
        "not_utf8",
        "oversized",
        "reused_msg_id",
        "schema",
        "unknown_device",
        "unknown_topic",
        "unknown_topic",
    ]
    assert query(county_url, "SELECT battery FROM telemetry WHERE device_id = 'wb-0001'") == [(80,)]
    kept = query(county_url, "SELECT payload FROM dead_letters WHERE reason = 'oversized'")[0][0]
    assert len(bytes(kept)) > 70_000  # the bytes are kept, not just the reason


def test_an_sos_behind_a_60000_message_backlog_is_stored_within_a_second_of_the_hubs_start(
    county_url: str, broker: Mosquitto
) -> None:
    """The issue-12 case: a hub comes back to a backlog of telemetry in its session and an
    SOS pressed after it. The SOS has its own connection and session, so it is not
    delivered behind the backlog; and the graceful stop lost none of the backlog."""
    hub_id = f"hub-{uuid.uuid4().hex[:6]}"
    first, first_thread = start_hub(county_url, broker.url, hub_id)
    first.stop()
    first_thread.join(15)
    publisher = Publisher(broker.port)
    try:
        for index in range(60_000):
            publisher.publish(f"shouhu/v1/wristband/wb-{index % 240 + 1:04d}/telemetry", telemetry(battery=60))
        publisher.client.publish("shouhu/v1/wristband/wb-0042/sos", alarm_payload("sos"), qos=1).wait_for_publish(60)
    finally:
        publisher.close()
    second, _upkeep = build_hub(Settings(_env_file=None), county_url, broker.url, metrics_port=None, hub_id=hub_id)  # type: ignore[call-arg]
    thread = threading.Thread(target=second.run, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        wait_until(lambda: incidents(county_url), timeout=20, what="the SOS")
        paged_after = time.monotonic() - started
        stored_when_paged = count(county_url, "telemetry")
        wait_until(lambda: count(county_url, "telemetry") == 60_000, timeout=120, what="the whole backlog")
    finally:
        second.stop()
        thread.join(15)
    assert paged_after < 1.0, f"the SOS was stored {paged_after:.2f}s after the hub started"
    assert stored_when_paged < 60_000, "the SOS was stored only after the backlog ahead of it"
    assert query(county_url, "SELECT count(*) FROM escalation_actions") == [(1,)]


def test_two_hubs_share_telemetry_and_both_see_every_sos(county_url: str, broker: Mosquitto) -> None:
    first, first_thread = start_hub(county_url, broker.url)
    second, second_thread = start_hub(county_url, broker.url)
    publisher = Publisher(broker.port)
    try:
        for index in range(400):
            publisher.publish(f"shouhu/v1/wristband/wb-{index % 240 + 1:04d}/telemetry", telemetry(battery=70))
        wait_until(lambda: count(county_url, "telemetry") == 400, timeout=20, what="400 rows")
        publish_raw(broker.url, "shouhu/v1/wristband/wb-0100/sos", alarm_payload("sos"))
        wait_until(
            lambda: (
                query(county_url, "SELECT count(*) FROM incident_events WHERE event IN ('opened', 'joined')") == [(1,)]
            ),
            what="one incident from two hubs",
        )
    finally:
        publisher.close()
        for worker, thread in ((first, first_thread), (second, second_thread)):
            worker.stop()
            thread.join(10)
    assert first.shared
    assert second.shared
    # Every telemetry row stored once although two hubs were subscribed.
    assert count(county_url, "message_ledger") == 401


def test_without_shared_subscriptions_one_hub_subscribes_directly(county_url: str) -> None:
    port = free_port()
    broker = ensure_local_broker(port)
    assert broker is not None
    try:
        worker, thread = start_hub(county_url, f"mqtt://127.0.0.1:{port}")
        assert not worker.shared  # amqtt takes $share/… literally and delivers nothing
        publish_raw(f"mqtt://127.0.0.1:{port}", "shouhu/v1/wristband/wb-0007/telemetry", telemetry(battery=5))
        wait_until(lambda: count(county_url, "telemetry") == 1, what="telemetry through a direct subscription")
        worker.stop()
        thread.join(10)
    finally:
        broker.terminate()
        broker.wait(10)


topics = st.one_of(
    st.text(max_size=120),
    st.builds(
        lambda kind, device, channel: f"shouhu/v1/{kind}/{device}/{channel}",
        st.sampled_from(["wristband", "camera", "toaster", ""]),
        st.text(max_size=70),
        st.sampled_from(["sos", "fall", "telemetry", "health", "status", "x"]),
    ),
)
payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.text(max_size=10), st.text(max_size=10))),
    st.builds(
        lambda msg, ts, extra: json.dumps({"msg_id": msg, "ts": ts, **extra}).encode(),
        st.text(max_size=70),
        st.sampled_from(["2026-11-24T10:00:00+08:00", "2026-11-24T10:00:00", "yesterday", ""]),
        st.dictionaries(
            st.sampled_from(["action", "battery", "online", "worn", "lat", "confidence"]),
            st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=5)),
        ),
    ),
)


@settings(max_examples=400, deadline=None)
@given(topic=topics, payload=payloads)
def test_the_parser_never_raises_on_anything(topic: str, payload: bytes) -> None:
    result = parse_message(topic, payload)
    assert isinstance(result, DeviceMessage | StatusMessage | Rejected)
    if isinstance(result, Rejected):
        assert result.detail


def test_on_mqtt_5_the_connack_says_whether_subscriptions_are_shared(hub: Hub) -> None:
    """No probe on MQTT 5: a probe would queue behind a session's backlog, time out, and
    leave the hub subscribed directly beside its shared subscription."""
    assert hub.connection.shares_available is True
    assert hub.shared
    assert not hub._share_seen.is_set()
