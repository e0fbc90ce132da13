"""Reconnects: a packet id from an earlier connection is never acknowledged, and a lost
session is logged and counted."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from prometheus_client import REGISTRY

from simulators.wristband import alarm_payload, publish_raw
from tests.support.hub import incidents, query, start_hub, wait_until
from tests.support.services import Mosquitto, MqttWireTap

PUBLISH, PUBACK = 3, 4


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_a_message_committed_after_a_reconnect_is_not_acknowledged_on_the_new_connection(
    county_url: str, broker: Mosquitto
) -> None:
    tap = MqttWireTap(broker.port)
    worker, thread = start_hub(county_url, tap.url, f"hub-{uuid.uuid4().hex[:6]}")
    stale_before = metric("shouhu_hub_stale_acks_total")
    try:
        blocker = psycopg.connect(county_url)
        blocker.execute("LOCK TABLE incidents IN SHARE ROW EXCLUSIVE MODE")  # hold the commit
        topic = "shouhu/v1/wristband/wb-0031/sos"
        publish_raw(broker.url, topic, alarm_payload("sos"))
        tap.wait_for("down", PUBLISH, topic=topic)
        # The alarm connection's copy, and the bulk connection's (`shouhu/v1/#`, acknowledged at once).
        wait_until(lambda: len(tap.seen("down", PUBLISH, topic=topic)) >= 2, what="both copies")
        delivered = len(tap.seen("down", PUBLISH, topic=topic))
        connacks = len(tap.seen("down", 2))
        tap.cut()  # the connections that delivered it are gone; paho reconnects
        wait_until(lambda: len(tap.seen("down", 2)) >= connacks + 2, timeout=20, what="both connections back")
        blocker.rollback()
        blocker.close()
        # The writer commits, but the packet id belongs to the dead connection: withheld.
        wait_until(lambda: metric("shouhu_hub_stale_acks_total") > stale_before, timeout=20, what="a withheld ack")
        # The broker redelivers on the new session; the ledger makes it a no-op.
        wait_until(
            lambda: len(tap.seen("down", PUBLISH, topic=topic)) > delivered, timeout=20, what="the redelivery"
        )
        wait_until(
            lambda: query(county_url, "SELECT count(*) FROM incident_events WHERE event = 'stored'") == [(1,)],
            what="one stored event",
        )
        assert len(incidents(county_url)) == 1
        assert query(county_url, "SELECT count(*) FROM message_ledger") == [(1,)]
    finally:
        worker.stop()
        thread.join(10)
        tap.close()


def test_a_reconnect_without_a_session_is_logged_and_counted(
    county_url: str, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    worker, thread = start_hub(county_url, broker.url, f"hub-{uuid.uuid4().hex[:6]}")
    lost_before = metric("shouhu_hub_sessions_lost_total")
    try:
        broker.stop(9)  # SIGKILL before any save: the broker forgets the hub's session
        for leftover in (broker.directory / "data").glob("*"):
            leftover.unlink()
        broker.start()
        wait_until(lambda: metric("shouhu_hub_sessions_lost_total") > lost_before, timeout=30, what="a lost session")
        assert "reconnected without a session" in caplog.text
        # The hub subscribed again on its own: a press after the loss is still stored.
        publish_raw(broker.url, "shouhu/v1/wristband/wb-0032/sos", alarm_payload("sos"))
        wait_until(lambda: incidents(county_url), timeout=20, what="the SOS after the lost session")
    finally:
        worker.stop()
        thread.join(10)


def test_a_refused_sos_subscription_keeps_the_hub_not_ready_and_says_why(
    county_url: str, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14: a broker that refuses the SOS subscription (an ACL, say) must not leave a
    hub that reports ready while no SOS can reach it. The fault: the broker's SUBACK for
    the SOS filter says "not authorized" (rewritten on the wire by the tap)."""
    from hub.service import Hub

    tap = MqttWireTap(broker.port, refuse_filters=frozenset({"shouhu/v1/+/+/sos/#"}))
    hub = Hub(county_url, tap.url, f"hub-{uuid.uuid4().hex[:6]}", 120)
    thread = threading.Thread(target=hub.run, daemon=True)
    thread.start()
    try:
        probe = f"shouhu/hub/{hub.hub_id}/probe"
        delivered = tap.wait_for("down", PUBLISH, topic=probe, timeout=15)
        tap.wait_for("up", PUBACK, packet_id=delivered.packet_id)  # the probe was handled
        assert not hub.ready.is_set()
        assert not hub.is_ready()
        assert "shouhu/v1/+/+/sos/#" in hub.alarm_connection.refused
        assert "refused" in caplog.text
        assert "shouhu/v1/+/+/sos/#" in caplog.text
    finally:
        hub.stop()
        thread.join(15)
        tap.close()
