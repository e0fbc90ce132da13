"""The incident timeline: every state change, attempt, callback and acknowledgement."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from shouhu.accounts import person_label

# What a timeline entry may say about a person, at any depth of its detail: names
# (``name``, ``taken_by``, a step's ``recipients[].name``), numbers (``to``, ``from``,
# ``phone``, ``callback_number``), free text (``note``, ``text``, ``body``) and where
# (``address``, ``lat``, ``lon``, ``medical_notes``). Ids, roles, states, steps and
# times are not: the timeline keeps them past ``SHOUHU_CONTACT_DAYS``.
PERSONAL_KEYS = (
    "name", "taken_by", "to", "from", "phone", "callback_number", "note", "text", "body",
    "address", "lat", "lon", "medical_notes",
)

# A number quoted in a text (a provider's error: eight digits or more) as an SQL
# expression of the text: its first three characters and last four digits around four
# stars, ``+86****1234``.
MASKED_IN_TEXT = r"regexp_replace({text}, '(\+\d{{2}}|\d{{3}})\d+(\d{{4}})', '\1****\2', 'g')"
# A timeline entry's detail without PERSONAL_KEYS, and with its ``error`` masked.
_STRIPPED = "jsonb_without_keys(detail, %(keys)s)"
_ERROR_MASKED = MASKED_IN_TEXT.format(text=f"({_STRIPPED} ->> 'error')")
_MASKED_DETAIL = f"""CASE WHEN jsonb_typeof({_STRIPPED} -> 'error') = 'string'
    THEN jsonb_set({_STRIPPED}, '{{error}}', to_jsonb({_ERROR_MASKED})) ELSE {_STRIPPED} END"""

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


Event = tuple[int, datetime, str, str | None, dict[str, Any]]  # incident, at, event, actor, detail


def add_events(conn: psycopg.Connection[Any], events: list[Event]) -> None:
    """:func:`add_event` for several (incident, at, event, actor, detail), in one statement, in order."""
    if not events:
        return
    values = ", ".join(["(%s, %s, %s, %s, %s)"] * len(events))
    conn.execute(
        f"INSERT INTO incident_events (incident_id, at, event, actor, detail) VALUES {values}",
        [v for incident_id, at, event, actor, detail in events for v in (incident_id, at, event, actor, Jsonb(detail))],
    )


def strip_personal(conn: psycopg.Connection[Any], incident_ids: list[int]) -> int:
    """Remove :data:`PERSONAL_KEYS` from the incidents' timeline entries and mask numbers in
    an entry's ``error`` (a provider's); returns how many changed.

    The caller holds the incidents' locks. Masked entries are left as they are.
    """
    return conn.execute(
        f"""
        UPDATE incident_events SET detail = {_MASKED_DETAIL}
        WHERE incident_id = ANY(%(ids)s) AND detail IS DISTINCT FROM {_MASKED_DETAIL}
        """,
        {"ids": incident_ids, "keys": list(PERSONAL_KEYS)},
    ).rowcount


def wake_routers(conn: psycopg.Connection[Any], reason: str = "") -> None:
    conn.execute("SELECT pg_notify(%s, %s)", (ESCALATION_CHANNEL, reason))


def actor_names(conn: psycopg.Connection[Any], events: list[tuple[str | None, dict[str, Any]]]) -> list[str | None]:
    """The name each timeline entry's actor goes by, for (actor, detail) pairs in order.

    A staff member or guardian is named with their role, ``董思远（网格员）``: by the name
    the entry recorded (``detail.name``, with ``detail.role``), else as the registry
    has them; an integration (``integration:<name>``) is its name; a device, the
    system or a legacy token key is shown as stored.
    """
    staff_ids = sorted({a.partition(":")[2] for a, _ in events if a and a.startswith("staff:")})
    guardian_ids = sorted({a.partition(":")[2] for a, _ in events if a and a.startswith("guardian:")})
    people: dict[str, tuple[str, str]] = {}  # key → (name, role)
    if staff_ids:
        for sid, name, role in _rows(conn, "SELECT id, name, role FROM staff WHERE id = ANY(%s)", staff_ids):
            people[f"staff:{sid}"] = (name, role)
    if guardian_ids:
        query = "SELECT id, name, 'guardian' FROM guardians WHERE id = ANY(%s)"
        for gid, name, role in _rows(conn, query, guardian_ids):
            people[f"guardian:{gid}"] = (name, role)
    names: list[str | None] = []
    for actor, detail in events:
        recorded = detail.get("name") if isinstance(detail.get("name"), str) else None
        if actor is None:
            names.append(None)
        elif actor in people or (recorded and actor.startswith(("staff:", "guardian:"))):
            name, role = people.get(actor, ("", ""))
            name, role = recorded or name, str(detail.get("role") or role)
            names.append(name if "（" in name else person_label(name, role))
        elif recorded:
            names.append(recorded)
        elif actor.startswith("integration:"):
            names.append(actor.partition(":")[2])
        else:
            names.append(actor)
    return names


def _rows(conn: psycopg.Connection[Any], query: str, ids: list[str]) -> list[tuple[str, str, str]]:
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(query, (ids,))
        return [(str(a), str(b), str(c)) for a, b, c in cur.fetchall()]
