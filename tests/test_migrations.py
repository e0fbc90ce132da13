"""The schema on both PostgreSQL versions here, the migration runner, and the
TimescaleDB statements parsed by PostgreSQL's own grammar."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pglast
import psycopg
import pytest

from devices.kinds import (
    AreaLevel,
    AttemptPurpose,
    Channel,
    DeviceKind,
    IncidentKind,
    IncidentState,
    Outcome,
    StaffRole,
    TaskKind,
    TaskOutcome,
    TaskState,
)
from shouhu import timeseries
from shouhu.migrations import MIGRATIONS, MigrationContext, MigrationError, migrate
from shouhu.tokens import Role

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
# Past the partitions the template database made on the real day it was migrated.
LATER = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)


def test_schema_is_complete_on_each_version(any_database_url: str) -> None:
    with psycopg.connect(any_database_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()}
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
        mode = conn.execute("SELECT value FROM shouhu_meta WHERE key = 'storage_mode'").fetchone()
    expected = {
        "areas",
        "residents",
        "guardians",
        "staff",
        "staff_areas",
        "duty_shifts",
        "devices",
        "device_state",
        "device_events",
        "message_ledger",
        "dead_letters",
        "escalation_policies",
        "incidents",
        "incident_events",
        "escalation_actions",
        "notification_attempts",
        "api_tokens",
        "audit_log",
        "telemetry",
        "camera_health",
        "care_tasks",
        "maintenance_windows",
        "quiet_hours",
        "battery_notices",
    }
    assert expected <= tables
    assert versions == [m.version for m in MIGRATIONS]
    assert mode == ("native",)


def test_second_run_applies_nothing(any_database_url: str) -> None:
    report = migrate(any_database_url, MigrationContext(90, NOW))
    assert report.applied == ()
    assert report.storage_mode is timeseries.StorageMode.NATIVE


def test_changed_migration_file_is_refused(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(MigrationError, match="different file"):
        migrate(database_url, MigrationContext(90, NOW))


def test_unknown_newer_migration_is_refused(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')")
    with pytest.raises(MigrationError, match=r"\[999\]"):
        migrate(database_url, MigrationContext(90, NOW))


def test_the_health_aggregate_takes_its_zone_from_the_migration_context(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A valid zone in the environment: migration 11 must not read it; the context's
    # unknown zone is refused before any SQL runs, which proves it is the one used.
    monkeypatch.setenv("SHOUHU_TIMEZONE", "Asia/Shanghai")
    [step] = [m for m in MIGRATIONS if m.version == 11]
    assert step.apply is not None
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE shouhu_meta SET value = 'timescaledb' WHERE key = 'storage_mode'")
        with pytest.raises(ValueError, match="Mars/Olympus"):
            step.apply(conn, MigrationContext(90, NOW, timezone="Mars/Olympus"))
        conn.rollback()


def _check_values(conn: psycopg.Connection, table: str, column: str) -> set[str]:
    rows = conn.execute(
        """
        SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
        JOIN pg_class t ON t.oid = c.conrelid
        WHERE t.relname = %s AND c.contype = 'c'
        """,
        (table,),
    ).fetchall()
    for (definition,) in rows:
        if f"({column} = ANY" in definition or f"(({column} = ANY" in definition:
            return set(re.findall(r"'([a-z_]+)'::text", definition))
    raise AssertionError(f"no CHECK on {table}.{column}")


@pytest.mark.parametrize(
    ("table", "column", "enum"),
    [
        ("areas", "level", AreaLevel),
        ("staff", "role", StaffRole),
        ("devices", "kind", DeviceKind),
        ("incidents", "kind", IncidentKind),
        ("incidents", "state", IncidentState),
        ("escalation_policies", "kind", IncidentKind),
        ("notification_attempts", "channel", Channel),
        ("api_tokens", "role", Role),
        ("incidents", "outcome", Outcome),
        ("notification_attempts", "purpose", AttemptPurpose),
        ("care_tasks", "kind", TaskKind),
        ("care_tasks", "state", TaskState),
        ("care_tasks", "outcome", TaskOutcome),
    ],
)
def test_enums_match_check_constraints(database_url: str, table: str, column: str, enum: type) -> None:
    with psycopg.connect(database_url) as conn:
        assert _check_values(conn, table, column) == {e.value for e in enum}  # type: ignore[attr-defined]


def _resident(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO areas (id, level, name) VALUES ('c', 'county', 'C')")
    conn.execute("INSERT INTO areas (id, parent_id, level, name) VALUES ('g', 'c', 'grid', 'G')")
    conn.execute("INSERT INTO residents (id, name, grid_id, address) VALUES ('r1', '王', 'g', '1号')")


def _open_red(conn: psycopg.Connection, code: str, kind: str = "sos") -> None:
    conn.execute(
        "INSERT INTO incidents (code, kind, severity, resident_id, opened_at) VALUES (%s, %s, 'red', 'r1', now())",
        (code, kind),
    )


def test_database_refuses_a_second_open_red_incident(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        _resident(conn)
        _open_red(conn, "A1")
        conn.commit()
        with pytest.raises(psycopg.errors.UniqueViolation):
            _open_red(conn, "A2", kind="fall")
        conn.rollback()
        conn.execute("UPDATE incidents SET state = 'resolved' WHERE code = 'A1'")
        _open_red(conn, "A3")  # a new one may open once the first is closed
        conn.commit()
        count = conn.execute("SELECT count(*) FROM incidents").fetchone()
    assert count == (2,)


def _insert_telemetry(conn: psycopg.Connection, received_at: datetime) -> None:
    conn.execute(
        "INSERT INTO telemetry (device_id, msg_id, received_at, battery) VALUES ('wb', %s, %s, 50)",
        (received_at.isoformat(), received_at),
    )


def _partition_of_rows(conn: psycopg.Connection) -> list[str]:
    return [
        r[0] for r in conn.execute("SELECT tableoid::regclass::text FROM telemetry ORDER BY received_at").fetchall()
    ]


def test_partitions_made_ahead_and_stray_rows_kept(any_database_url: str) -> None:
    with psycopg.connect(any_database_url) as conn:
        _insert_telemetry(conn, LATER + timedelta(days=30))
        assert _partition_of_rows(conn) == ["telemetry_default"]
        report = timeseries.maintain_partitions(conn, LATER, retention_days=90)
        assert "telemetry_p20270331" in report.created  # the stray row's day
        assert "telemetry_p20270308" in report.created  # a week ahead
        assert "telemetry_p20270309" not in report.created
        assert _partition_of_rows(conn) == ["telemetry_p20270331"]
        conn.commit()


def test_retention_drops_old_partitions(any_database_url: str) -> None:
    with psycopg.connect(any_database_url) as conn:
        timeseries.maintain_partitions(conn, NOW, retention_days=90)
        _insert_telemetry(conn, NOW)
        later = NOW + timedelta(days=95)
        report = timeseries.maintain_partitions(conn, later, retention_days=90)
        assert "telemetry_p20261124" in report.dropped
        assert conn.execute("SELECT count(*) FROM telemetry").fetchone() == (0,)
        kept = timeseries.existing_partitions(conn, timeseries.TELEMETRY)
        assert min(kept.values()) >= (later - timedelta(days=90)).date()


@pytest.mark.parametrize("table", timeseries.SERIES_TABLES, ids=lambda t: t.name)
def test_timescaledb_statements_parse(table: timeseries.SeriesTable) -> None:
    statements = timeseries.timescaledb_statements(table, retention_days=90)
    for statement in statements:
        pglast.parse_sql(statement)
    joined = "\n".join(statements)
    assert f"create_hypertable('{table.name}', by_range('received_at'" in joined
    assert "timescaledb.compress_segmentby = 'device_id'" in joined
    assert "add_retention_policy" in joined
    assert "INTERVAL '90 days'" in joined


def test_core_schema_parses_with_pglast() -> None:
    path = Path(__file__).resolve().parent.parent / "shouhu" / "migrations" / "0001_core.sql"
    parsed = pglast.parse_sql(path.read_text())
    assert len(parsed) > 20
