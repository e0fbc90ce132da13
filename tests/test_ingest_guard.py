"""Liveness bookkeeping can never cost an SOS or a telemetry row: it runs in a savepoint."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from prometheus_client import REGISTRY

from hub.batch import prepare_staging
from hub.ingest import STORE_ALONE, AlarmReceipt, IngestConfig, Writer, store_message
from hub.mqtt import Received
from hub.sightings import Sighting


def broken_liveness(conn: psycopg.Connection[Any], _sightings: Sequence[Sighting]) -> None:
    conn.execute("SELECT * FROM a_table_that_is_not_there")


def received(topic: str, payload: dict[str, Any]) -> Received:
    body = json.dumps({"msg_id": str(uuid.uuid4()), "ts": datetime.now(UTC).isoformat(), **payload}).encode()
    return Received(topic, body, 1, False, 1, 1, datetime.now(UTC), time.monotonic())


def failures() -> float:
    return REGISTRY.get_sample_value("shouhu_hub_liveness_failures_total") or 0.0


def test_an_sos_commits_even_when_liveness_fails(county_url: str) -> None:
    before = failures()
    with psycopg.connect(county_url) as conn:
        prepare_staging(conn)  # as the hub's writer does on every new connection
        store_message(
            conn,
            received("shouhu/v1/wristband/wb-0001/sos", {"action": "press"}),
            IngestConfig("t", 120),
            broken_liveness,
        )
        store_message(
            conn,
            received("shouhu/v1/wristband/wb-0002/telemetry", {"battery": 40}),
            IngestConfig("t", 120),
            broken_liveness,
        )
        conn.commit()
        incidents = conn.execute("SELECT kind, resident_id FROM incidents").fetchall()
        rows = conn.execute("SELECT device_id FROM telemetry").fetchall()
    assert incidents == [("sos", "r-0001")]
    assert rows == [("wb-0002",)]
    assert failures() == before + 2


def test_a_database_outage_inside_liveness_fails_the_whole_transaction(county_url: str) -> None:
    """The database going away is not a bookkeeping failure: nothing may be reported stored."""

    def database_gone(conn: psycopg.Connection[Any], _sightings: Sequence[Sighting]) -> None:
        raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")

    with psycopg.connect(county_url) as conn:
        prepare_staging(conn)
        try:
            with conn.transaction():
                store_message(
                    conn,
                    received("shouhu/v1/wristband/wb-0002/telemetry", {"battery": 40}),
                    IngestConfig("t", 120),
                    database_gone,
                )
        except psycopg.OperationalError:
            pass
        else:
            raise AssertionError("the outage was swallowed: the writer would acknowledge unstored messages")
        assert conn.execute("SELECT count(*) FROM telemetry").fetchone() == (0,)


def test_an_alarm_that_cannot_be_stored_normally_still_pages_the_county(county_url: str) -> None:
    with psycopg.connect(county_url) as conn:
        # A broken constraint on the normal path, as a bug would leave it.
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'broken'; END$$"
        )
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON message_ledger FOR EACH ROW EXECUTE FUNCTION refuse()")
    writer = Writer(county_url, IngestConfig("t", 120), sleep=lambda _s: None)
    try:
        writer.store(received("shouhu/v1/wristband/wb-0040/sos", {"action": "press"}))
    finally:
        writer.close()
    with psycopg.connect(county_url) as conn:
        incidents = conn.execute("SELECT kind, device_id, area_id, state FROM incidents").fetchall()
        actions = conn.execute("SELECT step, state FROM escalation_actions").fetchall()
        letters = conn.execute("SELECT reason FROM dead_letters").fetchall()
    assert incidents == [("sos_unregistered", "wb-0040", "county", "open")]
    assert actions == [(0, "pending")]
    assert letters == [("store_failed",)]


def test_a_group_member_that_fails_comes_back_to_be_stored_alone_and_the_others_keep_their_places(
    county_url: str,
) -> None:
    with psycopg.connect(county_url) as conn:
        rows = conn.execute(
            "SELECT DISTINCT ON (r.grid_id) d.id, r.id, r.grid_id FROM devices d"
            " JOIN residents r ON r.id = d.resident_id WHERE d.kind = 'wristband' ORDER BY r.grid_id, d.id LIMIT 3"
        ).fetchall()
        assert len(rows) == 3, "the demo county has wristbands in three grids"
        # A policy the registry should never hold (a step with no target) breaks the middle one's grid.
        conn.execute(
            "INSERT INTO escalation_policies (id, kind, area_id, steps) VALUES ('broken', 'sos', %s, %s)",
            (rows[1][2], json.dumps([{"channels": ["voice"]}])),
        )
    group = [received(f"shouhu/v1/wristband/{device}/sos", {"action": "press"}) for device, _r, _g in rows]
    writer = Writer(county_url, IngestConfig("t", 120))
    try:
        results = writer.store_group(group)
    finally:
        writer.close()
    assert results[1] is STORE_ALONE
    with psycopg.connect(county_url) as conn:
        stored: dict[str, str] = dict(conn.execute("SELECT resident_id, code FROM incidents").fetchall())
    assert set(stored) == {rows[0][1], rows[2][1]}
    for (device, resident, _grid), result in zip([rows[0], rows[2]], [results[0], results[2]], strict=True):
        assert isinstance(result, AlarmReceipt)
        assert (result.device_id, result.incident_code, result.state) == (device, stored[resident], "open")


def test_a_group_reads_its_devices_once_and_wakes_the_routers_once_after_the_commit(county_url: str) -> None:
    """A mass event's alarms are committed together (issue 13): the group reads every
    device in one statement and wakes the routers with one NOTIFY, delivered at the
    commit, while each alarm still opens its own incident with its resident and grid;
    an unregistered wristband in the group still pages the county (`sos_unregistered`)."""
    with psycopg.connect(county_url) as conn:
        bands = conn.execute(
            "SELECT d.id, d.resident_id, r.grid_id FROM devices d JOIN residents r ON r.id = d.resident_id"
            " WHERE d.kind = 'wristband' ORDER BY d.id LIMIT 8"
        ).fetchall()
    devices = [device for device, _r, _g in bands] + ["wb-not-registered"]
    group = [received(f"shouhu/v1/wristband/{device}/sos", {"action": "press"}) for device in devices]
    device_reads = 0
    execute = psycopg.Connection.execute

    def counting(self: psycopg.Connection[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal device_reads
        device_reads += "FROM devices d" in str(query)
        return execute(self, query, *args, **kwargs)

    with psycopg.connect(county_url, autocommit=True) as listener:
        listener.execute("LISTEN shouhu_escalation")
        writer = Writer(county_url, IngestConfig("t", 120))
        psycopg.Connection.execute = counting  # type: ignore[method-assign]
        try:
            results = writer.store_group(group)
        finally:
            psycopg.Connection.execute = execute  # type: ignore[method-assign]
            writer.close()
        woken = list(listener.notifies(timeout=1.0))
    assert device_reads == 1
    assert len(woken) == 1
    assert all(isinstance(result, AlarmReceipt) for result in results)
    with psycopg.connect(county_url) as conn:
        opened = conn.execute("SELECT device_id, kind, resident_id, area_id FROM incidents").fetchall()
        [(county,)] = conn.execute("SELECT id FROM areas WHERE parent_id IS NULL").fetchall()
    assert sorted(opened, key=lambda row: str(row[0])) == sorted(
        [(device, "sos", resident, grid) for device, resident, grid in bands]
        + [("wb-not-registered", "sos_unregistered", None, county)],
        key=lambda row: str(row[0]),
    )
