"""The authorization matrix: every route × every role × (own area, other area), and
every route with no token, an expired token and a revoked one.

One scenario is built once for the module: the demo county, a grid A in 东关镇 and a
grid B in 西关镇, and for each role its own objects in each (an SOS, a visit, a repair
order, a maintenance window, a token to revoke), so routes that change things can be
checked role by role without one role's call changing another's answer. Tokens are
bound to grid A (grid worker) or to 东关镇 (everyone else). Expected answers are
written out here, not derived from the code under test; a route the matrix does not
list fails ``test_every_route_is_in_the_matrix``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from alerts.care_sweep import sweep
from api import deps
from api.main import create_app
from devices.registry import load_registry
from shouhu.embedded.postgres import LocalPostgres
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token, revoke_token
from tests.support.care import RULES, heard, last_will
from tests.support.database import demo_county, fresh_database
from tests.support.escalation import press

NOW = datetime(2026, 11, 24, 4, 0, tzinfo=UTC)  # 12:00 in Asia/Shanghai
GRID_A, GRID_B = "dongguan-01-g1", "xiguan-02-g2"
TOWN_A, TOWN_B = "dongguan", "xiguan"
ROLES = tuple(Role)
READERS = {Role.ADMIN, Role.OPERATOR, Role.GRID_WORKER, Role.PLATFORM}  # may read residents
VISIT_ROLES = {Role.ADMIN, Role.OPERATOR, Role.GRID_WORKER}
REPAIR_ROLES = {Role.ADMIN, Role.OPERATOR, Role.TECHNICIAN}
SUPERVISORS = {Role.ADMIN, Role.OPERATOR}  # 督办, and the response figures
CALLBACKS = (
    "/callbacks/twilio/keypress",
    "/callbacks/twilio/status",
    "/callbacks/twilio/sms",
    "/callbacks/twilio/voice",
)
OUTSIDE_TOKENS = {("get", "/healthz"), ("get", "/readyz")} | {("post", path) for path in CALLBACKS}
# Covered by tests/test_events_api.py: the live feed streams until the client leaves
# (its scoping and 401s are tested there over a real server), and the session routes
# are the login itself (a token in the body) and the logout (the cookie).
OWN_TESTS = {("get", "/api/v1/events"), ("post", "/api/v1/session"), ("delete", "/api/v1/session")} | {
    # Staff sign-in: tests/test_staff_accounts.py.
    ("post", "/api/v1/session/code"),
    ("post", "/api/v1/session/sign-in"),
    # The Traccar bridge (its shared secret, not a token): tests/test_traccar_bridge.py.
    ("post", "/callbacks/traccar"),
    # Commands to watches (a broker and the watch gateway): tests/test_watch_commands.py.
    ("post", "/api/v1/devices/{device_id}/commands"),
}


@dataclass(frozen=True)
class Scenario:
    url: str
    headers: dict[Role, dict[str, str]]
    own: dict[Role, dict[str, Any]]
    other: dict[Role, dict[str, Any]]
    expired: dict[str, str]
    revoked: dict[str, str]


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _ids(conn: psycopg.Connection[Any], sql: str, *params: Any) -> list[str]:
    return [str(r[0]) for r in conn.execute(sql, params).fetchall()]


def _objects(conn: psycopg.Connection[Any], url: str, grid: str, town: str, index: int) -> dict[str, Any]:
    wristbands = _ids(
        conn,
        "SELECT d.id FROM devices d JOIN residents r ON r.id = d.resident_id WHERE r.grid_id = %s ORDER BY d.id",
        grid,
    )
    cameras_in_town = _ids(
        conn,
        """
        SELECT d.id FROM devices d JOIN areas a ON a.id = d.area_id LEFT JOIN areas p ON p.id = a.parent_id
        WHERE d.kind = 'camera' AND (a.parent_id = %s OR p.parent_id = %s) ORDER BY d.id
        """,
        town,
        town,
    )
    grid_camera = _ids(conn, "SELECT id FROM devices WHERE kind = 'camera' AND area_id = %s ORDER BY id", grid)[0]
    wristband, camera = wristbands[index], cameras_in_town[index + 2]
    resident = _ids(conn, "SELECT resident_id FROM devices WHERE id = %s", wristband)[0]
    incident = press(url, wristband, NOW - timedelta(hours=3), msg_id=f"authz-{index}")
    heard(conn, camera, NOW - timedelta(hours=3), reported_online=False, reported_reason="power")
    last_will(conn, wristband, NOW - timedelta(hours=3))
    window_device = camera if index == ROLES.index(Role.TECHNICIAN) else wristband
    window = conn.execute(
        "INSERT INTO maintenance_windows (device_id, starts_at, ends_at, reason, created_by, created_at)"
        " VALUES (%s, %s, %s, 'authz', 'test', %s) RETURNING id",
        (window_device, NOW - timedelta(hours=1), NOW + timedelta(hours=5), NOW),
    ).fetchone()
    token_to_revoke = create_token(conn, role=Role.OPERATOR, areas=[town], label="target", now=NOW, expires_at=None)
    token_id = _ids(conn, "SELECT id FROM api_tokens ORDER BY id DESC LIMIT 1")[0]
    assert window is not None
    assert token_to_revoke
    return {
        "grid": grid,
        "town": town,
        "wristband": wristband,
        "camera": grid_camera,
        "repair_camera": camera,
        "resident": resident,
        "incident": incident,
        "window": window[0],
        "window_device": window_device,
        "token": token_id,
    }


@pytest.fixture(scope="module")
def scenario(postgres: LocalPostgres) -> Iterator[Scenario]:
    for url in fresh_database(postgres):
        with psycopg.connect(url, autocommit=True) as conn:
            load_registry(conn, demo_county())
            own = {role: _objects(conn, url, GRID_A, TOWN_A, i) for i, role in enumerate(ROLES)}
            other = {role: _objects(conn, url, GRID_B, TOWN_B, i) for i, role in enumerate(ROLES)}
            # Cameras dark for 3 h and bands silent for 3 h: repair orders and visits open
            # (the windows made above for the maintenance routes start only after this sweep).
            conn.execute("UPDATE maintenance_windows SET starts_at = %s", (NOW + timedelta(minutes=1),))
            report = sweep(conn, NOW, RULES, lock_key=0x7E57_A022)
            conn.execute("UPDATE maintenance_windows SET starts_at = %s", (NOW - timedelta(hours=1),))
            assert len(report.opened) == 4 * len(ROLES)
            tasks = {
                (device, kind): task_id
                for device, kind, task_id in conn.execute("SELECT device_id, kind, id FROM care_tasks").fetchall()
            }
            for objects in (*own.values(), *other.values()):
                objects["visit"] = tasks[(objects["wristband"], "visit")]
                objects["repair"] = tasks[(objects["repair_camera"], "repair")]
            headers = {
                role: _bearer(
                    create_token(
                        conn,
                        role=role,
                        areas=[GRID_A if role is Role.GRID_WORKER else TOWN_A],
                        label=f"authz {role}",
                        now=NOW,
                        expires_at=None,
                    )
                )
                for role in ROLES
            }
            expired = create_token(
                conn,
                role=Role.ADMIN,
                areas=[],
                label="old",
                now=NOW - timedelta(days=2),
                expires_at=NOW - timedelta(days=1),
            )
            revoked = create_token(conn, role=Role.ADMIN, areas=[], label="gone", now=NOW, expires_at=None)
            revoked_id = int(_ids(conn, "SELECT id FROM api_tokens ORDER BY id DESC LIMIT 1")[0])
            revoke_token(conn, revoked_id, NOW)
        yield Scenario(url, headers, own, other, _bearer(expired), _bearer(revoked))


@pytest.fixture(scope="module")
def client(scenario: Scenario) -> Iterator[TestClient]:
    app = create_app(Settings(database_url=scenario.url, twilio_auth_token="authz-twilio-token"))
    app.dependency_overrides[deps.get_now] = lambda: NOW
    with TestClient(app) as test_client:
        yield test_client


@dataclass(frozen=True)
class Case:
    """One route: how to call it on an object, and who gets what in their own area and in another."""

    method: str
    template: str
    path: str  # with {key} placeholders filled from the scenario's objects
    allowed: frozenset[Role]  # answered ``ok`` in their own area
    ok: int = 200
    denied: int = 404  # a role outside ``allowed``, in its own area
    other: int = 404  # every role, in another area
    body: dict[str, Any] | None = None
    body_other: dict[str, Any] | None = None


def _everyone() -> frozenset[Role]:
    return frozenset(ROLES)


# Order matters for routes that change things: acknowledge before resolve, start before close.
MATRIX: tuple[Case, ...] = (
    Case("get", "/api/v1/areas", "/api/v1/areas?area={grid}", _everyone()),
    Case("get", "/api/v1/devices", "/api/v1/devices?area={grid}", _everyone()),
    Case("get", "/api/v1/devices/{device_id}", "/api/v1/devices/{wristband}", frozenset(READERS)),
    Case("get", "/api/v1/devices/{device_id}", "/api/v1/devices/{camera}", _everyone()),
    Case("get", "/api/v1/residents/{resident_id}", "/api/v1/residents/{resident}", frozenset(READERS)),
    Case("get", "/api/v1/incidents", "/api/v1/incidents?area={grid}", _everyone()),
    Case("get", "/api/v1/incidents/{incident_id}", "/api/v1/incidents/{incident}", frozenset(READERS)),
    # Before the acknowledgement: the SOS, pressed 3 h ago and never taken, is overdue.
    Case(
        "post",
        "/api/v1/incidents/{incident_id}/supervise",
        "/api/v1/incidents/{incident}/supervise",
        frozenset(SUPERVISORS),
        denied=403,
    ),
    Case("post", "/api/v1/incidents/{incident_id}/ack", "/api/v1/incidents/{incident}/ack", frozenset(READERS)),
    Case(
        "post",
        "/api/v1/incidents/{incident_id}/resolve",
        "/api/v1/incidents/{incident}/resolve",
        frozenset(READERS),
        body={"outcome": "false_alarm"},
        body_other={"outcome": "false_alarm"},
    ),
    Case("get", "/api/v1/tasks", "/api/v1/tasks?area={grid}", _everyone()),
    Case(
        "get",
        "/api/v1/tasks/repair-rounds",
        "/api/v1/tasks/repair-rounds?area={grid}",
        frozenset(REPAIR_ROLES),
        denied=403,
    ),
    Case("get", "/api/v1/tasks/{task_id}", "/api/v1/tasks/{visit}", frozenset(VISIT_ROLES)),
    Case("get", "/api/v1/tasks/{task_id}", "/api/v1/tasks/{repair}", frozenset(REPAIR_ROLES)),
    # The visit opened at NOW is not yet due: the gate lets a supervisor through to the 409.
    Case(
        "post",
        "/api/v1/tasks/{task_id}/supervise",
        "/api/v1/tasks/{visit}/supervise",
        frozenset(SUPERVISORS),
        ok=409,
        denied=403,
    ),
    Case("post", "/api/v1/tasks/{task_id}/start", "/api/v1/tasks/{visit}/start", frozenset(VISIT_ROLES)),
    Case(
        "post",
        "/api/v1/tasks/{task_id}/close",
        "/api/v1/tasks/{visit}/close",
        frozenset(VISIT_ROLES),
        body={"outcome": "resident_fine"},
        body_other={"outcome": "resident_fine"},
    ),
    Case(
        "post",
        "/api/v1/tasks/{task_id}/close",
        "/api/v1/tasks/{repair}/close",
        frozenset(REPAIR_ROLES),
        body={"outcome": "repaired"},
        body_other={"outcome": "repaired"},
    ),
    Case("get", "/api/v1/maintenance", "/api/v1/maintenance?area={grid}", _everyone()),
    Case(
        "post",
        "/api/v1/maintenance",
        "/api/v1/maintenance",
        frozenset(ROLES) - {Role.PLATFORM},
        ok=201,
        body={"device_id": "{window_device}", "ends_at": "2026-11-25T00:00:00Z", "reason": "authz"},
        body_other={"device_id": "{window_device}", "ends_at": "2026-11-25T00:00:00Z", "reason": "authz"},
    ),
    Case(
        "post",
        "/api/v1/maintenance/{window_id}/end",
        "/api/v1/maintenance/{window}/end",
        frozenset(ROLES) - {Role.PLATFORM},
    ),
    Case("get", "/api/v1/tokens", "/api/v1/tokens", frozenset({Role.ADMIN}), denied=403, other=0),
    Case(
        "post",
        "/api/v1/tokens",
        "/api/v1/tokens",
        frozenset({Role.ADMIN}),
        ok=201,
        denied=403,
        other=403,
        body={"role": "operator", "areas": ["{town}"]},
        body_other={"role": "operator", "areas": ["{town}"]},
    ),
    Case("delete", "/api/v1/tokens/{token_id}", "/api/v1/tokens/{token}", frozenset({Role.ADMIN}), denied=403),
    Case(
        "get",
        "/api/v1/cameras/uptime",
        "/api/v1/cameras/uptime?area={grid}",
        frozenset(REPAIR_ROLES),
        denied=403,
    ),
    Case(
        "get",
        "/api/v1/reports/response",
        "/api/v1/reports/response?area={grid}",
        frozenset(SUPERVISORS),
        denied=403,
    ),
    Case(
        "get",
        "/api/v1/reports/visits",
        "/api/v1/reports/visits?area={grid}",
        frozenset(VISIT_ROLES),
        denied=403,
    ),
    # The audit log spans the county: an admin bound to an area is refused too.
    Case("get", "/api/v1/audit", "/api/v1/audit", frozenset(), denied=403, other=0),
)


def _fill(value: Any, objects: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return value.format(**objects)
    if isinstance(value, dict):
        return {k: _fill(v, objects) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, objects) for v in value]
    return value


def _call(client: TestClient, case: Case, objects: dict[str, Any], headers: dict[str, str], body: Any) -> int:
    path = _fill(case.path, objects)
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        kwargs["json"] = _fill(body, objects)
    return int(client.request(case.method.upper(), path, **kwargs).status_code)


def test_every_route_answers_each_role_in_its_own_area_and_refuses_others(
    client: TestClient, scenario: Scenario
) -> None:
    wrong: list[str] = []
    for case in MATRIX:
        for role in ROLES:
            headers = scenario.headers[role]
            # Another area first: a refused call must change nothing the own-area call relies on.
            if case.other:
                # A role refused the route outright is refused the same way everywhere.
                elsewhere = case.other if role in case.allowed else case.denied
                got = _call(client, case, scenario.other[role], headers, case.body_other)
                if got != elsewhere:
                    wrong.append(f"{case.method.upper()} {case.path} as {role} in another area: {got}, not {elsewhere}")
            expected = case.ok if role in case.allowed else case.denied
            got = _call(client, case, scenario.own[role], headers, case.body)
            if got != expected:
                wrong.append(f"{case.method.upper()} {case.path} as {role} in its own area: {got}, not {expected}")
    assert wrong == [], "\n".join(wrong)


def test_every_token_route_refuses_no_token_an_expired_one_and_a_revoked_one(
    client: TestClient, scenario: Scenario
) -> None:
    wrong: list[str] = []
    objects = scenario.own[Role.ADMIN]
    for case in MATRIX:
        for name, headers in (("no token", {}), ("expired", scenario.expired), ("revoked", scenario.revoked)):
            got = _call(client, case, objects, headers, case.body)
            if got != 401:
                wrong.append(f"{case.method.upper()} {case.path} with {name}: {got}, not 401")
    assert wrong == [], "\n".join(wrong)


def test_callbacks_ignore_tokens_and_refuse_what_twilio_did_not_sign(client: TestClient, scenario: Scenario) -> None:
    for path in CALLBACKS:
        for headers in ({}, scenario.headers[Role.ADMIN]):
            answer = client.post(path, headers=headers, data={"CallSid": "CA1", "Digits": "1", "From": "+12025550100"})
            assert answer.status_code == 403, (path, answer.text)
    assert client.get("/healthz").status_code == 200


def test_every_route_is_in_the_matrix(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    routes = {(method, path) for path, item in paths.items() for method in item}
    covered = {(case.method, case.template) for case in MATRIX} | OUTSIDE_TOKENS | OWN_TESTS
    assert routes - covered == set(), "routes with no row in the authorization matrix"


# --- a console page and the REST route it mirrors admit the same roles ------------------

# (page, route, the roles both admit): written out here, not read from api/access.py.
PAGES_AND_ROUTES: tuple[tuple[str, str, frozenset[Role]], ...] = (
    ("/console/grid", "/api/v1/incidents", _everyone()),
    ("/console/grid/list", "/api/v1/incidents", _everyone()),
    ("/console/tech", "/api/v1/cameras/uptime", frozenset(REPAIR_ROLES)),
    ("/console/tech/body", "/api/v1/cameras/uptime", frozenset(REPAIR_ROLES)),
    ("/console/tech", "/api/v1/tasks/repair-rounds", frozenset(REPAIR_ROLES)),
    ("/console/incidents/{incident}", "/api/v1/incidents/{incident}", frozenset(READERS)),
    ("/console/incidents/{incident}/body", "/api/v1/incidents/{incident}", frozenset(READERS)),
    ("/console/tasks/{visit}", "/api/v1/tasks/{visit}", frozenset(VISIT_ROLES)),
    ("/console/tasks/{repair}", "/api/v1/tasks/{repair}", frozenset(REPAIR_ROLES)),
)


@pytest.fixture(scope="module")
def sessions(client: TestClient, scenario: Scenario) -> dict[Role, str]:
    """Each role's console session, logged in with its token as a browser does."""
    cookies: dict[Role, str] = {}
    for role in ROLES:
        secret = scenario.headers[role]["Authorization"].removeprefix("Bearer ")
        answer = client.post("/api/v1/session", json={"token": secret})
        assert answer.status_code == 201, answer.text
        cookies[role] = answer.cookies[deps.SESSION_COOKIE]
        client.cookies.clear()  # each request below names its own session
    return cookies


@pytest.mark.parametrize(
    ("page", "route", "admitted"), PAGES_AND_ROUTES, ids=[f"{p} {r}" for p, r, _ in PAGES_AND_ROUTES]
)
def test_a_console_page_and_its_rest_route_admit_the_same_roles(
    client: TestClient, scenario: Scenario, sessions: dict[Role, str], page: str, route: str, admitted: frozenset[Role]
) -> None:
    by_page: set[Role] = set()
    by_route: set[Role] = set()
    for role in ROLES:
        objects = scenario.own[role]
        cookie = {"Cookie": f"{deps.SESSION_COOKIE}={sessions[role]}"}
        shown = client.get(_fill(page, objects), headers=cookie, follow_redirects=False)
        served = client.get(_fill(route, objects), headers=scenario.headers[role])
        assert shown.status_code in (200, 403, 404), (page, role, shown.status_code)
        # Refused alike, too: 403 where the role may not use the thing at all, 404 where it may not see the object.
        assert shown.status_code == served.status_code, (page, route, role, shown.status_code, served.status_code)
        if shown.status_code == 200:
            by_page.add(role)
        if served.status_code == 200:
            by_route.add(role)
    assert by_page == by_route == admitted
