"""The hub against a real Mosquitto (and amqtt) and a real PostgreSQL: SOS in, incident out.

The delivery guarantee is tested on the wire: a proxy between the hub and the
broker decodes the packets, so "PUBACK only after commit" is observed, not assumed.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import uuid
from typing import Any

import psycopg
import pytest

from hub.service import Hub
from shouhu.embedded.broker import ensure_local_broker
from shouhu.embedded.postgres import LocalPostgres, free_port
from simulators.wristband import alarm_payload, publish_raw
from tests.support.hub import count, hub_process, incidents, query, sos_topic, start_hub, wait_until
from tests.support.services import Mosquitto, MqttWireTap, ShouhuProcess

PUBLISH, PUBACK = 3, 4


def events(url: str, incident_id: int) -> list[str]:
    return [
        r[0] for r in query(url, "SELECT event FROM incident_events WHERE incident_id = %s ORDER BY id", incident_id)
    ]


def test_press_opens_one_red_incident_with_its_first_step(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    publish_raw(broker.url, sos_topic("wb-0001"), alarm_payload("sos", lat=38.7, lon=111.6))
    found = wait_until(lambda: incidents(county_url), what="an incident")
    assert len(found) == 1
    incident_id, kind, state, resident, urgency, unreadable, area = found[0]
    assert (kind, state, resident, urgency, unreadable) == ("sos", "open", "r-0001", 1, False)
    grid = query(county_url, "SELECT grid_id FROM residents WHERE id = 'r-0001'")[0][0]
    assert area == grid
    assert events(county_url, incident_id) == ["opened", "stored"]
    actions = query(
        county_url, "SELECT step, round, token, state FROM escalation_actions WHERE incident_id = %s", incident_id
    )
    assert actions == [(0, 0, 1, "pending")]
    snapshot = query(county_url, "SELECT policy_snapshot FROM incidents WHERE id = %s", incident_id)[0][0]
    assert snapshot["steps"][0]["target"] == "grid_worker"


def test_same_message_twice_is_one_incident(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    payload = alarm_payload("sos")
    publish_raw(broker.url, sos_topic("wb-0002"), payload)
    publish_raw(broker.url, sos_topic("wb-0002"), payload)
    publish_raw(broker.url, sos_topic("wb-0003"), alarm_payload("sos"))  # a marker behind them
    wait_until(lambda: len(incidents(county_url)) == 2, what="two incidents")
    found = [i for i in incidents(county_url) if i[3] == "r-0002"]
    assert len(found) == 1
    assert found[0][4] == 1  # urgency not raised by the copy
    assert events(county_url, found[0][0]) == ["opened", "stored"]
    assert query(county_url, "SELECT count(*) FROM message_ledger WHERE device_id = 'wb-0002'") == [(1,)]


def test_two_presses_and_a_fall_join_one_incident(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    publish_raw(broker.url, sos_topic("wb-0004"), alarm_payload("sos"))
    publish_raw(broker.url, sos_topic("wb-0004"), alarm_payload("sos"))
    publish_raw(broker.url, sos_topic("wb-0004", "fall"), alarm_payload("fall", confidence=0.9))
    found = wait_until(lambda: [i for i in incidents(county_url) if i[4] == 3], what="urgency 3")
    assert len(incidents(county_url)) == 1
    assert events(county_url, found[0][0]) == ["opened", "stored", "joined", "joined"]
    assert query(county_url, "SELECT count(*) FROM escalation_actions") == [(1,)]


def test_reused_msg_id_with_other_content_is_paged_not_dropped(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    publish_raw(broker.url, sos_topic("wb-0005"), alarm_payload("sos", msg_id="boot1-7"))
    publish_raw(broker.url, sos_topic("wb-0005"), alarm_payload("sos", msg_id="boot1-7", battery=12))
    wait_until(lambda: query(county_url, "SELECT urgency FROM incidents") == [(2,)], what="the second press joined")
    keys = sorted(r[0] for r in query(county_url, "SELECT msg_id FROM message_ledger WHERE device_id = 'wb-0005'"))
    assert keys[0] == "boot1-7"
    assert keys[1].startswith("boot1-7#reused:")


def test_unreadable_sos_of_a_known_wristband_still_pages(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    garbage = b"\xff\xfe{not json"
    publish_raw(broker.url, sos_topic("wb-0006"), garbage)
    publish_raw(broker.url, sos_topic("wb-0006"), garbage)  # the same bytes again: one incident
    publish_raw(broker.url, sos_topic("wb-0007", "fall"), b'{"msg_id": "x"}')  # no ts
    wait_until(lambda: len(incidents(county_url)) == 2, what="two unreadable incidents")
    # The copy is dead-lettered in the transaction that handles it: its dead letter (the
    # third) means the copy has been stored, so a second incident would be there by now.
    wait_until(lambda: count(county_url, "dead_letters") == 3, what="the copy's dead letter")
    found = incidents(county_url)
    assert [(i[1], i[3], i[5]) for i in found] == [("sos", "r-0006", True), ("fall", "r-0007", True)]
    assert found[0][4] == 1
    reasons = sorted(r[0] for r in query(county_url, "SELECT reason FROM dead_letters"))
    assert reasons == ["not_utf8", "not_utf8", "schema"]


def test_sos_of_an_unregistered_wristband_pages_the_county(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    publish_raw(broker.url, sos_topic("wb-stranger"), alarm_payload("sos"))
    found = wait_until(lambda: incidents(county_url), what="an incident")
    assert [(i[1], i[3], i[6]) for i in found] == [("sos_unregistered", None, "county")]
    snapshot = query(county_url, "SELECT policy_snapshot FROM incidents")[0][0]
    assert snapshot["steps"][0]["target"] == "operators"


def test_bad_input_is_dead_lettered_and_the_hub_keeps_going(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    publish_raw(broker.url, "shouhu/v1/wristband/wb-0008/status", b"sleeping")
    publish_raw(broker.url, "shouhu/v1/camera/cam-999/status", b"offline")
    publish_raw(broker.url, "shouhu/v1/wristband/wb-0008/status", b"online")
    publish_raw(broker.url, sos_topic("wb-0008"), alarm_payload("sos"))
    wait_until(lambda: incidents(county_url), what="the SOS behind the bad input")
    wait_until(lambda: len(query(county_url, "SELECT 1 FROM dead_letters")) == 2, what="two dead letters")
    assert sorted(r[0] for r in query(county_url, "SELECT reason FROM dead_letters")) == ["schema", "unknown_device"]
    events = sorted(r[0] for r in query(county_url, "SELECT event FROM device_events WHERE device_id = 'wb-0008'"))
    assert events == ["online", "status_online"]  # the status message, and liveness's first sighting


def test_hub_falls_back_to_mqtt_311_on_the_embedded_broker(county_url: str) -> None:
    port = free_port()
    broker = ensure_local_broker(port)
    assert broker is not None
    url = f"mqtt://127.0.0.1:{port}"
    try:
        worker, thread = start_hub(county_url, url)
        assert worker.connection.protocol == 4  # MQTT 3.1.1
        publish_raw(url, sos_topic("wb-0009"), alarm_payload("sos"))
        wait_until(lambda: incidents(county_url), what="an incident via amqtt")
        worker.stop()
        thread.join(10)
    finally:
        broker.terminate()
        broker.wait(10)


def test_two_hubs_on_one_broker_open_one_incident(county_url: str, mosquitto: Mosquitto) -> None:
    first, first_thread = start_hub(county_url, mosquitto.url)
    second, second_thread = start_hub(county_url, mosquitto.url)
    try:
        for _ in range(5):
            publish_raw(mosquitto.url, sos_topic("wb-0010"), alarm_payload("sos"))
        wait_until(
            lambda: query(county_url, "SELECT urgency FROM incidents") == [(5,)], what="five presses, one incident"
        )
        # Each hub received every press (direct subscriptions); the ledger kept one of each.
        assert query(county_url, "SELECT count(*) FROM message_ledger") == [(5,)]
        redeliveries = query(county_url, "SELECT count(*) FROM incident_events WHERE event = 'joined'")
        assert redeliveries == [(4,)]
    finally:
        for worker, thread in ((first, first_thread), (second, second_thread)):
            worker.stop()
            thread.join(10)


def _hold_incidents(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    """Block every hub transaction that would write an incident, until rolled back."""
    blocker = psycopg.connect(url)
    blocker.execute("LOCK TABLE incidents IN SHARE ROW EXCLUSIVE MODE")
    return blocker


def _hub_waiting_on_lock(url: str, hub_id: str) -> bool:
    rows = query(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
        f"shouhu-hub-{hub_id}",
    )
    return bool(rows[0][0] > 0)


def test_puback_is_sent_only_after_the_commit(county_url: str, mosquitto: Mosquitto) -> None:
    tap = MqttWireTap(mosquitto.port)
    hub_id = f"hub-{uuid.uuid4().hex[:8]}"
    process = hub_process(county_url, tap.url, hub_id).start()
    try:
        blocker = _hold_incidents(county_url)
        topic = sos_topic("wb-0011")
        publish_raw(mosquitto.url, topic, alarm_payload("sos"))
        delivered = tap.wait_for("down", PUBLISH, topic=topic)
        wait_until(lambda: _hub_waiting_on_lock(county_url, hub_id), what="the hub inside its transaction")
        # The hub holds the message in an open transaction: no PUBACK may be on the wire.
        time.sleep(0.3)
        assert tap.seen("up", PUBACK, delivered.packet_id) == []
        assert incidents(county_url) == []
        blocker.rollback()
        blocker.close()
        acked = tap.wait_for("up", PUBACK, packet_id=delivered.packet_id)
        committed_at = time.monotonic()
        assert incidents(county_url), "PUBACK seen, so the incident must be committed"
        assert acked.at <= committed_at
    finally:
        process.stop()
        tap.close()


def test_hub_killed_before_commit_loses_nothing_and_doubles_nothing(county_url: str, mosquitto: Mosquitto) -> None:
    hub_id = f"hub-{uuid.uuid4().hex[:8]}"
    first = hub_process(county_url, mosquitto.url, hub_id).start()
    blocker = _hold_incidents(county_url)
    publish_raw(mosquitto.url, sos_topic("wb-0012"), alarm_payload("sos"))
    wait_until(lambda: _hub_waiting_on_lock(county_url, hub_id), what="the hub inside its transaction")
    first.kill(9)  # SIGKILL: received, not committed, not acknowledged
    blocker.rollback()
    blocker.close()
    assert incidents(county_url) == []
    second = hub_process(county_url, mosquitto.url, hub_id).start()
    try:
        found = wait_until(lambda: incidents(county_url), what="the redelivered SOS")
        # A press from another wristband, behind the redelivery on the same alarm session:
        # once its incident is stored, any second copy of the first press has been handled.
        publish_raw(mosquitto.url, sos_topic("wb-0013"), alarm_payload("sos"))
        wait_until(lambda: [i for i in incidents(county_url) if i[3] == "r-0013"], what="the press behind it")
        assert [i[3] for i in incidents(county_url)] == ["r-0012", "r-0013"]
        assert found[0][4] == 1
        incident = found[0][0]
        actions = query(county_url, "SELECT count(*) FROM escalation_actions WHERE incident_id = %s", incident)
        assert actions == [(1,)]
        stored = query(
            county_url, "SELECT detail FROM incident_events WHERE event = 'stored' AND incident_id = %s", incident
        )
        assert json.dumps(stored[0][0]).count(hub_id) == 1
    finally:
        second.stop()


@pytest.mark.parametrize("fault", ["postgres-crash", "broker-restart"])
def test_a_database_crash_or_broker_restart_inside_a_group_of_alarms_loses_none_and_doubles_none(
    own_postgres: tuple[LocalPostgres, str], broker: Mosquitto, fault: str
) -> None:
    """The other faults of a group in its shared statements (issue 13): PostgreSQL crashes
    (`pg_ctl stop -m immediate`, the group's transaction lost with it), or the broker
    restarts (the group commits while the hub's connection is gone, so its PUBACKs cannot
    go out and the broker delivers the group again). Either way every press ends with
    one incident and one first step, and the ledger one row per press."""
    cluster, url = own_postgres
    devices = [f"wb-{n:04d}" for n in range(21, 37)]
    hub_id = f"hub-{uuid.uuid4().hex[:8]}"
    tap = MqttWireTap(broker.port)
    holder, hub = _hub_with_a_group_in_its_shared_statements(url, broker, tap, hub_id, devices)
    try:
        if fault == "postgres-crash":
            cluster.stop("immediate")  # the holder's session and the group's transaction die with it
            cluster.start()
        else:
            broker.stop()  # SIGTERM: the broker saves its sessions
            holder.execute("SELECT pg_advisory_unlock_all()")  # the group commits; its PUBACKs have no connection
            wait_until(lambda: len(incidents(url)) == len(devices), what="the group committed with the broker down")
            broker.start()
        wait_until(lambda: len(incidents(url)) == len(devices), timeout=30, what="every press's incident")
        # One more press behind any redelivery on the same session: once it is stored,
        # every second copy of the group has been handled.
        publish_raw(broker.url, sos_topic("wb-0040"), alarm_payload("sos"))
        wait_until(lambda: len(incidents(url)) == len(devices) + 1, timeout=30, what="the press behind them")
        if fault == "broker-restart":  # the fault was real: the group came down the wire again
            assert all(len(tap.seen("down", PUBLISH, topic=sos_topic(d))) >= 2 for d in devices[1:])
    finally:
        with contextlib.suppress(psycopg.Error):
            holder.close()
        hub.stop()
        tap.close()
    per_device = query(
        url,
        "SELECT i.device_id, count(DISTINCT i.id), count(DISTINCT a.id) FROM incidents i"
        " JOIN escalation_actions a ON a.incident_id = i.id AND a.step = 0 AND a.round = 0"
        " WHERE i.device_id = ANY(%s) GROUP BY i.device_id ORDER BY i.device_id",
        devices,
    )
    assert per_device == [(device, 1, 1) for device in devices]
    assert query(url, "SELECT count(*) FROM message_ledger WHERE device_id = ANY(%s)", devices) == [(len(devices),)]


def _wait_on_advisory_lock(key: int, devices: list[str]) -> str:
    """A trigger on the ledger that makes a transaction storing one of ``devices`` wait
    for advisory lock ``key`` (which the test holds)."""
    listed = ", ".join(f"'{d}'" for d in devices)
    return f"""
        CREATE FUNCTION wait_{key}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.device_id IN ({listed}) THEN PERFORM pg_advisory_xact_lock_shared({key}); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER wait_{key} BEFORE INSERT ON message_ledger FOR EACH ROW EXECUTE FUNCTION wait_{key}();
    """


def _hub_statement(url: str, hub_id: str) -> str:
    rows = query(
        url,
        "SELECT query FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
        f"shouhu-hub-{hub_id}",
    )
    return str(rows[0][0]) if rows else ""


def _hub_with_a_group_in_its_shared_statements(
    url: str, broker: Mosquitto, tap: MqttWireTap, hub_id: str, devices: list[str]
) -> tuple[psycopg.Connection[tuple[Any, ...]], ShouhuProcess]:
    """A `shouhu hub` whose alarm lane holds ``devices[1:]`` as one group, waiting inside
    its shared statements on advisory lock 2, which the returned connection holds.

    The first press holds the lane in its transaction (lock 1) while the others queue in
    its inbox; released, it commits and the lane takes the others as one group."""
    holder = psycopg.connect(url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(1), pg_advisory_lock(2)")
    with psycopg.connect(url) as conn:
        conn.execute(_wait_on_advisory_lock(1, devices[:1]))
        conn.execute(_wait_on_advisory_lock(2, devices[1:]))
    hub = hub_process(url, tap.url, hub_id).start()
    try:
        publish_raw(broker.url, sos_topic(devices[0]), alarm_payload("sos"))
        wait_until(lambda: _hub_waiting_on_lock(url, hub_id), what="the first press in its transaction")
        for device in devices[1:]:
            publish_raw(broker.url, sos_topic(device), alarm_payload("sos"))
        for device in devices[1:]:  # delivered to the hub (the broker lets 20 be in flight)
            tap.wait_for("down", PUBLISH, topic=sos_topic(device))
        holder.execute("SELECT pg_advisory_unlock(1)")
        wait_until(lambda: "unnest" in _hub_statement(url, hub_id), what="the group in its shared statements")
        assert len(incidents(url)) == 1
    except BaseException:
        hub.kill(9)
        holder.close()
        tap.close()
        raise
    return holder, hub


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_a_hub_stopped_inside_a_group_of_alarms_loses_none_and_doubles_none(
    county_url: str, mosquitto: Mosquitto, signal_number: int
) -> None:
    """A mass event's alarms are stored together (issue 13): the hub is killed (SIGKILL) or
    stopped (SIGTERM) while a group of fifteen presses sits in its shared statements, not
    committed, not acknowledged. After a restart every press has its one incident, one
    first step and one `stored` entry: nothing lost to the kill, nothing doubled by the
    broker's redelivery."""
    devices = [f"wb-{n:04d}" for n in range(21, 37)]
    hub_id = f"hub-{uuid.uuid4().hex[:8]}"
    tap = MqttWireTap(mosquitto.port)
    holder, first = _hub_with_a_group_in_its_shared_statements(county_url, mosquitto, tap, hub_id, devices)
    try:
        assert first.process is not None
        first.process.send_signal(signal_number)
    finally:
        holder.execute("SELECT pg_advisory_unlock_all()")
        holder.close()
        try:
            assert first.process is not None
            # With the locks released a SIGTERMed hub commits and acks its group before it exits.
            first.process.wait(20)
        finally:
            first.kill(9)  # only if the test failed before its signal
            tap.close()
    second = hub_process(county_url, mosquitto.url, hub_id).start()
    try:
        wait_until(lambda: len(incidents(county_url)) == len(devices), timeout=20, what="every press's incident")
        # One more press behind any redelivery on the same session: once it is stored,
        # every second copy of the group has been handled.
        publish_raw(mosquitto.url, sos_topic("wb-0040"), alarm_payload("sos"))
        wait_until(lambda: len(incidents(county_url)) == len(devices) + 1, what="the press behind them")
    finally:
        second.stop()
    per_device = query(
        county_url,
        "SELECT i.device_id, count(DISTINCT a.id), count(DISTINCT e.id) FROM incidents i"
        " JOIN escalation_actions a ON a.incident_id = i.id"
        " JOIN incident_events e ON e.incident_id = i.id AND e.event = 'stored'"
        " WHERE i.device_id = ANY(%s) GROUP BY i.device_id ORDER BY i.device_id",
        devices,
    )
    assert per_device == [(device, 1, 1) for device in devices]
    assert query(county_url, "SELECT count(*) FROM message_ledger WHERE device_id = ANY(%s)", devices) == [
        (len(devices),)
    ]
