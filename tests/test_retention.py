"""Retention of the message ledger (7 days) and dead letters (SHOUHU_DEAD_LETTER_DAYS)
against a real PostgreSQL: the boundaries, batches, the leader lock, the hourly pass of
the hub's upkeep on its injected clock, and what pruning means for a redelivered SOS."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from alerts.incidents import Alarm, AlarmResult, record_alarm
from devices.kinds import IncidentKind
from hub.retention import LEDGER_KEEP, RETENTION_LOCK_KEY, Periods, prune
from hub.upkeep import RETENTION_INTERVAL, Upkeep
from shouhu.db import Conn
from tests.support.escalation import Clock

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
LOCK = 0x7E57_0006  # not the production key: the suite may share a cluster
TICK = timedelta(microseconds=1)  # timestamptz's resolution


@pytest.fixture
def conn(any_database_url: str) -> Iterator[Conn]:
    """Autocommit, as the hub's upkeep connection; on each PostgreSQL version here."""
    with psycopg.connect(any_database_url, autocommit=True) as connection:
        yield connection


def add_keys(conn: Conn, at: datetime, count: int = 1, prefix: str = "m") -> None:
    conn.execute(
        "INSERT INTO message_ledger (device_id, msg_id, payload_hash, channel, received_at)"
        " SELECT 'wb-x', %s || '-' || g, '\\x00', 'telemetry', %s FROM generate_series(1, %s) g",
        (f"{prefix}-{at.isoformat()}", at, count),
    )


def add_dead_letters(conn: Conn, at: datetime, count: int = 1) -> None:
    conn.execute(
        "INSERT INTO dead_letters (received_at, hub_id, topic, payload, reason)"
        " SELECT %s, 'hub', 'shouhu/v1/wristband/wb-x/telemetry', '\\x7b7d', 'schema' FROM generate_series(1, %s)",
        (at, count),
    )


def ages(conn: Conn, table: str, now: datetime) -> list[timedelta]:
    return [now - r[0] for r in conn.execute(f"SELECT received_at FROM {table} ORDER BY received_at").fetchall()]


def count(conn: Conn, table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def test_ledger_keys_go_after_seven_days_and_dead_letters_after_their_days(conn: Conn) -> None:
    week, fortnight = LEDGER_KEEP, timedelta(days=14)
    for age in (week + TICK, week, week - TICK, timedelta(days=1)):
        add_keys(conn, NOW - age)
    for age in (fortnight + TICK, fortnight, fortnight - TICK, week + TICK):
        add_dead_letters(conn, NOW - age)
    pruned = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK)
    assert pruned is not None
    assert (pruned.ledger, pruned.dead_letters, pruned.more) == (1, 1, False)
    # Exactly as old as the limit stays: a key is kept at least 7 days (DESIGN.md).
    assert ages(conn, "message_ledger", NOW) == [week, week - TICK, timedelta(days=1)]
    assert ages(conn, "dead_letters", NOW) == [fortnight, fortnight - TICK, week + TICK]


def test_dead_letter_days_is_honoured_and_the_ledger_keeps_its_week(conn: Conn) -> None:
    add_dead_letters(conn, NOW - timedelta(days=3) - TICK)
    add_dead_letters(conn, NOW - timedelta(days=3))
    add_keys(conn, NOW - timedelta(days=3) - TICK)
    pruned = prune(conn, NOW, dead_letter_days=3, lock_key=LOCK)
    assert pruned is not None
    assert (pruned.ledger, pruned.dead_letters) == (0, 1)
    assert ages(conn, "dead_letters", NOW) == [timedelta(days=3)]
    assert count(conn, "message_ledger") == 1


def test_more_rows_than_a_batch_go_in_batches_each_committed(conn: Conn, any_database_url: str) -> None:
    old = NOW - timedelta(days=30)
    add_keys(conn, old, 250)
    add_dead_letters(conn, old, 120)
    add_keys(conn, NOW, 5, prefix="young")
    # No time budget: one batch of each job (nine: ledger, dead letters, audit, locations,
    # sessions, sign-in, incident contacts, task notes, removed people), then the pass stops and says there is more.
    first = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK, batch_rows=100, budget_s=0)
    assert first is not None
    assert (first.ledger, first.dead_letters, first.batches, first.more) == (100, 100, 9, True)
    # Each batch committed on its own: another session sees them gone mid-pass.
    with psycopg.connect(any_database_url) as other:
        assert (count(other, "message_ledger"), count(other, "dead_letters")) == (155, 20)
    rest = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK, batch_rows=100)
    assert rest is not None
    # A round of nine: ledger 100, dead letters 20 (short: the last), the others none;
    # then the ledger alone, 50 (short: the last).
    assert (rest.ledger, rest.dead_letters, rest.batches, rest.more) == (150, 20, 10, False)
    assert count(conn, "message_ledger") == 5
    assert count(conn, "dead_letters") == 0


def test_only_the_lock_holder_prunes(conn: Conn, any_database_url: str) -> None:
    add_keys(conn, NOW - timedelta(days=8))
    add_dead_letters(conn, NOW - timedelta(days=15))
    with psycopg.connect(any_database_url, autocommit=True) as leader:
        leader.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
        assert prune(conn, NOW, dead_letter_days=14, lock_key=LOCK) is None
        assert (count(conn, "message_ledger"), count(conn, "dead_letters")) == (1, 1)
        leader.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
    pruned = prune(conn, NOW, dead_letter_days=14, lock_key=LOCK)
    assert pruned is not None
    assert (pruned.ledger, pruned.dead_letters) == (1, 1)
    # The pass let go of its session lock: the next leader can take it.
    assert conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK,)).fetchone() == (True,)
    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))


def test_prune_refuses_a_connection_that_would_hold_one_long_transaction(database_url: str) -> None:
    with psycopg.connect(database_url) as conn, pytest.raises(ValueError, match="autocommit"):
        prune(conn, NOW, dead_letter_days=14, lock_key=LOCK)


def test_the_hubs_upkeep_prunes_hourly_on_its_clock_and_a_second_hub_waits(conn: Conn, any_database_url: str) -> None:
    clock = Clock(datetime.now(UTC))
    upkeep = Upkeep(any_database_url, "hub-a", retention_days=90, clock=clock, periods=Periods(3))
    try:
        add_keys(conn, clock() - timedelta(days=8))
        add_dead_letters(conn, clock() - timedelta(days=4))
        upkeep.tick()  # the first tick prunes
        assert (count(conn, "message_ledger"), count(conn, "dead_letters")) == (0, 0)
        add_keys(conn, clock() - timedelta(days=8))
        clock.advance(RETENTION_INTERVAL.total_seconds() - 1)
        upkeep.tick()  # within the hour: not again
        assert count(conn, "message_ledger") == 1
        clock.advance(1)
        upkeep.tick()
        assert count(conn, "message_ledger") == 0
        # While another hub holds the lock, this one leaves the rows to it and waits an hour.
        add_keys(conn, clock() - timedelta(days=8))
        clock.advance(RETENTION_INTERVAL.total_seconds())
        with psycopg.connect(any_database_url, autocommit=True) as leader:
            leader.execute("SELECT pg_advisory_lock(%s)", (RETENTION_LOCK_KEY,))
            upkeep.tick()
            leader.execute("SELECT pg_advisory_unlock(%s)", (RETENTION_LOCK_KEY,))
        assert count(conn, "message_ledger") == 1
        clock.advance(RETENTION_INTERVAL.total_seconds())
        upkeep.tick()
        assert count(conn, "message_ledger") == 0
    finally:
        upkeep.close()


def test_upkeep_keeps_dead_letters_fourteen_days_by_default(conn: Conn, any_database_url: str) -> None:
    clock = Clock(datetime.now(UTC))
    upkeep = Upkeep(any_database_url, "hub-a", retention_days=90, clock=clock)
    try:
        add_dead_letters(conn, clock() - timedelta(days=14) - TICK)
        add_dead_letters(conn, clock() - timedelta(days=13))
        upkeep.tick()
        assert ages(conn, "dead_letters", clock()) == [timedelta(days=13)]
    finally:
        upkeep.close()


def sos(device_id: str, msg_id: str, at: datetime) -> Alarm:
    raw = f'{{"msg_id": "{msg_id}", "action": "press"}}'.encode()
    return Alarm(device_id, IncidentKind.SOS, msg_id, raw, hashlib.sha256(raw).digest(), at)


def test_a_redelivered_sos_is_a_duplicate_for_six_days_old_and_new_once_its_key_is_gone(county_url: str) -> None:
    with psycopg.connect(county_url) as conn:
        bands = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT ON (resident_id) id FROM devices"
                " WHERE kind = 'wristband' AND resident_id IS NOT NULL ORDER BY resident_id, id LIMIT 2"
            ).fetchall()
        ]
        six = sos(bands[0], "six-days", NOW - timedelta(days=6))
        eight = sos(bands[1], "eight-days", NOW - timedelta(days=8))
        for alarm in (six, eight):
            assert record_alarm(conn, alarm, ack_timeout_s=120, hub_id="test").result is AlarmResult.OPENED
    with psycopg.connect(county_url, autocommit=True) as conn:
        assert prune(conn, NOW, dead_letter_days=14, lock_key=LOCK) is not None
        keys = {r[0] for r in conn.execute("SELECT msg_id FROM message_ledger").fetchall()}
    assert keys == {"six-days"}
    with psycopg.connect(county_url) as conn:
        again_six = record_alarm(conn, sos(six.device_id, "six-days", NOW), ack_timeout_s=120, hub_id="test")
        again_eight = record_alarm(conn, sos(eight.device_id, "eight-days", NOW), ack_timeout_s=120, hub_id="test")
    assert again_six.result is AlarmResult.REDELIVERY
    # Past the ledger's week the same bytes are a new message: it joins the resident's
    # open incident (or would open one) instead of being dropped as a duplicate.
    assert again_eight.result is AlarmResult.JOINED
