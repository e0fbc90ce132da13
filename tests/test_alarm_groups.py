"""A mass event's alarms stored together (``alerts.incidents.open_alarms``, issue 13).

The hub stores a group's readable presses in a handful of statements. Each alarm must
still come out exactly as if stored alone: one open red incident per resident, the
press that finds one open joins it, a redelivery is a redelivery, an unregistered
wristband and a cancel take their own paths, and one alarm that breaks the shared
statements costs only itself.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from alerts import incidents
from hub.ingest import STORE_ALONE, AlarmReceipt, IngestConfig, Writer
from hub.mqtt import Received
from tests.support.escalation import DAY


def sos(device: str, msg_id: str, *, action: str = "press", seconds: int = 0) -> Received:
    at = DAY + timedelta(seconds=seconds)
    body = json.dumps({"msg_id": msg_id, "ts": at.isoformat(), "action": action}).encode()
    return Received(f"shouhu/v1/wristband/{device}/sos", body, 1, False, 1, 1, at, time.monotonic())


def bands(url: str, count: int) -> list[tuple[str, str]]:
    """(wristband, resident) for ``count`` residents, one wristband each."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT DISTINCT ON (d.resident_id) d.id, d.resident_id FROM devices d"
            " WHERE d.kind = 'wristband' AND d.resident_id IS NOT NULL ORDER BY d.resident_id, d.id LIMIT %s",
            (count,),
        ).fetchall()
    assert len(rows) == count, f"the demo county has {count} residents with wristbands"
    return [(str(device), str(resident)) for device, resident in rows]


def store(url: str, group: list[Received]) -> list[AlarmReceipt | Any]:
    writer = Writer(url, IngestConfig("hub-t", 120), sleep=lambda _s: None)
    try:
        return writer.store_group(group)
    finally:
        writer.close()


def q(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


def test_a_group_stores_each_alarm_as_if_alone(county_url: str) -> None:
    (a, ra), (b, rb), (c, rc), (d, rd) = bands(county_url, 4)
    # c's resident already has an open incident; b's press is stored already (a redelivery).
    first = store(county_url, [sos(c, "c-0"), sos(b, "b-1")])
    assert all(isinstance(r, AlarmReceipt) for r in first)
    group = [
        sos(a, "a-1"),
        sos(a, "a-2", seconds=1),  # the same resident again in the same group: joins
        sos(b, "b-1"),  # redelivered
        sos(c, "c-1"),  # joins the incident already open
        sos(d, "d-1"),
        sos("wb-nobody", "x-1"),  # unregistered: the county's operators
        sos(d, "d-cancel", action="cancel", seconds=2),  # a cancel in the same group
    ]
    receipts = store(county_url, group)
    assert all(isinstance(r, AlarmReceipt) for r in receipts)
    codes = {r.device_id: r.incident_code for r in receipts if isinstance(r, AlarmReceipt)}
    incidents_by_resident = dict(
        q(county_url, "SELECT coalesce(resident_id, device_id), code FROM incidents WHERE severity = 'red'")
    )
    assert set(incidents_by_resident) == {ra, rb, rc, rd, "wb-nobody"}
    assert codes[a] == incidents_by_resident[ra]
    assert codes[c] == incidents_by_resident[rc]
    assert codes["wb-nobody"] == incidents_by_resident["wb-nobody"]
    urgency = dict(q(county_url, "SELECT resident_id, urgency FROM incidents WHERE resident_id IS NOT NULL"))
    assert urgency == {ra: 2, rb: 1, rc: 2, rd: 1}
    # One first step per incident, and every opened incident's timeline says opened, then stored.
    steps = q(county_url, "SELECT incident_id, count(*) FROM escalation_actions GROUP BY 1")
    assert sorted(n for _i, n in steps) == [1] * 5
    timelines = q(
        county_url,
        "SELECT i.code, array_agg(e.event ORDER BY e.id) FROM incidents i JOIN incident_events e"
        " ON e.incident_id = i.id GROUP BY i.code",
    )
    events = {code: list(names) for code, names in timelines}
    assert events[incidents_by_resident[ra]] == ["opened", "stored", "joined"]
    assert events[incidents_by_resident[rc]] == ["opened", "stored", "joined"]
    assert events[incidents_by_resident[rb]] == ["opened", "stored"]  # the redelivery added nothing
    assert events[incidents_by_resident[rd]][:2] == ["opened", "stored"]
    assert "cancel_received" in events[incidents_by_resident[rd]]
    stored = q(county_url, "SELECT detail->>'msg_id', detail->>'hub_id' FROM incident_events WHERE event = 'stored'")
    assert sorted(stored) == sorted([("c-0", "hub-t"), ("b-1", "hub-t"), ("a-1", "hub-t"), ("d-1", "hub-t"),
                                     ("x-1", "hub-t")])
    ledger = {m for (m,) in q(county_url, "SELECT msg_id FROM message_ledger")}
    assert {"a-1", "a-2", "b-1", "c-0", "c-1", "d-1", "x-1", "d-cancel"} <= ledger


def test_a_group_opens_its_incidents_in_a_few_statements_whatever_its_size(county_url: str) -> None:
    """The point of storing together: the statements do not grow with the group."""
    executed = 0
    execute = psycopg.Connection.execute

    def counting(self: psycopg.Connection[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal executed
        executed += 1
        return execute(self, query, *args, **kwargs)

    counts = []
    residents = bands(county_url, 30)
    for group in (residents[:5], residents[5:30]):
        executed = 0
        psycopg.Connection.execute = counting  # type: ignore[method-assign]
        try:
            receipts = store(county_url, [sos(device, f"{device}-1") for device, _r in group])
        finally:
            psycopg.Connection.execute = execute  # type: ignore[method-assign]
        assert all(isinstance(r, AlarmReceipt) and r.state == "open" for r in receipts)
        counts.append(executed)
    assert counts[0] == counts[1], counts
    assert counts[1] < 25, counts
    assert q(county_url, "SELECT count(*) FROM incidents") == [(30,)]
    assert q(county_url, "SELECT count(DISTINCT code) FROM incidents") == [(30,)]


def test_a_code_drawn_twice_in_one_group_opens_with_the_next_draw(
    county_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a, ra), (b, rb), (c, rc) = bands(county_url, 3)
    draws = iter(["AAAAA", "AAAAA", "CCCCC", "BBBBB"])
    monkeypatch.setattr(incidents, "draw_code", lambda: next(draws))
    receipts = store(county_url, [sos(a, "a-1"), sos(b, "b-1"), sos(c, "c-1")])
    assert [r.incident_code for r in receipts if isinstance(r, AlarmReceipt)] == ["AAAAA", "BBBBB", "CCCCC"]
    assert sorted(q(county_url, "SELECT resident_id, code FROM incidents")) == sorted(
        [(ra, "AAAAA"), (rb, "BBBBB"), (rc, "CCCCC")]
    )
    assert q(county_url, "SELECT count(*) FROM escalation_actions") == [(3,)]


def test_an_alarm_that_breaks_the_shared_statements_costs_only_itself(county_url: str) -> None:
    """A row the incidents table refuses (here a trigger, as a bug would) fails the
    statement all of the group's incidents share: the group is then stored alarm by
    alarm, and only the refused one comes back to be stored alone."""
    (a, _ra), (b, rb), (c, rc) = bands(county_url, 3)
    with psycopg.connect(county_url) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$BEGIN IF NEW.device_id = '{a}' THEN RAISE EXCEPTION 'broken'; END IF; RETURN NEW; END$$"
        )
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON incidents FOR EACH ROW EXECUTE FUNCTION refuse()")
    receipts = store(county_url, [sos(a, "a-1"), sos(b, "b-1"), sos(c, "c-1")])
    assert receipts[0] is STORE_ALONE
    assert all(isinstance(r, AlarmReceipt) and r.state == "open" for r in receipts[1:])
    assert sorted(r for (r,) in q(county_url, "SELECT resident_id FROM incidents")) == sorted([rb, rc])
    # Nothing of the shared try is left behind: one ledger row and one first step each.
    assert sorted(m for (m,) in q(county_url, "SELECT msg_id FROM message_ledger")) == ["b-1", "c-1"]
    assert q(county_url, "SELECT count(*) FROM escalation_actions") == [(2,)]


def raw(device: str, payload: bytes, *, seconds: int = 0) -> Received:
    at = DAY + timedelta(seconds=seconds)
    return Received(f"shouhu/v1/wristband/{device}/sos", payload, 1, False, 1, 1, at, time.monotonic())


def test_a_cancel_before_a_press_in_the_same_group_still_comes_first(county_url: str) -> None:
    """Stored alone, a cancel and then a new press stand the old incident down and open a new
    one. Storing the press together with the group first would have joined it to the old
    incident and let the cancel stand the press down with it: a press lost. A press is taken
    into the shared statements only as its resident's first alarm in the group."""
    (d, rd), (e, re_) = bands(county_url, 2)
    [earlier] = store(county_url, [sos(d, "d-1"), sos(e, "e-0")])[:1]
    assert isinstance(earlier, AlarmReceipt)
    receipts = store(county_url, [sos(d, "d-cancel", action="cancel", seconds=5), sos(d, "d-2", seconds=6),
                                  sos(e, "e-1", seconds=6)])
    states = q(county_url, "SELECT code, state FROM incidents WHERE resident_id = %s ORDER BY id", rd)
    assert states[0] == (earlier.incident_code, "cancelled")
    assert [state for _code, state in states[1:]] == ["open"], "the press after the cancel opened its own incident"
    press = receipts[1]
    assert isinstance(press, AlarmReceipt)
    assert (press.incident_code, press.state) == (states[1][0], "open")
    assert q(county_url, "SELECT urgency FROM incidents WHERE resident_id = %s", re_) == [(2,)]


def test_a_cancel_with_nothing_open_then_a_press_in_the_same_group_pages(county_url: str) -> None:
    (d, rd), (e, _re) = bands(county_url, 2)
    receipts = store(county_url, [sos(d, "d-cancel", action="cancel"), sos(d, "d-1", seconds=1), sos(e, "e-1")])
    assert q(county_url, "SELECT state FROM incidents WHERE resident_id = %s", rd) == [("open",)]
    assert isinstance(receipts[1], AlarmReceipt)
    assert receipts[1].state == "open"


def test_an_unreadable_alarm_before_a_press_of_the_same_band_opens_the_incident_as_alone(county_url: str) -> None:
    (d, rd), (e, _re) = bands(county_url, 2)
    store(county_url, [raw(d, b"\xff\xfe not json"), sos(d, "d-1", seconds=1), sos(e, "e-1")])
    assert q(county_url, "SELECT payload_unreadable, urgency FROM incidents WHERE resident_id = %s", rd) == [
        (True, 2)
    ]
    events = q(
        county_url,
        "SELECT e.event FROM incident_events e JOIN incidents i ON i.id = e.incident_id"
        " WHERE i.resident_id = %s ORDER BY e.id",
        rd,
    )
    assert [event for (event,) in events] == ["opened", "stored", "joined"]
