"""The API base against a real database: health, metrics, bearer tokens, area scope, privacy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from psycopg import sql

from api import access, deps
from api.main import create_app
from devices.kinds import AreaLevel, DeviceKind
from shouhu.embedded.postgres import LocalPostgres, free_port
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token, revoke_token
from tests.utils.builders import (
    SmallCounty,
    add_area,
    add_device,
    add_guardian,
    add_resident,
    add_small_county,
    set_device_state,
)

NOW = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
SEEN = NOW - timedelta(seconds=30)
NOTES = "insulin-dependent diabetic; pacemaker"

Conn = psycopg.Connection[Any]
Headers = dict[str, str]


@dataclass(frozen=True, slots=True)
class County:
    """The small county with two residents (one per grid) and their devices."""

    tree: SmallCounty
    resident_a: str = "R-A"
    resident_b: str = "R-B"
    wristband_a: str = "W-A"
    wristband_b: str = "W-B"
    camera_a: str = "CAM-A"
    camera_a1: str = "CAM-A1"
    camera_b: str = "CAM-B"
    camera_retired: str = "CAM-OLD"


@pytest.fixture
def db(database_url: str) -> Iterator[Conn]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def county(db: Conn) -> County:
    tree = add_small_county(db)
    c = County(tree)
    add_resident(
        db, c.resident_a, grid=tree.grid_a, name="Wang Fang", address="3 Elm Row",
        phone="+12025550111", medical_notes=NOTES, lat=30.25, lon=120.17,
    )
    add_guardian(db, "G-2", resident=c.resident_a, name="Wang Min", relation="son", priority=2,
                 phone="+12025550122")
    add_guardian(db, "G-1", resident=c.resident_a, name="Wang Li", relation="daughter",
                 priority=1, phone="+12025550121")
    add_guardian(db, "G-old", resident=c.resident_a, name="Former", priority=1, active=False)
    add_resident(db, c.resident_b, grid=tree.grid_b, name="Zhao Lei", medical_notes="asthma")
    add_device(db, c.wristband_a, kind=DeviceKind.WRISTBAND, resident=c.resident_a, model="WB-2")
    add_device(db, c.wristband_b, kind=DeviceKind.WRISTBAND, resident=c.resident_b)
    add_device(db, c.camera_a, kind=DeviceKind.CAMERA, area=tree.grid_a, model="IPC-1")
    add_device(db, c.camera_a1, kind=DeviceKind.CAMERA, area=tree.micro_a)
    add_device(db, c.camera_b, kind=DeviceKind.CAMERA, area=tree.grid_b)
    add_device(db, c.camera_retired, kind=DeviceKind.CAMERA, area=tree.grid_a, active=False)
    set_device_state(db, c.wristband_a, online=True, last_seen=SEEN, battery=76, worn=True)
    set_device_state(db, c.camera_a1, online=False, last_seen=SEEN, offline_reason="power")
    return c


@pytest.fixture
def app(database_url: str) -> FastAPI:
    return create_app(Settings(database_url=database_url))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def bearer(
    db: Conn, role: Role, areas: tuple[str, ...] = (), *, expires_at: datetime | None = None
) -> Headers:
    secret = create_token(
        db, role=role, areas=list(areas), label="test", now=NOW - timedelta(days=1),
        expires_at=expires_at,
    )
    return {"Authorization": f"Bearer {secret}"}


def ids(body: dict[str, Any]) -> list[str]:
    return [item["id"] for item in body["data"]]


def audit_rows(db: Conn) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT token_id, role, action, subject, detail FROM audit_log ORDER BY id"
    ).fetchall()


# Health, readiness, metrics ------------------------------------------------------------


def test_healthz_answers_without_a_token(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_ready_on_a_migrated_database(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready"}


@pytest.fixture
def empty_database_url(postgres: LocalPostgres) -> Iterator[str]:
    name = f"empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres.url(name)
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_readyz_is_503_on_an_unmigrated_database(empty_database_url: str) -> None:
    with TestClient(create_app(Settings(database_url=empty_database_url))) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "not migrated" in detail
    assert "missing migrations 1, 2" in detail


def test_readyz_is_503_while_a_migration_is_missing(client: TestClient, db: Conn) -> None:
    db.execute("DELETE FROM schema_migrations WHERE version = 2")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "missing migrations 2;" in response.json()["detail"]


def test_readyz_is_503_when_the_database_is_unreachable() -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=1"
    with TestClient(create_app(Settings(database_url=nowhere))) as client:
        assert client.get("/healthz").status_code == 200, "alive even without a database"
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"detail": "database unreachable"}


def test_metrics_serves_prometheus_text_counting_by_route(
    client: TestClient, db: Conn, county: County
) -> None:
    labels = {"method": "GET", "route": "/api/v1/devices/{device_id}", "status": "200"}
    before = REGISTRY.get_sample_value("shouhu_api_requests_total", labels) or 0.0
    headers = bearer(db, Role.ADMIN)
    assert client.get(f"/api/v1/devices/{county.camera_a}", headers=headers).status_code == 200
    assert client.get(f"/api/v1/devices/{county.camera_b}", headers=headers).status_code == 200
    assert REGISTRY.get_sample_value("shouhu_api_requests_total", labels) == before + 2

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert "# TYPE shouhu_api_requests_total counter" in response.text
    assert (
        'shouhu_api_requests_total{method="GET",route="/api/v1/devices/{device_id}",status="200"}'
        in response.text
    )
    assert "shouhu_api_request_duration_seconds_bucket" in response.text
    assert county.camera_a not in response.text, "raw paths never become labels"


# Bearer tokens ----------------------------------------------------------------------------

PROTECTED = ["/api/v1/areas", "/api/v1/devices", "/api/v1/devices/W-A", "/api/v1/residents/R-A"]


@pytest.mark.parametrize("path", PROTECTED)
def test_401_without_a_token(client: TestClient, county: County, path: str) -> None:
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
        response = client.get(path, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {
            "detail": "a bearer token is required (Authorization: Bearer <token>)"
        }


@pytest.mark.parametrize("path", PROTECTED)
def test_401_with_a_bad_token(client: TestClient, county: County, path: str) -> None:
    response = client.get(path, headers={"Authorization": "Bearer shh_not-a-real-token"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json() == {"detail": "the bearer token is unknown, expired or revoked"}


def test_401_once_the_token_expires(
    app: FastAPI, client: TestClient, db: Conn, county: County
) -> None:
    headers = bearer(db, Role.OPERATOR, expires_at=NOW + timedelta(hours=1))
    app.dependency_overrides[deps.get_now] = lambda: NOW
    assert client.get("/api/v1/areas", headers=headers).status_code == 200
    app.dependency_overrides[deps.get_now] = lambda: NOW + timedelta(hours=1)
    response = client.get("/api/v1/areas", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_401_once_the_token_is_revoked(client: TestClient, db: Conn, county: County) -> None:
    headers = bearer(db, Role.OPERATOR)
    assert client.get("/api/v1/areas", headers=headers).status_code == 200
    (token_id,) = db.execute("SELECT id FROM api_tokens").fetchall()[0]
    assert revoke_token(db, token_id, datetime.now(UTC))
    assert client.get("/api/v1/areas", headers=headers).status_code == 401


# Areas -------------------------------------------------------------------------------------


def test_areas_are_scoped_with_parent_and_level(
    client: TestClient, db: Conn, county: County
) -> None:
    tree = county.tree
    body = client.get("/api/v1/areas", headers=bearer(db, Role.GRID_WORKER, (tree.grid_a,))).json()
    assert body == {
        "count": 2,
        "data": [
            {"id": "A", "parent_id": "M", "level": "grid", "name": "Area A", "active": True},
            {"id": "A1", "parent_id": "A", "level": "micro_grid", "name": "Area A1",
             "active": True},
        ],
    }
    everything = client.get("/api/v1/areas", headers=bearer(db, Role.ADMIN)).json()
    assert ids(everything) == ["C", "T", "M", "A", "B", "A1"]
    assert everything["count"] == 6


def test_areas_paginate_with_a_total_count(client: TestClient, db: Conn, county: County) -> None:
    headers = bearer(db, Role.OPERATOR)
    pages = [
        client.get("/api/v1/areas", params={"limit": 2, "offset": offset}, headers=headers).json()
        for offset in (0, 2, 4, 6)
    ]
    assert [ids(page) for page in pages] == [["C", "T"], ["M", "A"], ["B", "A1"], []]
    assert {page["count"] for page in pages} == {6}


def test_deactivated_areas_are_not_listed_by_default(
    client: TestClient, db: Conn, county: County
) -> None:
    add_area(db, "B9", level=AreaLevel.MICRO_GRID, parent=county.tree.grid_b, active=False)
    headers = bearer(db, Role.ADMIN)
    assert "B9" not in ids(client.get("/api/v1/areas", headers=headers).json())
    listed = client.get("/api/v1/areas", params={"include_inactive": True}, headers=headers)
    assert "B9" in ids(listed.json())
    assert listed.json()["count"] == 7


# Devices -----------------------------------------------------------------------------------


def test_device_detail_carries_state_and_placement(
    client: TestClient, db: Conn, county: County
) -> None:
    headers = bearer(db, Role.OPERATOR)
    wristband = client.get(f"/api/v1/devices/{county.wristband_a}", headers=headers).json()
    assert wristband == {
        "id": "W-A", "kind": "wristband", "model": "WB-2", "active": True,
        "resident_id": "R-A", "grid_id": "A", "area_id": None,
        "state": {"online": True, "last_seen": SEEN.isoformat().replace("+00:00", "Z"),
                  "battery": 76, "worn": True, "offline_reason": None},
    }
    camera = client.get(f"/api/v1/devices/{county.camera_a1}", headers=headers).json()
    assert camera["resident_id"] is None
    assert camera["grid_id"] is None
    assert camera["area_id"] == "A1"
    assert camera["state"]["online"] is False
    assert camera["state"]["offline_reason"] == "power"
    never_seen = client.get(f"/api/v1/devices/{county.camera_a}", headers=headers).json()
    assert never_seen["state"] is None


def test_unknown_device_is_404(client: TestClient, db: Conn, county: County) -> None:
    response = client.get("/api/v1/devices/nope", headers=bearer(db, Role.ADMIN))
    assert response.status_code == 404
    assert response.json() == {"detail": "device 'nope' not found"}


def test_devices_list_hides_deactivated_by_default(
    client: TestClient, db: Conn, county: County
) -> None:
    headers = bearer(db, Role.ADMIN)
    body = client.get("/api/v1/devices", headers=headers).json()
    assert ids(body) == ["CAM-A", "CAM-A1", "CAM-B", "W-A", "W-B"]
    assert body["count"] == 5
    everything = client.get(
        "/api/v1/devices", params={"include_inactive": "true"}, headers=headers
    ).json()
    assert county.camera_retired in ids(everything)
    assert everything["count"] == 6


def test_devices_filter_by_kind(client: TestClient, db: Conn, county: County) -> None:
    headers = bearer(db, Role.ADMIN)
    cameras = client.get("/api/v1/devices", params={"kind": "camera"}, headers=headers).json()
    assert ids(cameras) == ["CAM-A", "CAM-A1", "CAM-B"]
    assert cameras["count"] == 3
    bands = client.get("/api/v1/devices", params={"kind": "wristband"}, headers=headers).json()
    assert ids(bands) == ["W-A", "W-B"]


def test_devices_filter_by_area_includes_descendants(
    client: TestClient, db: Conn, county: County
) -> None:
    headers = bearer(db, Role.ADMIN)

    def listed(area: str, **extra: str) -> list[str]:
        response = client.get("/api/v1/devices", params={"area": area, **extra}, headers=headers)
        assert response.status_code == 200, response.text
        return ids(response.json())

    assert listed("A") == ["CAM-A", "CAM-A1", "W-A"]
    assert listed("A1") == ["CAM-A1"]
    assert listed("B") == ["CAM-B", "W-B"]
    assert listed("M", kind="camera") == ["CAM-A", "CAM-A1", "CAM-B"]
    response = client.get("/api/v1/devices", params={"area": "nowhere"}, headers=headers)
    assert response.status_code == 404
    assert response.json() == {"detail": "area 'nowhere' not found"}


def test_devices_paginate_with_a_total_count(client: TestClient, db: Conn, county: County) -> None:
    headers = bearer(db, Role.ADMIN)
    first = client.get("/api/v1/devices", params={"limit": 2}, headers=headers).json()
    second = client.get(
        "/api/v1/devices", params={"limit": 2, "offset": 2}, headers=headers
    ).json()
    last = client.get("/api/v1/devices", params={"limit": 2, "offset": 4}, headers=headers).json()
    assert (ids(first), ids(second), ids(last)) == (["CAM-A", "CAM-A1"], ["CAM-B", "W-A"], ["W-B"])
    assert first["count"] == second["count"] == last["count"] == 5


def test_a_bad_kind_is_422_naming_the_field(client: TestClient, db: Conn, county: County) -> None:
    response = client.get(
        "/api/v1/devices", params={"kind": "toaster"}, headers=bearer(db, Role.ADMIN)
    )
    assert response.status_code == 422
    body = response.json()
    assert body["detail"].startswith("invalid request: query parameter 'kind': ")
    assert "'wristband'" in body["detail"]
    assert "'camera'" in body["detail"]
    assert body["errors"][0]["loc"] == ["query", "kind"]


@pytest.mark.parametrize(("params", "field"), [({"limit": 0}, "limit"), ({"offset": -1}, "offset")])
def test_bad_pagination_is_422_naming_the_field(
    client: TestClient, db: Conn, county: County, params: dict[str, int], field: str
) -> None:
    response = client.get("/api/v1/areas", params=params, headers=bearer(db, Role.ADMIN))
    assert response.status_code == 422
    assert f"query parameter '{field}'" in response.json()["detail"]


# Area scope --------------------------------------------------------------------------------


def test_grid_worker_sees_own_grid_and_descendants_only(
    client: TestClient, db: Conn, county: County
) -> None:
    headers = bearer(db, Role.GRID_WORKER, (county.tree.grid_a,))
    assert ids(client.get("/api/v1/devices", headers=headers).json()) == [
        "CAM-A", "CAM-A1", "W-A",
    ]
    for device in (county.wristband_a, county.camera_a, county.camera_a1):
        assert client.get(f"/api/v1/devices/{device}", headers=headers).status_code == 200
    assert client.get(f"/api/v1/residents/{county.resident_a}", headers=headers).status_code == 200


def test_out_of_scope_objects_are_404_like_unknown_ones(
    client: TestClient, db: Conn, county: County
) -> None:
    headers = bearer(db, Role.GRID_WORKER, (county.tree.grid_a,))
    for path, what, ident in (
        (f"/api/v1/residents/{county.resident_b}", "resident", county.resident_b),
        (f"/api/v1/devices/{county.wristband_b}", "device", county.wristband_b),
        (f"/api/v1/devices/{county.camera_b}", "device", county.camera_b),
    ):
        response = client.get(path, headers=headers)
        assert response.status_code == 404, path
        assert response.json() == {"detail": f"{what} {ident!r} not found"}
    response = client.get("/api/v1/devices", params={"area": "B"}, headers=headers)
    assert response.status_code == 404
    assert response.json() == {"detail": "area 'B' not found"}
    # An ancestor of the token's own grid is outside its scope too.
    assert client.get("/api/v1/devices", params={"area": "M"}, headers=headers).status_code == 404
    assert audit_rows(db) == [], "a refused read discloses nothing and reads nothing"


def test_a_token_bound_to_a_community_sees_all_its_grids(
    client: TestClient, db: Conn, county: County
) -> None:
    headers = bearer(db, Role.OPERATOR, (county.tree.community,))
    assert client.get("/api/v1/devices", headers=headers).json()["count"] == 5
    assert client.get(f"/api/v1/residents/{county.resident_b}", headers=headers).status_code == 200
    assert ids(client.get("/api/v1/areas", headers=headers).json()) == ["M", "A", "B", "A1"]


# Residents and privacy --------------------------------------------------------------------


def test_resident_read_shows_guardians_devices_and_sensitive_fields(
    client: TestClient, db: Conn, county: County
) -> None:
    response = client.get(f"/api/v1/residents/{county.resident_a}", headers=bearer(db, Role.ADMIN))
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in ("id", "name", "grid_id", "address", "lives_alone", "phone")} == {
        "id": "R-A", "name": "Wang Fang", "grid_id": "A", "address": "3 Elm Row",
        "lives_alone": True, "phone": "+12025550111",
    }
    assert body["guardians"] == [
        {"id": "G-1", "name": "Wang Li", "relation": "daughter", "priority": 1,
         "phone": "+12025550121"},
        {"id": "G-2", "name": "Wang Min", "relation": "son", "priority": 2,
         "phone": "+12025550122"},
    ]
    assert [d["id"] for d in body["devices"]] == ["W-A"]
    assert body["devices"][0]["area_id"] is None, "nested models keep their null fields"
    assert body["devices"][0]["state"]["battery"] == 76
    assert (body["medical_notes"], body["lat"], body["lon"]) == (NOTES, 30.25, 120.17)


@pytest.mark.parametrize("role", [Role.ADMIN, Role.OPERATOR, Role.GRID_WORKER, Role.PLATFORM])
def test_roles_that_need_them_see_medical_notes_and_location(
    client: TestClient, db: Conn, county: County, role: Role
) -> None:
    body = client.get(f"/api/v1/residents/{county.resident_a}", headers=bearer(db, role)).json()
    assert body["medical_notes"] == NOTES
    assert (body["lat"], body["lon"]) == (30.25, 120.17)


def test_sensitive_fields_are_absent_for_roles_outside_the_sensitive_set(
    client: TestClient, db: Conn, county: County, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "SENSITIVE_READERS", frozenset({Role.ADMIN}))
    response = client.get(
        f"/api/v1/residents/{county.resident_a}", headers=bearer(db, Role.OPERATOR)
    )
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "Wang Fang"
    assert not {"medical_notes", "lat", "lon"} & body.keys()
    assert "diabetic" not in response.text
    assert "30.25" not in response.text
    assert audit_rows(db)[-1][4] == {"sensitive": False}


def test_a_technician_sees_cameras_not_residents(
    client: TestClient, db: Conn, county: County
) -> None:
    headers = bearer(db, Role.TECHNICIAN)
    response = client.get(f"/api/v1/residents/{county.resident_a}", headers=headers)
    assert response.status_code == 404
    assert response.json() == {"detail": "resident 'R-A' not found"}
    assert "diabetic" not in response.text
    assert client.get(f"/api/v1/devices/{county.wristband_a}", headers=headers).status_code == 404
    assert client.get(f"/api/v1/devices/{county.camera_a}", headers=headers).status_code == 200
    body = client.get("/api/v1/devices", headers=headers).json()
    assert ids(body) == ["CAM-A", "CAM-A1", "CAM-B"]
    assert body["count"] == 3
    wristbands = client.get("/api/v1/devices", params={"kind": "wristband"}, headers=headers)
    assert wristbands.json() == {"data": [], "count": 0}
    assert audit_rows(db) == []


def test_every_resident_read_is_audited(client: TestClient, db: Conn, county: County) -> None:
    headers = bearer(db, Role.GRID_WORKER, (county.tree.grid_a,))
    (token_id,) = db.execute("SELECT id FROM api_tokens").fetchall()[0]
    for _ in range(2):
        assert client.get(f"/api/v1/residents/{county.resident_a}", headers=headers).is_success
    client.get(f"/api/v1/residents/{county.resident_b}", headers=headers)  # out of scope
    client.get("/api/v1/residents/nobody", headers=headers)
    expected = (token_id, "grid_worker", "read_resident", "R-A", {"sensitive": True})
    assert audit_rows(db) == [expected, expected]
    at = db.execute("SELECT at FROM audit_log").fetchall()
    assert all(abs(row[0] - datetime.now(UTC)) < timedelta(minutes=1) for row in at)


def test_a_resident_read_fails_if_its_audit_row_cannot_be_written(
    app: FastAPI, db: Conn, county: County
) -> None:
    headers = bearer(db, Role.OPERATOR)
    db.execute("ALTER TABLE audit_log ADD CONSTRAINT no_more_audit CHECK (false) NOT VALID")
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get(f"/api/v1/residents/{county.resident_a}", headers=headers)
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "Wang Fang" not in response.text
