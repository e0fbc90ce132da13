"""`POST /api/v1/incidents/{id}/ack` and `/resolve`: roles, scope, audit, conflicts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.support.escalation import DAY, press, q, wristband_in


@pytest.fixture
def client(county_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=county_url, resolve_timeout_s=900))) as test_client:
        yield test_client


def token(url: str, role: Role, areas: list[str] | None = None, label: str = "") -> dict[str, str]:
    with psycopg.connect(url) as conn:
        secret = create_token(conn, role=role, areas=areas or [], label=label, now=datetime.now(UTC), expires_at=None)
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def sos(county_url: str) -> tuple[int, str]:
    device, grid, _resident = wristband_in(county_url, night_covered=False)
    return press(county_url, device, DAY), grid


def test_a_grid_worker_acknowledges_and_the_second_is_told_it_was_taken(
    client: TestClient, county_url: str, sos: tuple[int, str]
) -> None:
    incident, grid = sos
    mine = token(county_url, Role.GRID_WORKER, [grid], label="李网格")
    answer = client.post(f"/api/v1/incidents/{incident}/ack", headers=mine, json={"note": "在路上"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "id": incident, "state": "acknowledged", "result": "done",
        "acknowledged_by": "李网格", "acknowledged_by_id": "integration:李网格",
    }
    again = client.post(f"/api/v1/incidents/{incident}/ack", headers=mine)
    assert again.json()["result"] == "already"
    other = client.post(f"/api/v1/incidents/{incident}/ack", headers=token(county_url, Role.OPERATOR, label="值班长"))
    assert other.status_code == 409
    assert "taken by 李网格" in other.json()["detail"]
    audit = q(county_url, "SELECT action, subject, detail->>'result' FROM audit_log ORDER BY id")
    assert audit == [
        ("acknowledge", f"incident:{incident}", "done"),
        ("acknowledge", f"incident:{incident}", "already"),
        ("acknowledge", f"incident:{incident}", "taken"),
    ]
    due = q(county_url, "SELECT due_at FROM escalation_actions WHERE kind = 'resolve_check' AND state = 'pending'")
    assert len(due) == 1  # the API's resolve timeout (900 s) was used
    acknowledged_at = q(county_url, "SELECT acknowledged_at FROM incidents")[0][0]
    assert (due[0][0] - acknowledged_at).total_seconds() == 900


def test_the_emergency_platform_acknowledges_with_its_token(
    client: TestClient, county_url: str, sos: tuple[int, str]
) -> None:
    incident, _grid = sos
    answer = client.post(f"/api/v1/incidents/{incident}/ack", headers=token(county_url, Role.PLATFORM, label="120中心"))
    assert answer.status_code == 200
    assert q(county_url, "SELECT acknowledged_by, acknowledged_via FROM incidents")[0][1] == "api"


def test_out_of_scope_or_wrong_role_cannot_act(client: TestClient, county_url: str, sos: tuple[int, str]) -> None:
    incident, grid = sos
    other_grid = q(county_url, "SELECT id FROM areas WHERE level = 'grid' AND id <> %s ORDER BY id LIMIT 1", grid)[0][0]
    outsider = client.post(
        f"/api/v1/incidents/{incident}/ack", headers=token(county_url, Role.GRID_WORKER, [other_grid])
    )
    assert outsider.status_code == 404
    technician = client.post(f"/api/v1/incidents/{incident}/ack", headers=token(county_url, Role.TECHNICIAN))
    assert technician.status_code == 404
    assert client.post(f"/api/v1/incidents/{incident}/ack").status_code == 401
    assert q(county_url, "SELECT state FROM incidents") == [("open",)]


def test_resolve_records_the_outcome_once(client: TestClient, county_url: str, sos: tuple[int, str]) -> None:
    incident, grid = sos
    headers = token(county_url, Role.GRID_WORKER, [grid])
    done = client.post(
        f"/api/v1/incidents/{incident}/resolve",
        headers=headers,
        json={"outcome": "sent_to_hospital", "note": "已送县医院"},
    )
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "resolved"
    assert q(county_url, "SELECT outcome, resolution_note FROM incidents") == [("sent_to_hospital", "已送县医院")]
    again = client.post(f"/api/v1/incidents/{incident}/resolve", headers=headers, json={"outcome": "other"})
    assert again.status_code == 409
    assert "already resolved" in again.json()["detail"]


def test_a_bad_outcome_names_the_field(client: TestClient, county_url: str, sos: tuple[int, str]) -> None:
    incident, _grid = sos
    bad = client.post(
        f"/api/v1/incidents/{incident}/resolve", headers=token(county_url, Role.OPERATOR), json={"outcome": "fixed"}
    )
    assert bad.status_code == 422
    assert "outcome" in bad.json()["detail"]
