"""After a failed delivery: retry with backoff, and when nobody of a step is left, move on.

A page that failed (provider error, busy, no answer, a voicemail with no keypress,
an undelivered SMS) is tried again as a new attempt row, ``not_before`` the backoff.
After ``MAX_TRIES`` the channel is given up for that person. A CAP alert is given
up after its first failure: the webhook notifier has already retried it with
backoff. When nobody the step paged can still take the incident — each of them
declined, or every channel to them was given up — the step advances at once
instead of waiting out its timer: the next people are paged now.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import psycopg

from alerts.timeline import add_event, wake_routers

Conn = psycopg.Connection[tuple[Any, ...]]

MAX_TRIES = 3
BACKOFF_S = (20, 60)  # before the 2nd and the 3rd try
FAILED_STATES = frozenset({"failed", "busy", "no_answer", "no_keypress", "undelivered"})


def after_failure(conn: Conn, attempt_id: int, now: datetime) -> str:
    """Schedule a retry of ``attempt_id``, or give the channel up; returns what was done.

    Runs in the caller's transaction. Only pages and re-pages are retried here; a
    CAP alert has had its retries in the webhook notifier, so its failure gives the
    platform up at once. A given-up page or CAP alert advances its step when nobody
    of the step is left (:func:`nobody_left`): "advanced".
    """
    row = conn.execute(
        """
        SELECT a.incident_id, a.action_id, a.purpose, a.round, a.step, a.recipient_kind, a.recipient_id,
               a.address, a.channel, a.attempt, i.state
        FROM notification_attempts a JOIN incidents i ON i.id = a.incident_id
        WHERE a.id = %s FOR UPDATE OF i
        """,
        (attempt_id,),
    ).fetchone()
    assert row is not None
    incident_id, action_id, purpose, round_, step, kind, recipient, address, channel, attempt, state = row
    if purpose not in ("page", "repage", "cap_alert") or state in ("resolved", "cancelled"):
        return "none"  # a notice, a CAP Update or Cancel: nothing waits on it
    if purpose != "repage" and state == "acknowledged":
        return "none"  # someone took it: no point paging the rest again
    if purpose != "cap_alert" and attempt < MAX_TRIES:
        delay = BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)]
        conn.execute(
            """
            INSERT INTO notification_attempts (incident_id, action_id, purpose, round, step, recipient_kind,
                recipient_id, address, channel, attempt, state, created_at, not_before)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'pending', %s, %s) ON CONFLICT DO NOTHING
            """,
            (
                incident_id,
                action_id,
                purpose,
                round_,
                step,
                kind,
                recipient,
                address,
                channel,
                attempt + 1,
                now,
                now + timedelta(seconds=delay),
            ),
        )
        add_event(
            conn,
            incident_id,
            now,
            "retry_scheduled",
            None,
            {"attempt_id": attempt_id, "channel": channel, "to": address, "try": attempt + 1, "in_s": delay},
        )
        return "retry"
    add_event(
        conn,
        incident_id,
        now,
        "channel_given_up",
        None,
        {"attempt_id": attempt_id, "channel": channel, "to": address, "tries": attempt},
    )
    if purpose != "repage":
        reason = nobody_left(conn, incident_id, round_, step)
        if reason is not None and advance(conn, incident_id, round_, step, now, reason):
            return "advanced"
    return "given_up"


def _given_up(channel: str, state: str, attempt: int) -> bool:
    # A CAP alert's one attempt already holds the webhook notifier's retries.
    return state in FAILED_STATES and (attempt >= MAX_TRIES or channel == "webhook")


def nobody_left(conn: Conn, incident_id: int, round_: int, step: int) -> str | None:
    """Why nobody the step paged can still take the incident, or ``None`` while someone can.

    Decided from each recipient's channels, on the last try of each: a recipient is
    out once they declined this step, or once every channel to them failed its last
    try (busy, no answer, voicemail, undelivered, a provider error) or was cancelled.
    A channel still pending, sent, delivered or answered keeps them in: they may yet
    answer. Declines count from the step's start, so one from an earlier round does not.
    """
    rows = conn.execute(
        """
        SELECT DISTINCT ON (recipient_kind, recipient_id, channel)
               recipient_kind || ':' || recipient_id, channel, state, attempt,
               min(created_at) OVER ()
        FROM notification_attempts
        WHERE incident_id = %s AND round = %s AND step = %s AND purpose IN ('page', 'cap_alert')
          AND channel IN ('voice', 'sms', 'webhook')
        ORDER BY recipient_kind, recipient_id, channel, attempt DESC
        """,
        (incident_id, round_, step),
    ).fetchall()
    if not rows:
        return None
    declined = {
        str(actor)
        for (actor,) in conn.execute(
            "SELECT DISTINCT actor FROM incident_events WHERE incident_id = %s AND event = 'declined' AND at >= %s",
            (incident_id, rows[0][4]),
        ).fetchall()
    }
    reachable: set[str] = set()
    for person, channel, state, attempt, _started in rows:
        if person not in declined and state != "cancelled" and not _given_up(channel, state, attempt):
            reachable.add(person)
    if reachable:
        return None
    people = {str(r[0]) for r in rows}
    if people <= declined:
        return "everyone paged declined"
    if people & declined:
        return "everyone paged declined or could not be reached"
    return "every channel of the step failed"


def advance(conn: Conn, incident_id: int, round_: int, step: int, now: datetime, reason: str) -> bool:
    """Make the step after ``step`` due now; whether it was still waiting (and so was moved)."""
    advanced = conn.execute(
        "UPDATE escalation_actions SET due_at = %s WHERE incident_id = %s AND state = 'pending' AND kind = 'step'"
        " AND round = %s AND step = %s AND due_at > %s RETURNING id",
        (now, incident_id, round_, step + 1, now),
    ).fetchall()
    if not advanced:
        return False
    add_event(conn, incident_id, now, "step_advanced", None, {"reason": reason, "step": step, "round": round_})
    wake_routers(conn, "advanced")
    return True
