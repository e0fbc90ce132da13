"""Databases for tests: fresh copies of the session's migrated template."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import psycopg
from psycopg import sql

from devices.registry_file import RegistryFile, parse_registry
from shouhu.embedded.postgres import LocalPostgres

TEMPLATE = "shouhu_template"
DEMO_COUNTY = Path(__file__).resolve().parents[2] / "simulators" / "demo_county.yaml"


def fresh_database(cluster: LocalPostgres) -> Iterator[str]:
    """A database cloned from ``cluster``'s migrated template; dropped when resumed."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE)))
    yield cluster.url(name)
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@cache
def demo_county() -> RegistryFile:
    """The demo county's registry, parsed once per session (a frozen model: shared
    safely; parsing its 6,000 lines costs a third of a second each time)."""
    return parse_registry(DEMO_COUNTY)
