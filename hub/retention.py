"""Retention of the hub's own tables: the message ledger and the dead letters.

The ledger keeps each ``(device_id, msg_id)`` at least ``LEDGER_KEEP`` (DESIGN.md:
at least 7 days), so a device's or broker's redelivery within that time is still
recognised; dead letters hold raw payloads (location, heart rate) and are kept
``SHOUHU_DEAD_LETTER_DAYS``. Both are pruned by their ``received_at``, strictly
older than the cutoff: a row exactly as old as the limit stays until the next pass.

One hub at a time prunes (a session-level advisory lock, held across the batches
of a pass and released at its end). Each batch is one statement of at most
``BATCH_ROWS`` rows on an autocommit connection, so it commits on its own and holds
its row locks briefly; a pass stops after its time budget and the caller resumes it
on the next tick, so a backlog never holds up the upkeep tick (whose ingest
heartbeat must beat within ``liveness.INGEST_GRACE``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg import sql

from shouhu.db import Conn

LEDGER_KEEP = timedelta(days=7)
BATCH_ROWS = 10_000
# Pruning time per pass; the rest waits for the next tick, about a second later.
PASS_BUDGET_S = 1.0
RETENTION_LOCK_KEY = 0x5348_4F55_4855_0006


# One batch of a table. Its rows are found by ctid, a TID scan: the ledger has no
# surrogate key, and a join on its (device_id, msg_id) could be hashed against the
# whole table. Neither table's rows are ever updated, so a ctid stays its row's own
# within the statement; received_at is checked again anyway. The inner scan walks the
# received_at index oldest first and stops at the limit.
_PRUNE_BATCH = sql.SQL(
    """
    DELETE FROM {table}
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {table}
        WHERE received_at < %(cutoff)s
        ORDER BY received_at
        LIMIT %(limit)s
    ))
    AND received_at < %(cutoff)s
    """
)


@dataclass(slots=True)
class _Table:
    name: str
    cutoff: datetime
    deleted: int = 0
    more: bool = True


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one pass deleted, in how many batches, and whether rows past retention remain."""

    ledger: int
    dead_letters: int
    batches: int
    more: bool


def prune(
    conn: Conn,
    now: datetime,
    *,
    dead_letter_days: int,
    lock_key: int = RETENTION_LOCK_KEY,
    batch_rows: int = BATCH_ROWS,
    budget_s: float = PASS_BUDGET_S,
) -> Pruned | None:
    """Delete ledger keys older than ``LEDGER_KEEP`` and dead letters older than
    ``dead_letter_days``, relative to ``now``, in batches of ``batch_rows``.

    ``conn`` must be in autocommit mode: each batch commits on its own. A pass runs
    rounds of one batch per table that still has rows past retention, until none has
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
        ledger = _Table("message_ledger", now - LEDGER_KEEP)
        dead_letters = _Table("dead_letters", now - timedelta(days=dead_letter_days))
        tables = (ledger, dead_letters)
        started = time.monotonic()
        batches = 0
        while True:
            for table in tables:
                if table.more:
                    statement = _PRUNE_BATCH.format(table=sql.Identifier(table.name))
                    deleted = conn.execute(statement, {"cutoff": table.cutoff, "limit": batch_rows}).rowcount
                    table.deleted += deleted
                    table.more = deleted == batch_rows  # a short batch took the last of them
                    batches += 1
            more = any(table.more for table in tables)
            if not more or time.monotonic() - started >= budget_s:
                return Pruned(ledger.deleted, dead_letters.deleted, batches, more)
    finally:
        if not conn.broken:  # a lost connection took its session lock with it
            conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key,))
