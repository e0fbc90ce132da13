"""Notification attempts: the lock order, claiming an attempt with a lease, settling it.

No database lock is held across a provider call (DESIGN.md, "Channels are isolated"):

1. **claim**, one short transaction: due ``pending`` attempts of one channel are
   taken ``FOR UPDATE SKIP LOCKED``, their incidents read ``FOR SHARE``, and a lease
   committed on each (who, which database session, until when). Pages of an incident
   that is no longer escalating are cancelled here instead: the share lock conflicts
   with the ``FOR UPDATE`` an acknowledgement takes, so either the claim commits
   first (the acknowledgement then sees the attempt in flight and tells that person
   who took it) or the acknowledgement does (and the page never starts).
2. **send**, outside any transaction, with the notifier's hard timeout.
3. **settle**, a new transaction: incident first (``FOR SHARE`` for a send the
   provider accepted, ``FOR UPDATE`` for a failure), then the attempt, fenced by the
   lease (a sender whose lease was taken over records nothing).

A console page is not claimed at all: it is written as sent by the step that queues
it (:func:`queue_pages`, ``recorded``), the console's "sending" being that row.

An attempt stays ``pending`` while leased. A lease whose database session is gone (the
router died) or whose time ran out is taken over and the attempt re-sent under the
same key — once: lost a second time, it is failed, never sent a third time.

Lock order, everywhere: **incident → escalation actions → notification attempts**,
taken through :func:`alerts.locks.lock_incident` (docs/escalation.md, "Locks").

This module is the only writer of ``notification_attempts``: the pages of a step
(:func:`queue_pages`), re-pages, notices and CAP Updates (:func:`queue_notice`,
:func:`queue_repage`, :func:`queue_platform_message`), retries (:func:`queue_retry`),
cancelling pages not yet started, what a provider's callback says
(:func:`take_provider_id`, :func:`mark_answered`, :func:`record_status`), the
pages the hub's spool sent while the database was down (:func:`record_spooled_page`),
the provider a phone attempt went out on (recorded by :func:`settle`; a fallback is a
retry on another one), the consoles' alarm when every provider failed
(:func:`queue_console_alarm`) and, past ``SHOUHU_CONTACT_DAYS`` after the incident
closed, the numbers masked and the texts cleared (:func:`mask_contacts`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from alerts.locks import lock_incident, lock_incidents
from alerts.notifiers.base import Provider, SendOutcome, SendResult
from alerts.providers import PHONE_CHANNELS, Failover
from alerts.states import ACTIVE, CLOSED, AttemptState, IncidentState
from alerts.timeline import MASKED_IN_TEXT, add_event
from devices.kinds import AttemptPurpose, Channel
from shouhu.db import Conn

log = logging.getLogger(__name__)

__all__ = [
    "ATTEMPTS",
    "LEASE_S",
    "Lease",
    "LockedAttempt",
    "NewPage",
    "RecordedPage",
    "cancel_pending",
    "claim",
    "lock_attempt",
    "lock_incident",
    "lock_incidents",
    "mark_answered",
    "mask_contacts",
    "next_try",
    "queue_console_alarm",
    "queue_notice",
    "queue_pages",
    "queue_platform_message",
    "queue_repage",
    "queue_retry",
    "record_spooled_page",
    "record_status",
    "settle",
    "take_provider_id",
    "tried_providers",
]


ATTEMPTS = Counter(
    "shouhu_router_attempts_total",
    "Notification attempts, by channel, purpose and outcome",
    ["channel", "purpose", "outcome"],
)

# Longer than any notifier's hard timeout per request (10 s), with room: a live sender
# always settles before its lease runs out.
LEASE_S = 60.0
# Taken over twice means it was lost in flight twice: fail it rather than send a third time.
MAX_SENDS = 2


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed attempt: its id, the lease that fences its settling, how often it was sent,
    and what the claimer asked to read about it in the lease's statement (``claim(read=…)``)."""

    attempt_id: int
    incident_id: int
    token: str
    sends: int
    read: tuple[Any, ...] | None = field(default=None, compare=False)


def _cancel(conn: Conn, attempt_id: int, incident_id: int, now: datetime, why: str, worker: str) -> None:
    conn.execute(
        "UPDATE notification_attempts SET state = %s, error = %s, updated_at = %s WHERE id = %s",
        (AttemptState.CANCELLED, why, now, attempt_id),
    )
    add_event(conn, incident_id, now, "attempt_cancelled", worker, {"attempt_id": attempt_id, "reason": why})


def _keep(conn: Conn, purpose: AttemptPurpose, incident_id: int, state: IncidentState) -> tuple[bool, str | None]:
    """(send it?, why not) for a due attempt of an incident in ``state``; (False, None): not yet."""
    if purpose in (AttemptPurpose.PAGE, AttemptPurpose.CAP_ALERT) and state not in ACTIVE:
        return False, f"incident {state} before the send started"
    if purpose is AttemptPurpose.REPAGE and state in CLOSED:
        return False, f"incident {state} before the send started"
    if purpose in (AttemptPurpose.CAP_UPDATE, AttemptPurpose.CAP_CANCEL):
        alerts = conn.execute(
            "SELECT bool_or(state = %s), bool_or(state = %s) FROM notification_attempts"
            " WHERE incident_id = %s AND purpose = %s",
            (AttemptState.SENT, AttemptState.PENDING, incident_id, AttemptPurpose.CAP_ALERT),
        ).fetchone()
        sent, pending = alerts or (None, None)
        if not sent and pending:
            return False, None  # the Alert is still on its way (or retrying): the Update follows it
        if not sent:
            return False, "the platform never received the alert"
    return True, None


def claim(
    conn: Conn,
    channels: Collection[Channel],
    now: datetime,
    worker: str,
    *,
    limit: int = 1,
    lease_s: float = LEASE_S,
    first_pages_only: bool = False,
    only: int | None = None,
    read: str = "SELECT a.id FROM leased a",
) -> list[Lease]:
    """Lease up to ``limit`` due attempts of ``channels`` for ``worker``, oldest first; in the caller's transaction.

    An incident's very first pages go before everything else, and among them first
    those of incidents no provider has been asked about yet: in a mass event every
    incident gets one call or SMS out before any gets its second channel. Each query is
    served by a partial index. Commit before sending: the lease is what other senders see.
    ``only``: that attempt alone, if it is due and free (a fallback its sender sends at once).
    ``read``: a query over ``leased a`` (the leased rows as updated) whose first column is
    the attempt's id, run in the lease's own statement; each lease carries its row.
    """
    taken: list[tuple[Any, ...]] = []
    tiers: tuple[str, ...] = (_UNPAGED_FIRST_PAGES, _FIRST_PAGES)
    if not first_pages_only:
        tiers += ("",)
    if only is not None:
        tiers = (f"AND a.id = {int(only)}",)
    for extra in tiers:
        taken = conn.execute(*claim_query(extra, channels, now, limit)).fetchall()
        if taken:
            break
    if not taken:
        return []
    states = lock_incidents(conn, [int(r[1]) for r in taken], share=True)
    leasing: list[tuple[int, int, int, str | None]] = []  # attempt, incident, sends so far, body
    for attempt_id, incident_id, purpose, sends, stored, channel in taken:
        if sends >= MAX_SENDS:
            conn.execute(
                "UPDATE notification_attempts SET state = %s, error = %s, leased_until = NULL, updated_at = %s"
                " WHERE id = %s",
                (
                    AttemptState.FAILED,
                    "lost in flight twice (its sender died): not sent a third time",
                    now,
                    attempt_id,
                ),
            )
            add_event(conn, incident_id, now, "attempt_failed", worker, {"attempt_id": attempt_id, "lost": sends})
            continue
        keep, why = _keep(conn, AttemptPurpose(purpose), incident_id, states.get(incident_id, IncidentState.RESOLVED))
        if not keep:
            if why is not None:
                _cancel(conn, attempt_id, incident_id, now, why, worker)
            continue
        if sends:
            log.warning("attempt %s: its sender's lease lapsed in flight; sending again under its key", attempt_id)
            add_event(conn, incident_id, now, "attempt_resent", worker, {"attempt_id": attempt_id, "sends": sends + 1})
        body = stored
        if channel == Channel.WEBHOOK.value and not body:
            # The CAP identifier is fixed at the first claim and kept, so a re-send after a
            # crash, or a retry, is the same CAP message (the platform deduplicates on it).
            body = json.dumps(
                {
                    "identifier": f"shouhu-{incident_id}-{attempt_id}-{uuid.uuid4().hex[:8]}",
                    "sent": now.replace(microsecond=0).isoformat(),
                }
            )
        leasing.append((int(attempt_id), int(incident_id), int(sends), body))
    if not leasing:
        return []
    token = f"{worker}/{uuid.uuid4().hex[:12]}"
    rows = conn.execute(
        _LEASE.format(read=read),
        {
            "ids": [attempt_id for attempt_id, *_ in leasing],
            "bodies": [body for *_, body in leasing],
            "token": token,
            "until": now + timedelta(seconds=lease_s),
            "now": now,
        },
    ).fetchall()
    read_rows = {int(row[0]): tuple(row) for row in rows}
    return [
        Lease(attempt_id, incident_id, token, sends + 1, read_rows.get(attempt_id))
        for attempt_id, incident_id, sends, _body in leasing
    ]


# The lease of the claimed attempts, and what the claimer reads about them, in one
# statement (in a mass event a round trip per page less). The read sees the leased rows
# as updated (``leased``); any other table as before the statement.
_LEASE = """
    WITH leased AS (
        UPDATE notification_attempts a
        SET leased_by = %(token)s, lease_pid = pg_backend_pid(), leased_until = %(until)s,
            sends = a.sends + 1, body = l.body, updated_at = %(now)s
        FROM unnest(%(ids)s::bigint[], %(bodies)s::text[]) AS l(id, body)
        WHERE a.id = l.id
        RETURNING a.*
    )
    {read}
"""


def claim_query(extra: str, channels: Collection[Channel], now: datetime, limit: int) -> tuple[str, dict[str, Any]]:
    """One tier of :func:`claim`: its statement and parameters.

    One channel (every sender's claim) is matched by equality: only then can the planner
    read that channel's index in order and stop at the first free row. With
    ``= ANY(array)`` its generic plan (psycopg prepares a statement run five times) walked
    the all-channel first-pages index past every other channel's rows and every waiting
    sibling: in a mass event, a scan of the queue per claim.
    """
    values = [c.value for c in channels]
    match = "a.channel = %(channel)s" if len(values) == 1 else "a.channel = ANY(%(channels)s)"
    query = _CLAIM.format(extra=extra, pending=AttemptState.PENDING, channel_match=match)
    return query, {"channels": values, "channel": values[0] if values else None, "now": now, "limit": limit}


# State and purpose are written out (from the enums), not passed as parameters: each
# claim must match a partial index's predicate, which a parameter cannot prove. A lease's
# session is looked up with an uncorrelated ``NOT IN``, one hashed read of
# ``pg_stat_activity`` per claim: as a correlated ``NOT EXISTS`` it was read again for
# every attempt in flight the claim passed over (a third of a claim's cost in a mass event).
_CLAIM = """
    SELECT a.id, a.incident_id, a.purpose, a.sends, a.body, a.channel FROM notification_attempts a
    WHERE a.state = '{pending}' AND {channel_match} AND (a.not_before IS NULL OR a.not_before <= %(now)s)
      AND (a.leased_until IS NULL OR a.leased_until < %(now)s
           OR coalesce(a.lease_pid, 0) NOT IN (SELECT s.pid FROM pg_stat_activity s WHERE s.pid IS NOT NULL)) {extra}
    ORDER BY a.created_at, a.id
    LIMIT %(limit)s
    FOR UPDATE OF a SKIP LOCKED
"""
_FIRST_PAGES = f"AND a.purpose = '{AttemptPurpose.PAGE}' AND a.round = 0 AND a.step = 0 AND a.attempt = 1"
# The one first page of each incident that leads (migration 15; chosen by queue_pages):
# senders take these before any incident's other first pages.
_UNPAGED_FIRST_PAGES = _FIRST_PAGES + " AND NOT a.behind_sibling"


def settle(
    conn: Conn,
    lease: Lease,
    result: SendResult,
    now: datetime,
    worker: str,
    detail: dict[str, Any],
    *,
    failover: Failover | None = None,
    provider: Provider | None = None,
) -> str | None:
    """Record a send's outcome, in the caller's (new) transaction; the attempt's state, or None if fenced out.

    A success is recorded by one statement, which is a transaction of its own on an
    autocommit connection (how the router's senders settle it, in one round trip).

    ``provider``: the phone provider it went out on, recorded here with the outcome
    (an attempt that has one keeps it), not in a statement of its own.

    A keypress may have answered the call before its sid came back: the attempt keeps
    ``answered`` and gets its sid. A failure is retried, falls back to the next
    provider of ``failover`` or is given up (``alerts.retry``).
    """
    from alerts.retry import after_failure  # retry queues attempts through this module's rules

    # A send the provider accepted decides nothing (no retry, no step advanced): the
    # statement holds the incident FOR SHARE, which other senders' claims and successful
    # settles share, and which an acknowledgement's or a callback's FOR UPDATE still
    # waits for; one statement, so the dispatcher can settle a success in one round trip.
    # A failure may retry, fall back or advance the step from what the other attempts
    # say, so failures settle one at a time, FOR UPDATE, taken first (``after_failure``
    # locks it too: a share lock taken first would have to be upgraded).
    if result.outcome is not SendOutcome.SENT:
        if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            raise RuntimeError("a failed send is settled in a transaction: its lock must hold until after_failure")
        lock_incident(conn, lease.incident_id)
    outcome = result.outcome.value
    # The outcome and its timeline entry in one statement (a mass event settles thousands).
    row = conn.execute(
        _SETTLE,
        {
            "pending": AttemptState.PENDING,
            "outcome": outcome,
            "provider_id": result.provider_id,
            "error": result.error,
            "sent": result.outcome is SendOutcome.SENT,
            "now": now,
            "provider": None if provider is None else provider.value,
            "attempt": lease.attempt_id,
            "token": lease.token,
            "incident": lease.incident_id,
            "event": "attempt_" + outcome,
            "worker": worker,
            "detail": Jsonb(
                detail | {"attempt_id": lease.attempt_id, "provider_id": result.provider_id, "error": result.error}
            ),
            "late": Jsonb({"attempt_id": lease.attempt_id, "outcome": outcome, "provider_id": result.provider_id}),
        },
    ).fetchone()
    if row is None:
        log.warning("attempt %s: lease %s was taken over; its result is not recorded", lease.attempt_id, lease.token)
        return None
    if result.outcome is SendOutcome.FAILED and row[0] == outcome:
        after_failure(conn, lease.attempt_id, now, final=result.final, fall_back=result.fall_back, failover=failover)
    return str(row[0])


# A settled attempt and its timeline entry (``attempt_<outcome>``, or ``attempt_result_late``
# when the lease was taken over and nothing is recorded): add_event's row, written here.
# ``held`` is the incident's lock, first (incident → attempts): the update's condition
# refers to it, so PostgreSQL takes it before it locks the attempt's row.
_SETTLE = """
    WITH held AS (
        SELECT id FROM incidents WHERE id = %(incident)s FOR SHARE
    ), settled AS (
        UPDATE notification_attempts
        SET state = CASE WHEN state = %(pending)s THEN %(outcome)s ELSE state END,
            provider_id = coalesce(provider_id, %(provider_id)s), error = coalesce(%(error)s, error),
            sent_at = CASE WHEN %(sent)s THEN %(now)s ELSE sent_at END, provider = coalesce(provider, %(provider)s),
            leased_by = NULL, lease_pid = NULL, leased_until = NULL, updated_at = %(now)s
        WHERE id = %(attempt)s AND leased_by = %(token)s AND EXISTS (SELECT FROM held)
        RETURNING state
    ), logged AS (
        INSERT INTO incident_events (incident_id, at, event, actor, detail)
        SELECT %(incident)s, %(now)s, CASE WHEN s.state IS NULL THEN 'attempt_result_late' ELSE %(event)s END,
               %(worker)s, CASE WHEN s.state IS NULL THEN %(late)s ELSE %(detail)s END
        FROM (SELECT 1) AS one LEFT JOIN settled s ON true
    )
    SELECT state FROM settled
"""


# --- queueing ---------------------------------------------------------------------------
# Every new attempt row is written here; the router's senders claim them (above).


@dataclass(frozen=True, slots=True)
class NewPage:
    """One page of an escalation step: a person (or the platform) on one channel."""

    incident_id: int
    action_id: int
    purpose: AttemptPurpose  # PAGE, or CAP_ALERT on the webhook
    round: int
    step: int
    recipient_kind: str
    recipient_id: str
    address: str
    channel: Channel


@dataclass(frozen=True, slots=True)
class RecordedPage:
    """A page written as sent when it was queued (a console's: see :func:`queue_pages`)."""

    id: int
    incident_id: int
    purpose: AttemptPurpose
    channel: Channel
    address: str
    step: int
    round: int
    provider_id: str


# Which channel leads an incident's first pages, alternating over the incidents whose
# steps are written together (in incident order): the call for the first, the SMS for the
# second, and so on. An incident alone leads with its call; in a mass event the call
# senders and the SMS senders, each taking the oldest leading page of its channel, page
# different incidents.
_LEADING_CHANNEL = (Channel.VOICE, Channel.SMS)


def _is_first_page(page: NewPage) -> bool:
    return page.purpose is AttemptPurpose.PAGE and page.round == 0 and page.step == 0


def behind_the_leader(pages: list[NewPage], recorded: Collection[Channel] = ()) -> list[bool]:
    """For each page, whether it waits behind its incident's leading first page
    (``behind_sibling``, migration 15): every incident gets one call or SMS out before any
    gets its second first page.

    An incident's first call or SMS leads: on the channel ``_LEADING_CHANNEL`` gives its
    place among the incidents of ``pages`` if it has a page there, else its first phone
    page. Its other first pages (calls, SMS, a console page that is sent rather than
    recorded) are behind it: claimed only when no leading page of their channel waits.
    Chosen when the pages are written, not when one is leased: at lease time two
    senders leasing the same incident's call and SMS at once each saw the other's row
    locked and both went ahead (476 of 1,000 incidents in a mass event, which then took
    half again as long to page every incident).
    """
    paged = sorted({page.incident_id for page in pages if _is_first_page(page)})
    place = {incident: number for number, incident in enumerate(paged)}
    leaders: dict[int, int] = {}
    for index, page in enumerate(pages):
        if not _is_first_page(page) or page.channel not in PHONE_CHANNELS:
            continue
        current = leaders.get(page.incident_id)
        preferred = _LEADING_CHANNEL[place[page.incident_id] % 2]
        if current is None or (pages[current].channel is not preferred and page.channel is preferred):
            leaders[page.incident_id] = index
    return [
        _is_first_page(page)
        and page.incident_id in leaders
        and leaders[page.incident_id] != index
        and page.channel not in recorded
        for index, page in enumerate(pages)
    ]


def queue_pages(
    conn: Conn, pages: list[NewPage], now: datetime, *, recorded: Collection[Channel] = ()
) -> list[RecordedPage]:
    """A step's pages, in one statement; a page already queued (same key) is left as it is.

    A page on a channel of ``recorded`` is written as sent, now: the console's "sending"
    is this row (alerts/notifiers/console.py), so it needs no claim, lease and settle
    of its own (three transactions per incident in a mass event). It is written in the
    step's transaction, which holds the incident's lock, so no acknowledgement can
    commit between the step and it. Returns those pages, for the caller's timeline.
    """
    if not pages:
        return []
    behind = behind_the_leader(pages, recorded)
    rows = conn.execute(
        """
        INSERT INTO notification_attempts (id, incident_id, action_id, purpose, round, step,
            recipient_kind, recipient_id, address, channel, attempt, state, created_at,
            sends, sent_at, provider_id, updated_at, behind_sibling)
        OVERRIDING SYSTEM VALUE
        SELECT n.id, n.incident_id, n.action_id, n.purpose, n.round, n.step, n.recipient_kind,
               n.recipient_id, n.address, n.channel, 1,
               CASE WHEN n.recorded THEN %(sent)s ELSE %(pending)s END, %(now)s,
               CASE WHEN n.recorded THEN 1 ELSE 0 END, CASE WHEN n.recorded THEN %(now)s END,
               CASE WHEN n.recorded THEN n.channel || '-' || n.id END, %(now)s, n.behind
        FROM (SELECT nextval(pg_get_serial_sequence('notification_attempts', 'id')) AS id, p.*
              FROM unnest(%(incident)s::bigint[], %(action)s::bigint[], %(purpose)s::text[], %(round)s::int[],
                          %(step)s::int[], %(kind)s::text[], %(recipient)s::text[], %(address)s::text[],
                          %(channel)s::text[], %(recorded)s::bool[], %(behind)s::bool[])
                   AS p(incident_id, action_id, purpose, round, step, recipient_kind, recipient_id, address,
                        channel, recorded, behind)) n
        ON CONFLICT DO NOTHING
        RETURNING id, incident_id, purpose, channel, address, step, round, provider_id, state
        """,
        {
            "incident": [p.incident_id for p in pages],
            "action": [p.action_id for p in pages],
            "purpose": [p.purpose.value for p in pages],
            "round": [p.round for p in pages],
            "step": [p.step for p in pages],
            "kind": [p.recipient_kind for p in pages],
            "recipient": [p.recipient_id for p in pages],
            "address": [p.address for p in pages],
            "channel": [p.channel.value for p in pages],
            "recorded": [p.channel in recorded and p.purpose is AttemptPurpose.PAGE for p in pages],
            "behind": behind,
            "sent": AttemptState.SENT.value,
            "pending": AttemptState.PENDING.value,
            "now": now,
        },
    ).fetchall()
    recorded_pages = [
        RecordedPage(int(i), int(incident), AttemptPurpose(purpose), Channel(channel), address, step, round_, sid)
        for i, incident, purpose, channel, address, step, round_, sid, state in rows
        if state == AttemptState.SENT
    ]
    for page in recorded_pages:
        ATTEMPTS.labels(page.channel.value, page.purpose.value, SendOutcome.SENT.value).inc()
    return recorded_pages


def queue_notice(
    conn: Conn,
    incident_id: int,
    cause_event: int,
    text: str,
    people: list[tuple[str, str, str]],
    now: datetime,
    *,
    not_before: datetime | None = None,
) -> int:
    """An SMS to each of ``people`` (kind, id, phone), keyed by the event that caused it (so it is queued once).

    ``not_before`` holds a non-urgent notice back (quiet hours); pages never use it.
    """
    for kind, recipient_id, phone in people:
        conn.execute(
            """
            INSERT INTO notification_attempts (incident_id, purpose, round, step, recipient_kind, recipient_id,
                address, channel, attempt, state, body, created_at, not_before)
            VALUES (%s, %s, 0, %s, %s, %s, %s, %s, 1, %s, %s, %s, %s) ON CONFLICT DO NOTHING
            """,
            (
                incident_id,
                AttemptPurpose.NOTICE,
                cause_event,
                kind,
                recipient_id,
                phone,
                Channel.SMS,
                AttemptState.PENDING,
                text,
                now,
                not_before,
            ),
        )
    return len(people)


def queue_platform_message(
    conn: Conn, incident_id: int, cause_event: int, purpose: AttemptPurpose, now: datetime
) -> bool:
    """A CAP Update or Cancel, if (and only if) the platform was sent the first alert, or it is on its way.

    An Alert in flight (leased) or between its tries: the Update is queued now and sent
    once the Alert got through (:func:`claim`), or dropped if it never did.
    """
    told = conn.execute(
        "SELECT 1 FROM notification_attempts WHERE incident_id = %s AND purpose = %s"
        " AND (state = %s OR (state = %s AND (leased_by IS NOT NULL OR attempt > 1)))",
        (incident_id, AttemptPurpose.CAP_ALERT, AttemptState.SENT, AttemptState.PENDING),
    ).fetchone()
    if not told:
        return False
    conn.execute(
        """
        INSERT INTO notification_attempts (incident_id, purpose, round, step, recipient_kind, recipient_id,
            address, channel, attempt, state, created_at)
        VALUES (%s, %s, 0, %s, 'platform', 'emergency-platform', '', %s, 1, %s, %s)
        ON CONFLICT DO NOTHING
        """,
        (incident_id, purpose, cause_event, Channel.WEBHOOK, AttemptState.PENDING, now),
    )
    return True


def queue_repage(
    conn: Conn, incident_id: int, cause_event: int, recipient: tuple[str, str, str], now: datetime
) -> None:
    """Call and text ``recipient`` (kind, id, phone) again: a press after they acknowledged."""
    kind, person, phone = recipient
    for channel in (Channel.VOICE, Channel.SMS):
        conn.execute(
            """
            INSERT INTO notification_attempts (incident_id, purpose, round, step, recipient_kind, recipient_id,
                address, channel, attempt, state, created_at)
            VALUES (%s, %s, 0, %s, %s, %s, %s, %s, 1, %s, %s) ON CONFLICT DO NOTHING
            """,
            (incident_id, AttemptPurpose.REPAGE, cause_event, kind, person, phone, channel, AttemptState.PENDING, now),
        )


def queue_retry(
    conn: Conn, attempt_id: int, now: datetime, delay_s: float, *, keep_body: bool, provider: Provider | None = None
) -> None:
    """The next try of ``attempt_id``: a new row, ``not_before`` the backoff (never a sleep).

    ``keep_body``: the same CAP message, its identifier and sent time (the platform
    deduplicates on them). The try goes out on ``provider`` (a fallback), else on the
    failed try's provider.
    """
    conn.execute(
        """
        INSERT INTO notification_attempts (incident_id, action_id, purpose, round, step, recipient_kind,
            recipient_id, address, channel, attempt, state, created_at, not_before, body, provider)
        SELECT incident_id, action_id, purpose, round, step, recipient_kind, recipient_id, address, channel,
            attempt + 1, %s, %s, %s, CASE WHEN %s THEN body END, coalesce(%s, provider)
        FROM notification_attempts WHERE id = %s
        ON CONFLICT DO NOTHING
        """,
        (AttemptState.PENDING, now, now + timedelta(seconds=delay_s), keep_body, provider, attempt_id),
    )


def next_try(conn: Conn, attempt_id: int) -> int | None:
    """The id of the try queued after ``attempt_id`` and not started yet, if there is one."""
    row = conn.execute(
        """
        SELECT n.id FROM notification_attempts a JOIN notification_attempts n
          ON n.incident_id = a.incident_id AND n.purpose = a.purpose AND n.round = a.round AND n.step = a.step
         AND n.recipient_id = a.recipient_id AND n.channel = a.channel AND n.attempt = a.attempt + 1
        WHERE a.id = %s AND n.state = %s AND n.leased_by IS NULL
        """,
        (attempt_id, AttemptState.PENDING),
    ).fetchone()
    return None if row is None else int(row[0])


def tried_providers(conn: Conn, attempt_id: int) -> list[Provider]:
    """The providers this page (every try of it so far, ``attempt_id``'s included) went out on, first first."""
    rows = conn.execute(
        """
        SELECT t.provider FROM notification_attempts a JOIN notification_attempts t
          ON t.incident_id = a.incident_id AND t.purpose = a.purpose AND t.round = a.round AND t.step = a.step
         AND t.recipient_id = a.recipient_id AND t.channel = a.channel AND t.attempt <= a.attempt
        WHERE a.id = %s AND t.provider IS NOT NULL
        GROUP BY t.provider ORDER BY min(t.attempt)
        """,
        (attempt_id,),
    ).fetchall()
    return [Provider(r[0]) for r in rows]


def queue_console_alarm(
    conn: Conn, incident_id: int, cause_event: int, text: str, people: list[tuple[str, str]], now: datetime
) -> int:
    """A console notice to each of ``people`` (kind, id), keyed by the event that caused it (queued once).

    What the consoles show when no phone page could go out: every provider failed.
    """
    for kind, recipient_id in people:
        conn.execute(
            """
            INSERT INTO notification_attempts (incident_id, purpose, round, step, recipient_kind, recipient_id,
                address, channel, attempt, state, body, created_at)
            VALUES (%s, %s, 0, %s, %s, %s, '', %s, 1, %s, %s, %s) ON CONFLICT DO NOTHING
            """,
            (
                incident_id,
                AttemptPurpose.NOTICE,
                cause_event,
                kind,
                recipient_id,
                Channel.CONSOLE,
                AttemptState.PENDING,
                text,
                now,
            ),
        )
    return len(people)


def record_spooled_page(
    conn: Conn,
    incident_id: int,
    action_id: int | None,
    recipient: tuple[str, str, str],
    channel: Channel,
    result: SendResult,
    started_at: datetime,
    finished_at: datetime,
) -> int | None:
    """A first-step page the hub's spool sent while the database was down (hub/spool.py), as it ended.

    Its id, or None if an earlier reconcile recorded it already.
    """
    kind, person, phone = recipient
    sent = result.outcome is SendOutcome.SENT
    row = conn.execute(
        """
        INSERT INTO notification_attempts (incident_id, action_id, purpose, round, step, recipient_kind,
            recipient_id, address, channel, attempt, state, provider_id, error, created_at, sent_at,
            updated_at, provider)
        VALUES (%s, %s, %s, 0, 0, %s, %s, %s, %s, 1, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT DO NOTHING RETURNING id
        """,
        (
            incident_id,
            action_id,
            AttemptPurpose.PAGE,
            kind,
            person,
            phone,
            channel,
            result.outcome.value,
            result.provider_id,
            result.error,
            started_at,
            finished_at if sent else None,
            finished_at,
            # The hub's spool pages through Twilio (hub/spool.py).
            Provider.TWILIO if channel in (Channel.VOICE, Channel.SMS) else None,
        ),
    ).fetchone()
    return None if row is None else int(row[0])


# --- cancelling -------------------------------------------------------------------------


def cancel_pending(conn: Conn, incident_id: int, now: datetime, *, pages_only: bool) -> None:
    """Cancel the incident's attempts not started yet; the incident is locked already.

    ``pages_only``: pages and re-pages (an acknowledgement, a resolve, a cancel; notices
    and CAP messages still go), else every pending attempt (a low battery charged).
    Rows a sender holds right now are skipped, not waited for: a page already leased
    goes on and its person is told who took it; one claimed right now reads the
    incident under a share lock this transaction's ``FOR UPDATE`` conflicts with, so it
    sees the incident as this transaction leaves it and cancels itself.
    """
    purposes = [AttemptPurpose.PAGE.value, AttemptPurpose.REPAGE.value] if pages_only else None
    conn.execute(
        """
        UPDATE notification_attempts SET state = %(cancelled)s, updated_at = %(now)s
        WHERE id IN (SELECT id FROM notification_attempts WHERE incident_id = %(incident)s AND state = %(pending)s
                     AND (%(purposes)s::text[] IS NULL OR (purpose = ANY(%(purposes)s) AND leased_by IS NULL))
                     FOR UPDATE SKIP LOCKED)
        """,
        {
            "cancelled": AttemptState.CANCELLED,
            "now": now,
            "incident": incident_id,
            "pending": AttemptState.PENDING,
            "purposes": purposes,
        },
    )


# --- what a provider's callback says (api/routes/callbacks.py, alerts/aliyun_receipts.py) ---


@dataclass(frozen=True, slots=True)
class LockedAttempt:
    """An attempt a provider's callback names, read under its lock."""

    id: int
    incident_id: int
    channel: str
    provider_id: str | None
    recipient_kind: str
    recipient_id: str
    address: str
    state: str
    in_flight: bool  # leased by a sender right now: its provider id may not be recorded yet


def lock_attempt(conn: Conn, where: str, params: tuple[Any, ...]) -> LockedAttempt | None:
    """The attempt found by ``where``, locked in the lock order: its incident first, then it.

    ``where`` is a fixed SQL condition of the caller's (never input) with ``params``.
    No lock is waited for while a provider is called: a router holds none across its send.
    """
    found = conn.execute(f"SELECT id, incident_id FROM notification_attempts WHERE {where}", params).fetchone()
    if found is None:
        return None
    lock_incident(conn, int(found[1]))
    row = conn.execute(
        "SELECT id, incident_id, channel, provider_id, recipient_kind, recipient_id, address, state,"
        " state = 'pending' AND leased_by IS NOT NULL FROM notification_attempts WHERE id = %s FOR UPDATE",
        (found[0],),
    ).fetchone()
    return None if row is None else LockedAttempt(*row)


def take_provider_id(conn: Conn, attempt_id: int, provider_id: str, now: datetime) -> None:
    """An attempt still in flight gets the sid Twilio gave it (the router's record of it may come later)."""
    conn.execute(
        "UPDATE notification_attempts SET provider_id = coalesce(provider_id, %s), updated_at = %s WHERE id = %s",
        (provider_id, now, attempt_id),
    )


def mark_answered(conn: Conn, attempt_id: int, now: datetime) -> None:
    """A call's person pressed 1 or 2: reached, whatever the sender records afterwards (:func:`settle`)."""
    conn.execute(
        "UPDATE notification_attempts SET state = %s, updated_at = %s WHERE id = %s",
        (AttemptState.ANSWERED, now, attempt_id),
    )


def record_status(conn: Conn, attempt_id: int, state: AttemptState, error: str | None, now: datetime) -> None:
    """A delivery status settled the attempt (delivered, busy, no keypress…); a failure is retried by the caller."""
    conn.execute(
        "UPDATE notification_attempts SET state = %s, error = coalesce(%s, error), updated_at = %s WHERE id = %s",
        (state, error, now, attempt_id),
    )


# A phone number past its days: the first three characters (``+86``) and the last four
# kept, every other one a star: ``+8613800001234`` → ``+86*******1234``. Masking a masked
# number changes nothing. A number a provider's error text quotes: ``MASKED_IN_TEXT``.
_MASKED_NUMBER = """
    CASE WHEN length(address) > 7 THEN left(address, 3) || repeat('*', length(address) - 7) || right(address, 4)
         ELSE repeat('*', length(address)) END
"""


def mask_contacts(conn: Conn, incident_ids: list[int]) -> int:
    """Mask the phone numbers and clear the texts of the incidents' attempts; returns how many.

    Who was called (recipient kind and id, channel, provider and its id), when and what
    came of it (state, times) stay: the record of the response. The caller holds the
    incidents' locks (closed incidents, so nothing else writes their attempts).
    """
    return conn.execute(
        f"""
        UPDATE notification_attempts SET
            address = CASE WHEN channel IN ('{Channel.VOICE}', '{Channel.SMS}') THEN {_MASKED_NUMBER}
                           ELSE address END,
            body = NULL,
            error = {MASKED_IN_TEXT.format(text="error")}
        WHERE incident_id = ANY(%s)
        """,
        (incident_ids,),
    ).rowcount
