"""Retention of personal data by the hubs' hourly pass (hub/retention.py) on a real
PostgreSQL, with the clock driven, never slept: the audit log after SHOUHU_AUDIT_DAYS,
closed incidents' locations after SHOUHU_LOCATION_DAYS (the incident itself stays),
sessions, sign-in codes and attempts after SHOUHU_SESSION_DAYS; old rows go, recent
ones stay, in batches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from pydantic import ValidationError

from hub.retention import Periods, prune
from hub.upkeep import RETENTION_INTERVAL, Upkeep
from shouhu.db import Conn
from shouhu.settings import DEFAULT_AUDIT_DAYS, DEFAULT_LOCATION_DAYS, DEFAULT_SESSION_DAYS, Settings
from tests.support.builders import add_incident
from tests.support.escalation import Clock

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
LOCK = 0x7E57_0018  # not the production key: the suite may share a cluster
TICK = timedelta(microseconds=1)


@pytest.fixture
def conn(database_url: str) -> Iterator[Conn]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO staff (id, name, role, phone) VALUES ('op', '值班员', 'operator', '+8613800000000')"
        )
        yield connection


def audit_at(conn: Conn, at: datetime) -> None:
    conn.execute(
        "INSERT INTO audit_log (at, role, action, subject, actor, actor_name)"
        " VALUES (%s, 'operator', 'read_resident', 'resident:r1', 'staff:op', '值班员')",
        (at,),
    )


def audit_ages(conn: Conn, now: datetime) -> list[timedelta]:
    return [now - at for (at,) in conn.execute("SELECT at FROM audit_log ORDER BY at").fetchall()]


def located(conn: Conn, code: str, opened_at: datetime, state: str = "resolved") -> None:
    add_incident(conn, code, state=state, opened_at=opened_at, outcome="visited_fine" if state == "resolved" else None,
                 resolved_at=opened_at + timedelta(hours=1) if state == "resolved" else None, lat=38.7, lon=111.6)


def locations(conn: Conn) -> dict[str, tuple[float | None, float | None]]:
    return {code: (lat, lon) for code, lat, lon in conn.execute("SELECT code, lat, lon FROM incidents").fetchall()}


def session_ended(conn: Conn, ended: datetime) -> None:
    """A console session signed in 12 hours before it ended (by logout or expiry)."""
    conn.execute(
        "INSERT INTO api_sessions (session_hash, staff_id, method, created_at, expires_at)"
        " VALUES (%s, 'op', 'code', %s, %s)",
        (os.urandom(32), ended - timedelta(hours=12), ended),
    )


def sign_in_at(conn: Conn, at: datetime) -> None:
    """A code asked for at ``at`` (valid 5 minutes) and the attempt that asked."""
    conn.execute(
        "INSERT INTO sign_in_codes (staff_id, code_salt, code_hash, created_at, expires_at)"
        " VALUES ('op', '\\x00', '\\x00', %s, %s)",
        (at - timedelta(minutes=5), at),
    )
    conn.execute(
        "INSERT INTO sign_in_attempts (at, phone, staff_id, ip, kind, ok)"
        " VALUES (%s, '+8613800000000', 'op', '203.0.113.9', 'code_request', true)",
        (at,),
    )


def count(conn: Conn, table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def test_the_audit_log_keeps_its_days_and_no_more(conn: Conn) -> None:
    days = timedelta(days=200)
    for age in (days + TICK, days, days - TICK, timedelta(days=1)):
        audit_at(conn, NOW - age)
    pruned = prune(conn, NOW, dead_letter_days=14, audit_days=200, lock_key=LOCK)
    assert pruned is not None
    assert pruned.audit == 1
    assert audit_ages(conn, NOW) == [days, days - TICK, timedelta(days=1)]


def test_closed_incidents_lose_their_location_and_keep_everything_else(conn: Conn) -> None:
    days = timedelta(days=30)
    located(conn, "OLD", NOW - days - TICK)
    located(conn, "CANCELLED", NOW - days - timedelta(days=5), state="cancelled")
    located(conn, "EXACT", NOW - days)
    located(conn, "YOUNG", NOW - timedelta(days=2))
    located(conn, "STILL-OPEN", NOW - timedelta(days=60), state="unreached")
    events = count(conn, "live_events")
    pruned = prune(conn, NOW, dead_letter_days=14, location_days=30, lock_key=LOCK)
    assert pruned is not None
    assert pruned.locations == 2
    assert locations(conn) == {
        "OLD": (None, None),
        "CANCELLED": (None, None),
        "EXACT": (38.7, 111.6),
        "YOUNG": (38.7, 111.6),
        "STILL-OPEN": (38.7, 111.6),  # an open incident's responders may still need it
    }
    row = conn.execute("SELECT state, outcome, opened_at FROM incidents WHERE code = 'OLD'").fetchone()
    assert row == ("resolved", "visited_fine", NOW - days - TICK)
    assert count(conn, "live_events") == events  # no change a console must hear of


def test_locations_are_cleared_in_batches(conn: Conn) -> None:
    for n in range(5):
        located(conn, f"L{n}", NOW - timedelta(days=100 + n))
    first = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK, batch_rows=2, budget_s=0)
    assert first is not None
    assert (first.locations, first.more) == (2, True)
    # The oldest go first.
    assert [c for c, (lat, _) in sorted(locations(conn).items()) if lat is None] == ["L3", "L4"]
    rest = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK, batch_rows=2)
    assert rest is not None
    assert (rest.locations, rest.more) == (3, False)
    assert set(locations(conn).values()) == {(None, None)}


def test_sessions_codes_and_attempts_go_after_their_days(conn: Conn) -> None:
    days = timedelta(days=DEFAULT_SESSION_DAYS)
    session_ended(conn, NOW - days - TICK)
    session_ended(conn, NOW - days)
    session_ended(conn, NOW + timedelta(hours=6))  # signed in now
    conn.execute(  # logged out 8 days ago, though it would have lasted longer
        "INSERT INTO api_sessions (session_hash, staff_id, method, created_at, expires_at, ended_at)"
        " VALUES ('\\x01', 'op', 'password', %s, %s, %s)",
        (NOW - timedelta(days=8, hours=1), NOW + timedelta(days=30), NOW - timedelta(days=8)),
    )
    sign_in_at(conn, NOW - days - TICK)
    sign_in_at(conn, NOW - timedelta(days=1))
    pruned = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK)
    assert pruned is not None
    assert pruned.sessions == 4  # two sessions, a code, an attempt
    assert count(conn, "api_sessions") == 2
    assert [NOW - at for (at,) in conn.execute("SELECT at FROM sign_in_attempts").fetchall()] == [timedelta(days=1)]
    assert count(conn, "sign_in_codes") == 1


def test_the_hubs_upkeep_applies_every_period_as_its_clock_moves(conn: Conn, database_url: str) -> None:
    clock = Clock(datetime.now(UTC))
    start = clock()
    audit_at(conn, start - timedelta(days=181))
    audit_at(conn, start - timedelta(days=179))
    located(conn, "A", start - timedelta(days=11))
    located(conn, "B", start - timedelta(days=9))
    session_ended(conn, start - timedelta(days=4))
    session_ended(conn, start - timedelta(days=2))
    sign_in_at(conn, start - timedelta(days=4))
    upkeep = Upkeep(database_url, "hub-a", retention_days=90, clock=clock,
                    periods=Periods(14, audit_days=180, location_days=10, session_days=3))
    try:
        upkeep.tick()  # the first tick prunes
        assert audit_ages(conn, clock()) == [timedelta(days=179)]
        assert locations(conn) == {"A": (None, None), "B": (38.7, 111.6)}
        assert count(conn, "api_sessions") == 1
        assert (count(conn, "sign_in_codes"), count(conn, "sign_in_attempts")) == (0, 0)
        # Two days on, within the hour of a pass: nothing; at the next pass the rest is past its days.
        clock.advance(timedelta(days=2).total_seconds())
        upkeep.tick()
        assert count(conn, "audit_log") == 0
        assert locations(conn) == {"A": (None, None), "B": (None, None)}
        assert count(conn, "api_sessions") == 0
        audit_at(conn, clock() - timedelta(days=181))
        clock.advance(RETENTION_INTERVAL.total_seconds() - 1)
        upkeep.tick()
        assert count(conn, "audit_log") == 1  # within the hour: not again
        clock.advance(1)
        upkeep.tick()
        assert count(conn, "audit_log") == 0
    finally:
        upkeep.close()


def test_the_periods_default_and_the_audit_log_keeps_at_least_six_months() -> None:
    settings = Settings()
    assert (settings.audit_days, settings.location_days, settings.session_days) == (
        DEFAULT_AUDIT_DAYS, DEFAULT_LOCATION_DAYS, DEFAULT_SESSION_DAYS,
    )
    assert Settings(audit_days=180).audit_days == 180
    with pytest.raises(ValidationError, match="audit_days"):
        Settings(audit_days=179)
    with pytest.raises(ValidationError, match="location_days"):
        Settings(location_days=0)
