"""Retention of personal data and of the hub's own tables, one pass an hour.

| what | kept | by |
|---|---|---|
| message ledger keys | ``LEDGER_KEEP`` (7 days, DESIGN.md: at least 7) | ``received_at`` |
| dead letters (raw payloads: location, heart rate) | ``SHOUHU_DEAD_LETTER_DAYS`` | ``received_at`` |
| audit log (who read whose data) | ``SHOUHU_AUDIT_DAYS`` | ``at`` |
| an incident's location (``lat``, ``lon``) | ``SHOUHU_LOCATION_DAYS``, once closed | ``opened_at`` |
| console sessions, sign-in codes and attempts | ``SHOUHU_SESSION_DAYS`` after they ended | their end |
| a closed incident's contacts (numbers called, texts, names, notes) | ``SHOUHU_CONTACT_DAYS``, masked | its close |
| a closed task's note | ``SHOUHU_CONTACT_DAYS``, cleared | ``closed_at`` |
| people removed from the registry: name, phone, address, notes | ``SHOUHU_REGISTRY_DAYS``, anonymised | deactivation |

Each goes strictly older than its cutoff: a row exactly as old as the limit stays
until the next pass. The incident itself stays (the county's figures count it): only
its location is cleared, and only when it is resolved or cancelled. Its contacts are
masked, not deleted: each attempt keeps who was called, how, when and what came of it
with the number masked (``alerts/attempts.py``), each timeline entry its ids and states
(``alerts/timeline.py``), the incident its outcome (its resolution note cleared); it
closed when resolved or cancelled (opened, if neither time is recorded). Raw telemetry has
its own path (``SHOUHU_RETENTION_DAYS``: partitions or TimescaleDB, ``shouhu/timeseries.py``).
Sessions and sign-in rows are deleted, attempts, timelines and task notes masked or
cleared, through their owners (``shouhu/sessions.py``, ``shouhu/accounts.py``,
``alerts/attempts.py``, ``alerts/timeline.py``, ``alerts/care.py``), removed people
anonymised through the registry's (``devices/registry.py``); this module only
schedules them.

One hub at a time prunes (a session-level advisory lock, held across the batches
of a pass and released at its end). Each batch is one statement of at most
``BATCH_ROWS`` rows on an autocommit connection, so it commits on its own and holds
its row locks briefly (incidents' contacts: one short transaction over
``BATCH_ROWS // ROWS_PER_INCIDENT`` incidents, locked first as everywhere, then their
attempts, timelines and the incidents themselves); a pass stops after its time budget and the caller resumes it
on the next tick, so a backlog never holds up the upkeep tick (whose ingest
heartbeat must beat within ``liveness.INGEST_GRACE``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg import sql

from alerts.attempts import mask_contacts
from alerts.care import clear_task_notes
from alerts.locks import lock_incidents
from alerts.states import CLOSED
from alerts.timeline import strip_personal
from devices.registry import anonymise_removed
from shouhu.accounts import prune_sign_in
from shouhu.db import Conn
from shouhu.sessions import prune_sessions
from shouhu.settings import (
    DEFAULT_AUDIT_DAYS,
    DEFAULT_CONTACT_DAYS,
    DEFAULT_LOCATION_DAYS,
    DEFAULT_REGISTRY_DAYS,
    DEFAULT_SESSION_DAYS,
    Settings,
)

LEDGER_KEEP = timedelta(days=7)
BATCH_ROWS = 10_000
# Pruning time per pass; the rest waits for the next tick, about a second later.
PASS_BUDGET_S = 1.0
RETENTION_LOCK_KEY = 0x5348_4F55_4855_0006
# An incident's contacts are its attempts and timeline entries, tens of rows each (an
# SOS paged over a few rounds): a batch takes this many fewer incidents than rows.
ROWS_PER_INCIDENT = 100


# One batch of a table. Its rows are found by ctid, a TID scan: the ledger has no
# surrogate key, and a join on its (device_id, msg_id) could be hashed against the
# whole table. None of these tables' rows are ever updated, so a ctid stays its row's
# own within the statement; the time is checked again anyway. The inner scan walks the
# time's index oldest first and stops at the limit.
_PRUNE_BATCH = sql.SQL(
    """
    DELETE FROM {table}
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {table}
        WHERE {column} < %(cutoff)s
        ORDER BY {column}
        LIMIT %(limit)s
    ))
    AND {column} < %(cutoff)s
    """
)

# Closed incidents' locations, oldest first, through incidents_located_idx (0021): a
# cleared row leaves that index, so each batch starts where the last one stopped. The
# incident's other fields stay: the response figures and exports count it for years.
_CLEAR_LOCATIONS = """
    UPDATE incidents SET lat = NULL, lon = NULL
    WHERE id = ANY(ARRAY(
        SELECT id FROM incidents
        WHERE (lat IS NOT NULL OR lon IS NOT NULL) AND opened_at < %(cutoff)s
          AND state IN ('resolved', 'cancelled')
        ORDER BY opened_at
        LIMIT %(limit)s
    ))
"""

# Closed incidents whose contacts are not masked yet, oldest close first, through
# incidents_contacts_kept_idx (0022): a masked one leaves that index.
_CONTACTS_DUE = """
    SELECT id FROM incidents
    WHERE contacts_masked_at IS NULL AND state IN ('resolved', 'cancelled')
      AND coalesce(resolved_at, cancelled_at, opened_at) < %(cutoff)s
    ORDER BY coalesce(resolved_at, cancelled_at, opened_at)
    LIMIT %(limit)s
"""


def _mask_contacts(conn: Conn, cutoff: datetime, limit: int, now: datetime) -> int:
    """One batch of closed incidents' contacts, in one transaction; returns how many incidents."""
    with conn.transaction():
        due = [int(i) for (i,) in conn.execute(_CONTACTS_DUE, {"cutoff": cutoff, "limit": limit}).fetchall()]
        if not due:
            return 0
        ids = [i for i, state in lock_incidents(conn, due).items() if state in CLOSED]  # incident first
        mask_contacts(conn, ids)
        strip_personal(conn, ids)
        conn.execute(
            "UPDATE incidents SET contacts_masked_at = %s, resolution_note = '' WHERE id = ANY(%s)", (now, ids)
        )
        return len(due)


@dataclass(frozen=True, slots=True)
class Periods:
    """How long each kind of personal data is kept (the settings of the table above)."""

    dead_letter_days: int
    audit_days: int = DEFAULT_AUDIT_DAYS
    location_days: int = DEFAULT_LOCATION_DAYS
    session_days: int = DEFAULT_SESSION_DAYS
    contact_days: int = DEFAULT_CONTACT_DAYS
    registry_days: int = DEFAULT_REGISTRY_DAYS

    @classmethod
    def from_settings(cls, settings: Settings) -> Periods:
        return cls(
            dead_letter_days=settings.dead_letter_days,
            audit_days=settings.audit_days,
            location_days=settings.location_days,
            session_days=settings.session_days,
            contact_days=settings.contact_days,
            registry_days=settings.registry_days,
        )


@dataclass(slots=True)
class _Job:
    name: str
    batch: Callable[[Conn, int], int]
    """One batch of at most the given items; returns how many it removed or cleared."""
    rows_per_item: int = 1
    """About how many rows one item touches: a batch takes ``BATCH_ROWS`` // this items."""
    done: int = 0
    more: bool = True


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one pass deleted (or cleared), in how many batches, and whether rows past retention remain."""

    ledger: int
    dead_letters: int
    batches: int
    more: bool
    audit: int = 0
    locations: int = 0
    """Incidents whose location was cleared."""
    sessions: int = 0
    """Sessions, sign-in codes and sign-in attempts deleted."""
    contacts: int = 0
    """Closed incidents whose attempts and timeline were masked."""
    task_notes: int = 0
    """Closed tasks whose note was cleared."""
    people: int = 0
    """Residents, guardians and staff removed from the registry and anonymised."""

    def by_table(self) -> dict[str, int]:
        """The counts by the ``table`` label of ``shouhu_hub_pruned_rows_total``."""
        return {
            "message_ledger": self.ledger,
            "dead_letters": self.dead_letters,
            "audit_log": self.audit,
            "incident_locations": self.locations,
            "sessions": self.sessions,
            "incident_contacts": self.contacts,
            "task_notes": self.task_notes,
            "removed_people": self.people,
        }


def _delete_older(table: str, column: str, cutoff: datetime) -> Callable[[Conn, int], int]:
    statement = _PRUNE_BATCH.format(table=sql.Identifier(table), column=sql.Identifier(column))
    return lambda conn, limit: conn.execute(statement, {"cutoff": cutoff, "limit": limit}).rowcount


def _jobs(now: datetime, periods: Periods) -> tuple[_Job, ...]:
    def days(n: int) -> datetime:
        return now - timedelta(days=n)

    def locations(conn: Conn, limit: int) -> int:
        return conn.execute(_CLEAR_LOCATIONS, {"cutoff": days(periods.location_days), "limit": limit}).rowcount

    def contacts(conn: Conn, limit: int) -> int:
        return _mask_contacts(conn, days(periods.contact_days), limit, now)

    def task_notes(conn: Conn, limit: int) -> int:
        return clear_task_notes(conn, days(periods.contact_days), limit)

    def people(conn: Conn, limit: int) -> int:
        return anonymise_removed(conn, days(periods.registry_days), now, limit)

    keep_sessions = timedelta(days=periods.session_days)
    return (
        _Job("message_ledger", _delete_older("message_ledger", "received_at", now - LEDGER_KEEP)),
        _Job("dead_letters", _delete_older("dead_letters", "received_at", days(periods.dead_letter_days))),
        _Job("audit_log", _delete_older("audit_log", "at", days(periods.audit_days))),
        _Job("incident_locations", locations),
        _Job("sessions", lambda conn, limit: prune_sessions(conn, now, keep=keep_sessions, limit=limit)),
        # Codes and attempts: one batch of each per call, so a full batch of either means more.
        _Job("sign_in", lambda conn, limit: prune_sign_in(conn, now, keep=keep_sessions, limit=limit)),
        _Job("incident_contacts", contacts, rows_per_item=ROWS_PER_INCIDENT),
        _Job("task_notes", task_notes),
        # Residents, guardians and staff: one batch of each per call, as sign-in above.
        _Job("removed_people", people),
    )


def prune(
    conn: Conn,
    now: datetime,
    *,
    dead_letter_days: int,
    audit_days: int = DEFAULT_AUDIT_DAYS,
    location_days: int = DEFAULT_LOCATION_DAYS,
    session_days: int = DEFAULT_SESSION_DAYS,
    contact_days: int = DEFAULT_CONTACT_DAYS,
    registry_days: int = DEFAULT_REGISTRY_DAYS,
    lock_key: int = RETENTION_LOCK_KEY,
    batch_rows: int = BATCH_ROWS,
    budget_s: float = PASS_BUDGET_S,
) -> Pruned | None:
    """Delete or clear, relative to ``now``, what is past its period (the module's table),
    in batches of ``batch_rows`` (of incidents' contacts, ``batch_rows // ROWS_PER_INCIDENT``
    incidents, at least one).

    ``conn`` must be in autocommit mode: each batch commits on its own. A pass runs
    rounds of one batch per job that still has rows past retention, until none has
    or ``budget_s`` has passed (at least one round).

    Returns:
        What was deleted, or None when another hub holds the retention lock.
    """
    if not conn.autocommit:
        raise ValueError("prune commits batch by batch: give it an autocommit connection")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key,)).fetchone()
    if not (locked and locked[0]):
        return None
    try:
        periods = Periods(dead_letter_days, audit_days, location_days, session_days, contact_days, registry_days)
        jobs = _jobs(now, periods)
        started = time.monotonic()
        batches = 0
        while True:
            for job in jobs:
                if job.more:
                    limit = max(1, batch_rows // job.rows_per_item)
                    done = job.batch(conn, limit)
                    job.done += done
                    job.more = done >= limit  # a short batch took the last of them
                    batches += 1
            more = any(job.more for job in jobs)
            if not more or time.monotonic() - started >= budget_s:
                by_name = {job.name: job.done for job in jobs}
                return Pruned(
                    ledger=by_name["message_ledger"],
                    dead_letters=by_name["dead_letters"],
                    batches=batches,
                    more=more,
                    audit=by_name["audit_log"],
                    locations=by_name["incident_locations"],
                    sessions=by_name["sessions"] + by_name["sign_in"],
                    contacts=by_name["incident_contacts"],
                    task_notes=by_name["task_notes"],
                    people=by_name["removed_people"],
                )
    finally:
        if not conn.broken:  # a lost connection took its session lock with it
            conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key,))
