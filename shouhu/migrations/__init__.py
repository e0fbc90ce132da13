"""A small migration runner: numbered steps, applied once, in order, under a lock.

Why not Alembic or yoyo: the schema is plain SQL with no ORM, and one step must
choose at run time between TimescaleDB hypertables and native partitioning; a
dozen lines of Python do that more plainly than a tool's hooks.

Each step runs in its own transaction holding a PostgreSQL advisory lock, so two
processes (say ``shouhu up`` and a compose ``migrate`` job) never apply the same
step twice. SQL steps are recorded with their SHA-256; an applied step whose file
has since changed is refused rather than silently skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import psycopg

from shouhu import timeseries
from shouhu.settings import DEFAULT_TIMEZONE

# An arbitrary constant: the advisory lock key that serialises migrations.
MIGRATION_LOCK_KEY = 0x5348_4F55_4855_0001


@dataclass(frozen=True, slots=True)
class MigrationContext:
    """What the steps may depend on beyond the database: given by the caller (the
    settings of the ``shouhu`` verb that migrates), never read from the environment."""

    retention_days: int
    now: datetime
    # SHOUHU_TIMEZONE: the local day the health samples' daily aggregate buckets by.
    timezone: str = DEFAULT_TIMEZONE


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql_file: str | None = None
    apply: Callable[[psycopg.Connection, MigrationContext], None] | None = None

    def sql(self) -> str:
        assert self.sql_file is not None
        return resources.files(__package__).joinpath(self.sql_file).read_text(encoding="utf-8")

    def checksum(self) -> str | None:
        return hashlib.sha256(self.sql().encode()).hexdigest() if self.sql_file else None


def _create_series_tables(conn: psycopg.Connection, context: MigrationContext) -> None:
    mode = timeseries.detect_mode(conn)
    timeseries.create_tables(conn, mode, context.retention_days)
    conn.execute("INSERT INTO shouhu_meta (key, value) VALUES ('storage_mode', %s)", (mode.value,))


def _create_health_daily(conn: psycopg.Connection, context: MigrationContext) -> None:
    """The health samples' continuous aggregate, on the TimescaleDB path only."""
    if storage_mode(conn) is not timeseries.StorageMode.TIMESCALEDB:
        return
    for statement in timeseries.health_daily_statements(context.timezone):
        conn.execute(statement.encode())


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "core schema", sql_file="0001_core.sql"),
    Migration(2, "time-series tables", apply=_create_series_tables),
    Migration(3, "acknowledgement, notices, CAP messages", sql_file="0003_acknowledgement.sql"),
    Migration(4, "retries with backoff", sql_file="0004_retries.sql"),
    Migration(5, "liveness: deadline state, ingest heartbeats and gaps", sql_file="0005_liveness.sql"),
    Migration(6, "liveness windows per device kind", sql_file="0006_heartbeat_kinds.sql"),
    Migration(7, "an index for first pages", sql_file="0007_first_pages.sql"),
    Migration(8, "care: visit tasks, work orders, battery notices, maintenance, quiet hours", sql_file="0008_care.sql"),
    Migration(9, "an index for the incident list", sql_file="0009_incident_list.sql"),
    # 10 was reserved for work that needed no migration; the runner does not need versions contiguous.
    Migration(11, "camera uptime", sql_file="0011_uptime.sql", apply=_create_health_daily),
    Migration(12, "live feed outbox and console sessions", sql_file="0012_events.sql"),
    # 13 is left free for parallel work on issue 13; versions need not be contiguous.
    Migration(14, "attempt leases: send outside any lock", sql_file="0014_attempt_leases.sql"),
    Migration(15, "first pages of unpaged incidents first", sql_file="0015_unpaged_first.sql"),
    Migration(16, "staff accounts: tokens and sessions of people and integrations", sql_file="0016_staff_accounts.sql"),
    Migration(17, "visits: follow-ups after an SOS, recurring visits", sql_file="0017_visits.sql"),
    Migration(18, "an index for supervisions", sql_file="0018_supervision.sql"),
    Migration(19, "provider receipts: a queue for Aliyun's pushes", sql_file="0019_provider_receipts.sql"),
    Migration(20, "phone providers per area; each attempt's provider", sql_file="0020_providers.sql"),
    Migration(21, "retention of personal data: indexes", sql_file="0021_personal_data_retention.sql"),
    Migration(22, "retention: contacts, notes, removed people", sql_file="0022_contact_retention.sql"),
)


class MigrationError(Exception):
    """The database holds a schema this code cannot safely upgrade."""


@dataclass(frozen=True, slots=True)
class MigrationReport:
    applied: tuple[int, ...]
    storage_mode: timeseries.StorageMode
    partitions_created: tuple[str, ...]
    partitions_dropped: tuple[str, ...]


def _bootstrap(conn: psycopg.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version     integer PRIMARY KEY,
            name        text NOT NULL,
            checksum    text,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    conn.execute("CREATE TABLE IF NOT EXISTS shouhu_meta (key text PRIMARY KEY, value text NOT NULL)")


def storage_mode(conn: psycopg.Connection) -> timeseries.StorageMode:
    row = conn.execute("SELECT value FROM shouhu_meta WHERE key = 'storage_mode'").fetchone()
    if row is None:
        raise MigrationError("the schema has no storage mode: run `shouhu migrate`")
    return timeseries.StorageMode(row[0])


def pending_migrations(conninfo: str) -> tuple[int, ...]:
    """The steps this code has that the database has not applied, checking those it has.

    Raises:
        MigrationError: an applied SQL step differs from the file shipped here, the
            database has a step this code does not know, or it has no schema at all.
    """
    with psycopg.connect(conninfo) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        if not (exists and exists[0]):
            raise MigrationError("the database has no schema_migrations table: it is not a Shouhu database")
        rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    applied: dict[int, str | None] = dict(rows)
    known = {m.version: m for m in MIGRATIONS}
    newer = sorted(v for v in applied if v not in known)
    if newer:
        raise MigrationError(f"the database has migrations {newer} this version does not know")
    for version, checksum in applied.items():
        if checksum != known[version].checksum():
            raise MigrationError(f"migration {version} ({known[version].name}) was applied from a different file")
    return tuple(v for v in sorted(known) if v not in applied)


def migrate(conninfo: str, context: MigrationContext) -> MigrationReport:
    """Apply every pending step, then the storage path's upkeep (partitions or retention).

    Raises:
        MigrationError: an applied SQL step differs from the file shipped here, or the
            database is at a version newer than this code knows.
    """
    applied: list[int] = []
    with psycopg.connect(conninfo) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            _bootstrap(conn)
        known = {m.version for m in MIGRATIONS}
        for migration in MIGRATIONS:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                row = conn.execute(
                    "SELECT checksum FROM schema_migrations WHERE version = %s",
                    (migration.version,),
                ).fetchone()
                if row is not None:
                    if row[0] != migration.checksum():
                        raise MigrationError(
                            f"migration {migration.version} ({migration.name}) was applied "
                            "from a different file; restore the original or migrate by hand"
                        )
                    continue
                if migration.sql_file is not None:
                    conn.execute(migration.sql().encode())
                if migration.apply is not None:
                    migration.apply(conn, context)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum()),
                )
                applied.append(migration.version)
        newer = [v for (v,) in conn.execute("SELECT version FROM schema_migrations").fetchall() if v not in known]
        if newer:
            raise MigrationError(f"the database has migrations {newer} this version does not know")
        with conn.transaction():
            mode = storage_mode(conn)
            created: tuple[str, ...] = ()
            dropped: tuple[str, ...] = ()
            if mode is timeseries.StorageMode.NATIVE:
                report = timeseries.maintain_partitions(conn, context.now, context.retention_days)
                created, dropped = report.created, report.dropped
            else:
                for table in timeseries.SERIES_TABLES:
                    for statement in timeseries.timescaledb_retention_statements(table, context.retention_days):
                        conn.execute(statement.encode())
    return MigrationReport(tuple(applied), mode, created, dropped)
