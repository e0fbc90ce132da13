"""Camera uptime through the real route on a real PostgreSQL: hand-built transition
histories with exact arithmetic, exclusions, local days, roll-ups, repairs, scope, roles
and readable errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from api import deps
from api.main import create_app
from devices.kinds import AreaLevel, DeviceKind
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.utils.builders import add_area, add_device

Conn = psycopg.Connection[tuple[Any, ...]]
ZONE = ZoneInfo("Asia/Shanghai")
HOUR = 3600.0


def local(day: int, hour: float = 0) -> datetime:
    """A time on 2026-11-`day` in Asia/Shanghai, in UTC."""
    return datetime(2026, 11, day, tzinfo=ZONE).astimezone(UTC) + timedelta(hours=hour)


NOW = local(27, 12)


@pytest.fixture
def conn(database_url: str) -> Iterator[Conn]:
    """A small county: two townships, one community and grid each; cam-a and cam-b in
    grid g1 (township t1), cam-c in grid g2 (township t2)."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        add_area(connection, "c", level=AreaLevel.COUNTY)
        for n in ("1", "2"):
            add_area(connection, f"t{n}", level=AreaLevel.TOWNSHIP, parent="c")
            add_area(connection, f"m{n}", level=AreaLevel.COMMUNITY, parent=f"t{n}")
            add_area(connection, f"g{n}", level=AreaLevel.GRID, parent=f"m{n}")
        for camera, grid in (("cam-a", "g1"), ("cam-b", "g1"), ("cam-c", "g2")):
            add_device(connection, camera, kind=DeviceKind.CAMERA, area=grid)
        yield connection


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    app = create_app(Settings(database_url=database_url, timezone=ZONE.key))
    app.dependency_overrides[deps.get_now] = lambda: NOW
    with TestClient(app) as test_client:
        yield test_client


def token(url: str, role: Role = Role.TECHNICIAN, areas: list[str] | None = None) -> dict[str, str]:
    with psycopg.connect(url) as c:
        secret = create_token(c, role=role, areas=areas or [], label="", now=NOW, expires_at=None)
    return {"Authorization": f"Bearer {secret}"}


def went(conn: Conn, device: str, at: datetime, online: bool, reason: str | None = None, previous: str = "") -> None:
    """A transition as hub/liveness.py writes it."""
    before = previous or ("offline" if online else "online")
    conn.execute(
        "INSERT INTO device_events (device_id, at, event, reason, detail) VALUES (%s, %s, %s, %s, %s)",
        (device, at, "online" if online else "offline", reason, Jsonb({"from": before})),
    )


def maintenance(conn: Conn, start: datetime, end: datetime, *, device: str | None = None, area: str | None = None,
                cancelled: bool = False) -> None:
    conn.execute(
        "INSERT INTO maintenance_windows (device_id, area_id, starts_at, ends_at, reason, created_by, created_at,"
        " cancelled_at) VALUES (%s, %s, %s, %s, '检修', 'test', %s, %s)",
        (device, area, start, end, start, start if cancelled else None),
    )


def repair(conn: Conn, device: str, problem_since: datetime, *, recovered: datetime | None = None,
           closed: datetime | None = None) -> None:
    """A repair order (and its camera_offline incident), closed at ``closed`` or still open."""
    row = conn.execute(
        "INSERT INTO incidents (code, kind, severity, device_id, area_id, opened_at, state)"
        " SELECT %s, 'camera_offline', 'yellow', id, area_id, %s, %s FROM devices WHERE id = %s RETURNING id, area_id",
        (f"R-{device}-{problem_since:%d%H%M}", problem_since, "resolved" if closed else "open", device),
    ).fetchone()
    assert row is not None
    conn.execute(
        "INSERT INTO care_tasks (incident_id, kind, device_id, area_id, owner_area_id, reason, state, opened_at,"
        " problem_since, due_at, recovered_at, closed_at) VALUES (%s, 'repair', %s, %s, %s, 'no_heartbeat', %s,"
        " %s, %s, %s, %s, %s)",
        (row[0], device, row[1], row[1], "closed" if closed else "open", problem_since, problem_since,
         problem_since + timedelta(days=2), recovered, closed),
    )


def get(client: TestClient, headers: dict[str, str], **params: str) -> dict[str, Any]:
    response = client.get("/api/v1/cameras/uptime", headers=headers, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def day24(client: TestClient, headers: dict[str, str], **params: str) -> dict[str, Any]:
    return get(client, headers, **{"from": "2026-11-24", "to": "2026-11-25", **params})


def camera(bucket: dict[str, Any], device: str) -> dict[str, Any]:
    return next(c for c in bucket["cameras"] if c["device_id"] == device)


def area(bucket: dict[str, Any], area_id: str) -> dict[str, Any]:
    return next(a for a in bucket["areas"] if a["area_id"] == area_id)


def test_offline_6_of_24_hours_with_2_hours_of_maintenance_is_16_of_22(
    conn: Conn, client: TestClient, database_url: str
) -> None:
    went(conn, "cam-a", local(20), True, previous="unknown")
    went(conn, "cam-a", local(24, 8), False, "reported:video_lost")
    went(conn, "cam-a", local(24, 14), True)
    maintenance(conn, local(24, 2), local(24, 4), device="cam-a")  # while it was online
    # Same history on cam-b, but its 2 hours of maintenance lie inside the outage.
    went(conn, "cam-b", local(20), True, previous="unknown")
    went(conn, "cam-b", local(24, 8), False, "reported:video_lost")
    went(conn, "cam-b", local(24, 14), True)
    maintenance(conn, local(24, 12), local(24, 14), device="cam-b")
    maintenance(conn, local(24, 0), local(25, 0), device="cam-b", cancelled=True)  # never happened

    [bucket] = day24(client, token(database_url), area="g1")["buckets"]
    a, b = camera(bucket, "cam-a"), camera(bucket, "cam-b")
    assert (a["online_s"], a["offline_s"], a["maintenance_s"], a["monitored_s"]) == (
        16 * HOUR, 6 * HOUR, 2 * HOUR, 22 * HOUR,
    )
    assert a["online_ratio"] == pytest.approx(16 / 22)
    assert a["offline_by_reason"] == {"reported:video_lost": 6 * HOUR}
    assert (b["online_s"], b["offline_s"], b["maintenance_s"]) == (18 * HOUR, 4 * HOUR, 2 * HOUR)
    assert b["online_ratio"] == pytest.approx(18 / 22)
    assert (a["outages"], b["outages"]) == (1, 1)
    grid = area(bucket, "g1")
    assert grid["online_ratio"] == pytest.approx(34 / 44)
    assert grid["cameras"] == 2


def test_ingest_gaps_and_time_before_the_first_sighting_are_unknown(
    conn: Conn, client: TestClient, database_url: str
) -> None:
    went(conn, "cam-a", local(24, 6), True, previous="unknown")  # first heard at 06:00
    conn.execute("INSERT INTO ingest_gaps (started_at, ended_at) VALUES (%s, %s)", (local(24, 10), local(24, 11)))
    [bucket] = day24(client, token(database_url), area="g1")["buckets"]
    a = camera(bucket, "cam-a")
    assert (a["unknown_s"], a["online_s"], a["offline_s"], a["online_ratio"]) == (7 * HOUR, 17 * HOUR, 0.0, 1.0)
    never = camera(bucket, "cam-b")  # never heard at all: no ratio, not 0 %
    assert (never["unknown_s"], never["monitored_s"], never["online_ratio"]) == (24 * HOUR, 0.0, None)


def test_an_open_ingest_gap_counts_up_to_now_and_the_future_is_unknown(
    conn: Conn, client: TestClient, database_url: str
) -> None:
    went(conn, "cam-c", local(20), True, previous="unknown")
    conn.execute("INSERT INTO ingest_gaps (started_at) VALUES (%s)", (NOW - timedelta(hours=2),))
    body = get(client, token(database_url), area="g2", **{"from": "2026-11-27", "to": "2026-11-28"})
    c = camera(body["buckets"][0], "cam-c")
    # 00:00–10:00 online; 10:00–12:00 the open gap; 12:00 (now)–24:00 not yet happened.
    assert (c["online_s"], c["unknown_s"]) == (10 * HOUR, 14 * HOUR)


def test_days_begin_at_midnight_in_asia_shanghai(conn: Conn, client: TestClient, database_url: str) -> None:
    went(conn, "cam-a", local(20), True, previous="unknown")
    went(conn, "cam-a", local(24, 23), False, "no_heartbeat")
    went(conn, "cam-a", local(25, 1), True)
    body = get(client, token(database_url), area="g1", by="day", **{"from": "2026-11-24", "to": "2026-11-26"})
    first, second = body["buckets"]
    assert (first["day"], first["from"], first["to"]) == ("2026-11-24", "2026-11-23T16:00:00Z", "2026-11-24T16:00:00Z")
    assert second["day"] == "2026-11-25"
    assert camera(first, "cam-a")["offline_s"] == HOUR
    assert camera(second, "cam-a")["offline_s"] == HOUR
    assert (camera(first, "cam-a")["outages"], camera(second, "cam-a")["outages"]) == (1, 0)
    assert body["timezone"] == "Asia/Shanghai"


def test_the_roll_up_is_time_weighted_across_cameras_and_areas(
    conn: Conn, client: TestClient, database_url: str
) -> None:
    went(conn, "cam-a", local(20), True, previous="unknown")  # 24 h online
    went(conn, "cam-b", local(24, 18), True, previous="unknown")  # first heard 18:00
    went(conn, "cam-b", local(24, 21), False, "last_will")  # 3 h online, 3 h offline
    went(conn, "cam-c", local(20), False, "reported:power", previous="unknown")  # 24 h offline
    body = day24(client, token(database_url, Role.OPERATOR))
    [bucket] = body["buckets"]
    township = area(bucket, "t1")
    assert (township["online_s"], township["monitored_s"]) == (27 * HOUR, 30 * HOUR)
    assert township["online_ratio"] == pytest.approx(0.9)  # not (1 + 0.5) / 2
    county = area(bucket, "c")
    assert county == {**bucket["total"], "area_id": "c"}
    assert county["online_ratio"] == pytest.approx(27 / 54)
    assert county["offline_by_reason"] == {"last_will": 3 * HOUR, "reported:power": 24 * HOUR}
    assert [a["id"] for a in body["areas"]] == ["c", "g1", "g2", "m1", "m2", "t1", "t2"]
    assert {a["id"]: a["cameras"] for a in body["areas"]}["t1"] == 2


def test_area_maintenance_applies_to_every_camera_below(conn: Conn, client: TestClient, database_url: str) -> None:
    for cam in ("cam-a", "cam-c"):
        went(conn, cam, local(20), True, previous="unknown")
    maintenance(conn, local(24, 0), local(24, 6), area="t1")
    [bucket] = day24(client, token(database_url))["buckets"]
    assert camera(bucket, "cam-a")["maintenance_s"] == 6 * HOUR
    assert camera(bucket, "cam-c")["maintenance_s"] == 0.0


def test_offline_reasons_outages_and_mean_time_to_repair(conn: Conn, client: TestClient, database_url: str) -> None:
    went(conn, "cam-a", local(20), True, previous="unknown")
    went(conn, "cam-a", local(24, 1), False, "no_heartbeat")
    went(conn, "cam-a", local(24, 2), True)
    went(conn, "cam-a", local(24, 5), False, "reported:power")
    went(conn, "cam-a", local(24, 8), True)
    went(conn, "cam-b", local(20), True, previous="unknown")
    went(conn, "cam-b", local(24, 10), False, "last_will")
    repair(conn, "cam-a", local(24, 1), recovered=local(24, 2), closed=local(24, 3))  # 1 h (to recovery)
    repair(conn, "cam-a", local(24, 5), closed=local(24, 9))  # 4 h (no recovery: to the close)
    repair(conn, "cam-a", local(23, 5), closed=local(23, 9))  # closed the day before: not in the period
    repair(conn, "cam-b", local(24, 10))  # still open
    body = day24(client, token(database_url), area="t1")
    [bucket] = body["buckets"]
    a = camera(bucket, "cam-a")
    assert a["offline_by_reason"] == {"no_heartbeat": HOUR, "reported:power": 3 * HOUR}
    assert (a["outages"], a["repairs_closed"], a["mttr_s"]) == (2, 2, 2.5 * HOUR)
    assert camera(bucket, "cam-b")["mttr_s"] is None
    township = area(bucket, "t1")
    assert (township["outages"], township["repairs_closed"], township["mttr_s"]) == (3, 2, 2.5 * HOUR)
    assert body["open_repair_orders"] == 1
    assert {a["id"]: a["open_repair_orders"] for a in body["areas"]} == {"t1": 1, "m1": 1, "g1": 1}


def test_a_token_bound_to_a_township_sees_it_only(conn: Conn, client: TestClient, database_url: str) -> None:
    mine = token(database_url, Role.TECHNICIAN, ["t1"])
    response = client.get("/api/v1/cameras/uptime", headers=mine, params={"area": "g2"})
    assert response.status_code == 404
    assert response.json() == {"detail": "area 'g2' not found"}
    assert client.get("/api/v1/cameras/uptime", headers=mine, params={"area": "nowhere"}).status_code == 404
    body = get(client, mine)
    assert body["camera_count"] == 2
    assert [c["device_id"] for c in body["buckets"][0]["cameras"]] == ["cam-a", "cam-b"]
    assert sorted(a["id"] for a in body["areas"]) == ["g1", "m1", "t1"]
    assert get(client, mine, area="g1")["camera_count"] == 2


def test_cameras_are_paged_while_areas_count_them_all(conn: Conn, client: TestClient, database_url: str) -> None:
    body = get(client, token(database_url), limit="1", offset="1")
    assert body["camera_count"] == 3
    assert [c["device_id"] for c in body["buckets"][0]["cameras"]] == ["cam-b"]
    assert body["buckets"][0]["total"]["cameras"] == 3


@pytest.mark.parametrize("role", [Role.GRID_WORKER, Role.PLATFORM])
def test_grid_workers_and_the_platform_are_refused(client: TestClient, database_url: str, role: Role) -> None:
    response = client.get("/api/v1/cameras/uptime", headers=token(database_url, role))
    assert response.status_code == 403
    assert "cannot read camera uptime" in response.json()["detail"]


@pytest.mark.parametrize(
    ("params", "name", "words"),
    [
        ({"from": "2026-11-25", "to": "2026-11-24"}, "from", "before 'to'"),
        ({"from": "2026-11-24", "to": "2026-11-24"}, "from", "before 'to'"),
        ({"from": "2025-11-24", "to": "2026-11-26"}, "to", "longer than 366 days"),
        ({"from": "2026-11-24T00:00:00"}, "from", "no offset"),
        ({"to": "yesterday"}, "to", "neither a date"),
        ({"by": "week"}, "by", "'day' or 'period'"),
    ],
)
def test_bad_parameters_are_named(
    client: TestClient, database_url: str, params: dict[str, str], name: str, words: str
) -> None:
    response = client.get("/api/v1/cameras/uptime", headers=token(database_url), params=params)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert f"query parameter {name!r}" in detail
    assert words in detail


def test_the_defaults_are_the_week_up_to_now(conn: Conn, client: TestClient, database_url: str) -> None:
    went(conn, "cam-a", local(1), True, previous="unknown")
    body = get(client, token(database_url), area="g1")
    assert (body["from"], body["to"], body["by"]) == ("2026-11-20T04:00:00Z", "2026-11-27T04:00:00Z", "period")
    assert camera(body["buckets"][0], "cam-a")["online_s"] == 7 * 24 * HOUR


def test_status_messages_in_device_events_are_not_transitions(
    conn: Conn, client: TestClient, database_url: str
) -> None:
    went(conn, "cam-a", local(20), True, previous="unknown")
    conn.execute(
        "INSERT INTO device_events (device_id, at, event, reason) VALUES ('cam-a', %s, 'status_offline', 'last_will')",
        (local(24, 12),),
    )
    [bucket] = day24(client, token(database_url), area="g1")["buckets"]
    assert camera(bucket, "cam-a")["online_s"] == 24 * HOUR


# --- the technician's board and the route in a zone other than Shanghai ---------------

ELSEWHERE = "America/New_York"
# 23:30 on 2026-11-23 in New York, already 12:30 on the 24th in Shanghai: the two zones
# disagree about which day "today" is and where it began.
LATE_EVENING = datetime(2026, 11, 24, 4, 30, tzinfo=UTC)


def test_the_technician_board_and_the_uptime_route_agree_on_local_days_outside_shanghai(
    conn: Conn, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cam-a online for days, then dark 10:00–16:00 UTC on the 23rd: inside New York's
    # 23rd (which began at 05:00 UTC), before Shanghai's 24th (which began at 16:00 UTC).
    went(conn, "cam-a", datetime(2026, 11, 15, tzinfo=UTC), True, previous="unknown")
    went(conn, "cam-a", datetime(2026, 11, 23, 10, tzinfo=UTC), False, "reported:video_lost")
    went(conn, "cam-a", datetime(2026, 11, 23, 16, tzinfo=UTC), True)
    monkeypatch.setenv("SHOUHU_TIMEZONE", ELSEWHERE)
    app = create_app(Settings(database_url=database_url))  # as `shouhu api` builds it: from the environment
    app.dependency_overrides[deps.get_now] = lambda: LATE_EVENING
    with psycopg.connect(database_url) as c:
        secret = create_token(c, role=Role.TECHNICIAN, areas=[], label="田霞", now=LATE_EVENING, expires_at=None)

    with TestClient(app) as client:
        assert client.post("/api/v1/session", json={"token": secret}).status_code == 201
        board = client.get("/console/tech")
        headers = {"Authorization": f"Bearer {secret}"}
        today = get(client, headers, area="g1", **{"from": "2026-11-23"})
        week = get(client, headers, by="day", **{"from": "2026-11-17"})

    assert board.status_code == 200, board.text
    assert today["timezone"] == ELSEWHERE
    ratio = area(today["buckets"][0], "g1")["online_ratio"]
    assert ratio == pytest.approx(17.5 / 23.5)  # 6 of the 23.5 hours since New York's midnight
    # The board's "today" column for the grid: the same day, the same figure.
    row = re.search(r'<th scope="row">Area g1</th><td>[^<]*</td><td>([^<]*)</td>', board.text)
    assert row is not None, board.text
    assert row.group(1) == f"{ratio * 100:.1f}%"
    # Its period ends on New York's today, and its chart's days are the route's days.
    assert 'id="to" name="to" value="2026-11-23"' in board.text
    days = [(b["day"], b["total"]["online_ratio"]) for b in week["buckets"]]
    assert days[-1][0] == "2026-11-23"
    chart = "; ".join(f"{day}: {'—' if r is None else f'{r * 100:.1f}%'}" for day, r in days)
    assert f'<desc id="chart-desc">{chart}</desc>' in board.text
