"""Time-series tables on both storage paths.

TimescaleDB (production, docker-compose): hypertables chunked by day on the hub's
``received_at``, compressed after a week, dropped after ``SHOUHU_RETENTION_DAYS``
by TimescaleDB's own background jobs.

Plain PostgreSQL (the embedded default and the tests): the same tables declared
``PARTITION BY RANGE (received_at)`` with one partition per UTC day, made a week
ahead, plus a default partition so that a row whose day has no partition yet is
kept rather than refused. ``maintain_partitions`` (run by ``shouhu migrate`` and
hourly by the hub) makes partitions ahead, moves any rows that landed in the
default partition into their day, and drops days past retention.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg import sql


class StorageMode(StrEnum):
    TIMESCALEDB = "timescaledb"
    NATIVE = "native"


@dataclass(frozen=True, slots=True)
class SeriesTable:
    name: str
    columns: str


TELEMETRY = SeriesTable(
    "telemetry",
    """
    device_id     text NOT NULL,
    msg_id        text NOT NULL,
    ts            timestamptz,
    received_at   timestamptz NOT NULL,
    battery       smallint,
    heart_rate    smallint,
    spo2          smallint,
    worn          boolean,
    lat           double precision,
    lon           double precision,
    steps         integer,
    extra         jsonb NOT NULL DEFAULT '{}'
    """,
)

CAMERA_HEALTH = SeriesTable(
    "camera_health",
    """
    device_id     text NOT NULL,
    msg_id        text NOT NULL,
    ts            timestamptz,
    received_at   timestamptz NOT NULL,
    online        boolean NOT NULL,
    reason        text,
    fps           real,
    bitrate_kbps  real,
    storage_ok    boolean,
    extra         jsonb NOT NULL DEFAULT '{}'
    """,
)

SERIES_TABLES = (TELEMETRY, CAMERA_HEALTH)
PARTITIONS_AHEAD_DAYS = 7
COMPRESS_AFTER = "7 days"


def detect_mode(conn: psycopg.Connection) -> StorageMode:
    """TimescaleDB when the extension can be installed here, plain PostgreSQL otherwise."""
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    return StorageMode.TIMESCALEDB if row else StorageMode.NATIVE


def timescaledb_statements(table: SeriesTable, retention_days: int) -> list[str]:
    """The statements that make ``table`` a compressed hypertable with retention.

    ``by_range`` needs TimescaleDB ≥ 2.13. Compression settings use the
    ``timescaledb.compress*`` options, still accepted by 2.18+ (where they are
    aliases of the columnstore options).
    """
    name = table.name
    return [
        f"CREATE TABLE {name} ({table.columns})",
        f"SELECT create_hypertable('{name}', by_range('received_at', INTERVAL '1 day'))",
        f"CREATE INDEX {name}_device_idx ON {name} (device_id, received_at DESC)",
        f"ALTER TABLE {name} SET (timescaledb.compress, "
        f"timescaledb.compress_segmentby = 'device_id', "
        f"timescaledb.compress_orderby = 'received_at DESC')",
        f"SELECT add_compression_policy('{name}', INTERVAL '{COMPRESS_AFTER}')",
        *timescaledb_retention_statements(table, retention_days),
    ]


def timescaledb_retention_statements(table: SeriesTable, retention_days: int) -> list[str]:
    """Replace the retention job, so a changed SHOUHU_RETENTION_DAYS takes effect."""
    return [
        f"SELECT remove_retention_policy('{table.name}', if_exists => true)",
        f"SELECT add_retention_policy('{table.name}', INTERVAL '{int(retention_days)} days')",
    ]


# The health samples' continuous aggregate refreshes the last three days every hour,
# leaving the newest hour to settle. Three days is far inside the raw retention
# (SHOUHU_RETENTION_DAYS, 90), so a refresh never runs over dropped chunks, and the
# daily rows outlive the samples they summarise.
HEALTH_DAILY = "camera_health_daily"


def health_daily_statements(zone: str) -> list[str]:
    """A continuous aggregate of the 5-minute health samples per camera and local day.

    It is the sample side of the picture — how many reports, how many said "offline",
    mean frame rate and bitrate — kept after raw retention drops the samples. The
    uptime report does not read it: the ratio is time-weighted from transitions. The
    day is bucketed in ``zone`` (SHOUHU_TIMEZONE when the migration ran, from its context), which
    ``time_bucket`` accepts in a continuous aggregate from TimescaleDB 2.8.
    """
    try:
        ZoneInfo(zone)  # refuse an unknown zone before it reaches SQL
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {zone!r}") from exc
    literal = zone.replace("'", "''")
    return [
        f"""CREATE MATERIALIZED VIEW {HEALTH_DAILY}
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 day', received_at, '{literal}') AS day,
       device_id,
       count(*) AS samples,
       count(*) FILTER (WHERE NOT online) AS offline_samples,
       count(*) FILTER (WHERE storage_ok = false) AS storage_faults,
       avg(fps) AS mean_fps,
       avg(bitrate_kbps) AS mean_bitrate_kbps,
       min(received_at) AS first_sample,
       max(received_at) AS last_sample
FROM camera_health
GROUP BY day, device_id
WITH NO DATA""",
        f"""SELECT add_continuous_aggregate_policy('{HEALTH_DAILY}',
    start_offset => INTERVAL '3 days',
    end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '1 hour')""",
    ]


def native_statements(table: SeriesTable) -> list[str]:
    """The partitioned parent table, its default partition and its index."""
    name = table.name
    return [
        f"CREATE TABLE {name} ({table.columns}) PARTITION BY RANGE (received_at)",
        f"CREATE TABLE {name}_default PARTITION OF {name} DEFAULT",
        f"CREATE INDEX {name}_device_idx ON {name} (device_id, received_at DESC)",
    ]


def create_tables(conn: psycopg.Connection, mode: StorageMode, retention_days: int) -> None:
    """Create every time-series table on the chosen path (inside the caller's transaction)."""
    if mode is StorageMode.TIMESCALEDB:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    for table in SERIES_TABLES:
        statements = (
            timescaledb_statements(table, retention_days)
            if mode is StorageMode.TIMESCALEDB
            else native_statements(table)
        )
        for statement in statements:
            conn.execute(statement.encode())


def partition_name(table: SeriesTable, day: date) -> str:
    return f"{table.name}_p{day:%Y%m%d}"


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def existing_partitions(conn: psycopg.Connection, table: SeriesTable) -> dict[str, date]:
    """Daily partitions of ``table`` by name, with their day."""
    rows = conn.execute(
        """
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = %s AND c.relname LIKE %s
        """,
        (table.name, f"{table.name}\\_p%"),
    ).fetchall()
    prefix = f"{table.name}_p"
    return {name: datetime.strptime(name.removeprefix(prefix), "%Y%m%d").replace(tzinfo=UTC).date() for (name,) in rows}


def _create_day_partition(conn: psycopg.Connection, table: SeriesTable, day: date) -> None:
    # Build the day's table, move into it any rows that fell into the default
    # partition, then attach it: a plain CREATE ... PARTITION OF would fail if the
    # default already held rows of that day.
    start, end = _day_start(day), _day_start(day + timedelta(days=1))
    part = sql.Identifier(partition_name(table, day))
    parent = sql.Identifier(table.name)
    default = sql.Identifier(f"{table.name}_default")
    conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(part, parent))
    conn.execute(
        sql.SQL(
            "WITH moved AS (DELETE FROM {} WHERE received_at >= %s AND received_at < %s"
            " RETURNING *) INSERT INTO {} SELECT * FROM moved"
        ).format(default, part),
        (start, end),
    )
    conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            parent, part, sql.Literal(start), sql.Literal(end)
        )
    )


@dataclass(frozen=True, slots=True)
class PartitionReport:
    created: tuple[str, ...]
    dropped: tuple[str, ...]


def maintain_partitions(
    conn: psycopg.Connection,
    now: datetime,
    retention_days: int,
    tables: Iterable[SeriesTable] = SERIES_TABLES,
) -> PartitionReport:
    """Make daily partitions from yesterday to a week ahead; drop days past retention.

    Runs in the caller's transaction. Only for the native path: TimescaleDB makes
    chunks and runs retention itself.
    """
    today = now.astimezone(UTC).date()
    wanted = [today + timedelta(days=offset) for offset in range(-1, PARTITIONS_AHEAD_DAYS + 1)]
    oldest_kept = today - timedelta(days=retention_days)
    created: list[str] = []
    dropped: list[str] = []
    for table in tables:
        existing = existing_partitions(conn, table)
        have = set(existing.values())
        # Days in the default partition (late or early rows) get their own partition
        # too, unless they are already past retention.
        stray_days = {
            row[0]
            for row in conn.execute(
                sql.SQL("SELECT DISTINCT (received_at AT TIME ZONE 'UTC')::date FROM {}").format(
                    sql.Identifier(f"{table.name}_default")
                )
            ).fetchall()
        }
        for day in sorted(set(wanted) | stray_days):
            if day not in have and day >= oldest_kept:
                _create_day_partition(conn, table, day)
                created.append(partition_name(table, day))
        for name, day in sorted(existing.items()):
            if day < oldest_kept:
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                dropped.append(name)
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE received_at < %s").format(sql.Identifier(f"{table.name}_default")),
            (_day_start(oldest_kept),),
        )
    return PartitionReport(tuple(created), tuple(dropped))
