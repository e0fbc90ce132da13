"""Due times and supervision (督办): pure due-time rules, then the routes over a real
PostgreSQL, the phone-network simulator and a router on a clock the test moves.

An overdue SOS supervised has its next step paged at once, with ``supervised`` on its
timeline naming who; an overdue visit supervised rises one level and its new owners
are texted; not overdue or closed is 409, a grid worker 403.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import psycopg

from alerts.supervise import incident_due_at, is_overdue
from devices.kinds import IncidentState, Severity
from shouhu.tokens import Role, create_token
from tests.support.callbacks import Stack
from tests.support.care import RULES, last_will, run
from tests.support.escalation import DAY, press, q

T = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


def test_a_red_incident_is_due_to_be_taken_after_its_first_wait_then_resolved_after_the_resolve_timeout() -> None:
    opened = incident_due_at(Severity.RED, IncidentState.OPEN, T, None, 120, 1800, None)
    assert opened == T + timedelta(seconds=120)
    assert incident_due_at(Severity.RED, IncidentState.UNREACHED, T, None, 90, 1800, None) == T + timedelta(seconds=90)
    taken = incident_due_at(Severity.RED, IncidentState.ACKNOWLEDGED, T, T + timedelta(seconds=40), 120, 1800, None)
    assert taken == T + timedelta(seconds=1840)
    assert not is_overdue(opened, T + timedelta(seconds=119))
    assert is_overdue(opened, T + timedelta(seconds=120))


def test_a_care_incident_is_due_with_its_task_and_closed_or_blue_ones_never() -> None:
    task_due = T + timedelta(hours=4)
    assert incident_due_at(Severity.YELLOW, IncidentState.OPEN, T, None, 0, 1800, task_due) == task_due
    assert incident_due_at(Severity.BLUE, IncidentState.OPEN, T, None, 0, 1800, None) is None
    assert incident_due_at(Severity.RED, IncidentState.RESOLVED, T, None, 120, 1800, None) is None
    assert incident_due_at(Severity.YELLOW, IncidentState.CANCELLED, T, None, 0, 1800, task_due) is None
    assert not is_overdue(None, T)


def _bearer(stack: Stack, role: Role, label: str) -> dict[str, str]:
    with psycopg.connect(stack.db) as conn:
        secret = create_token(conn, role=role, areas=[], label=label, now=stack.clock(), expires_at=None)
    return {"Authorization": f"Bearer {secret}"}


def _band(url: str) -> str:
    rows = q(url, "SELECT d.id FROM devices d WHERE d.kind = 'wristband' AND d.resident_id IS NOT NULL ORDER BY d.id")
    return str(rows[0][0])


def _step_pages(url: str, incident: int, step: int) -> int:
    rows = q(
        url,
        "SELECT count(*) FROM notification_attempts WHERE incident_id = %s AND purpose = 'page' AND step = %s",
        incident,
        step,
    )
    return int(rows[0][0])


def test_an_overdue_sos_supervised_pages_its_next_step_now(stack: Stack) -> None:
    operator = _bearer(stack, Role.OPERATOR, "综治值班")
    incident = press(stack.db, _band(stack.db), DAY, msg_id="sup-1")
    stack.router.run_once()  # step 1: the grid workers
    url = f"{stack.api}/api/v1/incidents/{incident}"

    stack.clock.advance(60)
    listed = httpx.get(url, headers=operator).json()
    assert listed["due_at"] == (DAY + timedelta(seconds=120)).isoformat().replace("+00:00", "Z")
    assert listed["overdue"] is False
    early = httpx.post(f"{url}/supervise", headers=operator)
    assert early.status_code == 409
    assert "not overdue" in early.json()["detail"]
    assert "due at" in early.json()["detail"]

    stack.clock.advance(65)  # 125 s: overdue; the router pages the guardians (step 2) on time
    stack.router.run_once()
    assert httpx.get(url, headers=operator).json()["overdue"] is True
    assert _step_pages(stack.db, incident, 3) == 0
    grid_worker = _bearer(stack, Role.GRID_WORKER, "网格员")
    refused = httpx.post(f"{url}/supervise", headers=grid_worker)
    assert refused.status_code == 403

    done = httpx.post(f"{url}/supervise", headers=operator)
    assert done.status_code == 200, done.text
    assert done.json()["supervised_by"] == "综治值班"
    assert done.json()["raised"] == "step 3 of round 0"
    # No platform configured: step 3 finds nobody and the operators (step 4) are paged at once,
    # 120 s before their time.
    stack.router.run_once()
    assert _step_pages(stack.db, incident, 3) > 0
    timeline = httpx.get(url, headers=operator).json()["timeline"]
    supervised = [e for e in timeline if e["event"] == "supervised"]
    assert len(supervised) == 1
    assert supervised[0]["detail"]["name"] == "综治值班"
    audited = "SELECT count(*) FROM audit_log WHERE action = 'supervise' AND subject = %s"
    audit = q(stack.db, audited, f"incident:{incident}")
    assert audit == [(1,)]

    resolved = httpx.post(f"{url}/resolve", json={"outcome": "visited_fine"}, headers=operator)
    assert resolved.status_code == 200
    closed = httpx.post(f"{url}/supervise", headers=operator)
    assert closed.status_code == 409
    assert "closed" in closed.json()["detail"]
    assert httpx.get(url, headers=operator).json()["due_at"] is None


def test_an_overdue_visit_supervised_rises_one_level_and_its_new_owners_are_texted(stack: Stack) -> None:
    operator = _bearer(stack, Role.OPERATOR, "综治值班")
    band = _band(stack.db)
    with psycopg.connect(stack.db) as conn:
        last_will(conn, band, stack.clock())
        stack.clock.advance(RULES.visit_offline_hold.total_seconds() + 1)
        opened = run(conn, stack.clock()).opened
    assert len(opened) == 1
    task = opened[0]
    url = f"{stack.api}/api/v1/tasks/{task}"
    early = httpx.post(f"{url}/supervise", headers=operator)
    assert early.status_code == 409
    assert "not overdue" in early.json()["detail"]
    incident = httpx.get(url, headers=operator).json()["incident_id"]
    # The incident is due when its task is, and supervising it names the task route.
    as_incident = httpx.get(f"{stack.api}/api/v1/incidents/{incident}", headers=operator).json()
    assert as_incident["due_at"] == httpx.get(url, headers=operator).json()["due_at"]
    redirected = httpx.post(f"{stack.api}/api/v1/incidents/{incident}/supervise", headers=operator)
    assert redirected.status_code == 409
    assert f"/api/v1/tasks/{task}/supervise" in redirected.json()["detail"]

    stack.clock.advance(RULES.visit_due.total_seconds() + 1)
    before = httpx.get(url, headers=operator).json()
    assert before["overdue"] is True
    notices_before = q(stack.db, "SELECT count(*) FROM notification_attempts WHERE incident_id = %s", incident)[0][0]
    done = httpx.post(f"{url}/supervise", headers=operator)
    assert done.status_code == 200, done.text
    after = httpx.get(url, headers=operator).json()
    assert after["level"] == before["level"] + 1
    assert after["owner_area_id"] != before["owner_area_id"]
    assert after["overdue"] is False
    notices_after = q(stack.db, "SELECT count(*) FROM notification_attempts WHERE incident_id = %s", incident)[0][0]
    assert notices_after > notices_before
    timeline = "SELECT event FROM incident_events WHERE incident_id = %s ORDER BY id"
    events = [e[0] for e in q(stack.db, timeline, incident)]
    assert events[-2:] == ["supervised", "task_escalated"]


def test_supervising_while_the_next_step_is_already_due_records_it_and_skips_nothing(stack: Stack) -> None:
    operator = _bearer(stack, Role.OPERATOR, "综治值班")
    incident = press(stack.db, _band(stack.db), DAY, msg_id="sup-2")
    stack.router.run_once()
    stack.clock.advance(125)  # overdue, and the guardians' step is due but no router has run it yet
    done = httpx.post(f"{stack.api}/api/v1/incidents/{incident}/supervise", headers=operator)
    assert done.status_code == 200, done.text
    assert done.json()["raised"] == "already escalating"
    stack.router.run_once()
    # The guardians are paged now; the platform's step keeps its own wait (nothing jumped twice).
    assert _step_pages(stack.db, incident, 1) > 0
    pending = q(
        stack.db,
        "SELECT step, due_at FROM escalation_actions WHERE incident_id = %s AND state = 'pending'",
        incident,
    )
    assert pending == [(2, stack.clock() + timedelta(seconds=120))]


def test_the_console_supervises_an_overdue_visit_only_from_its_own_site(stack: Stack) -> None:
    with psycopg.connect(stack.db) as conn:
        last_will(conn, _band(stack.db), stack.clock())
        stack.clock.advance(RULES.visit_offline_hold.total_seconds() + RULES.visit_due.total_seconds() + 2)
        secret = create_token(conn, role=Role.OPERATOR, areas=[], label="综治值班", now=stack.clock(), expires_at=None)
        [task] = run(conn, stack.clock() - RULES.visit_due - timedelta(seconds=1)).opened
    browser = httpx.Client(base_url=stack.api)
    assert browser.post("/api/v1/session", json={"token": secret}).status_code == 201
    level = "SELECT level FROM care_tasks WHERE id = %s"
    assert browser.post(f"/console/tasks/{task}/supervise").status_code == 403  # no Origin: cross-site refused
    assert q(stack.db, level, task) == [(0,)]
    page = browser.get(f"/console/tasks/{task}")
    assert 'id="supervise"' in page.text
    done = browser.post(f"/console/tasks/{task}/supervise", headers={"Origin": stack.api})
    assert done.status_code == 303
    assert q(stack.db, level, task) == [(1,)]
    again = browser.post(f"/console/tasks/{task}/supervise", headers={"Origin": stack.api})
    assert again.status_code == 409  # a new deadline now: not overdue
    assert 'id="supervise"' not in browser.get(f"/console/tasks/{task}").text
