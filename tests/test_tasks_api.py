"""Visits, repair orders and maintenance windows through the API: who sees and closes
what, repair rounds oldest first, audit, conflicts and readable errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from api import deps
from api.main import create_app
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.care_support import T0, heard, last_will, run, s
from tests.escalation_support import q

Conn = psycopg.Connection[tuple[Any, ...]]
NOW = T0 + timedelta(hours=2)


@pytest.fixture
def conn(county_url: str) -> Iterator[Conn]:
    with psycopg.connect(county_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def client(county_url: str) -> Iterator[TestClient]:
    app = create_app(Settings(database_url=county_url))
    app.dependency_overrides[deps.get_now] = lambda: NOW
    with TestClient(app) as test_client:
        yield test_client


def token(url: str, role: Role, areas: list[str] | None = None, label: str = "") -> dict[str, str]:
    with psycopg.connect(url) as conn:
        secret = create_token(conn, role=role, areas=areas or [], label=label, now=datetime.now(UTC), expires_at=None)
    return {"Authorization": f"Bearer {secret}"}


def camera_area(conn: Conn, camera: str) -> str:
    row = conn.execute("SELECT area_id FROM devices WHERE id = %s", (camera,)).fetchone()
    assert row is not None
    return str(row[0])


def township_of(conn: Conn, area: str) -> str:
    row = conn.execute(
        """
        WITH RECURSIVE up(id, parent_id, level) AS (
            SELECT id, parent_id, level FROM areas WHERE id = %s
            UNION ALL SELECT a.id, a.parent_id, a.level FROM areas a JOIN up ON a.id = up.parent_id
        ) SELECT id FROM up WHERE level = 'township'
        """,
        (area,),
    ).fetchone()
    assert row is not None
    return str(row[0])


@pytest.fixture
def opened(conn: Conn) -> dict[str, Any]:
    """A visit for wb-0001 and two repair orders (cam-001 older than cam-002), all open."""
    last_will(conn, "wb-0001", T0 - timedelta(hours=1))
    heard(conn, "cam-002", T0 - s(200), reported_online=False, reported_reason="power")
    heard(conn, "cam-001", T0 - s(900), reported_online=False, reported_reason="video_lost")
    run(conn, T0 - s(500))  # cam-001's order opens first
    run(conn, T0 + s(101))
    rows = conn.execute("SELECT device_id, id, incident_id, area_id FROM care_tasks").fetchall()
    return {device: {"task": task, "incident": incident, "area": area} for device, task, incident, area in rows}


def test_a_grid_worker_sees_and_closes_the_visits_of_her_grid_only(
    client: TestClient, county_url: str, opened: dict[str, Any]
) -> None:
    visit = opened["wb-0001"]
    mine = token(county_url, Role.GRID_WORKER, [visit["area"]], label="李网格")
    listed = client.get("/api/v1/tasks?open=true", headers=mine).json()
    assert [t["id"] for t in listed["data"]] == [visit["task"]]
    assert listed["data"][0]["kind"] == "visit"
    assert listed["data"][0]["reason"] == "last_will"
    other_grid = q(county_url, "SELECT id FROM areas WHERE level = 'grid' AND id <> %s LIMIT 1", visit["area"])[0][0]
    theirs = token(county_url, Role.GRID_WORKER, [other_grid])
    assert client.get("/api/v1/tasks", headers=theirs).json() == {"data": [], "count": 0}
    assert client.get(f"/api/v1/tasks/{visit['task']}", headers=theirs).status_code == 404
    assert client.post(f"/api/v1/tasks/{visit['task']}/start", headers=theirs).status_code == 404

    started = client.post(f"/api/v1/tasks/{visit['task']}/start", headers=mine)
    assert started.json() == {"id": visit["task"], "state": "started", "result": "done"}
    wrong = client.post(f"/api/v1/tasks/{visit['task']}/close", headers=mine, json={"outcome": "repaired"})
    assert wrong.status_code == 422
    assert "outcome" in wrong.json()["detail"]
    closed = client.post(
        f"/api/v1/tasks/{visit['task']}/close", headers=mine, json={"outcome": "resident_away", "note": "去女儿家了"}
    )
    assert closed.status_code == 200, closed.text
    assert client.post(
        f"/api/v1/tasks/{visit['task']}/close", headers=mine, json={"outcome": "resident_fine"}
    ).status_code == 409
    task = client.get(f"/api/v1/tasks/{visit['task']}", headers=mine).json()
    assert (task["state"], task["outcome"], task["note"], task["started_by_name"]) == (
        "closed", "resident_away", "去女儿家了", "李网格",
    )
    assert q(county_url, "SELECT state, outcome FROM incidents WHERE id = %s", visit["incident"]) == [
        ("resolved", "task_completed")
    ]
    audit = q(county_url, "SELECT action, subject, detail->>'result' FROM audit_log ORDER BY id")
    subject = f"task:{visit['task']}"
    assert audit == [
        ("task_start", subject, "done"),
        ("task_close", subject, "done"),
        ("task_close", subject, "closed"),  # the refused second close is on record too
    ]


def test_a_technician_works_repair_rounds_oldest_first_and_never_sees_visits(
    client: TestClient, conn: Conn, county_url: str, opened: dict[str, Any]
) -> None:
    township = township_of(conn, camera_area(conn, "cam-001"))
    tech = token(county_url, Role.TECHNICIAN, [township], label="田师傅")
    rounds = client.get("/api/v1/tasks/repair-rounds", headers=tech).json()["data"]
    orders = [o for area in rounds for o in area["orders"]]
    assert [o["device_id"] for o in orders][:1] == ["cam-001"]
    assert all(o["kind"] == "repair" and o["state"] == "open" for o in orders)
    assert rounds[0]["area_name"]
    visit = opened["wb-0001"]
    assert client.get(f"/api/v1/tasks/{visit['task']}", headers=tech).status_code == 404
    assert all(t["kind"] == "repair" for t in client.get("/api/v1/tasks", headers=tech).json()["data"])
    order = opened["cam-001"]["task"]
    closed = client.post(
        f"/api/v1/tasks/{order}/close", headers=tech, json={"outcome": "replaced", "note": "更换了摄像头电源"}
    )
    assert closed.json()["state"] == "closed"
    detail = client.get(f"/api/v1/tasks/{order}", headers=tech).json()
    assert detail["time_to_repair_s"] == (NOW - (T0 - s(900))).total_seconds()
    # The incident routes point a task's incident at its task.
    operator = token(county_url, Role.OPERATOR)
    refused = client.post(f"/api/v1/incidents/{opened['cam-002']['incident']}/ack", headers=operator)
    assert refused.status_code == 409
    assert f"/api/v1/tasks/{opened['cam-002']['task']}" in refused.json()["detail"]
    assert client.get("/api/v1/tasks/repair-rounds", headers=token(county_url, Role.GRID_WORKER)).status_code == 403


def test_overdue_filter(client: TestClient, county_url: str, opened: dict[str, Any]) -> None:
    operator = token(county_url, Role.OPERATOR)
    client.app.dependency_overrides[deps.get_now] = lambda: T0 + timedelta(hours=5)  # type: ignore[attr-defined]
    overdue = client.get("/api/v1/tasks?overdue=true", headers=operator).json()
    assert [t["device_id"] for t in overdue["data"]] == ["wb-0001"]
    assert overdue["data"][0]["overdue"] is True


def test_maintenance_windows_by_role_and_scope(client: TestClient, conn: Conn, county_url: str) -> None:
    grid = q(
        county_url, "SELECT r.grid_id FROM devices d JOIN residents r ON r.id = d.resident_id WHERE d.id = 'wb-0001'"
    )
    mine = token(county_url, Role.GRID_WORKER, [grid[0][0]])
    hospital = {"device_id": "wb-0001", "ends_at": (NOW + timedelta(days=3)).isoformat(), "reason": "老人住院"}
    created = client.post("/api/v1/maintenance", headers=mine, json=hospital)
    assert created.status_code == 201, created.text
    assert created.json()["active"] is True
    camera_by_grid_worker = {**hospital, "device_id": "cam-001"}
    assert client.post("/api/v1/maintenance", headers=mine, json=camera_by_grid_worker).status_code == 404
    whole_grid = {"area_id": grid[0][0], "ends_at": hospital["ends_at"], "reason": "x"}
    assert client.post("/api/v1/maintenance", headers=mine, json=whole_grid).status_code == 403
    both = client.post("/api/v1/maintenance", headers=mine, json={**hospital, "area_id": grid[0][0]})
    assert both.status_code == 422
    assert "exactly one of device_id and area_id" in str(both.json())
    backwards = client.post(
        "/api/v1/maintenance", headers=mine, json={**hospital, "ends_at": (NOW - timedelta(hours=1)).isoformat()}
    )
    assert backwards.status_code == 422
    assert "ends_at" in backwards.json()["detail"]
    tech = token(county_url, Role.TECHNICIAN)
    township_window = {"area_id": "dongguan", "ends_at": hospital["ends_at"], "reason": "停电"}
    assert client.post("/api/v1/maintenance", headers=tech, json=township_window).status_code == 403
    backdated = client.post(
        "/api/v1/maintenance",
        headers=tech,
        json={**hospital, "device_id": "cam-001", "starts_at": (NOW - timedelta(days=2)).isoformat()},
    )
    assert backdated.status_code == 422
    assert "starts_at" in backdated.json()["detail"]
    camera = client.post(
        "/api/v1/maintenance", headers=tech,
        json={"device_id": "cam-001", "ends_at": (NOW + timedelta(hours=2)).isoformat(), "reason": "更换中"},
    ).json()
    assert [w["device_id"] for w in client.get("/api/v1/maintenance?active=true", headers=tech).json()["data"]] == [
        "cam-001"
    ]
    # Silenced: the camera goes dark, no order opens while the window lasts.
    heard(conn, "cam-001", NOW, reported_online=False, reported_reason="defect")
    assert run(conn, NOW + s(400)).opened == []
    later = NOW + s(600)
    client.app.dependency_overrides[deps.get_now] = lambda: later  # type: ignore[attr-defined]
    ended = client.post(f"/api/v1/maintenance/{camera['id']}/end", headers=tech).json()
    assert datetime.fromisoformat(ended["ends_at"]) == later  # the past of the window is kept
    assert ended["active"] is False
    assert client.post(f"/api/v1/maintenance/{camera['id']}/end", headers=tech).status_code == 409
    assert len(run(conn, later + s(1)).opened) == 1


def test_tasks_filter_by_time_and_devices_by_liveness(
    client: TestClient, county_url: str, opened: dict[str, Any]
) -> None:
    operator = token(county_url, Role.OPERATOR)
    # cam-001's order opened at T0 - 500 s, the visit and cam-002's at T0 + 101 s.
    early = client.get("/api/v1/tasks?until=" + T0.isoformat().replace("+00:00", "Z"), headers=operator).json()
    assert [t["device_id"] for t in early["data"]] == ["cam-001"]
    later = client.get("/api/v1/tasks?since=" + T0.isoformat().replace("+00:00", "Z"), headers=operator).json()
    assert sorted(t["device_id"] for t in later["data"]) == ["cam-002", "wb-0001"]
    offline = client.get("/api/v1/devices?liveness=offline", headers=operator).json()
    assert sorted(d["id"] for d in offline["data"]) == ["cam-001", "cam-002", "wb-0001"]
    unknown = client.get("/api/v1/devices?liveness=unknown&kind=camera&limit=1", headers=operator).json()
    assert unknown["count"] == q(county_url, "SELECT count(*) FROM devices WHERE kind = 'camera'")[0][0] - 2
    assert client.get("/api/v1/devices?liveness=dead", headers=operator).status_code == 422
