"""Where the embedded defaults live, and how other verbs find a running one.

``shouhu up`` with no ``SHOUHU_DATABASE_URL`` keeps its PostgreSQL under the data
directory (``SHOUHU_DATA_DIR`` when set, else ``/var/lib/shouhu`` as root and
``$XDG_DATA_HOME/shouhu`` otherwise) and records the URL there, so ``shouhu token
create`` or ``shouhu registry load`` in another terminal reach the same database
without configuration.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from shouhu.embedded.postgres import (
    ClusterSpec,
    LocalPostgres,
    create_database,
    free_port,
    wheel_bin_dir,
)

DATABASE_NAME = "shouhu"
STATE_FILE = "embedded.json"
PREFERRED_PORT = 5544


def default_data_dir(configured: str = "") -> Path:
    """``configured`` (``SHOUHU_DATA_DIR``) when set, else the platform's place for it."""
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/lib/shouhu")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shouhu"


@dataclass(frozen=True, slots=True)
class EmbeddedDatabase:
    cluster: LocalPostgres
    url: str


def _port_free(port: int) -> bool:
    from shouhu.embedded.broker import is_listening

    return not is_listening("127.0.0.1", port)


def start_embedded_database(data_dir: Path) -> EmbeddedDatabase:
    """Start (initialising on first use) the embedded PostgreSQL under ``data_dir``.

    The port is kept across runs in the state file; a new cluster takes 5544, or a
    free port when 5544 is taken.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    state_path = data_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    port = int(state.get("port", 0))
    if not port or not _port_free(port):
        port = PREFERRED_PORT if _port_free(PREFERRED_PORT) else free_port()
    cluster = LocalPostgres(ClusterSpec(wheel_bin_dir(), data_dir / "postgres", port))
    cluster.start()
    create_database(cluster.url(), DATABASE_NAME)
    url = cluster.url(DATABASE_NAME)
    state_path.write_text(json.dumps({"port": port, "database_url": url}))
    return EmbeddedDatabase(cluster, url)


def recorded_database_url(data_dir: Path | None = None) -> str | None:
    """The URL a running ``shouhu up`` recorded, if its database is up."""
    state_path = (data_dir or default_data_dir()) / STATE_FILE
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    if _port_free(int(state.get("port", 0))):
        return None
    url: str = state["database_url"]
    return url
