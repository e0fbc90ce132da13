"""Alarms first inside the hub (issue 19): while the alarm lane has an alarm in hand, a
bulk batch is held back (at most ALARM_YIELD_MAX_S), so telemetry does not take the
interpreter and the database from an SOS. A real hub, broker and PostgreSQL; the
alarm lane is held in its transaction by a table lock another session takes."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import psycopg
from paho.mqtt import publish
from prometheus_client import REGISTRY

from hub.service import Hub
from simulators.wristband import alarm_payload
from tests.support.hub import count, sos_topic, wait_until
from tests.support.services import Mosquitto

YIELDS = "shouhu_hub_bulk_yields_total"


def yields() -> float:
    return REGISTRY.get_sample_value(YIELDS) or 0.0


def telemetry(broker: Mosquitto, device: str, messages: int) -> None:
    body = {"ts": datetime.now(UTC).isoformat(), "battery": 70}
    publish.multiple(
        [
            (f"shouhu/v1/wristband/{device}/telemetry", json.dumps({**body, "msg_id": str(uuid.uuid4())}), 1, False)
            for _ in range(messages)
        ],
        hostname="127.0.0.1",
        port=broker.port,
    )


def alarm_lane_waits_on_a_lock(url: str) -> bool:
    rows = psycopg.connect(url, autocommit=True).execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    row = rows.fetchone()
    rows.connection.close()
    return bool(row and row[0])


def test_telemetry_waits_for_an_alarm_in_hand_and_only_then(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    before = yields()
    telemetry(broker, "wb-0001", 5)
    wait_until(lambda: count(county_url, "telemetry") == 5, what="telemetry with no alarm in hand")
    assert yields() == before, "no alarm in hand: nothing to wait for"

    with psycopg.connect(county_url) as locker:
        # The alarm lane's transaction will block on the incidents table until this one ends.
        locker.execute("LOCK TABLE incidents IN ACCESS EXCLUSIVE MODE")
        publish.single(sos_topic("wb-0091"), alarm_payload("sos"), qos=1, hostname="127.0.0.1", port=broker.port)
        wait_until(lambda: alarm_lane_waits_on_a_lock(county_url), what="the alarm lane holding the SOS")
        telemetry(broker, "wb-0002", 5)
        wait_until(lambda: yields() > before, what="a bulk batch held back for the alarm")
        # Held, not stopped: after ALARM_YIELD_MAX_S the batch is stored though the alarm is still in hand.
        wait_until(lambda: count(county_url, "telemetry") == 10, timeout=5, what="the held batch stored")
        assert locker.execute("SELECT count(*) FROM incidents").fetchone() == (0,), "the alarm is still in hand"
        locker.rollback()
    wait_until(lambda: count(county_url, "incidents") == 1, what="the SOS stored once the lock is gone")
    assert hub.is_ready()
