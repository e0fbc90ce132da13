"""After a failed delivery: retry with backoff, and when nobody of a step is left, move on.

A page that failed (provider error, busy, no answer, a voicemail with no keypress,
an undelivered SMS) is tried again as a new attempt row, ``not_before`` the backoff.
After ``MAX_TRIES`` the channel is given up for that person. A CAP message (Alert,
Update, Cancel) is retried the same way, one request per attempt, after
``WEBHOOK_BACKOFF_S`` (0.5, 1, 2, 4 s: five tries, keeping the first try's CAP
identifier), unless the platform refused it (a 4xx: ``final``). When nobody the
step paged can still take the incident — each of them declined, or every channel
to them was given up — the step advances at once instead of waiting out its
timer: the next people are paged now.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from alerts.timeline import add_event, wake_routers
from shouhu.db import Conn

MAX_TRIES = 3
BACKOFF_S = (20, 60)  # before the 2nd and the 3rd try
WEBHOOK_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)  # before the 2nd … 5th try of a CAP message
WEBHOOK_TRIES = len(WEBHOOK_BACKOFF_S) + 1
FAILED_STATES = frozenset({"failed", "busy", "no_answer", "no_keypress", "undelivered"})


def after_failure(conn: Conn, attempt_id: int, now: datetime, *, final: bool = False) -> str:
    """Schedule a retry of ``attempt_id``, or give the channel up; returns what was done.

    Runs in the caller's transaction, the incident locked first (``alerts.attempts``).
    Pages, re-pages and CAP messages are retried; a notice is not. ``final``: the
    provider refused it for good (a 4xx from the platform), so no retry. A given-up
    page or CAP alert advances its step when nobody of the step is left
    (:func:`nobody_left`): "advanced".
    """
    from alerts.attempts import lock_incident

    found = conn.execute("SELECT incident_id FROM notification_attempts WHERE id = %s", (attempt_id,)).fetchone()
    assert found is not None
    lock_incident(conn, int(found[0]))
    row = conn.execute(
        """
        SELECT a.incident_id, a.action_id, a.purpose, a.round, a.step, a.recipient_kind, a.recipient_id,
               a.address, a.channel, a.attempt, i.state, a.body
        FROM notification_attempts a JOIN incidents i ON i.id = a.incident_id
        WHERE a.id = %s
        """,
        (attempt_id,),
    ).fetchone()
    assert row is not None
    incident_id, action_id, purpose, round_, step, kind, recipient, address, channel, attempt, state, body = row
    platform_news = purpose in ("cap_update", "cap_cancel")
    if purpose not in ("page", "repage", "cap_alert") and not platform_news:
        return "none"  # a notice: nothing waits on it
    if not platform_news and state in ("resolved", "cancelled"):
        return "none"
    if purpose in ("page", "cap_alert") and state == "acknowledged":
        return "none"  # someone took it: no point paging the rest again
    webhook = channel == "webhook"
    tries, backoff = (WEBHOOK_TRIES, WEBHOOK_BACKOFF_S) if webhook else (MAX_TRIES, BACKOFF_S)
    if not final and attempt < tries:
        delay = backoff[min(attempt - 1, len(backoff) - 1)]
        conn.execute(
            """
            INSERT INTO notification_attempts (incident_id, action_id, purpose, round, step, recipient_kind,
                recipient_id, address, channel, attempt, state, created_at, not_before, body)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s) ON CONFLICT DO NOTHING
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
                body if webhook else None,  # the same CAP message: its identifier and sent time
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
    if purpose in ("page", "cap_alert"):
        reason = nobody_left(conn, incident_id, round_, step)
        if reason is not None and advance(conn, incident_id, round_, step, now, reason):
            return "advanced"
    return "given_up"


def _given_up(channel: str, state: str, attempt: int) -> bool:
    # A CAP alert's retry is written in the same transaction as its failure, so a
    # failed last try is given up (its tries ran out, or the platform refused it).
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
