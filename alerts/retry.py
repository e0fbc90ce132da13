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

from datetime import datetime

from alerts.escalation import advance
from alerts.locks import lock_incident
from alerts.states import CLOSED, FAILED, AttemptState, IncidentState
from alerts.timeline import add_event
from devices.kinds import AttemptPurpose, Channel
from shouhu.db import Conn

MAX_TRIES = 3
BACKOFF_S = (20, 60)  # before the 2nd and the 3rd try
WEBHOOK_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)  # before the 2nd … 5th try of a CAP message
WEBHOOK_TRIES = len(WEBHOOK_BACKOFF_S) + 1
FAILED_STATES = FAILED
RETRIED = (AttemptPurpose.PAGE, AttemptPurpose.REPAGE, AttemptPurpose.CAP_ALERT)
PLATFORM_NEWS = (AttemptPurpose.CAP_UPDATE, AttemptPurpose.CAP_CANCEL)
STEP_PAGES = (AttemptPurpose.PAGE, AttemptPurpose.CAP_ALERT)

__all__ = ["FAILED_STATES", "MAX_TRIES", "advance", "after_failure", "nobody_left"]


def after_failure(conn: Conn, attempt_id: int, now: datetime, *, final: bool = False) -> str:
    """Schedule a retry of ``attempt_id``, or give the channel up; returns what was done.

    Runs in the caller's transaction, the incident locked first (``alerts.attempts``).
    Pages, re-pages and CAP messages are retried; a notice is not. ``final``: the
    provider refused it for good (a 4xx from the platform), so no retry. A given-up
    page or CAP alert advances its step when nobody of the step is left
    (:func:`nobody_left`): "advanced".
    """
    from alerts.attempts import queue_retry  # the attempts' owner imports this module's rules

    found = conn.execute("SELECT incident_id FROM notification_attempts WHERE id = %s", (attempt_id,)).fetchone()
    assert found is not None
    lock_incident(conn, int(found[0]))
    row = conn.execute(
        """
        SELECT a.incident_id, a.purpose, a.round, a.step, a.address, a.channel, a.attempt, i.state
        FROM notification_attempts a JOIN incidents i ON i.id = a.incident_id
        WHERE a.id = %s
        """,
        (attempt_id,),
    ).fetchone()
    assert row is not None
    incident_id, raw_purpose, round_, step, address, channel, attempt, raw_state = row
    purpose, state = AttemptPurpose(raw_purpose), IncidentState(raw_state)
    platform_news = purpose in PLATFORM_NEWS
    if purpose not in RETRIED and not platform_news:
        return "none"  # a notice: nothing waits on it
    if not platform_news and state in CLOSED:
        return "none"
    if purpose in STEP_PAGES and state is IncidentState.ACKNOWLEDGED:
        return "none"  # someone took it: no point paging the rest again
    webhook = channel == Channel.WEBHOOK
    tries, backoff = (WEBHOOK_TRIES, WEBHOOK_BACKOFF_S) if webhook else (MAX_TRIES, BACKOFF_S)
    if not final and attempt < tries:
        delay = backoff[min(attempt - 1, len(backoff) - 1)]
        # The same CAP message on the webhook: its identifier and sent time.
        queue_retry(conn, attempt_id, now, delay, keep_body=webhook)
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
    if purpose in STEP_PAGES:
        reason = nobody_left(conn, incident_id, round_, step)
        if reason is not None and advance(conn, incident_id, round_, step, now, reason):
            return "advanced"
    return "given_up"


def _given_up(channel: str, state: str, attempt: int) -> bool:
    # A CAP alert's retry is written in the same transaction as its failure, so a
    # failed last try is given up (its tries ran out, or the platform refused it).
    return state in FAILED_STATES and (attempt >= MAX_TRIES or channel == Channel.WEBHOOK)


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
        WHERE incident_id = %s AND round = %s AND step = %s AND purpose = ANY(%s) AND channel = ANY(%s)
        ORDER BY recipient_kind, recipient_id, channel, attempt DESC
        """,
        (
            incident_id,
            round_,
            step,
            [p.value for p in STEP_PAGES],
            [Channel.VOICE.value, Channel.SMS.value, Channel.WEBHOOK.value],
        ),
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
        if person not in declined and state != AttemptState.CANCELLED and not _given_up(channel, state, attempt):
            reachable.add(person)
    if reachable:
        return None
    people = {str(r[0]) for r in rows}
    if people <= declined:
        return "everyone paged declined"
    if people & declined:
        return "everyone paged declined or could not be reached"
    return "every channel of the step failed"
