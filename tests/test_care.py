"""Care between emergencies against the real PostgreSQL with the demo county: visits,
repair orders, low-battery notices, overdue escalation, maintenance and quiet hours.

Time is driven: sightings carry the hub's receipt time and every sweep is given its
``now``, so rules about hours and days run in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from typing import Any

import psycopg
import pytest

from alerts.acknowledge import Result
from alerts.care import close_task, start_task
from alerts.incidents import Alarm, record_alarm
from alerts.recipients import duty_chain
from alerts.silence import QuietHours
from devices.contract import payload_hash
from devices.kinds import IncidentKind, TaskOutcome
from shouhu.db import Conn
from tests.support.care import LOCK, RULES, T0, WORKER, heard, last_will, run, s
from tests.support.escalation import NIGHT, ZONE, Clock, calls, make_router, messages, q, wristband_in


@pytest.fixture
def conn(county_url: str) -> Iterator[Conn]:
    # Autocommit: each sweep and sighting is its own transaction, as in the services.
    with psycopg.connect(county_url, autocommit=True) as connection:
        yield connection


def tasks(conn: Conn, device_id: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT id, kind, state, owner_area_id, level, reason, outcome, flaps, due_at, incident_id"
        " FROM care_tasks WHERE device_id = %s ORDER BY id",
        (device_id,),
    ).fetchall()


def notices(conn: Conn, incident_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT recipient_kind, recipient_id, address, body, not_before, state FROM notification_attempts"
        " WHERE incident_id = %s AND purpose = 'notice' ORDER BY id",
        (incident_id,),
    ).fetchall()


def events(conn: Conn, incident_id: int) -> list[str]:
    rows = conn.execute("SELECT event FROM incident_events WHERE incident_id = %s ORDER BY id", (incident_id,))
    return [r[0] for r in rows.fetchall()]


def wristband(conn: Conn, device_id: str = "wb-0001") -> tuple[str, str, str]:
    """(device, resident, grid)."""
    row = conn.execute(
        "SELECT d.id, r.id, r.grid_id FROM devices d JOIN residents r ON r.id = d.resident_id WHERE d.id = %s",
        (device_id,),
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def parent(conn: Conn, area_id: str) -> str:
    row = conn.execute("SELECT parent_id FROM areas WHERE id = %s", (area_id,)).fetchone()
    assert row is not None
    return str(row[0])


def grid_workers_on_duty(conn: Conn, grid: str) -> set[str]:
    return {p.id for p in duty_chain(conn, grid, T0, ZONE)}


# -- visits ------------------------------------------------------------------


def test_a_wristband_offline_past_the_hold_gets_one_visit_from_its_grid_worker(conn: Conn) -> None:
    device, resident, grid = wristband(conn)
    heard(conn, device, T0 - s(60))
    last_will(conn, device, T0)
    assert run(conn, T0 + timedelta(minutes=59)).opened == []
    report = run(conn, T0 + timedelta(hours=1, seconds=1))
    assert len(report.opened) == 1
    [(_, kind, state, owner, level, reason, _, _, due_at, incident_id)] = tasks(conn, device)
    assert (kind, state, owner, level, reason) == ("visit", "open", grid, 0, "last_will")
    assert due_at == T0 + timedelta(hours=5, seconds=1)
    incident = q(conn.info.dsn, "SELECT kind, severity, state, resident_id FROM incidents WHERE id = %s", incident_id)
    assert incident == [("wristband_offline", "yellow", "open", resident)]
    told = notices(conn, incident_id)
    assert {n[1] for n in told} == grid_workers_on_duty(conn, grid) != set()
    assert all("探视任务" in n[3] and n[4] is None for n in told)
    # A second sweep, and a second hour, change nothing: one loop per problem.
    assert run(conn, T0 + timedelta(hours=2)).opened == []
    assert len(tasks(conn, device)) == 1


def test_the_device_coming_back_withdraws_a_visit_nobody_started(conn: Conn) -> None:
    device, _, _ = wristband(conn)
    last_will(conn, device, T0)
    run(conn, T0 + timedelta(hours=1, seconds=1))
    heard(conn, device, T0 + timedelta(hours=2))
    report = run(conn, T0 + timedelta(hours=2, seconds=5))
    [(task_id, _, state, _, _, _, outcome, _, _, incident_id)] = tasks(conn, device)
    assert report.closed == [task_id]
    assert (state, outcome) == ("closed", "device_recovered")
    assert q(conn.info.dsn, "SELECT state, outcome FROM incidents WHERE id = %s", incident_id) == [
        ("resolved", "device_recovered")
    ]
    assert "自动销号" in notices(conn, incident_id)[-1][3]


def test_a_started_visit_stays_open_for_the_worker_when_the_device_comes_back(conn: Conn) -> None:
    device, _, _ = wristband(conn)
    last_will(conn, device, T0)
    run(conn, T0 + timedelta(hours=1, seconds=1))
    [(task_id, *_rest, incident_id)] = tasks(conn, device)
    with conn.transaction():
        assert start_task(conn, task_id, WORKER, T0 + timedelta(hours=1, minutes=10)) is Result.DONE
    assert q(conn.info.dsn, "SELECT state, acknowledged_by_name FROM incidents WHERE id = %s", incident_id) == [
        ("acknowledged", "测试网格员（网格员）")
    ]
    heard(conn, device, T0 + timedelta(hours=1, minutes=30))
    report = run(conn, T0 + timedelta(hours=1, minutes=31))
    assert report.closed == []
    assert tasks(conn, device)[0][2] == "started"
    assert "device_back" in events(conn, incident_id)
    # Nor does it escalate, though past due: the device is back and someone is on it.
    assert run(conn, T0 + timedelta(hours=6)).escalated == []
    with conn.transaction(), pytest.raises(ValueError, match="does not fit a visit"):
        close_task(conn, task_id, TaskOutcome.REPAIRED, "", WORKER, T0 + timedelta(hours=6))
    with conn.transaction():
        result = close_task(conn, task_id, TaskOutcome.BAND_CHARGED, "已充上电", WORKER, T0 + timedelta(hours=6))
    assert result is Result.DONE
    assert tasks(conn, device)[0][2:7:4] == ("closed", "band_charged")
    assert q(conn.info.dsn, "SELECT state, outcome FROM incidents WHERE id = %s", incident_id) == [
        ("resolved", "task_completed")
    ]


def test_a_band_left_unworn_past_the_hold_gets_a_visit_until_it_is_worn_again(conn: Conn) -> None:
    device, _, grid = wristband(conn)
    heard(conn, device, T0, worn=True)
    heard(conn, device, T0 + s(60), worn=False)
    # Online all along (telemetry keeps coming), but lying on the table.
    heard(conn, device, T0 + timedelta(hours=5), worn=False)
    assert run(conn, T0 + timedelta(hours=6)).opened == []
    heard(conn, device, T0 + timedelta(hours=6, minutes=1), worn=False)
    report = run(conn, T0 + timedelta(hours=6, minutes=2))
    assert len(report.opened) == 1
    [(task_id, kind, state, owner, _, reason, *_)] = tasks(conn, device)
    assert (kind, state, owner, reason) == ("visit", "open", grid, "not_worn")
    heard(conn, device, T0 + timedelta(hours=7), worn=True)
    assert run(conn, T0 + timedelta(hours=7, seconds=1)).closed == [task_id]


def test_an_overdue_visit_goes_up_to_the_community_then_the_township(conn: Conn) -> None:
    device, _, grid = wristband(conn)
    last_will(conn, device, T0)
    run(conn, T0 + timedelta(hours=1))
    [(task_id, *_rest, due_at, incident_id)] = tasks(conn, device)
    assert run(conn, due_at - s(1)).escalated == []
    community, township = parent(conn, grid), parent(conn, parent(conn, grid))
    report = run(conn, due_at)
    assert report.escalated == [task_id]
    _, _, state, owner, level, *_rest, new_due, _ = tasks(conn, device)[0]
    assert (state, owner, level) == ("open", community, 1)
    assert new_due == due_at + RULES.visit_due
    escalation_notice = notices(conn, incident_id)[-1]
    assert "逾期" in escalation_notice[3]
    on_duty_above = conn.execute(
        "SELECT s.id FROM duty_shifts d JOIN staff s ON s.id = d.staff_id WHERE d.area_id = %s", (community,)
    ).fetchall()
    assert escalation_notice[1] in {r[0] for r in on_duty_above}
    run(conn, new_due)
    assert tasks(conn, device)[0][3:5] == (township, 2)
    assert events(conn, incident_id).count("task_escalated") == 2


# -- camera repairs --------------------------------------------------------------


def test_a_camera_offline_past_the_hold_opens_a_repair_order_for_its_technicians(conn: Conn) -> None:
    heard(conn, "cam-001", T0 - s(60), reported_online=True)
    heard(conn, "cam-001", T0, reported_online=False, reported_reason="video_lost")
    assert run(conn, T0 + s(299)).opened == []
    assert len(run(conn, T0 + s(300)).opened) == 1
    [(_, kind, state, owner, _, reason, *_rest, incident_id)] = tasks(conn, "cam-001")
    assert (kind, state, reason) == ("repair", "open", "reported:video_lost")
    technicians = conn.execute(
        "SELECT s.id FROM staff s JOIN staff_areas a ON a.staff_id = s.id WHERE s.role = 'technician'"
        " AND a.area_id = %s",
        (owner,),
    ).fetchall()
    told = notices(conn, incident_id)
    assert told
    assert {n[1] for n in told} <= {r[0] for r in technicians}
    assert "维修工单" in told[0][3]
    assert "离线原因：视频丢失" in told[0][3]
    assert q(conn.info.dsn, "SELECT kind, severity FROM incidents WHERE id = %s", incident_id) == [
        ("camera_offline", "yellow")
    ]


def test_a_flapping_camera_keeps_one_order_which_closes_with_its_time_to_repair(conn: Conn) -> None:
    heard(conn, "cam-002", T0, reported_online=False, reported_reason="network")
    run(conn, T0 + s(301))
    back = T0 + timedelta(minutes=20)
    heard(conn, "cam-002", back, reported_online=True)
    assert run(conn, back + s(60)).closed == []  # back, but not for long enough yet
    heard(conn, "cam-002", back + s(120), reported_online=False, reported_reason="network")
    run(conn, back + s(130))
    again = back + s(400)
    heard(conn, "cam-002", again, reported_online=True)
    run(conn, again + s(10))
    assert run(conn, again + s(299)).closed == []
    report = run(conn, again + s(300))
    [(task_id, _, state, _, _, _, outcome, flaps, _, incident_id)] = tasks(conn, "cam-002")
    assert report.closed == [task_id]
    assert (state, outcome, flaps) == ("closed", "device_recovered", 1)
    detail = conn.execute(
        "SELECT detail FROM incident_events WHERE incident_id = %s AND event = 'task_closed'", (incident_id,)
    ).fetchone()
    assert detail is not None
    assert detail[0]["time_to_repair_s"] == (again - T0).total_seconds()
    # Offline again after the order closed: a new loop, a new order.
    heard(conn, "cam-002", again + s(1000), reported_online=False, reported_reason="power")
    run(conn, again + s(1301))
    assert [t[5] for t in tasks(conn, "cam-002")] == ["reported:network", "reported:power"]


def test_an_overdue_repair_goes_one_level_up(conn: Conn) -> None:
    heard(conn, "cam-003", T0, reported_online=False, reported_reason="defect")
    run(conn, T0 + s(300))
    [(task_id, _, _, owner, *_rest, due_at, _)] = tasks(conn, "cam-003")
    assert run(conn, due_at).escalated == [task_id]
    assert tasks(conn, "cam-003")[0][3:5] == (parent(conn, owner), 1)


# -- batteries -------------------------------------------------------------------


def test_low_battery_tells_the_guardians_at_most_once_a_local_day(conn: Conn) -> None:
    device, resident, _ = wristband(conn)
    heard(conn, device, T0, battery=15)
    report = run(conn, T0)
    [incident_id] = report.battery_incidents
    guardians = {r[0] for r in conn.execute("SELECT id FROM guardians WHERE resident_id = %s", (resident,))}
    first = notices(conn, incident_id)
    assert {n[1] for n in first} == guardians
    assert all(n[0] == "guardian" and "电量15%" in n[3] and n[4] is None for n in first)
    # Later the same day, lower still but not critical: nothing more.
    heard(conn, device, T0 + timedelta(hours=5), battery=12)
    run(conn, T0 + timedelta(hours=5))
    assert len(notices(conn, incident_id)) == len(first)
    # The next local day (still low): told again, once.
    next_day = T0 + timedelta(days=1)
    run(conn, next_day)
    run(conn, next_day + timedelta(minutes=5))
    assert len(notices(conn, incident_id)) == 2 * len(first)
    assert q(conn.info.dsn, "SELECT kind, severity FROM incidents WHERE id = %s", incident_id) == [
        ("low_battery", "blue")
    ]


def test_a_critical_battery_also_tells_the_grid_worker_once(conn: Conn) -> None:
    device, _, grid = wristband(conn)
    heard(conn, device, T0, battery=8)
    [incident_id] = run(conn, T0).battery_incidents
    run(conn, T0 + timedelta(minutes=30))
    told = notices(conn, incident_id)
    workers = [n for n in told if n[0] == "staff"]
    assert {n[1] for n in workers} == grid_workers_on_duty(conn, grid)
    assert all("即将关机" in n[3] for n in workers)


def test_a_charged_band_resolves_the_blue_incident_and_drops_waiting_notices(conn: Conn) -> None:
    device, _, _ = wristband(conn)
    late = datetime(2026, 11, 24, 23, 0, tzinfo=ZONE)
    heard(conn, device, late, battery=15)
    [incident_id] = run(conn, late).battery_incidents
    heard(conn, device, late + timedelta(minutes=20), battery=22)
    assert run(conn, late + timedelta(minutes=21)).charged == []  # within the hysteresis
    heard(conn, device, late + timedelta(minutes=40), battery=60)
    assert run(conn, late + timedelta(minutes=41)).charged == [incident_id]
    assert q(conn.info.dsn, "SELECT state, outcome FROM incidents WHERE id = %s", incident_id) == [
        ("resolved", "battery_charged")
    ]
    assert {n[5] for n in notices(conn, incident_id)} == {"cancelled"}


def test_quiet_hours_hold_a_battery_notice_until_the_morning(conn: Conn) -> None:
    device, _, _ = wristband(conn)
    late = datetime(2026, 11, 24, 23, 30, tzinfo=ZONE)
    heard(conn, device, late, battery=15)
    [incident_id] = run(conn, late).battery_incidents
    morning = datetime(2026, 11, 25, 7, 0, tzinfo=ZONE)
    told = notices(conn, incident_id)
    assert told
    assert all(n[4] == morning for n in told)
    # It counts for the day it is sent: at 08:00 nothing more is queued.
    run(conn, morning + timedelta(hours=1))
    assert len(notices(conn, incident_id)) == len(told)


def test_quiet_hours_follow_the_nearest_area_and_run_past_midnight() -> None:
    quiet = QuietHours(time(21, 0), time(7, 0))
    at = datetime(2026, 11, 24, 22, 0, tzinfo=ZONE)
    assert quiet.ends_after(at, ZONE) == datetime(2026, 11, 25, 7, 0, tzinfo=ZONE)
    assert quiet.ends_after(datetime(2026, 11, 25, 6, 59, tzinfo=ZONE), ZONE) == datetime(
        2026, 11, 25, 7, 0, tzinfo=ZONE
    )
    assert quiet.ends_after(datetime(2026, 11, 25, 7, 0, tzinfo=ZONE), ZONE) is None
    assert quiet.ends_after(datetime(2026, 11, 25, 12, 0, tzinfo=ZONE), ZONE) is None
    lunch = QuietHours(time(12, 0), time(14, 0))
    assert lunch.ends_after(datetime(2026, 11, 25, 13, 0, tzinfo=ZONE), ZONE) == datetime(
        2026, 11, 25, 14, 0, tzinfo=ZONE
    )
    assert lunch.ends_after(datetime(2026, 11, 25, 14, 0, tzinfo=ZONE), ZONE) is None
    with pytest.raises(ValueError, match="quiet hours"):
        QuietHours(time(8, 0), time(8, 0))


# -- maintenance ---------------------------------------------------------------------


def add_window(
    conn: Conn, *, start: datetime, end: datetime, device: str | None = None, area: str | None = None
) -> None:
    conn.execute(
        "INSERT INTO maintenance_windows (device_id, area_id, starts_at, ends_at, reason, created_by, created_at)"
        " VALUES (%s, %s, %s, %s, 'test', 'test', %s)",
        (device, area, start, end, start),
    )


def test_maintenance_silences_visits_repairs_and_batteries_until_it_ends(conn: Conn) -> None:
    device, _, grid = wristband(conn)
    community = parent(conn, grid)
    # A resident in hospital (a window on the band), a camera under repair (on the camera),
    # and a second band covered by a window on its community.
    add_window(conn, start=T0, end=T0 + timedelta(days=2), device=device)
    add_window(conn, start=T0, end=T0 + timedelta(hours=3), device="cam-001")
    other = conn.execute(
        "SELECT d.id FROM devices d JOIN residents r ON r.id = d.resident_id JOIN areas a ON a.id = r.grid_id"
        " WHERE a.parent_id = %s AND d.id <> %s ORDER BY d.id LIMIT 1",
        (community, device),
    ).fetchone()
    assert other is not None
    add_window(conn, start=T0, end=T0 + timedelta(hours=3), area=community)
    heard(conn, device, T0, battery=5)
    last_will(conn, device, T0 + s(1))
    last_will(conn, other[0], T0 + s(1))
    heard(conn, "cam-001", T0, reported_online=False, reported_reason="defect")
    report = run(conn, T0 + timedelta(hours=2))
    assert report.opened == []
    assert report.battery_incidents == []
    assert conn.execute("SELECT count(*) FROM incidents").fetchone() == (0,)
    # The camera's and the community's windows end; the hospital stay goes on.
    after = run(conn, T0 + timedelta(hours=3))
    opened = {t[0] for d in ("cam-001", other[0], device) for t in tasks(conn, d)}
    assert set(after.opened) == opened
    assert tasks(conn, device) == []
    assert len(tasks(conn, "cam-001")) == 1
    assert len(tasks(conn, other[0])) == 1


def test_maintenance_pauses_an_overdue_task(conn: Conn) -> None:
    heard(conn, "cam-003", T0, reported_online=False, reported_reason="power")
    run(conn, T0 + s(300))
    [(task_id, *_rest, due_at, _)] = tasks(conn, "cam-003")
    add_window(conn, start=due_at - s(10), end=due_at + timedelta(hours=1), device="cam-003")
    assert run(conn, due_at).escalated == []
    assert run(conn, due_at + timedelta(hours=1)).escalated == [task_id]


def test_only_one_sweeper_leads(conn: Conn, county_url: str) -> None:
    with psycopg.connect(county_url) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
        last_will(conn, "wb-0001", T0)
        assert run(conn, T0 + timedelta(hours=2)).leader is False
        assert tasks(conn, "wb-0001") == []
        other.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
    assert run(conn, T0 + timedelta(hours=2)).leader is True


# -- an SOS bypasses all of it ----------------------------------------------------------


@pytest.mark.parametrize("kind", [IncidentKind.SOS, IncidentKind.FALL])
def test_an_alarm_bypasses_maintenance_and_quiet_hours(
    conn: Conn, county_url: str, phone_network: str, kind: IncidentKind
) -> None:
    """In hospital (a maintenance window on the band and on its whole county), at 02:00
    (the demo county's quiet hours): a press or a fall still rings the grid worker at once."""
    device, grid, _resident = wristband_in(county_url, night_covered=True)
    county = conn.execute("SELECT id FROM areas WHERE parent_id IS NULL").fetchone()
    assert county is not None
    add_window(conn, start=NIGHT - timedelta(days=1), end=NIGHT + timedelta(days=1), device=device)
    add_window(conn, start=NIGHT - timedelta(days=1), end=NIGHT + timedelta(days=1), area=county[0])
    assert conn.execute("SELECT count(*) FROM quiet_hours").fetchone() == (1,)
    clock = Clock(NIGHT)
    router = make_router(county_url, phone_network, clock)
    with psycopg.connect(county_url) as alarm_conn:
        outcome = record_alarm(
            alarm_conn,
            Alarm(device, kind, "m-bypass", b"{}", payload_hash(b"m-bypass"), NIGHT),
            ack_timeout_s=120,
            hub_id="test",
        )
    assert outcome.incident_id is not None
    router.run_once()
    rung = {c["to"] for c in calls(phone_network)}
    on_duty = {p.phone for p in duty_chain(conn, grid, NIGHT, ZONE)}
    assert on_duty
    assert rung == on_duty
    attempts = conn.execute(
        "SELECT not_before, sent_at FROM notification_attempts WHERE incident_id = %s AND purpose = 'page'",
        (outcome.incident_id,),
    ).fetchall()
    assert attempts
    assert all(not_before is None and sent_at == NIGHT for not_before, sent_at in attempts)
    # And the care sweeper leaves the red incident alone.
    assert run(conn, NIGHT).opened == []
    assert conn.execute("SELECT count(*) FROM care_tasks").fetchone() == (0,)


def test_the_router_delivers_a_visit_at_once_and_a_night_battery_notice_at_seven(
    conn: Conn, county_url: str, phone_network: str
) -> None:
    """Through the real senders and the phone-network simulator: a yellow visit is not
    held by quiet hours; a blue notice raised at 23:30 reaches the guardians at 07:00."""
    late = datetime(2026, 11, 24, 23, 30, tzinfo=ZONE)
    clock = Clock(late.astimezone(UTC))
    router = make_router(county_url, phone_network, clock)
    device, _, grid = wristband(conn, "wb-0002")
    last_will(conn, device, late - timedelta(hours=2))
    heard(conn, "wb-0003", late, battery=12)
    report = run(conn, late)
    assert len(report.opened) == 1
    assert len(report.battery_incidents) == 1
    router.run_once()
    texts = messages(phone_network)
    visit_to = {p.phone for p in duty_chain(conn, grid, late, ZONE)}
    assert {m["to"] for m in texts if "探视任务" in m["body"]} == visit_to
    assert not [m for m in texts if "电量" in m["body"]]
    guardian_phones = {
        r[0]
        for r in conn.execute(
            "SELECT g.phone FROM guardians g JOIN devices d ON d.resident_id = g.resident_id WHERE d.id = 'wb-0003'"
        ).fetchall()
    }
    clock.now = datetime(2026, 11, 25, 6, 59, tzinfo=ZONE).astimezone(UTC)
    router.run_once()
    assert not [m for m in messages(phone_network) if "电量" in m["body"]]
    clock.now = datetime(2026, 11, 25, 7, 0, tzinfo=ZONE).astimezone(UTC)
    router.run_once()
    battery = [m for m in messages(phone_network) if "电量12%" in m["body"]]
    assert {m["to"] for m in battery} == guardian_phones


def test_closed_by_hand_while_still_dark_reopens_only_a_hold_after_the_close(conn: Conn) -> None:
    heard(conn, "cam-004", T0, reported_online=False, reported_reason="power")
    run(conn, T0 + s(300))
    [(task_id, *_rest)] = tasks(conn, "cam-004")
    closed_at = T0 + timedelta(hours=1)
    with conn.transaction():
        close_task(conn, task_id, TaskOutcome.POWER_RESTORED, "电源已恢复", WORKER, closed_at)
    assert run(conn, closed_at + s(299)).opened == []
    reopened = run(conn, closed_at + s(300)).opened
    assert len(reopened) == 1
    assert [t[2] for t in tasks(conn, "cam-004")] == ["closed", "open"]


def test_one_row_that_fails_costs_only_itself(conn: Conn) -> None:
    """A row the database refuses (here a trigger stands in for any bug or bad data)
    is logged and skipped; every other elder's visit still opens in the same sweep."""
    conn.execute(
        """
        CREATE FUNCTION refuse_wb_0003() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
        CREATE TRIGGER refuse_wb_0003 BEFORE INSERT ON care_tasks
            FOR EACH ROW WHEN (NEW.device_id = 'wb-0003') EXECUTE FUNCTION refuse_wb_0003();
        """
    )
    for device in ("wb-0002", "wb-0003", "wb-0004"):
        last_will(conn, device, T0)
    report = run(conn, T0 + timedelta(hours=1, seconds=1))
    assert len(report.opened) == 2
    assert tasks(conn, "wb-0003") == []
    assert len(tasks(conn, "wb-0002")) == 1
    assert len(tasks(conn, "wb-0004")) == 1
    # Nothing half-done is left behind for the refused one: no incident without its task.
    assert conn.execute("SELECT count(*) FROM incidents WHERE device_id = 'wb-0003'").fetchone() == (0,)
