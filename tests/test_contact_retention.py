"""Retention of who was called and told what, and of people removed from the registry
(hub/retention.py), on a real PostgreSQL, the clock driven, never slept:
SHOUHU_CONTACT_DAYS after an incident closed its attempts keep who, how, when and what
came of each call with the number masked and the text cleared, its timeline keeps ids
and states without names, numbers or notes, and the console's story of it still reads;
a closed task's note is cleared after the same days; a resident, guardian or staff
member deactivated SHOUHU_REGISTRY_DAYS ago is anonymised unless an open incident still
needs them, and filled in again when the registry lists them again."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from alerts.aliyun_receipts import ReceiptKind, handle
from alerts.answers import paged_for
from alerts.receipts import Receipt, ReceiptOutcome
from api.consoles import queries
from api.consoles.i18n import Lang
from api.consoles.story import story
from devices.registry import load_registry
from devices.registry_file import parse_registry
from hub.retention import Periods, prune
from hub.upkeep import Upkeep
from shouhu.db import Conn
from shouhu.settings import DEFAULT_CONTACT_DAYS, DEFAULT_REGISTRY_DAYS, Settings
from tests.support.builders import add_incident, add_resident, add_small_county, add_task
from tests.support.escalation import Clock

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
LOCK = 0x7E57_0022  # not the production key: the suite may share a cluster
TICK = timedelta(microseconds=1)
DAYS = timedelta(days=DEFAULT_CONTACT_DAYS)
PHONE, MASKED = "+8613800001234", "+86*******1234"
BODY = "【守护】紧急求助：张秀英（幸福里3号楼2单元）按下了SOS，请立即回拨13800001234。"
NOTE = "张秀英摔倒，女儿张丽已送医"


@pytest.fixture
def conn(database_url: str) -> Iterator[Conn]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO staff (id, name, role, phone) VALUES ('gw', '董思远', 'grid_worker', %s)", (PHONE,)
        )
        add_resident(connection, "r1", grid=add_small_county(connection).grid_a, name="张秀英")
        yield connection


def called(conn: Conn, code: str, closed_at: datetime | None, state: str = "resolved") -> int:
    """An SOS paged to the grid worker by voice (answered, 1 pressed), taken and then closed at ``closed_at``."""
    opened = (closed_at or NOW) - timedelta(hours=1)
    incident = add_incident(conn, code, state=state, resident="r1", opened_at=opened,
                            resolved_at=closed_at if state == "resolved" else None,
                            outcome="visited_fine" if state == "resolved" else None)
    if state == "cancelled":
        conn.execute("UPDATE incidents SET cancelled_at = %s WHERE id = %s", (closed_at, incident))
    conn.execute("UPDATE incidents SET resolution_note = %s WHERE id = %s", (NOTE, incident))
    row = conn.execute(
        """
        INSERT INTO notification_attempts (incident_id, step, recipient_kind, recipient_id, address, channel, state,
            provider, provider_id, body, error, created_at, sent_at, updated_at)
        VALUES (%s, 0, 'staff', 'gw', %s, 'voice', 'answered', 'twilio', %s, %s, %s, %s, %s, %s) RETURNING id
        """,
        (incident, PHONE, f"CA{incident:032d}", BODY, f"twilio: busy at {PHONE}", opened, opened,
         opened + timedelta(minutes=1)),
    ).fetchone()
    assert row is not None
    for event, actor, detail in timeline(int(row[0])):
        conn.execute(
            "INSERT INTO incident_events (incident_id, at, event, actor, detail) VALUES (%s, %s, %s, %s, %s)",
            (incident, opened, event, actor, Jsonb(detail)),
        )
    return incident


def timeline(attempt: int) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [
        ("step_started", None, {"step": 0, "round": 0, "target": "grid_worker",
                                "recipients": [{"id": "gw", "name": "董思远", "role": "grid_worker"}]}),
        ("retry_scheduled", None, {"attempt_id": attempt, "channel": "voice", "to": PHONE, "try": 2, "in_s": 30}),
        ("provider_fallback", None, {"attempt_id": attempt, "to": PHONE, "failed": "twilio",
                                     "error": f"twilio: 21211 invalid To {PHONE}", "to_provider": "aliyun"}),
        ("keypress", "staff:gw", {"attempt_id": attempt, "provider_id": "CA1", "digit": "1"}),
        ("acknowledge_ignored", "staff:gw", {"via": "voice", "taken_by": "董思远（网格员）"}),
        ("resolved", "staff:gw", {"name": "董思远", "role": "grid_worker", "outcome": "visited_fine", "note": NOTE}),
    ]


def stripped(attempt: int) -> list[dict[str, Any]]:
    return [
        {"step": 0, "round": 0, "target": "grid_worker", "recipients": [{"id": "gw", "role": "grid_worker"}]},
        {"attempt_id": attempt, "channel": "voice", "try": 2, "in_s": 30},
        {"attempt_id": attempt, "failed": "twilio", "error": "twilio: 21211 invalid To +86****1234",
         "to_provider": "aliyun"},
        {"attempt_id": attempt, "provider_id": "CA1", "digit": "1"},
        {"via": "voice"},
        {"role": "grid_worker", "outcome": "visited_fine"},
    ]


def contacts(conn: Conn, incident: int) -> tuple[Any, ...]:
    attempt = conn.execute(
        "SELECT id, recipient_kind, recipient_id, channel, state, provider, provider_id, created_at, sent_at,"
        " updated_at, address, body, error FROM notification_attempts WHERE incident_id = %s",
        (incident,),
    ).fetchone()
    details = [d for (d,) in conn.execute(
        "SELECT detail FROM incident_events WHERE incident_id = %s ORDER BY id", (incident,)
    ).fetchall()]
    note = conn.execute("SELECT outcome, resolution_note FROM incidents WHERE id = %s", (incident,)).fetchone()
    return attempt, details, note


def test_closed_incidents_keep_who_was_called_when_with_the_number_masked_and_no_text(
    conn: Conn, database_url: str
) -> None:
    old = called(conn, "OLD", NOW - DAYS - TICK)
    cancelled = called(conn, "CANCELLED", NOW - DAYS - timedelta(days=3), state="cancelled")
    kept = {
        code: called(conn, code, closed, state)
        for code, closed, state in (
            ("EXACT", NOW - DAYS, "resolved"),
            ("YOUNG", NOW - timedelta(days=2), "resolved"),
            ("STILL-OPEN", None, "unreached"),  # opened a year ago, still being worked
        )
    }
    conn.execute("UPDATE incidents SET opened_at = opened_at - interval '2 years' WHERE code = 'STILL-OPEN'")
    before = {code: contacts(conn, incident) for code, incident in kept.items()}
    was = {incident: contacts(conn, incident)[0] for incident in (old, cancelled)}
    assert paged_for(conn, "OLD", PHONE) is not None
    events = conn.execute("SELECT count(*) FROM live_events").fetchone()

    pruned = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK)
    assert pruned is not None
    assert (pruned.contacts, pruned.by_table()["incident_contacts"]) == (2, 2)
    for incident in (old, cancelled):
        attempt, details, note = contacts(conn, incident)
        # Who, how, with which provider id, when, and how it ended: as they were.
        assert attempt[:10] == was[incident][:10]
        assert attempt[10:] == (MASKED, None, "twilio: busy at +86****1234")
        assert details == stripped(attempt[0])
        assert note[1] == ""
    assert contacts(conn, old)[2] == ("visited_fine", "")
    assert {code: contacts(conn, incident) for code, incident in kept.items()} == {
        code: before[code] for code in kept
    }
    assert conn.execute("SELECT count(*) FROM live_events").fetchone() == events  # nothing a console must hear of

    # An SMS reply naming the old incident no longer finds whom it paged: only help comes back.
    assert paged_for(conn, "OLD", PHONE) is None
    assert paged_for(conn, "YOUNG", PHONE) is not None
    # The console's story still reads: the worker named from the registry, no number, name or note from the rows.
    with psycopg.connect(database_url, row_factory=dict_row) as reader:
        lines = story(Lang.ZH, queries.timeline(reader, old), queries.attempts(reader, old), {})
    text = " ".join(f"{line.headline} {line.result}" for line in lines)
    assert "董思远" in text
    assert not [word for word in ("13800001234", "张秀英", "张丽") if word in text]
    # Masked already: a second pass finds nothing, and changes nothing.
    masked = contacts(conn, old)
    again = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK)
    assert again is not None
    assert again.contacts == 0
    assert contacts(conn, old) == masked
    # An hour on, the one exactly as old as the limit has passed it.
    later = prune(conn, NOW + timedelta(hours=1), dead_letter_days=14, lock_key=LOCK)
    assert later is not None
    assert later.contacts == 1
    assert contacts(conn, kept["EXACT"])[0][10] == MASKED


def test_a_late_aliyun_receipt_naming_the_real_number_is_refused_once_the_number_is_masked(conn: Conn) -> None:
    def texted(code: str, closed_at: datetime) -> int:
        incident = add_incident(conn, code, resident="r1", opened_at=closed_at - timedelta(hours=1),
                                resolved_at=closed_at, outcome="visited_fine")
        row = conn.execute(
            "INSERT INTO notification_attempts (incident_id, step, recipient_kind, recipient_id, address, channel,"
            " state, provider, provider_id, body, created_at, sent_at)"
            " VALUES (%s, 0, 'staff', 'gw', %s, 'sms', 'sent', 'aliyun', %s, %s, %s, %s) RETURNING id",
            (incident, PHONE, f"9050^{code}", BODY, closed_at, closed_at),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def receipt(attempt: int, code: str) -> ReceiptOutcome:
        body = {"phone_number": "13800001234", "success": True, "biz_id": f"9050^{code}", "out_id": str(attempt)}
        return handle(conn, Receipt(attempt, "aliyun", ReceiptKind.SMS_REPORT, body, 0), NOW, resolve_timeout_s=1800)

    old, young = texted("OLD", NOW - DAYS - TICK), texted("YOUNG", NOW - timedelta(days=1))
    pruned = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK)
    assert pruned is not None
    assert pruned.contacts == 1
    assert receipt(old, "OLD") is ReceiptOutcome.REFUSED
    assert conn.execute("SELECT state FROM notification_attempts WHERE id = %s", (old,)).fetchone() == ("sent",)
    refused = conn.execute("SELECT detail->>'reason' FROM audit_log WHERE action = 'receipt_refused'").fetchall()
    assert refused == [("not the number the attempt was sent to",)]
    assert receipt(young, "YOUNG") is ReceiptOutcome.SETTLED  # the same receipt, its number not yet masked


def test_contacts_are_masked_oldest_first_in_batches(conn: Conn) -> None:
    ids = [called(conn, f"B{n}", NOW - DAYS - timedelta(days=n + 1)) for n in range(3)]
    # 100 rows a batch: one incident (hub.retention.ROWS_PER_INCIDENT), then the time is up.
    first = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK, batch_rows=100, budget_s=0)
    assert first is not None
    assert (first.contacts, first.more) == (1, True)
    assert [contacts(conn, i)[0][10] for i in ids] == [PHONE, PHONE, MASKED]
    rest = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK, batch_rows=100)
    assert rest is not None
    assert (rest.contacts, rest.more) == (2, False)
    assert {contacts(conn, i)[0][10] for i in ids} == {MASKED}


def test_closed_tasks_lose_their_note_as_the_upkeeps_clock_passes_their_days(conn: Conn, database_url: str) -> None:
    clock = Clock(datetime.now(UTC))
    start = clock()
    tasks = {}
    for code, closed in (("T-OLD", start - timedelta(days=181)), ("T-YOUNG", start - timedelta(days=179)),
                         ("T-OPEN", None)):
        incident = called(conn, code, closed, "resolved" if closed else "open")
        tasks[code] = add_task(conn, incident, kind="visit", area="A", resident="r1", reason="sos_follow_up",
                               opened_at=start - timedelta(days=200), due_at=start - timedelta(days=199),
                               closed_at=closed, outcome="resident_fine" if closed else None)
        conn.execute("UPDATE care_tasks SET note = %s WHERE id = %s", (NOTE, tasks[code]))

    def task(code: str) -> tuple[Any, ...]:
        row = conn.execute("SELECT note, outcome, closed_at, closed_by_name FROM care_tasks WHERE id = %s",
                           (tasks[code],)).fetchone()
        assert row is not None
        return tuple(row)

    def masked() -> dict[str, bool]:
        rows = conn.execute("SELECT code, contacts_masked_at IS NOT NULL FROM incidents ORDER BY code").fetchall()
        return {code: bool(done) for code, done in rows}

    upkeep = Upkeep(database_url, "hub-a", retention_days=90, clock=clock, periods=Periods(14, contact_days=180))
    try:
        upkeep.tick()
        assert task("T-OLD") == ("", "resident_fine", start - timedelta(days=181), "董思远（网格员）")
        assert task("T-YOUNG")[0] == NOTE
        assert task("T-OPEN")[0] == NOTE
        assert masked() == {"T-OLD": True, "T-OPEN": False, "T-YOUNG": False}
        clock.advance(timedelta(days=2).total_seconds())
        upkeep.tick()
        assert (task("T-YOUNG")[0], task("T-OPEN")[0]) == ("", NOTE)
        assert masked() == {"T-OLD": True, "T-OPEN": False, "T-YOUNG": True}
    finally:
        upkeep.close()


def test_contacts_are_kept_a_year_by_default_and_never_under_six_months() -> None:
    assert Settings().contact_days == DEFAULT_CONTACT_DAYS == 365
    assert Settings(contact_days=180).contact_days == 180
    with pytest.raises(ValidationError, match="contact_days"):
        Settings(contact_days=179)
    assert Settings().registry_days == DEFAULT_REGISTRY_DAYS == 365
    with pytest.raises(ValidationError, match="registry_days"):
        Settings(registry_days=0)


COUNTY: dict[str, Any] = {
    "areas": [
        {"id": "county", "name": "守护县", "level": "county"},
        {"id": "t1", "name": "东关镇", "level": "township", "parent": "county"},
        {"id": "c1", "name": "东关村", "level": "community", "parent": "t1"},
        {"id": "g1", "name": "一网格", "level": "grid", "parent": "c1"},
    ],
    "staff": [
        {"id": f"gw{n}", "name": f"网格员{n}", "role": "grid_worker", "phone": f"+8613900000{n:03d}", "areas": ["g1"]}
        for n in (1, 2, 3)
    ],
    "rosters": [{"staff": "gw1", "area": "g1", "start": "00:00", "end": "00:00"}],
    "residents": [
        {"id": f"r{n}", "name": f"老人{n}", "grid": "g1", "address": f"东关村{n}组", "phone": f"+8613700000{n:03d}",
         "medical_notes": "高血压", "lat": 38.7, "lon": 111.6,
         "guardians": [{"id": f"r{n}-g", "name": f"子女{n}", "phone": f"+8613600000{n:03d}", "relation": "女儿"}]}
        for n in (1, 2, 3)
    ],
    "devices": [{"id": f"wb-{n}", "kind": "wristband", "resident": f"r{n}"} for n in (1, 2, 3)],
    "policies": [{"id": "sos", "kind": "sos", "steps": [{"target": "grid_worker", "channels": ["voice"]}]}],
}


def people(conn: Conn) -> dict[str, tuple[Any, ...]]:
    rows = conn.execute(
        "SELECT id, active, name, address, phone, medical_notes, lat, lon, grid_id FROM residents"
        " UNION ALL SELECT id, active, name, relation, phone, '', NULL, NULL, resident_id FROM guardians"
        " UNION ALL SELECT id, active, name, '', phone, '', NULL, NULL, role FROM staff"
    ).fetchall()
    return {row[0]: tuple(row[1:]) for row in rows}


def test_people_removed_from_the_registry_are_anonymised_after_their_days_unless_still_needed(
    database_url: str, tmp_path: Path
) -> None:
    def load(data: dict[str, Any]) -> bool:
        path = tmp_path / "registry.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        return load_registry(db, parse_registry(path)).changed

    kept = {**COUNTY, "staff": COUNTY["staff"][:1], "residents": COUNTY["residents"][2:],
            "devices": COUNTY["devices"][2:]}
    with psycopg.connect(database_url, autocommit=True) as db:
        load(COUNTY)
        full = people(db)
        load(kept)  # r1, r2, their guardians, gw2 and gw3 removed: deactivated now
        # r2 is still in an incident gw2 took: both wait, and r2's guardian with them.
        incident = add_incident(db, "K1", state="acknowledged", resident="r2", opened_at=datetime.now(UTC))
        db.execute("UPDATE incidents SET acknowledged_by = 'staff:gw2' WHERE id = %s", (incident,))
        removed = people(db)
        days = timedelta(days=DEFAULT_REGISTRY_DAYS)

        early = prune(db, datetime.now(UTC) + days - timedelta(hours=1), dead_letter_days=14, lock_key=LOCK)
        assert early is not None
        assert early.people == 0
        assert people(db) == removed
        pruned = prune(db, datetime.now(UTC) + days + timedelta(hours=1), dead_letter_days=14, lock_key=LOCK)
        assert pruned is not None
        assert (pruned.people, pruned.by_table()["removed_people"]) == (3, 3)
        now = people(db)
        # Cleared but for the id, the grid (the resident of a guardian, a staff member's role).
        assert now["r1"] == (False, "", "", None, "", None, None, "g1")
        assert now["r1-g"] == (False, "", "", "", "", None, None, "r1")
        assert now["gw3"] == (False, "", "", "", "", None, None, "grid_worker")
        assert {k: v for k, v in now.items() if k not in ("r1", "r1-g", "gw3")} == {
            k: v for k, v in removed.items() if k not in ("r1", "r1-g", "gw3")
        }
        db.execute("UPDATE incidents SET state = 'resolved', resolved_at = now() WHERE id = %s", (incident,))
        closed = prune(db, datetime.now(UTC) + days + timedelta(hours=2), dead_letter_days=14, lock_key=LOCK)
        assert closed is not None
        assert closed.people == 3
        assert {person for person, row in people(db).items() if row[1] == ""} == {
            "r1", "r1-g", "r2", "r2-g", "gw2", "gw3"
        }
        # Listed again, they are as the file has them; a second load changes nothing.
        assert load(COUNTY)
        assert people(db) == full
        assert db.execute("SELECT count(*) FROM residents WHERE anonymised_at IS NOT NULL").fetchone() == (0,)
        assert not load(COUNTY)
