"""The incidents API against a real database: list, filters, scope, timeline, privacy, audit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from alerts.incidents import Alarm, record_alarm
from alerts.notifiers.base import Delivery, Provider, SendOutcome, SendResult
from alerts.notifiers.console import ConsoleNotifier
from alerts.providers import PhoneProviders, ProviderChoice
from alerts.router import Router, RouterConfig
from api.main import create_app
from devices.contract import payload_hash
from devices.kinds import Channel, DeviceKind, IncidentKind
from shouhu.db import Conn
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.support.builders import SmallCounty, add_device, add_resident, add_small_county

ZONE = ZoneInfo("Asia/Shanghai")
T0 = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)  # 10:00 in Asia/Shanghai
NOTES = "insulin-dependent diabetic; pacemaker"
GRID_WORKER_PHONE = "+12025550100"
TECHNICIAN_PHONE = "+12025550177"
LIST_FIELDS = {
    "id", "code", "kind", "severity", "state", "opened_at", "urgency", "payload_unreadable",
    "area_id", "resident_id", "device_id", "acknowledged_at", "acknowledged_by", "acknowledged_by_id",
    "resolved_at", "outcome", "due_at", "overdue",
}

Headers = dict[str, str]


@dataclass(frozen=True, slots=True)
class World:
    """Seven incidents across the small county; ``old`` was inserted last but opened first."""

    tree: SmallCounty
    sos_a: int  # R-A's SOS in grid A, escalated by the router, joined by a second press
    fall_b: int  # R-B's fall in grid B
    cam_a1: int  # camera offline in micro-grid A1, a technician paged
    cam_b: int  # camera offline in grid B
    unregistered: int  # SOS from an unknown wristband: the county
    no_area: int  # an incident with no area
    old: int  # R-A's wristband offline an hour before, resolved

    def newest_first(self) -> list[int]:
        return [
            self.no_area, self.unregistered, self.cam_b, self.cam_a1, self.fall_b, self.sos_a,
            self.old,
        ]


class _Voice:
    """The grid worker's phone is busy."""

    channels = frozenset({Channel.VOICE})

    def send(self, delivery: Delivery) -> SendResult:
        return SendResult(SendOutcome.FAILED, error="busy")


class _Sms:
    channels = frozenset({Channel.SMS})

    def send(self, delivery: Delivery) -> SendResult:
        return SendResult(SendOutcome.SENT, provider_id=f"SM{delivery.attempt_id}")


def _press(
    db: Conn, device: str, at: datetime, msg_id: str, kind: IncidentKind = IncidentKind.SOS
) -> int:
    with db.transaction():
        outcome = record_alarm(
            db,
            Alarm(device, kind, msg_id, b"{}", payload_hash(msg_id.encode()), at),
            ack_timeout_s=120,
            hub_id="t",
        )
    assert outcome.incident_id is not None
    return outcome.incident_id


def _add_incident(
    db: Conn,
    code: str,
    *,
    kind: IncidentKind,
    severity: str,
    opened_at: datetime,
    area: str | None,
    device: str | None = None,
    resident: str | None = None,
    state: str = "open",
    resolved_at: datetime | None = None,
    outcome: str | None = None,
) -> int:
    row = db.execute(
        """
        INSERT INTO incidents (code, kind, severity, state, resident_id, device_id, area_id,
                               opened_at, resolved_at, outcome)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
        """,
        (code, kind.value, severity, state, resident, device, area, opened_at, resolved_at,
         outcome),
    ).fetchone()
    assert row is not None
    incident_id: int = row[0]
    _add_event(db, incident_id, opened_at, "opened", "sweeper", {"kind": kind.value})
    return incident_id


def _add_event(
    db: Conn, incident_id: int, at: datetime, event: str, actor: str | None, detail: dict[str, Any]
) -> None:
    db.execute(
        "INSERT INTO incident_events (incident_id, at, event, actor, detail) VALUES (%s, %s, %s, %s, %s)",
        (incident_id, at, event, actor, Jsonb(detail)),
    )


@pytest.fixture
def db(database_url: str) -> Iterator[Conn]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def world(database_url: str, db: Conn) -> World:
    tree = add_small_county(db)
    add_resident(db, "R-A", grid=tree.grid_a, name="Wang Fang", medical_notes=NOTES)
    add_resident(db, "R-B", grid=tree.grid_b, medical_notes="asthma")
    add_device(db, "W-A", kind=DeviceKind.WRISTBAND, resident="R-A")
    add_device(db, "W-B", kind=DeviceKind.WRISTBAND, resident="R-B")
    add_device(db, "CAM-A1", kind=DeviceKind.CAMERA, area=tree.micro_a)
    add_device(db, "CAM-B", kind=DeviceKind.CAMERA, area=tree.grid_b)
    # A grid worker on duty for grid A around the clock.
    db.execute(
        "INSERT INTO staff (id, name, role, phone) VALUES ('GW-A', 'Li Wei', 'grid_worker', %s)",
        (GRID_WORKER_PHONE,),
    )
    db.execute("INSERT INTO staff_areas (staff_id, area_id) VALUES ('GW-A', 'A')")
    db.execute(
        """
        INSERT INTO duty_shifts (staff_id, area_id, weekdays, start_time, end_time)
        VALUES ('GW-A', 'A', '{1,2,3,4,5,6,7}', '00:00', '00:00')
        """
    )

    # R-A presses SOS; a second press 10 s later joins it (written before the router
    # runs, so its timeline row has a lower id but a later time).
    sos_a = _press(db, "W-A", T0, "m1")
    assert _press(db, "W-A", T0 + timedelta(seconds=10), "m2") == sos_a
    router = Router(
        database_url,
        RouterConfig("r1", ZONE),
        PhoneProviders(
            {(Provider.TWILIO, Channel.VOICE): _Voice(), (Provider.TWILIO, Channel.SMS): _Sms()},
            ProviderChoice(Provider.TWILIO),
        ),
        console=ConsoleNotifier(),
        clock=lambda: T0 + timedelta(seconds=5),
    )
    try:
        router.run_once()
    finally:
        router.close()

    fall_b = _press(db, "W-B", T0 + timedelta(minutes=1), "f1", IncidentKind.FALL)
    cam_a1 = _add_incident(
        db, "CAMA1", kind=IncidentKind.CAMERA_OFFLINE, severity="yellow",
        opened_at=T0 + timedelta(minutes=2), area=tree.micro_a, device="CAM-A1",
    )
    paged = T0 + timedelta(minutes=2, seconds=1)
    db.execute(
        """
        INSERT INTO notification_attempts (incident_id, round, step, recipient_kind, recipient_id,
            address, channel, state, provider_id, created_at, sent_at)
        VALUES (%s, 0, 0, 'staff', 'TECH-1', %s, 'sms', 'sent', 'SM-T1', %s, %s)
        """,
        (cam_a1, TECHNICIAN_PHONE, paged, paged),
    )
    _add_event(db, cam_a1, paged, "attempt_sent", "r1",
               {"channel": "sms", "to": TECHNICIAN_PHONE, "provider_id": "SM-T1"})
    cam_b = _add_incident(
        db, "CAMB1", kind=IncidentKind.CAMERA_OFFLINE, severity="yellow",
        opened_at=T0 + timedelta(minutes=3), area=tree.grid_b, device="CAM-B",
    )
    unregistered = _press(db, "W-UNKNOWN", T0 + timedelta(minutes=4), "u1")
    no_area = _add_incident(
        db, "NOAR1", kind=IncidentKind.LOW_BATTERY, severity="blue",
        opened_at=T0 + timedelta(minutes=5), area=None, device="W-LOST",
    )
    old = _add_incident(
        db, "OLD01", kind=IncidentKind.WRISTBAND_OFFLINE, severity="yellow",
        opened_at=T0 - timedelta(hours=1), area=tree.grid_a, device="W-A", resident="R-A",
        state="resolved", resolved_at=T0 - timedelta(minutes=30), outcome="visited_fine",
    )
    return World(tree, sos_a, fall_b, cam_a1, cam_b, unregistered, no_area, old)


@pytest.fixture
def app(database_url: str) -> FastAPI:
    return create_app(Settings(database_url=database_url))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def bearer(db: Conn, role: Role, areas: tuple[str, ...] = ()) -> Headers:
    secret = create_token(
        db, role=role, areas=list(areas), label="test", now=T0 - timedelta(days=1), expires_at=None
    )
    return {"Authorization": f"Bearer {secret}"}


def ids(body: dict[str, Any]) -> list[int]:
    return [item["id"] for item in body["data"]]


def when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def audit_rows(db: Conn) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT token_id, role, action, subject, detail FROM audit_log ORDER BY id"
    ).fetchall()


def list_incidents(client: TestClient, headers: Headers, **params: Any) -> dict[str, Any]:
    response = client.get("/api/v1/incidents", params=params, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# Listing -------------------------------------------------------------------------------------


def test_list_is_newest_first_with_every_field(
    client: TestClient, db: Conn, world: World
) -> None:
    body = list_incidents(client, bearer(db, Role.ADMIN))
    assert ids(body) == world.newest_first()
    assert body["count"] == 7
    assert all(item.keys() == LIST_FIELDS for item in body["data"])
    by_id = {item["id"]: item for item in body["data"]}
    sos = by_id[world.sos_a]
    code_row = db.execute("SELECT code FROM incidents WHERE id = %s", (world.sos_a,)).fetchone()
    assert code_row is not None
    assert {**sos, "opened_at": when(sos["opened_at"]), "due_at": when(sos["due_at"])} == {
        "id": world.sos_a, "code": code_row[0], "kind": "sos", "severity": "red", "state": "open",
        "opened_at": T0, "urgency": 2, "payload_unreadable": False, "area_id": "A",
        "resident_id": "R-A", "device_id": "W-A", "acknowledged_at": None,
        "acknowledged_by": None, "acknowledged_by_id": None, "resolved_at": None, "outcome": None,
        # Nobody took it within the built-in first wait (SHOUHU_ACK_TIMEOUT_S): overdue.
        "due_at": T0 + timedelta(seconds=120), "overdue": True,
    }
    old = by_id[world.old]
    assert (old["state"], old["outcome"]) == ("resolved", "visited_fine")
    assert (old["due_at"], old["overdue"]) == (None, False)
    assert when(old["resolved_at"]) == T0 - timedelta(minutes=30)
    assert by_id[world.unregistered]["kind"] == "sos_unregistered"
    assert by_id[world.unregistered]["area_id"] == "C", "an unknown wristband goes to the county"
    assert by_id[world.no_area]["area_id"] is None


def test_list_paginates_with_a_total_count(client: TestClient, db: Conn, world: World) -> None:
    headers = bearer(db, Role.OPERATOR)
    pages = [list_incidents(client, headers, limit=3, offset=offset) for offset in (0, 3, 6, 9)]
    everything = world.newest_first()
    assert [ids(page) for page in pages] == [everything[0:3], everything[3:6], everything[6:], []]
    assert {page["count"] for page in pages} == {7}
    red = list_incidents(client, headers, severity="red", limit=1, offset=1)
    assert ids(red) == [world.fall_b]
    assert red["count"] == 3


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"state": "resolved"}, ["old"]),
        ({"state": "open"}, ["no_area", "unregistered", "cam_b", "cam_a1", "fall_b", "sos_a"]),
        ({"state": "acknowledged"}, []),
        ({"kind": "sos"}, ["sos_a"]),
        ({"kind": "fall"}, ["fall_b"]),
        ({"kind": "sos_unregistered"}, ["unregistered"]),
        ({"severity": "yellow"}, ["cam_b", "cam_a1", "old"]),
        ({"severity": "blue"}, ["no_area"]),
        ({"area": "A"}, ["cam_a1", "sos_a", "old"]),
        ({"area": "A1"}, ["cam_a1"]),
        ({"area": "M"}, ["cam_b", "cam_a1", "fall_b", "sos_a", "old"]),
        ({"area": "C"}, ["unregistered", "cam_b", "cam_a1", "fall_b", "sos_a", "old"]),
        ({"kind": "camera_offline", "area": "B"}, ["cam_b"]),
        ({"state": "open", "area": "A", "severity": "red"}, ["sos_a"]),
    ],
)
def test_list_filters(
    client: TestClient, db: Conn, world: World, params: dict[str, str], expected: list[str]
) -> None:
    body = list_incidents(client, bearer(db, Role.ADMIN), **params)
    assert ids(body) == [getattr(world, name) for name in expected]
    assert body["count"] == len(expected)


def test_list_filters_on_opened_at_in_any_offset(
    client: TestClient, db: Conn, world: World
) -> None:
    headers = bearer(db, Role.ADMIN)
    since = (T0 + timedelta(minutes=1)).astimezone(ZONE).isoformat()  # ...T10:01:00+08:00
    until = (T0 + timedelta(minutes=3)).isoformat()
    window = list_incidents(client, headers, since=since, until=until)
    assert ids(window) == [world.cam_a1, world.fall_b], "since is inclusive, until exclusive"
    assert window["count"] == 2
    assert ids(list_incidents(client, headers, since=since)) == world.newest_first()[:5]
    assert ids(list_incidents(client, headers, until=T0.isoformat())) == [world.old]


# Area scope ---------------------------------------------------------------------------------


def test_grid_worker_sees_only_incidents_of_own_grid_and_below(
    client: TestClient, db: Conn, world: World
) -> None:
    headers = bearer(db, Role.GRID_WORKER, (world.tree.grid_a,))
    body = list_incidents(client, headers)
    assert ids(body) == [world.cam_a1, world.sos_a, world.old]
    assert body["count"] == 3
    for incident in (world.sos_a, world.cam_a1, world.old):
        assert client.get(f"/api/v1/incidents/{incident}", headers=headers).status_code == 200


def test_out_of_scope_incidents_are_404_like_unknown_ones(
    client: TestClient, db: Conn, world: World
) -> None:
    headers = bearer(db, Role.GRID_WORKER, (world.tree.grid_a,))
    for incident in (world.fall_b, world.cam_b, world.unregistered, world.no_area, 999_999):
        response = client.get(f"/api/v1/incidents/{incident}", headers=headers)
        assert response.status_code == 404, incident
        assert response.json() == {"detail": f"incident '{incident}' not found"}
    for area in ("B", "M", "nowhere"):
        response = client.get("/api/v1/incidents", params={"area": area}, headers=headers)
        assert response.status_code == 404, area
        assert response.json() == {"detail": f"area {area!r} not found"}
    assert audit_rows(db) == [], "a refused read discloses nothing and reads nothing"


def test_an_incident_without_an_area_is_seen_only_by_unscoped_tokens(
    client: TestClient, db: Conn, world: World
) -> None:
    community = bearer(db, Role.OPERATOR, (world.tree.community,))
    county = bearer(db, Role.OPERATOR, (world.tree.county,))
    unscoped = bearer(db, Role.OPERATOR)
    assert world.no_area not in ids(list_incidents(client, community))
    assert ids(list_incidents(client, community)) == [
        world.cam_b, world.cam_a1, world.fall_b, world.sos_a, world.old,
    ]
    assert world.no_area not in ids(list_incidents(client, county))
    assert world.unregistered in ids(list_incidents(client, county))
    assert world.no_area in ids(list_incidents(client, unscoped))
    path = f"/api/v1/incidents/{world.no_area}"
    assert client.get(path, headers=county).status_code == 404
    assert client.get(path, headers=unscoped).status_code == 200


# Detail and timeline ---------------------------------------------------------------------


def test_detail_carries_the_timeline_in_time_order(
    client: TestClient, db: Conn, world: World
) -> None:
    response = client.get(f"/api/v1/incidents/{world.sos_a}", headers=bearer(db, Role.ADMIN))
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in LIST_FIELDS} == next(
        item for item in list_incidents(client, bearer(db, Role.ADMIN))["data"]
        if item["id"] == world.sos_a
    )
    timeline = body["timeline"]
    assert [(e["event"], e["actor"]) for e in timeline] == [
        ("opened", "W-A"),
        ("stored", "t"),
        ("step_started", "r1"),
        ("attempt_sent", "r1"),  # the console page, written as sent with its step (issue 13)
        ("attempt_failed", "r1"),
        ("retry_scheduled", None),  # a busy line is tried again after the backoff
        ("attempt_sent", "r1"),
        ("joined", "W-A"),
    ]
    stamps = [when(e["at"]) for e in timeline]
    assert stamps == [T0, T0] + [T0 + timedelta(seconds=5)] * 5 + [T0 + timedelta(seconds=10)]
    opened, stored, step, console, failed, retry, sms, joined = (e["detail"] for e in timeline)
    assert (retry["channel"], retry["try"]) == ("voice", 2)
    assert opened == {"kind": "sos", "severity": "red", "policy": "built-in"}
    assert (stored["msg_id"], stored["hub_id"], stored["device_id"]) == ("m1", "t", "W-A")
    assert step["target"] == "grid_worker"
    assert step["recipients"] == [{"id": "GW-A", "name": "Li Wei", "role": "grid_worker"}]
    assert (failed["channel"], failed["to"], failed["error"]) == ("voice", GRID_WORKER_PHONE, "busy")
    assert (sms["channel"], sms["to"]) == ("sms", GRID_WORKER_PHONE)
    assert sms["provider_id"].startswith("SM")
    assert console["channel"] == "console"
    assert (joined["msg_id"], joined["state"]) == ("m2", "open")


def test_detail_lists_every_attempt_stored_attempted_and_sent(
    client: TestClient, db: Conn, world: World
) -> None:
    body = client.get(f"/api/v1/incidents/{world.sos_a}", headers=bearer(db, Role.ADMIN)).json()
    attempt_ids = [
        row[0] for row in db.execute(
            "SELECT id FROM notification_attempts WHERE incident_id = %s ORDER BY id", (world.sos_a,)
        ).fetchall()
    ]
    at = T0 + timedelta(seconds=5)
    common = {"step": 0, "round": 0, "attempt": 1, "recipient_kind": "staff",
              "recipient_id": "GW-A", "to": GRID_WORKER_PHONE}
    attempts = [
        {**a, "created_at": when(a["created_at"]), "sent_at": when(a["sent_at"])}
        for a in body["attempts"]
    ]
    assert attempts == [
        {**common, "channel": "voice", "state": "failed", "provider_id": None, "error": "busy",
         "created_at": at, "sent_at": None},
        {**common, "channel": "sms", "state": "sent", "provider_id": f"SM{attempt_ids[1]}",
         "error": None, "created_at": at, "sent_at": at},
        {**common, "channel": "console", "state": "sent",
         "provider_id": f"console-{attempt_ids[2]}", "error": None, "created_at": at, "sent_at": at},
        # The busy call's retry: queued, due after the backoff, not yet sent.
        {**common, "attempt": 2, "channel": "voice", "state": "pending", "provider_id": None,
         "error": None, "created_at": at, "sent_at": None},
    ]
    fall = client.get(f"/api/v1/incidents/{world.fall_b}", headers=bearer(db, Role.ADMIN)).json()
    assert [e["event"] for e in fall["timeline"]] == ["opened", "stored"]
    assert fall["attempts"] == [], "stored, not yet attempted"


def test_list_and_detail_never_show_medical_notes(
    client: TestClient, db: Conn, world: World
) -> None:
    # Say a notifier recorded what it sent the platform, health data included.
    _add_event(db, world.sos_a, T0 + timedelta(seconds=20), "platform_alerted", "r1",
               {"channel": "webhook", "medical_notes": NOTES, "cap": {"medical_notes": NOTES}})
    headers = bearer(db, Role.ADMIN)
    listed = client.get("/api/v1/incidents", headers=headers)
    detail = client.get(f"/api/v1/incidents/{world.sos_a}", headers=headers)
    assert detail.status_code == 200
    for response in (listed, detail):
        assert "diabetic" not in response.text
        assert "medical_notes" not in response.text
    assert detail.json()["timeline"][-1] == {
        "at": "2026-11-24T02:00:20Z", "event": "platform_alerted", "actor": "r1", "actor_name": "r1",
        "detail": {"channel": "webhook", "cap": {}},
    }


# Privacy by role ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "shown"),
    [
        (Role.ADMIN, TECHNICIAN_PHONE),
        (Role.OPERATOR, TECHNICIAN_PHONE),
        (Role.PLATFORM, TECHNICIAN_PHONE),
        (Role.GRID_WORKER, "+1202****0177"),
        (Role.TECHNICIAN, "+1202****0177"),
    ],
)
def test_phone_numbers_are_masked_for_roles_that_do_not_need_them(
    client: TestClient, db: Conn, world: World, role: Role, shown: str
) -> None:
    response = client.get(f"/api/v1/incidents/{world.cam_a1}", headers=bearer(db, role))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [a["to"] for a in body["attempts"]] == [shown]
    assert [e["detail"].get("to") for e in body["timeline"]] == [None, shown]
    if shown != TECHNICIAN_PHONE:
        assert TECHNICIAN_PHONE not in response.text


def test_grid_worker_sees_the_sos_pages_masked(client: TestClient, db: Conn, world: World) -> None:
    headers = bearer(db, Role.GRID_WORKER, (world.tree.grid_a,))
    response = client.get(f"/api/v1/incidents/{world.sos_a}", headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert {a["to"] for a in body["attempts"]} == {"+1202****0100"}
    assert [e["detail"]["to"] for e in body["timeline"] if "to" in e["detail"]] == [
        "+1202****0100"
    ] * 4  # three attempts and the busy call's retry
    assert GRID_WORKER_PHONE not in response.text
    assert [a["recipient_id"] for a in body["attempts"]] == ["GW-A"] * 4


def test_a_technician_sees_camera_incidents_only(
    client: TestClient, db: Conn, world: World
) -> None:
    headers = bearer(db, Role.TECHNICIAN)
    body = list_incidents(client, headers)
    assert ids(body) == [world.cam_b, world.cam_a1]
    assert body["count"] == 2
    assert list_incidents(client, headers, kind="sos") == {"data": [], "count": 0}
    for incident in (world.sos_a, world.fall_b, world.unregistered, world.old, world.no_area):
        response = client.get(f"/api/v1/incidents/{incident}", headers=headers)
        assert response.status_code == 404, incident
        assert response.json() == {"detail": f"incident '{incident}' not found"}
    assert client.get(f"/api/v1/incidents/{world.cam_a1}", headers=headers).status_code == 200
    scoped = bearer(db, Role.TECHNICIAN, (world.tree.grid_a,))
    assert ids(list_incidents(client, scoped)) == [world.cam_a1]
    assert audit_rows(db) == []


# Audit -------------------------------------------------------------------------------------


def test_every_detail_read_naming_a_resident_is_audited(
    client: TestClient, db: Conn, world: World
) -> None:
    headers = bearer(db, Role.GRID_WORKER, (world.tree.grid_a,))
    (token_id,) = db.execute("SELECT id FROM api_tokens").fetchall()[0]
    for _ in range(2):
        assert client.get(f"/api/v1/incidents/{world.sos_a}", headers=headers).is_success
    assert client.get(f"/api/v1/incidents/{world.old}", headers=headers).is_success
    assert client.get(f"/api/v1/incidents/{world.cam_a1}", headers=headers).is_success  # no resident
    client.get(f"/api/v1/incidents/{world.fall_b}", headers=headers)  # out of scope
    client.get("/api/v1/incidents/999999", headers=headers)
    sos = (token_id, "grid_worker", "read_incident", f"incident:{world.sos_a}", {"resident_id": "R-A"})
    old = (token_id, "grid_worker", "read_incident", f"incident:{world.old}", {"resident_id": "R-A"})
    assert audit_rows(db) == [sos, sos, old]
    at = db.execute("SELECT at FROM audit_log").fetchall()
    assert all(abs(row[0] - datetime.now(UTC)) < timedelta(minutes=1) for row in at)


def test_a_detail_read_fails_if_its_audit_row_cannot_be_written(
    app: FastAPI, db: Conn, world: World
) -> None:
    headers = bearer(db, Role.OPERATOR)
    db.execute("ALTER TABLE audit_log ADD CONSTRAINT no_more_audit CHECK (false) NOT VALID")
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get(f"/api/v1/incidents/{world.sos_a}", headers=headers)
        assert client.get(f"/api/v1/incidents/{world.cam_a1}", headers=headers).status_code == 200
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}


# Authentication and validation --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/incidents", "/api/v1/incidents/1"])
def test_401_without_a_valid_token(client: TestClient, world: World, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "detail": "a bearer token is required (Authorization: Bearer <token>)"
    }
    bad = client.get(path, headers={"Authorization": "Bearer shh_not-a-real-token"})
    assert bad.status_code == 401
    assert bad.json() == {"detail": "the bearer token is unknown, expired or revoked"}


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ({"state": "closed"}, "state", "'acknowledged'"),
        ({"kind": "burglary"}, "kind", "'camera_offline'"),
        ({"severity": "purple"}, "severity", "'yellow'"),
        ({"since": "2026-11-24T08:00:00"}, "since", "timezone"),
        ({"until": "2026-11-24T08:00:00"}, "until", "timezone"),
        ({"since": "yesterday"}, "since", "RFC 3339"),
        ({"until": "0.5"}, "until", "RFC 3339"),  # not Unix seconds
        ({"stat": "open"}, "stat", "not one this route takes"),  # a typo never widens the answer
        ({"limit": 0}, "limit", "greater than or equal to 1"),
        # Past PostgreSQL's bigint this was a 500 (the OpenAPI fuzz found it on /tasks).
        ({"offset": 13357955320705588396032}, "offset", "less than or equal to 1000000000"),
    ],
)
def test_bad_query_is_422_naming_the_field(
    client: TestClient, db: Conn, world: World, params: dict[str, Any], field: str, says: str
) -> None:
    response = client.get("/api/v1/incidents", params=params, headers=bearer(db, Role.ADMIN))
    assert response.status_code == 422
    body = response.json()
    assert body["detail"].startswith(f"invalid request: query parameter '{field}'")
    assert says in body["detail"]
    if "errors" in body:
        assert body["errors"][0]["loc"] == ["query", field]


def test_a_non_numeric_incident_id_is_422(client: TestClient, db: Conn, world: World) -> None:
    response = client.get("/api/v1/incidents/SOS-1", headers=bearer(db, Role.ADMIN))
    assert response.status_code == 422
    assert response.json()["detail"].startswith("invalid request: path parameter 'incident_id': ")
