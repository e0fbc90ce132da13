"""Database connections: one place that knows how Shouhu talks to PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

# A connection with psycopg's default rows (tuples); a query that builds a dataclass
# passes ``row_factory=class_row(...)`` to its cursor.
Conn = psycopg.Connection[tuple[Any, ...]]
# A connection from a pool opened here: its rows are dicts (see ``open_pool``).
DictConn = psycopg.Connection[DictRow]


def connect(url: str, *, autocommit: bool = False) -> Conn:
    """A plain connection, for CLI verbs and one-shot work."""
    return psycopg.connect(url, autocommit=autocommit, application_name="shouhu")


def open_pool(url: str, *, name: str, min_size: int = 1, max_size: int = 8) -> ConnectionPool:
    """A connection pool whose connections are health-checked on checkout.

    ``check`` makes a pool survive a database restart: a dead connection is thrown
    away and replaced instead of failing the next request.
    """
    pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        kwargs={"application_name": f"shouhu-{name}", "row_factory": dict_row},
        check=ConnectionPool.check_connection,
        open=False,
    )
    pool.open(wait=False)
    return pool
