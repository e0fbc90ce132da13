"""`shouhu backup` and `shouhu restore` through the command line on a real PostgreSQL:
a populated county backed up, restored into a new database and compared table by
table (row counts and checksums); raw telemetry only on request; a database that is
not empty refused; a pg_dump older than the server named."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import psycopg.conninfo
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from launch.cli import app
from shouhu.backup import _read_archive, _without_password, candidate_bin_dirs, find_tools
from shouhu.embedded.postgres import LocalPostgres, debian_bin_dirs
from tests.support.builders import add_incident, add_task

NOW = datetime(2026, 11, 27, 4, 0, tzinfo=UTC)
SERIES = ("telemetry", "camera_health")


def populate(url: str) -> None:
    """Incidents with timelines, tasks, audit rows, uptime transitions, telemetry, tokens."""
    with psycopg.connect(url, autocommit=True) as conn:
        sos = add_incident(conn, "B1SOS", area="dongguan-01-g1", resident="r-0001", device="wb-0001",
                           opened_at=NOW - timedelta(hours=5), acknowledged_at=NOW - timedelta(hours=5),
                           resolved_at=NOW - timedelta(hours=4), outcome="visited_fine", lat=38.73, lon=111.63)
        conn.execute("INSERT INTO incident_events (incident_id, at, event, actor, detail) VALUES (%s, %s, 'opened',"
                     " 'device:wb-0001', %s)", (sos, NOW - timedelta(hours=5), Jsonb({"lat": 38.73, "名": "熊润香"})))
        cam = add_incident(conn, "B2CAM", kind="camera_offline", severity="yellow", state="open",
                           area="dongguan-01", device="cam-001", opened_at=NOW - timedelta(hours=3))
        add_task(conn, cam, kind="repair", area="dongguan-01", device="cam-001", opened_at=NOW - timedelta(hours=3),
                 due_at=NOW + timedelta(days=1))
        add_task(conn, sos, kind="visit", area="dongguan-01-g1", resident="r-0001", reason="follow_up",
                 opened_at=NOW - timedelta(hours=4), due_at=NOW + timedelta(hours=20),
                 closed_at=NOW - timedelta(hours=1), outcome="resident_fine")
        for i in range(20):
            conn.execute("INSERT INTO audit_log (at, role, action, subject, detail, actor, actor_name) VALUES"
                         " (%s, 'operator', 'read_resident', 'resident:r-0001', '{}', 'staff:op', '值班员')",
                         (NOW - timedelta(minutes=i),))
            conn.execute("INSERT INTO device_events (device_id, at, event, reason) VALUES ('cam-001', %s, %s, %s)",
                         (NOW - timedelta(hours=i), "offline" if i % 2 else "online",
                          "no_heartbeat" if i % 2 else None))
            conn.execute("INSERT INTO telemetry (device_id, msg_id, ts, received_at, battery, lat, lon) VALUES"
                         " ('wb-0001', %s, %s, %s, 80, 38.7, 111.6)", (f"m{i}", NOW, NOW - timedelta(days=i % 3)))
            conn.execute("INSERT INTO camera_health (device_id, msg_id, received_at, online) VALUES"
                         " ('cam-001', %s, %s, true)", (f"h{i}", NOW - timedelta(days=i % 3)))
        conn.execute("INSERT INTO api_tokens (token_hash, role, label, created_at, integration)"
                     " VALUES ('\\x01', 'admin', 'ops', %s, 'ops')", (NOW,))


def tables(url: str) -> dict[str, tuple[int, str]]:
    """Every table of the database (partitions too): its row count and the md5 of its sorted rows."""
    with psycopg.connect(url) as conn:
        names = [n for (n,) in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1"
        ).fetchall()]
        out = {}
        for name in names:
            row = conn.execute(sql.SQL(
                "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') FROM {} t"
            ).format(sql.Identifier(name))).fetchone()
            assert row is not None
            out[name] = (row[0], row[1])
        return out


def sequences(url: str) -> dict[str, int | None]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT sequencename, last_value FROM pg_sequences").fetchall())


@pytest.fixture
def new_database(postgres: LocalPostgres) -> Iterator[str]:
    """An empty database (no schema at all) on the session's PostgreSQL 18."""
    name = f"r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres.url(name)
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def shouhu(url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"SHOUHU_DATABASE_URL": url})
    return result.exit_code, result.stdout, result.stderr


def test_a_backup_restores_into_a_new_database_table_by_table(
    county_url: str, new_database: str, postgres: LocalPostgres, tmp_path: Path
) -> None:
    populate(county_url)
    before = tables(county_url)
    assert before["incidents"][0] == 2
    assert before["care_tasks"][0] == 2
    assert before["audit_log"][0] >= 20
    assert before["device_events"][0] == 20
    assert before["residents"][0] > 0
    file = tmp_path / "county.dump"

    code, out, err = shouhu(county_url, "backup", str(file))
    assert code == 0, err
    assert "backup written to" in out
    assert file.stat().st_size > 0
    assert not file.with_name("county.dump.partial").exists()
    # Progress: one line per table (not a terminal here), counting up to the total.
    lines = [line for line in err.splitlines() if "tables backed up" in line]
    assert len(lines) >= 30
    assert "public.incidents" in err
    total = int(lines[-1].split("] ")[1].split("/")[1].split()[0])
    assert lines[-1].split("] ")[1].startswith(f"{total}/{total}")

    code, out, err = shouhu(new_database, "restore", str(file))
    assert code == 0, err
    assert "migrations: up to date" in out
    after = tables(new_database)
    assert set(after) == set(before)
    for name, figures in before.items():
        if name.startswith(SERIES):
            assert after[name][0] == 0, f"{name}: raw series rows restored without --with-telemetry"
        else:
            assert after[name] == figures, f"{name}: {figures} before, {after[name]} restored"
    assert sum(n for name, (n, _) in before.items() if name.startswith(SERIES)) == 40
    assert sequences(new_database) == sequences(county_url)
    # The restored database works: a new incident takes the next id; telemetry is taken.
    with psycopg.connect(new_database, autocommit=True) as conn:
        new_id = add_incident(conn, "B3NEW", area="dongguan-01-g1", resident="r-0002", opened_at=NOW)
        conn.execute("INSERT INTO telemetry (device_id, msg_id, received_at) VALUES ('wb-0001', 'x', %s)", (NOW,))
    assert new_id > max(
        row[0] for row in psycopg.connect(county_url).execute("SELECT id FROM incidents").fetchall()
    )


def test_with_telemetry_the_raw_series_come_back_too(
    county_url: str, new_database: str, tmp_path: Path
) -> None:
    populate(county_url)
    file = tmp_path / "full.dump"
    code, _, err = shouhu(county_url, "backup", str(file), "--with-telemetry")
    assert code == 0, err
    code, _, err = shouhu(new_database, "restore", str(file))
    assert code == 0, err
    assert tables(new_database) == tables(county_url)


def test_restore_refuses_a_database_that_is_not_empty_unless_forced(county_url: str, tmp_path: Path) -> None:
    populate(county_url)
    file = tmp_path / "county.dump"
    assert shouhu(county_url, "backup", str(file))[0] == 0
    before = tables(county_url)
    with psycopg.connect(county_url, autocommit=True) as conn:
        conn.execute("DELETE FROM audit_log")

    code, _, err = shouhu(county_url, "restore", str(file))
    assert code == 1
    assert "the database is not empty" in err
    assert "--force" in err

    code, _out, err = shouhu(county_url, "restore", str(file), "--force")
    assert code == 0, err
    after = tables(county_url)
    assert after["audit_log"] == before["audit_log"]
    assert {k: v for k, v in after.items() if not k.startswith(SERIES)} == {
        k: v for k, v in before.items() if not k.startswith(SERIES)
    }


def test_errors_name_the_version_mismatch_and_a_missing_pg_dump(
    county_url: str, new_database: str, tmp_path: Path
) -> None:
    older = [d for d in debian_bin_dirs() if int(d.parent.name) < 18]
    assert older, "Debian's PostgreSQL 15 is needed: run the README's test command"
    code, _, err = shouhu(county_url, "backup", str(tmp_path / "x.dump"), "--pg-bin", str(older[0]))
    assert code == 1
    assert "version mismatch: the server is PostgreSQL 18" in err
    assert f"{older[0].parent.name} in {older[0]}" in err
    assert not (tmp_path / "x.dump").exists()

    code, _, err = shouhu(county_url, "backup", str(tmp_path / "x.dump"), "--pg-bin", str(tmp_path))
    assert code == 1
    assert "pg_dump and pg_restore were not found" in err

    code, _, err = shouhu(new_database, "restore", str(tmp_path / "missing.dump"))
    assert code == 1
    assert "missing.dump: no such file" in err

    (tmp_path / "garbage.dump").write_bytes(b"not a dump")
    code, _, err = shouhu(new_database, "restore", str(tmp_path / "garbage.dump"))
    assert code == 1
    assert "is not a backup pg_restore can read" in err


def test_the_password_goes_to_pg_dump_in_its_environment_never_its_arguments() -> None:
    dbname, env = _without_password("postgresql://shouhu:s3cr%40t@db.example:5432/shouhu?sslmode=require")
    assert "s3cr" not in dbname
    assert env["PGPASSWORD"] == "s3cr@t"
    assert psycopg.conninfo.conninfo_to_dict(dbname) == {
        "user": "shouhu", "host": "db.example", "port": "5432", "dbname": "shouhu", "sslmode": "require",
    }


def test_the_archive_names_its_extensions_so_a_timescaledb_restore_is_bracketed(
    county_url: str, tmp_path: Path
) -> None:
    """The TimescaleDB bracket itself needs TimescaleDB, which is not here; what decides
    it — the archive's list of extensions, as pg_restore prints it — is checked on citext."""
    with psycopg.connect(county_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION citext")
    file = tmp_path / "ext.dump"
    assert shouhu(county_url, "backup", str(file))[0] == 0
    tools = find_tools(18, candidate_bin_dirs())
    archive = _read_archive(tools, file)
    assert archive.extensions == {"citext"}
    assert "public.incidents" in archive.tables
