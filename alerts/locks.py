"""The lock order, taken through one helper: **incident → escalation actions → notification attempts**.

Every transaction that writes an incident's actions, attempts or timeline locks the
incident row first, through :func:`lock_incident` (or :func:`lock_incidents`, in id
order, for several). Rows of ``escalation_actions`` come next, then
``notification_attempts``. Because the incident is always taken first and
``FOR UPDATE`` (or ``FOR SHARE`` by a sender's claim and by settling a send the
provider accepted), the key-share lock an insert
into a child table takes on the incident never has to be upgraded under another
transaction's, which is how "deadlock detected … relation incidents" happened.

A supervision (督办, alerts/supervise.py) follows the same order: the incident, then its
next pending action, that one taken ``SKIP LOCKED`` because a router claims actions
before it locks their incident.

A claim of due rows (``FOR UPDATE SKIP LOCKED``) may come before the incident's lock:
a skipped row never waits, so it cannot close a cycle. docs/escalation.md, "Locks".

Its own module so that alerts/escalation.py and alerts/attempts.py, which call each
other's functions, both take it without importing one another for it.
"""

from __future__ import annotations

from alerts.states import IncidentState
from shouhu.db import Conn


def lock_incident(conn: Conn, incident_id: int, *, share: bool = False) -> IncidentState | None:
    """Lock the incident row (``FOR UPDATE``, or ``FOR SHARE``); its state, or None if there is none.

    The first lock a transaction takes on an incident's rows: incident → actions → attempts.
    """
    mode = "FOR SHARE" if share else "FOR UPDATE"
    row = conn.execute(f"SELECT state FROM incidents WHERE id = %s {mode}", (incident_id,)).fetchone()
    return None if row is None else IncidentState(row[0])


def lock_incidents(conn: Conn, incident_ids: list[int], *, share: bool = False) -> dict[int, IncidentState]:
    """:func:`lock_incident` for several, in id order (two lockers never wait for each other in a cycle)."""
    mode = "FOR SHARE" if share else "FOR UPDATE"
    rows = conn.execute(
        f"SELECT id, state FROM incidents WHERE id = ANY(%s) ORDER BY id {mode}", (sorted(set(incident_ids)),)
    ).fetchall()
    return {int(i): IncidentState(s) for i, s in rows}
