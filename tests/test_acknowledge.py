"""Acknowledge, decline, resolve, cancel, re-escalation and the sweeper, against the real
database, the router and the phone-network simulator, with a clock the test moves."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import pytest

from alerts import incidents
from alerts.acknowledge import Actor, Result, acknowledge, decline, resolve
from alerts.incidents import Alarm, AlarmResult, record_alarm
from devices.contract import payload_hash
from devices.kinds import IncidentKind, Outcome
from tests.support.escalation import DAY, Clock, calls, make_router, messages, q, wristband_in


def alarm(
    url: str, device: str, at: Any, msg_id: str, *, kind: IncidentKind = IncidentKind.SOS, cancel: bool = False
) -> Any:
    with psycopg.connect(url) as conn:
        return record_alarm(
            conn,
            Alarm(device, kind, msg_id, b"{}", payload_hash(msg_id.encode()), at, cancel=cancel),
            ack_timeout_s=120,
            hub_id="test",
            cancel_window_s=30,
        )


def staff_actor(url: str, phone: str) -> Actor:
    staff_id, name, role = q(url, "SELECT id, name, role FROM staff WHERE phone = %s", phone)[0]
    return Actor("staff", staff_id, name, phone, role)


def guardian_actor(url: str, resident: str, priority: int = 1) -> Actor:
    gid, name, phone = q(
        url, "SELECT id, name, phone FROM guardians WHERE resident_id = %s ORDER BY priority", resident
    )[priority - 1]
    return Actor("guardian", gid, name, phone, "guardian")


def run(url: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    with psycopg.connect(url) as conn:
        return fn(conn, *args, **kwargs)


def setup_paged_guardians(url: str, phone: str) -> tuple[int, str, Clock, Any]:
    device, _grid, resident = wristband_in(url, night_covered=False)
    clock = Clock(DAY)
    incident = alarm(url, device, DAY, "p1").incident_id
    router = make_router(url, phone, clock)
    router.run_once()
    clock.advance(120)
    router.run_once()  # guardians paged
    return incident, resident, clock, router


def test_acknowledgement_stops_the_chain_and_tells_everyone_paged(county_url: str, phone_network: str) -> None:
    incident, resident, clock, router = setup_paged_guardians(county_url, phone_network)
    guardian = guardian_actor(county_url, resident)
    paged = {r[0] for r in q(county_url, "SELECT DISTINCT address FROM notification_attempts WHERE purpose = 'page'")}
    assert run(county_url, acknowledge, incident, guardian, "sms", clock(), resolve_timeout_s=1800) is Result.DONE
    sms_before = len(messages(phone_network))
    router.run_once()
    notices = messages(phone_network)[sms_before:]
    assert {m["to"] for m in notices} == paged - {guardian.phone}
    assert all(guardian.name in m["body"] and "接单" in m["body"] for m in notices)
    calls_before = len(calls(phone_network))
    clock.advance(600)
    router.run_once()
    assert len(calls(phone_network)) == calls_before  # nothing more is paged
    state, by, via = q(county_url, "SELECT state, acknowledged_by, acknowledged_via FROM incidents")[0]
    assert (state, by, via) == ("acknowledged", guardian.key, "sms")
    assert q(county_url, "SELECT kind FROM escalation_actions WHERE state = 'pending'") == [("resolve_check",)]


def test_a_second_acknowledgement_is_told_it_was_taken(county_url: str, phone_network: str) -> None:
    incident, resident, clock, _router = setup_paged_guardians(county_url, phone_network)
    first, second = guardian_actor(county_url, resident, 1), guardian_actor(county_url, resident, 2)
    assert run(county_url, acknowledge, incident, first, "voice", clock(), resolve_timeout_s=1800) is Result.DONE
    assert run(county_url, acknowledge, incident, first, "sms", clock(), resolve_timeout_s=1800) is Result.ALREADY
    assert run(county_url, acknowledge, incident, second, "sms", clock(), resolve_timeout_s=1800) is Result.TAKEN


def test_a_press_after_the_acknowledgement_pages_whoever_took_it(county_url: str, phone_network: str) -> None:
    incident, resident, clock, router = setup_paged_guardians(county_url, phone_network)
    guardian = guardian_actor(county_url, resident)
    run(county_url, acknowledge, incident, guardian, "voice", clock(), resolve_timeout_s=1800)
    router.run_once()
    device = q(county_url, "SELECT device_id FROM incidents")[0][0]
    clock.advance(30)
    assert alarm(county_url, device, clock(), "p2").result is AlarmResult.JOINED
    calls_before = len(calls(phone_network))
    router.run_once()
    assert [c["to"] for c in calls(phone_network)[calls_before:]] == [guardian.phone]
    repages = q(county_url, "SELECT channel, state FROM notification_attempts WHERE purpose = 'repage' ORDER BY id")
    assert repages == [("voice", "sent"), ("sms", "sent")]


def test_everyone_in_the_step_declining_moves_on_at_once(county_url: str, phone_network: str) -> None:
    device, grid, _resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    incident = alarm(county_url, device, DAY, "d1").incident_id
    router = make_router(county_url, phone_network, clock)
    router.run_once()
    workers = {
        r[0]
        for r in q(
            county_url, "SELECT DISTINCT address FROM notification_attempts WHERE step = 0 AND channel = 'voice'"
        )
    }
    for phone in workers:
        run(county_url, decline, incident, staff_actor(county_url, phone), "voice", clock())
    calls_before = len(calls(phone_network))
    router.run_once()  # no clock advance: the guardians are paged now, not in 120 s
    guardians = {
        r[0] for r in q(county_url, "SELECT phone FROM guardians g JOIN incidents i ON i.resident_id = g.resident_id")
    }
    assert {c["to"] for c in calls(phone_network)[calls_before:]} == guardians
    assert "step_advanced" in [r[0] for r in q(county_url, "SELECT event FROM incident_events")]
    assert grid


def test_resolve_records_the_outcome_and_ends_everything(county_url: str, phone_network: str) -> None:
    incident, resident, clock, router = setup_paged_guardians(county_url, phone_network)
    guardian = guardian_actor(county_url, resident)
    run(county_url, acknowledge, incident, guardian, "voice", clock(), resolve_timeout_s=1800)
    assert run(county_url, resolve, incident, Outcome.VISITED_FINE, "老人无恙", guardian, clock()) is Result.DONE
    assert run(county_url, resolve, incident, Outcome.OTHER, "", guardian, clock()) is Result.CLOSED
    clock.advance(3600)
    calls_before = len(calls(phone_network))
    router.run_once()
    assert len(calls(phone_network)) == calls_before
    assert q(county_url, "SELECT state, outcome, resolution_note FROM incidents") == [
        ("resolved", "visited_fine", "老人无恙")
    ]
    assert q(county_url, "SELECT count(*) FROM escalation_actions WHERE state = 'pending'") == [(0,)]


def test_acknowledged_but_unresolved_re_escalates_after_the_timeout(county_url: str, phone_network: str) -> None:
    incident, resident, clock, router = setup_paged_guardians(county_url, phone_network)
    run(
        county_url,
        acknowledge,
        incident,
        guardian_actor(county_url, resident),
        "voice",
        clock(),
        resolve_timeout_s=1800,
    )
    router.run_once()
    clock.advance(1799)
    calls_before = len(calls(phone_network))
    router.run_once()
    assert len(calls(phone_network)) == calls_before
    clock.advance(1)
    router.run_once()
    assert q(county_url, "SELECT state FROM incidents") == [("open",)]
    assert len(calls(phone_network)) > calls_before  # the grid worker again, round 1
    assert q(county_url, "SELECT max(round) FROM notification_attempts WHERE purpose = 'page'") == [(1,)]


def test_a_cancel_within_the_window_stands_an_sos_down_and_tells_the_grid_worker(
    county_url: str, phone_network: str
) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    alarm(county_url, device, DAY, "c1")
    router = make_router(county_url, phone_network, clock)
    router.run_once()
    worker = calls(phone_network)[0]["to"]
    assert alarm(county_url, device, DAY + timedelta(seconds=20), "c2", cancel=True).result is AlarmResult.CANCELLED
    sms_before = len(messages(phone_network))
    router.run_once()
    notice = messages(phone_network)[sms_before:]
    assert [m["to"] for m in notice] == [worker]
    assert "取消" in notice[0]["body"]
    assert q(county_url, "SELECT state FROM incidents") == [("cancelled",)]
    clock.advance(600)
    calls_before = len(calls(phone_network))
    router.run_once()
    assert len(calls(phone_network)) == calls_before


def test_a_late_cancel_or_a_fall_cancel_is_refused_and_paging_goes_on(county_url: str, phone_network: str) -> None:
    first, _g, _r = wristband_in(county_url, night_covered=False)
    second, _g2, _r2 = wristband_in(county_url, night_covered=True)
    alarm(county_url, first, DAY, "l1")
    alarm(county_url, second, DAY, "f1", kind=IncidentKind.FALL)
    late = alarm(county_url, first, DAY + timedelta(seconds=31), "l2", cancel=True)
    fall = alarm(county_url, second, DAY + timedelta(seconds=5), "f2", cancel=True)
    assert (late.result, fall.result) == (AlarmResult.CANCEL_REFUSED, AlarmResult.CANCEL_REFUSED)
    assert {r[0] for r in q(county_url, "SELECT state FROM incidents")} == {"open"}
    reasons = sorted(
        r[0]["reason"] for r in q(county_url, "SELECT detail FROM incident_events WHERE event = 'cancel_refused'")
    )
    assert reasons == ["after the 30s cancel window", "not an SOS"]


def test_the_sweeper_repairs_an_open_incident_without_a_pending_action(county_url: str, phone_network: str) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    incident = alarm(county_url, device, DAY, "s1").incident_id
    with psycopg.connect(county_url) as conn:
        conn.execute("DELETE FROM escalation_actions")  # a lost timer, as a bug or a hand edit would leave
    router = make_router(county_url, phone_network, clock)
    assert router.sweep() == [incident]
    assert router.sweep() == []
    router.run_once()
    assert calls(phone_network), "the repaired chain pages at once"
    assert "invariant_repaired" in [r[0] for r in q(county_url, "SELECT event FROM incident_events")]


def test_a_round_that_reaches_nobody_waits_instead_of_spinning(county_url: str, phone_network: str) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    with psycopg.connect(county_url) as conn:
        conn.execute("UPDATE staff SET active = false")
        conn.execute("UPDATE guardians SET active = false")
    clock = Clock(DAY)
    incident = alarm(county_url, device, DAY, "n1").incident_id
    router = make_router(county_url, phone_network, clock)
    router.run_once()  # returns: no tight loop
    assert calls(phone_network) == []
    events = [r[0] for r in q(county_url, "SELECT event FROM incident_events WHERE incident_id = %s", incident)]
    assert events.count("nobody_reachable") == 1
    due = q(county_url, "SELECT due_at FROM escalation_actions WHERE state = 'pending'")
    assert due == [(DAY + timedelta(seconds=120),)]


def test_a_code_drawn_twice_opens_the_incident_with_the_next_draw_in_the_same_transaction(
    county_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub opens an alarm's incident without a savepoint of its own (two statements
    fewer per alarm in a mass event): a drawn code already taken inserts nothing, finds
    no open incident to join, and the next draw opens it — in the same transaction, the
    press not lost, the other resident's incident untouched."""
    first_device, _grid, first_resident = wristband_in(county_url, night_covered=False)
    taken = alarm(county_url, first_device, DAY, "first")
    assert taken.result is AlarmResult.OPENED
    taken_code = q(county_url, "SELECT code FROM incidents WHERE id = %s", taken.incident_id)[0][0]
    second_device = q(
        county_url,
        "SELECT d.id FROM devices d WHERE d.kind = 'wristband' AND d.resident_id <> %s ORDER BY d.id LIMIT 1",
        first_resident,
    )[0][0]
    draws = iter([taken_code, taken_code, "Z2345"])
    monkeypatch.setattr(incidents, "draw_code", lambda: next(draws))
    opened = alarm(county_url, second_device, DAY, "second")
    assert (opened.result, opened.code) == (AlarmResult.OPENED, "Z2345")
    assert q(county_url, "SELECT device_id, code FROM incidents ORDER BY id") == [
        (first_device, taken_code),
        (second_device, "Z2345"),
    ]
    assert q(county_url, "SELECT count(*) FROM escalation_actions WHERE incident_id = %s", opened.incident_id) == [(1,)]
