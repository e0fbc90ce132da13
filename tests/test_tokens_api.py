"""Token administration and the audit log through the API, against the real database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

from api import deps
from api.main import create_app
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.escalation_support import q

NOW = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


@pytest.fixture
def client(county_url: str) -> Iterator[TestClient]:
    app = create_app(Settings(database_url=county_url))
    app.dependency_overrides[deps.get_now] = lambda: NOW
    with TestClient(app) as test_client:
        yield test_client


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def token(url: str, role: Role, areas: list[str] | None = None) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return bearer(create_token(conn, role=role, areas=areas or [], label=f"{role}", now=NOW, expires_at=None))


def test_an_admin_makes_lists_and_revokes_a_token(client: TestClient, county_url: str) -> None:
    admin = token(county_url, Role.ADMIN)
    made = client.post(
        "/api/v1/tokens",
        headers=admin,
        json={"role": "grid_worker", "areas": ["dongguan-01-g1"], "label": "董思远", "expires_in_days": 30},
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["secret"].startswith("shh_")
    assert body["expires_at"] == (NOW + timedelta(days=30)).isoformat().replace("+00:00", "Z")
    worker = bearer(body["secret"])
    assert client.get("/api/v1/areas", headers=worker).status_code == 200
    listed = client.get("/api/v1/tokens?role=grid_worker", headers=admin).json()
    assert [t["label"] for t in listed["data"]] == ["董思远"]
    assert "secret" not in listed["data"][0]
    stored = q(county_url, "SELECT token_hash FROM api_tokens WHERE id = %s", body["id"])[0][0]
    assert body["secret"].encode() not in bytes(stored)
    revoked = client.delete(f"/api/v1/tokens/{body['id']}", headers=admin)
    assert revoked.json()["active"] is False
    assert client.get("/api/v1/areas", headers=worker).status_code == 401
    assert client.delete(f"/api/v1/tokens/{body['id']}", headers=admin).status_code == 409
    assert client.delete("/api/v1/tokens/999999", headers=admin).status_code == 404
    audit = client.get("/api/v1/audit?action=token_create", headers=admin).json()
    assert [(e["action"], e["subject"]) for e in audit["data"]] == [("token_create", f"token:{body['id']}")]
    assert client.get("/api/v1/audit?subject=token:" + str(body["id"]), headers=admin).json()["count"] == 2


def test_only_admins_manage_tokens_and_area_admins_stay_in_their_areas(client: TestClient, county_url: str) -> None:
    for role in (Role.OPERATOR, Role.GRID_WORKER, Role.TECHNICIAN, Role.PLATFORM):
        other = token(county_url, role)
        assert client.get("/api/v1/tokens", headers=other).status_code == 403
        assert client.post("/api/v1/tokens", headers=other, json={"role": "admin"}).status_code == 403
        assert client.get("/api/v1/audit", headers=other).status_code == 403
    township_admin = token(county_url, Role.ADMIN, ["dongguan"])
    assert client.post("/api/v1/tokens", headers=township_admin, json={"role": "operator"}).status_code == 403
    elsewhere = client.post("/api/v1/tokens", headers=township_admin, json={"role": "operator", "areas": ["xiguan"]})
    assert elsewhere.status_code == 403
    assert "areas" in elsewhere.json()["detail"]
    inside = client.post(
        "/api/v1/tokens", headers=township_admin, json={"role": "grid_worker", "areas": ["dongguan-01-g1"]}
    )
    assert inside.status_code == 201
    assert client.get("/api/v1/audit", headers=township_admin).status_code == 403
    county_admin = token(county_url, Role.ADMIN)
    unknown = client.post("/api/v1/tokens", headers=county_admin, json={"role": "operator", "areas": ["x"]})
    assert unknown.status_code == 422
    assert "'x' does not exist" in unknown.json()["detail"]
    bad_role = client.post("/api/v1/tokens", headers=token(county_url, Role.ADMIN), json={"role": "mayor"})
    assert bad_role.status_code == 422
    assert "role" in bad_role.json()["detail"]


def test_the_audit_log_filters_by_time_and_refuses_a_backwards_range(client: TestClient, county_url: str) -> None:
    admin = token(county_url, Role.ADMIN)
    client.post("/api/v1/tokens", headers=admin, json={"role": "operator"})
    window = "from=2026-11-24T01:00:00Z&to=2026-11-24T03:00:00Z"
    assert client.get(f"/api/v1/audit?{window}", headers=admin).json()["count"] == 1
    assert client.get("/api/v1/audit?from=2026-11-25T00:00:00Z", headers=admin).json()["count"] == 0
    backwards = client.get("/api/v1/audit?from=2026-11-25T00:00:00Z&to=2026-11-24T00:00:00Z", headers=admin)
    assert backwards.status_code == 422
    assert "'from'" in backwards.json()["detail"]
