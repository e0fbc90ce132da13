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

A phone page that failed in a way retrying on the same provider cannot fix
(``SendResult.fall_back``: refused, 5xx, a timeout) goes out again at once on the
next provider of its area's choice (``alerts/providers.py``), as a new row that does
not count as one of the ``MAX_TRIES``. When no provider is left to fall back on, the
console and the operators are alarmed (``providers_down``, once per step) and the page
is retried and given up as any other failure.
"""

from __future__ import annotations

from datetime import datetime

from alerts.escalation import advance
from alerts.locks import lock_incident
from alerts.notifiers.base import Provider
from alerts.providers import FALLBACKS, PROVIDER_FAILURES, PROVIDERS_DOWN, Failover
from alerts.recipients import operators
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


def after_failure(
    conn: Conn,
    attempt_id: int,
    now: datetime,
    *,
    final: bool = False,
    fall_back: bool = False,
    failover: Failover | None = None,
) -> str:
    """Schedule a retry of ``attempt_id``, fall back to another provider, or give the channel up;
    returns what was done.

    Runs in the caller's transaction, the incident locked first (``alerts.attempts``).
    Pages, re-pages and CAP messages are retried; a notice is not. ``final``: the
    provider refused it for good (a 4xx from the platform), so no retry.
    ``fall_back``: the provider cannot carry it (``SendResult.fall_back``); with a
    ``failover`` naming a provider this page has not tried, the next try goes out on
    it at once: "fell_back". A given-up page or CAP alert advances its step when
    nobody of the step is left (:func:`nobody_left`): "advanced".
    """
    from alerts.attempts import queue_retry, tried_providers  # the attempts' owner imports this module's rules

    found = conn.execute("SELECT incident_id FROM notification_attempts WHERE id = %s", (attempt_id,)).fetchone()
    assert found is not None
    lock_incident(conn, int(found[0]))
    row = conn.execute(
        """
        SELECT a.incident_id, a.purpose, a.round, a.step, a.address, a.channel, a.attempt, i.state, a.provider
        FROM notification_attempts a JOIN incidents i ON i.id = a.incident_id
        WHERE a.id = %s
        """,
        (attempt_id,),
    ).fetchone()
    assert row is not None
    incident_id, raw_purpose, round_, step, address, channel, attempt, raw_state, raw_provider = row
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
    retry_on: Provider | None = None
    person_try = attempt  # which of the person's MAX_TRIES this was
    if channel in (Channel.VOICE, Channel.SMS):
        tried = tried_providers(conn, attempt_id)
        # A try that fell back to another provider is not one of the person's tries:
        # with every provider down the page is given up when it would be with one.
        fallbacks = max(len(tried) - 1, 0)
        tries += fallbacks
        person_try -= fallbacks
        if fall_back and raw_provider and not final:
            failed = Provider(raw_provider)
            PROVIDER_FAILURES.labels(failed.value, channel).inc()
            nxt = failover.choice.next_after(tried) if failover else None
            if nxt is not None:
                _fall_back(conn, attempt_id, incident_id, now, channel, address, attempt, failed, nxt)
                return "fell_back"
            if failover is not None:
                _providers_down(conn, incident_id, now, channel, round_, step, tried, failover)
                retry_on = failover.choice.primary  # no provider is left: retry where pages start
    if not final and attempt < tries:
        delay = backoff[min(person_try - 1, len(backoff) - 1)]
        # The same CAP message on the webhook: its identifier and sent time.
        queue_retry(conn, attempt_id, now, delay, keep_body=webhook, provider=retry_on)
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


def _fall_back(
    conn: Conn,
    attempt_id: int,
    incident_id: int,
    now: datetime,
    channel: str,
    address: str,
    attempt: int,
    failed: Provider,
    nxt: Provider,
) -> None:
    """The next try of the page, now, on ``nxt``: 呼叫失败（twilio：…），改由aliyun发送."""
    from alerts.attempts import queue_retry

    FALLBACKS.labels(failed.value, nxt.value).inc()
    queue_retry(conn, attempt_id, now, 0, keep_body=False, provider=nxt)
    error = conn.execute("SELECT error FROM notification_attempts WHERE id = %s", (attempt_id,)).fetchone()
    add_event(
        conn,
        incident_id,
        now,
        "provider_fallback",
        None,
        {
            "attempt_id": attempt_id,
            "channel": channel,
            "to": address,
            "try": attempt + 1,
            "failed": failed.value,
            "error": error[0] if error else None,
            "to_provider": nxt.value,
        },
    )


def _providers_down(
    conn: Conn,
    incident_id: int,
    now: datetime,
    channel: str,
    round_: int,
    step: int,
    tried: list[Provider],
    failover: Failover,
) -> None:
    """Every provider of the choice failed this page: alarm the consoles and the operators, once per step."""
    from alerts.attempts import queue_console_alarm

    PROVIDERS_DOWN.labels(channel).inc()
    already = conn.execute(
        "SELECT 1 FROM incident_events WHERE incident_id = %s AND event = 'providers_down'"
        " AND (detail->>'round')::int = %s AND (detail->>'step')::int = %s",
        (incident_id, round_, step),
    ).fetchone()
    if already:
        return
    names = "、".join(p.value for p in tried)
    event = add_event(
        conn,
        incident_id,
        now,
        "providers_down",
        None,
        {"round": round_, "step": step, "channel": channel, "providers": [p.value for p in tried]},
    )
    people = [(p.kind, p.id) for p in operators(conn, now, failover.zone)]
    text = f"电话通知全部失败：服务商（{names}）均无法发送，请立即通过其他方式联系当事人。"
    queue_console_alarm(conn, incident_id, event, text, people, now)


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
