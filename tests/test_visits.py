"""Visits from the seeds (issue #15): the follow-up visit after an SOS or a fall, the
registry's recurring visits, and the month's visit rate.

Period arithmetic is tested pure, at several local hours and across month, year and
DST boundaries; the rest against the real PostgreSQL with the demo county, every sweep
given its ``now`` (never the host's hour).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.rows import dict_row

from alerts.acknowledge import Actor, resolve
from alerts.care import close_task
from alerts.care_sweep import CareReport, CareRules, sweep, sweep_visits
from alerts.incidents import Alarm, record_alarm
from alerts.visits import parse_month, period_of, total, visit_rates
from api import deps
from api.main import create_app
from devices.contract import payload_hash
from devices.kinds import IncidentKind, Outcome, TaskOutcome, VisitFrequency
from shouhu.db import Conn
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.support.care import LOCK, RULES, WORKER
from tests.support.escalation import ZONE, press, q

MONTHLY, WEEKLY = VisitFrequency.MONTHLY, VisitFrequency.WEEKLY
BERLIN = ZoneInfo("Europe/Berlin")
OPERATOR = Actor("staff", "op-test", "测试值班员", None, "operator")


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0, *, zone: ZoneInfo = ZONE) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=zone).astimezone(UTC)


# -- period arithmetic (pure) --------------------------------------------------------


@pytest.mark.parametrize("hour", [0, 7, 8, 15, 16, 23])
def test_a_month_is_the_local_calendar_month_at_every_hour(hour: int) -> None:
    period = period_of(MONTHLY, local(2026, 11, 30, hour, 59), ZONE)
    assert (period.key, period.start, period.end) == ("2026-11", local(2026, 11, 1), local(2026, 12, 1))
    # Local midnight on the 1st is already December, though UTC still says 30 November.
    december = period_of(MONTHLY, local(2026, 12, 1, 0, 0), ZONE)
    assert december.key == "2026-12"
    assert (december.start.day, december.start.hour) == (30, 16)
    assert period_of(MONTHLY, local(2026, 12, 1, 0, 0) - timedelta(microseconds=1), ZONE) == period


@pytest.mark.parametrize(
    ("at", "key", "start", "end"),
    [
        (local(2026, 2, 28, 12), "2026-02", local(2026, 2, 1), local(2026, 3, 1)),
        (local(2028, 2, 29, 23, 30), "2028-02", local(2028, 2, 1), local(2028, 3, 1)),
        (local(2026, 12, 31, 23, 59), "2026-12", local(2026, 12, 1), local(2027, 1, 1)),
        (local(2027, 1, 1, 0, 0), "2027-01", local(2027, 1, 1), local(2027, 2, 1)),
    ],
)
def test_months_across_their_ends(at: datetime, key: str, start: datetime, end: datetime) -> None:
    assert period_of(MONTHLY, at, ZONE) == period_of(MONTHLY, at, ZONE)
    period = period_of(MONTHLY, at, ZONE)
    assert (period.key, period.start, period.end) == (key, start, end)


@pytest.mark.parametrize("hour", [0, 9, 23])
def test_a_week_runs_monday_to_monday_and_is_named_by_its_iso_week(hour: int) -> None:
    # Monday 30 November 2026 opens ISO week 49, which spans the month's end.
    for day in (30, 1, 6):
        month = 11 if day == 30 else 12
        period = period_of(WEEKLY, local(2026, month, day, hour), ZONE)
        assert (period.key, period.start, period.end) == ("2026-W49", local(2026, 11, 30), local(2026, 12, 7))
    assert period_of(WEEKLY, local(2026, 11, 29, hour), ZONE).key == "2026-W48"
    # 2026 has 53 ISO weeks; 1 January 2027 (a Friday) still belongs to its week 53.
    assert period_of(WEEKLY, local(2027, 1, 1, hour), ZONE).key == "2026-W53"
    assert period_of(WEEKLY, local(2027, 1, 4, hour), ZONE).key == "2027-W01"


def test_periods_follow_the_zone_across_daylight_saving() -> None:
    # Berlin leaves summer time on 25 October 2026: that week is an hour longer.
    week = period_of(WEEKLY, local(2026, 10, 25, 12, zone=BERLIN), BERLIN)
    assert week.end - week.start == timedelta(days=7, hours=1)
    march = period_of(MONTHLY, local(2026, 3, 31, 23, 30, zone=BERLIN), BERLIN)
    assert march.end - march.start == timedelta(days=31) - timedelta(hours=1)
    assert march.end == local(2026, 4, 1, zone=BERLIN)


def test_naive_times_and_bad_months_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        period_of(MONTHLY, datetime(2026, 12, 1), ZONE)  # noqa: DTZ001 - the point of the test
    for bad in ("2026-13", "2026-00", "2026-1", "26-12", "2026/12", "december"):
        with pytest.raises(ValueError, match="YYYY-MM"):
            parse_month(bad, ZONE)
    assert parse_month("2026-12", ZONE) == period_of(MONTHLY, local(2026, 12, 15), ZONE)


# -- against the database ------------------------------------------------------------

# Thursday 3 December 2026, 10:00 in Asia/Shanghai.
NOW = local(2026, 12, 3, 10)


@pytest.fixture
def conn(county_url: str) -> Iterator[Conn]:
    with psycopg.connect(county_url, autocommit=True) as connection:
        yield connection


def visits(conn: Conn, rules: CareRules = RULES, *, at: datetime) -> CareReport:
    return sweep_visits(conn, at, rules, lock_key=LOCK)


def task_rows(conn: Conn, where: str, *params: Any, order: str = "t.id") -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT t.*, i.kind AS incident_kind, i.severity FROM care_tasks t JOIN incidents i ON i.id = t.incident_id"
            f" WHERE {where} ORDER BY {order}",
            params,
        ).fetchall()


def resolved_sos(url: str, device: str, at: datetime, outcome: Outcome, msg_id: str = "m1") -> int:
    incident = press(url, device, at, msg_id)
    with psycopg.connect(url) as conn:
        resolve(conn, incident, outcome, "已处置", OPERATOR, at + timedelta(minutes=5))
    return incident


def resident_of(conn: Conn, device: str) -> tuple[str, str]:
    row = conn.execute(
        "SELECT r.id, r.grid_id FROM devices d JOIN residents r ON r.id = d.resident_id WHERE d.id = %s", (device,)
    ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def grid_worker_ids(conn: Conn, grid: str) -> set[str]:
    rows = conn.execute(
        "SELECT s.id FROM staff s JOIN staff_areas a ON a.staff_id = s.id"
        " WHERE a.area_id = %s AND s.role = 'grid_worker' AND s.active",
        (grid,),
    ).fetchall()
    return {r[0] for r in rows}


def test_a_resolved_sos_gets_one_follow_up_visit_for_the_grid_workers_of_its_grid(
    conn: Conn, county_url: str
) -> None:
    resident, grid = resident_of(conn, "wb-0001")
    incident = resolved_sos(county_url, "wb-0001", NOW, Outcome.VISITED_FINE)
    resolved_at = NOW + timedelta(minutes=5)
    report = visits(conn, at=resolved_at + timedelta(seconds=10))
    [task] = task_rows(conn, "t.incident_id = %s", incident)
    assert report.follow_ups == [task["id"]]
    assert (task["kind"], task["reason"], task["state"], task["device_id"]) == ("visit", "follow_up", "open", None)
    assert (task["resident_id"], task["area_id"], task["owner_area_id"]) == (resident, grid, grid)
    # Due a day after the resolution, not after the sweep; the deadline the rate counts is the same.
    assert task["due_at"] == task["deadline"] == resolved_at + RULES.follow_up_due
    told = q(
        county_url,
        "SELECT recipient_id, body FROM notification_attempts WHERE incident_id = %s AND purpose = 'notice'",
        incident,
    )
    assert {r[0] for r in told} == grid_worker_ids(conn, grid) != set()
    assert all("回访" in body for _, body in told)
    timeline = q(county_url, "SELECT event FROM incident_events WHERE incident_id = %s", incident)
    assert "task_opened" in {r[0] for r in timeline}
    # Again, later, and from a sweeper on a new connection (a restart): still one.
    assert visits(conn, at=resolved_at + timedelta(hours=1)).follow_ups == []
    with psycopg.connect(county_url, autocommit=True) as restarted:
        assert visits(restarted, at=resolved_at + timedelta(hours=2)).follow_ups == []
    assert len(task_rows(conn, "t.incident_id = %s", incident)) == 1
    # A band online all along never withdraws it: it is a visit to a person.
    assert sweep(conn, resolved_at + timedelta(hours=3), RULES, lock_key=LOCK).closed == []


def test_a_false_alarm_gets_no_visit_unless_the_policy_says_so(conn: Conn, county_url: str) -> None:
    false_alarm = resolved_sos(county_url, "wb-0002", NOW, Outcome.FALSE_ALARM)
    at = NOW + timedelta(minutes=6)
    assert visits(conn, at=at).follow_ups == []
    assert task_rows(conn, "t.incident_id = %s", false_alarm) == []
    # An SOS still open gets nothing either.
    still_open = press(county_url, "wb-0003", NOW, "m2")
    assert visits(conn, at=at).follow_ups == []
    assert task_rows(conn, "t.incident_id = %s", still_open) == []
    policy = replace(RULES, follow_up_false_alarms=True)
    [task_id] = visits(conn, policy, at=at + timedelta(seconds=1)).follow_ups
    assert [t["id"] for t in task_rows(conn, "t.incident_id = %s", false_alarm)] == [task_id]


def test_a_resolved_fall_through_the_api_gets_its_visit_and_old_resolutions_none(
    conn: Conn, county_url: str
) -> None:
    fell = record_alarm(
        conn,
        Alarm("wb-0004", IncidentKind.FALL, "f1", b"{}", payload_hash(b"f1"), NOW),
        ack_timeout_s=120,
        hub_id="test",
    )
    fall = fell.incident_id
    app = create_app(Settings(database_url=county_url))
    app.dependency_overrides[deps.get_now] = lambda: NOW + timedelta(minutes=3)
    secret = create_token(conn, role=Role.OPERATOR, areas=[], label="值班员", now=NOW, expires_at=None)
    with TestClient(app) as client:
        answer = client.post(
            f"/api/v1/incidents/{fall}/resolve",
            headers={"Authorization": f"Bearer {secret}"},
            json={"outcome": "sent_to_hospital", "note": "已送医"},
        )
    assert answer.status_code == 200, answer.text
    # Resolved more than the due window ago (an upgrade, a long outage): no visit born overdue.
    old = resolved_sos(county_url, "wb-0005", NOW - timedelta(days=3), Outcome.VISITED_FINE, "m3")
    report = visits(conn, at=NOW + timedelta(minutes=4))
    [task] = task_rows(conn, "t.reason = 'follow_up'")
    assert (report.follow_ups, task["incident_id"], task["incident_kind"]) == ([task["id"]], fall, "fall")
    assert task_rows(conn, "t.incident_id = %s", old) == []
    # The fall stays a fall: its page is its own story (not its visit's), and it is done.
    with TestClient(app) as client:
        again = client.post(
            f"/api/v1/incidents/{fall}/resolve",
            headers={"Authorization": f"Bearer {secret}"},
            json={"outcome": "visited_fine"},
        )
        assert again.status_code == 409
        assert "already resolved" in again.json()["detail"]
        client.post("/api/v1/session", json={"token": secret}).raise_for_status()
        page = client.get(f"/console/incidents/{fall}", follow_redirects=False)
        assert page.status_code == 200
        assert "跌倒" in page.text
        assert f'<a id="follow-up" href="/console/tasks/{task["id"]}">' in page.text
        visit = client.get(f"/console/tasks/{task['id']}")
        assert visit.status_code == 200
        assert "求助后回访" in visit.text


def test_recurring_visits_open_once_per_period_at_any_hour(conn: Conn, county_url: str) -> None:
    monthly = {r[0] for r in q(county_url, "SELECT id FROM residents WHERE active AND visit_frequency = 'monthly'")}
    weekly = {r[0] for r in q(county_url, "SELECT id FROM residents WHERE active AND visit_frequency = 'weekly'")}
    assert monthly
    assert weekly
    # Sunday 29 November, 23:30 local: November's and week 48's visits.
    first = visits(conn, at=local(2026, 11, 29, 23, 30))
    opened = task_rows(conn, "t.reason = 'scheduled'")
    assert sorted(first.scheduled) == [t["id"] for t in opened]
    assert {(t["resident_id"], t["period"]) for t in opened} == {(r, "2026-11") for r in monthly} | {
        (r, "2026-W48") for r in weekly
    }
    for task in opened:
        end = local(2026, 12, 1) if task["period"] == "2026-11" else local(2026, 11, 30)
        assert (task["due_at"], task["deadline"], task["device_id"]) == (end, end, None)
        assert (task["incident_kind"], task["severity"], task["state"]) == ("scheduled_visit", "blue", "open")
    assert q(county_url, "SELECT count(*) FROM notification_attempts")[0][0] == 0, "nobody texted at midnight"
    # Later the same evening, and every hour of the week after: nothing new until a period turns.
    assert visits(conn, at=local(2026, 11, 29, 23, 59)).scheduled == []
    monday = visits(conn, at=local(2026, 11, 30, 0, 0) + timedelta(seconds=30))
    assert {t["resident_id"] for t in task_rows(conn, "t.id = ANY(%s)", monday.scheduled)} == weekly
    for hour in (1, 8, 16, 23):
        assert visits(conn, at=local(2026, 11, 30, hour)).scheduled == []
    december = visits(conn, at=local(2026, 12, 1, 0, 1))
    assert {t["period"] for t in task_rows(conn, "t.id = ANY(%s)", december.scheduled)} == {"2026-12"}
    assert len(december.scheduled) == len(monthly)
    # A restarted sweeper finds all of it there.
    with psycopg.connect(county_url, autocommit=True) as restarted:
        assert visits(restarted, at=local(2026, 12, 1, 9)).scheduled == []


def test_an_unvisited_recurring_visit_goes_up_once_its_period_ends(conn: Conn, county_url: str) -> None:
    visits(conn, at=local(2026, 11, 29, 12))
    task = task_rows(conn, "t.reason = 'scheduled' AND t.period = '2026-W48'")[0]
    assert sweep(conn, local(2026, 11, 29, 23, 59), RULES, lock_key=LOCK).escalated == []
    escalated = sweep(conn, local(2026, 11, 30, 0, 0), RULES, lock_key=LOCK).escalated
    assert task["id"] in escalated
    [after] = task_rows(conn, "t.id = %s", task["id"])
    assert (after["level"], after["deadline"]) == (1, task["deadline"])
    assert after["owner_area_id"] != task["owner_area_id"]
    told = q(
        county_url,
        "SELECT body FROM notification_attempts WHERE incident_id = %s AND purpose = 'notice'",
        task["incident_id"],
    )
    assert told
    assert all("定期探视" in body and "None" not in body for (body,) in told)


def test_maintenance_holds_a_recurring_visit_back_until_it_ends(conn: Conn, county_url: str) -> None:
    resident, band, grid = q(
        county_url,
        "SELECT r.id, d.id, r.grid_id FROM residents r JOIN devices d ON d.resident_id = r.id"
        " WHERE r.visit_frequency = 'weekly' ORDER BY r.id LIMIT 1",
    )[0]
    neighbour = q(
        county_url,
        "SELECT r.id FROM residents r WHERE r.visit_frequency IS NOT NULL AND r.grid_id <> %s ORDER BY r.id LIMIT 1",
        grid,
    )[0][0]
    in_hospital = (local(2026, 11, 30), local(2026, 12, 2))
    conn.execute(
        "INSERT INTO maintenance_windows (device_id, starts_at, ends_at, reason, created_by, created_at)"
        " VALUES (%s, %s, %s, '住院', 'test', %s)",
        (band, *in_hospital, in_hospital[0]),
    )
    held = visits(conn, at=local(2026, 12, 1, 9))
    opened = {t["resident_id"] for t in task_rows(conn, "t.id = ANY(%s)", held.scheduled)}
    assert resident not in opened
    assert neighbour in opened
    [task_id] = visits(conn, at=local(2026, 12, 2, 0, 1)).scheduled
    [task] = task_rows(conn, "t.id = %s", task_id)
    assert (task["resident_id"], task["period"], task["deadline"]) == (resident, "2026-W49", local(2026, 12, 7))


def rated(conn: Conn) -> dict[str, Any]:
    """November's visits and week 45's (opened Monday 2 November), and week 49's (opened
    Monday 30 November, due 7 December: a December deadline); weeks 46–48 never opened.
    One November visit closed on time, one late, week 45 all on time."""
    visits(conn, at=local(2026, 11, 2, 9))
    visits(conn, at=local(2026, 11, 30, 9))
    november = task_rows(conn, "t.period = '2026-11'", order="t.area_id, t.id")
    week45 = task_rows(conn, "t.period = '2026-W45'")
    assert len(november) >= 3
    assert week45
    on_time, late = november[0], november[1]
    with conn.transaction():
        close_task(conn, on_time["id"], TaskOutcome.RESIDENT_FINE, "", WORKER, local(2026, 11, 20, 15))
        close_task(conn, late["id"], TaskOutcome.RESIDENT_FINE, "", WORKER, local(2026, 12, 2, 9))
        for task in week45:
            close_task(conn, task["id"], TaskOutcome.RESIDENT_AWAY, "", WORKER, local(2026, 11, 8, 23, 59))
    return {"november": november, "week45": week45, "on_time": on_time, "late": late}


def test_the_months_visit_rate_counts_on_time_late_missed_and_upcoming(conn: Conn) -> None:
    tasks = rated(conn)
    november, week45 = len(tasks["november"]), len(tasks["week45"])
    month = parse_month("2026-11", ZONE)
    # Mid-November only week 45 is due; the month's own visits are upcoming.
    mid = total(visit_rates(conn, month, local(2026, 11, 20), scope=None))
    assert (mid.due, mid.on_time, mid.late, mid.missed, mid.upcoming) == (week45, week45, 0, 0, november)
    assert mid.rate == 1.0
    # After the month: a deadline at the month's very end (local midnight) is November's.
    after = total(visit_rates(conn, month, local(2026, 12, 3), scope=None))
    assert (after.due, after.on_time, after.late, after.missed, after.upcoming) == (
        november + week45, 1 + week45, 1, november - 2, 0
    )
    assert after.rate == pytest.approx((1 + week45) / (november + week45))
    # December holds week 49, not yet due on the 3rd.
    december = total(visit_rates(conn, parse_month("2026-12", ZONE), local(2026, 12, 3), scope=None))
    assert (december.due, december.upcoming) == (0, len(task_rows(conn, "t.period = '2026-W49'")))
    # Only the areas a scope allows, by grid.
    area = tasks["on_time"]["area_id"]
    [only] = visit_rates(conn, month, local(2026, 12, 3), scope=[area])
    assert (only.area_id, only.on_time) == (area, 1 + sum(t["area_id"] == area for t in tasks["week45"]))


def test_the_visit_report_route_answers_by_role_and_area(conn: Conn, county_url: str) -> None:
    tasks = rated(conn)
    area = tasks["on_time"]["area_id"]
    app = create_app(Settings(database_url=county_url))
    app.dependency_overrides[deps.get_now] = lambda: local(2026, 12, 3)

    def bearer(role: Role, areas: list[str] | None = None) -> dict[str, str]:
        secret = create_token(conn, role=role, areas=areas or [], label=role.value, now=NOW, expires_at=None)
        return {"Authorization": f"Bearer {secret}"}

    with TestClient(app) as client:
        county = client.get("/api/v1/reports/visits?month=2026-11", headers=bearer(Role.OPERATOR)).json()
        assert (county["month"], county["timezone"], county["total"]["target"]) == ("2026-11", "Asia/Shanghai", 1.0)
        assert (county["from"], county["to"]) == ("2026-10-31T16:00:00Z", "2026-11-30T16:00:00Z")
        november, week45 = len(tasks["november"]), len(tasks["week45"])
        assert (county["total"]["due"], county["total"]["on_time"], county["total"]["late"]) == (
            november + week45, 1 + week45, 1
        )
        assert sum(a["due"] for a in county["areas"]) == county["total"]["due"]
        assert all(a["area_name"] for a in county["areas"])
        mine = client.get("/api/v1/reports/visits?month=2026-11", headers=bearer(Role.GRID_WORKER, [area])).json()
        assert [a["area_id"] for a in mine["areas"]] == [area]
        # The current month by default; ?area= narrows; the errors name what is wrong.
        assert client.get("/api/v1/reports/visits", headers=bearer(Role.ADMIN)).json()["month"] == "2026-12"
        narrowed = client.get(f"/api/v1/reports/visits?month=2026-11&area={area}", headers=bearer(Role.OPERATOR))
        assert [a["area_id"] for a in narrowed.json()["areas"]] == [area]
        assert client.get("/api/v1/reports/visits", headers=bearer(Role.TECHNICIAN)).status_code == 403
        assert client.get("/api/v1/reports/visits", headers=bearer(Role.PLATFORM)).status_code == 403
        bad = client.get("/api/v1/reports/visits?month=2026-13", headers=bearer(Role.OPERATOR))
        assert bad.status_code == 422
        assert "month" in bad.json()["detail"]
        other = client.get("/api/v1/reports/visits?area=nowhere", headers=bearer(Role.OPERATOR))
        assert other.status_code == 404
