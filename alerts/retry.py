"""After a failed delivery: retry with backoff, and when a whole step has failed, move on.

A page that failed (provider error, busy, no answer, a voicemail with no keypress,
an undelivered SMS) is tried again as a new attempt row, ``not_before`` the backoff.
After ``MAX_TRIES`` the channel is given up for that person; when every page of the
step has been given up, the step advances at once instead of waiting out its timer
— the next people are paged now.
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

    Runs in the caller's transaction. Only pages and re-pages are retried here
    (a CAP message has its own retries in the webhook notifier).
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
    if purpose not in ("page", "repage") or state in ("resolved", "cancelled"):
        return "none"
    if purpose == "page" and state == "acknowledged":
        return "none"  # someone took it: no point paging the rest again
    if attempt < MAX_TRIES:
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
    if purpose == "page" and step_hard_failed(conn, incident_id, round_, step):
        advanced = conn.execute(
            "UPDATE escalation_actions SET due_at = %s WHERE incident_id = %s AND state = 'pending'"
            " AND kind = 'step' AND due_at > %s RETURNING id",
            (now, incident_id, now),
        ).fetchall()
        if advanced:
            add_event(
                conn,
                incident_id,
                now,
                "step_advanced",
                None,
                {"reason": "every channel of the step failed", "step": step, "round": round_},
            )
            wake_routers(conn, "advanced")
            return "advanced"
    return "given_up"


def step_hard_failed(conn: Conn, incident_id: int, round_: int, step: int) -> bool:
    """Whether every phone page of the step has failed its last try (none pending or reached)."""
    rows = conn.execute(
        """
        SELECT DISTINCT ON (recipient_id, channel) state, attempt FROM notification_attempts
        WHERE incident_id = %s AND round = %s AND step = %s AND purpose = 'page' AND channel IN ('voice', 'sms')
        ORDER BY recipient_id, channel, attempt DESC
        """,
        (incident_id, round_, step),
    ).fetchall()
    return bool(rows) and all(state in FAILED_STATES and attempt >= MAX_TRIES for state, attempt in rows)
