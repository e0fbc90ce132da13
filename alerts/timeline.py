"""The incident timeline: every state change, attempt, callback and acknowledgement."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

# Routers LISTEN here; a NOTIFY in a committing transaction wakes them at once.
ESCALATION_CHANNEL = "shouhu_escalation"


def add_event(
    conn: psycopg.Connection[Any], incident_id: int, at: datetime, event: str, actor: str | None, detail: dict[str, Any]
) -> int:
    """Append one timeline entry in the caller's transaction; returns its id."""
    row = conn.execute(
        "INSERT INTO incident_events (incident_id, at, event, actor, detail) VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (incident_id, at, event, actor, Jsonb(detail)),
    ).fetchone()
    assert row is not None
    return int(row[0])


def wake_routers(conn: psycopg.Connection[Any], reason: str = "") -> None:
    conn.execute("SELECT pg_notify(%s, %s)", (ESCALATION_CHANNEL, reason))
