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
3. **settle**, a new transaction: incident first, then the attempt, fenced by the
   lease (a sender whose lease was taken over records nothing).

An attempt stays ``pending`` while leased. A lease whose database session is gone (the
router died) or whose time ran out is taken over and the attempt re-sent under the
same key — once: lost a second time, it is failed, never sent a third time.

Lock order, everywhere: **incident → escalation actions → notification attempts**.
:func:`lock_incident` is how code takes the incident row; a transaction that will
write an incident's attempts, actions or timeline takes it first, so a key-share lock
taken by an insert never has to be upgraded under another transaction's.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from alerts.notifiers.base import SendOutcome, SendResult
from alerts.timeline import add_event
from devices.kinds import AttemptPurpose, Channel
from shouhu.db import Conn

log = logging.getLogger(__name__)


# Longer than any notifier's hard timeout per request (10 s), with room: a live sender
# always settles before its lease runs out.
LEASE_S = 60.0
ACTIVE = ("open", "unreached")
CLOSED = ("resolved", "cancelled")
# Taken over twice means it was lost in flight twice: fail it rather than send a third time.
MAX_SENDS = 2


def lock_incident(conn: Conn, incident_id: int, *, share: bool = False) -> str | None:
    """Lock the incident row (``FOR UPDATE``, or ``FOR SHARE``); its state, or None if there is none.

    The first lock a transaction takes on an incident's rows: incident → actions → attempts.
    """
    mode = "FOR SHARE" if share else "FOR UPDATE"
    row = conn.execute(f"SELECT state FROM incidents WHERE id = %s {mode}", (incident_id,)).fetchone()
    return None if row is None else str(row[0])


def lock_incidents(conn: Conn, incident_ids: list[int], *, share: bool = False) -> dict[int, str]:
    """:func:`lock_incident` for several, in id order (two lockers never wait for each other in a cycle)."""
    mode = "FOR SHARE" if share else "FOR UPDATE"
    rows = conn.execute(
        f"SELECT id, state FROM incidents WHERE id = ANY(%s) ORDER BY id {mode}", (sorted(set(incident_ids)),)
    ).fetchall()
    return {int(i): str(s) for i, s in rows}


IN_FLIGHT = "a.leased_until IS NOT NULL AND a.state = 'pending'"


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed attempt: its id, the lease that fences its settling, how often it was sent."""

    attempt_id: int
    incident_id: int
    token: str
    sends: int


def _cancel(conn: Conn, attempt_id: int, incident_id: int, now: datetime, why: str, worker: str) -> None:
    conn.execute(
        "UPDATE notification_attempts SET state = 'cancelled', error = %s, updated_at = %s WHERE id = %s",
        (why, now, attempt_id),
    )
    add_event(conn, incident_id, now, "attempt_cancelled", worker, {"attempt_id": attempt_id, "reason": why})


def _keep(conn: Conn, purpose: AttemptPurpose, incident_id: int, state: str) -> tuple[bool, str | None]:
    """(send it?, why not) for a due attempt of an incident in ``state``; (False, None): not yet."""
    if purpose in (AttemptPurpose.PAGE, AttemptPurpose.CAP_ALERT) and state not in ACTIVE:
        return False, f"incident {state} before the send started"
    if purpose is AttemptPurpose.REPAGE and state in CLOSED:
        return False, f"incident {state} before the send started"
    if purpose in (AttemptPurpose.CAP_UPDATE, AttemptPurpose.CAP_CANCEL):
        alerts = conn.execute(
            "SELECT bool_or(state = 'sent'), bool_or(state = 'pending') FROM notification_attempts"
            " WHERE incident_id = %s AND purpose = 'cap_alert'",
            (incident_id,),
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
) -> list[Lease]:
    """Lease up to ``limit`` due attempts of ``channels`` for ``worker``, oldest first; in the caller's transaction.

    An incident's very first pages go before everything else, and among them first
    those of incidents no provider has been asked about yet: in a mass event every
    incident gets one call or SMS out before any gets its second channel. Each query is
    served by a partial index. Commit before sending: the lease is what other senders see.
    """
    taken: list[tuple[Any, ...]] = []
    tiers = (_UNPAGED_FIRST_PAGES, _FIRST_PAGES) if first_pages_only else (_UNPAGED_FIRST_PAGES, _FIRST_PAGES, "")
    for extra in tiers:
        taken = conn.execute(
            _CLAIM.format(extra=extra), {"channels": [c.value for c in channels], "now": now, "limit": limit}
        ).fetchall()
        if taken:
            break
    if not taken:
        return []
    states = lock_incidents(conn, [int(r[1]) for r in taken], share=True)
    leases: list[Lease] = []
    token = f"{worker}/{uuid.uuid4().hex[:12]}"
    for attempt_id, incident_id, purpose, sends, stored, channel in taken:
        if sends >= MAX_SENDS:
            conn.execute(
                "UPDATE notification_attempts SET state = 'failed', error = %s, leased_until = NULL, updated_at = %s"
                " WHERE id = %s",
                ("lost in flight twice (its sender died): not sent a third time", now, attempt_id),
            )
            add_event(conn, incident_id, now, "attempt_failed", worker, {"attempt_id": attempt_id, "lost": sends})
            continue
        keep, why = _keep(conn, AttemptPurpose(purpose), incident_id, states.get(incident_id, "resolved"))
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
        conn.execute(
            "UPDATE notification_attempts SET leased_by = %s, lease_pid = pg_backend_pid(), leased_until = %s,"
            " sends = sends + 1, body = %s, updated_at = %s WHERE id = %s",
            (token, now + timedelta(seconds=lease_s), body, now, attempt_id),
        )
        if extra == _UNPAGED_FIRST_PAGES and channel in (Channel.VOICE.value, Channel.SMS.value):
            conn.execute(_BEHIND_SIBLING, {"incident": incident_id, "leased": attempt_id})
        leases.append(Lease(int(attempt_id), int(incident_id), token, int(sends) + 1))
    return leases


_CLAIM = """
    SELECT a.id, a.incident_id, a.purpose, a.sends, a.body, a.channel FROM notification_attempts a
    WHERE a.state = 'pending' AND a.channel = ANY(%(channels)s) AND (a.not_before IS NULL OR a.not_before <= %(now)s)
      AND (a.leased_until IS NULL OR a.leased_until < %(now)s
           OR NOT EXISTS (SELECT 1 FROM pg_stat_activity s WHERE s.pid = a.lease_pid)) {extra}
    ORDER BY a.created_at, a.id
    LIMIT %(limit)s
    FOR UPDATE OF a SKIP LOCKED
"""
_FIRST_PAGES = "AND a.purpose = 'page' AND a.round = 0 AND a.step = 0 AND a.attempt = 1"
# A first page of an incident no provider has been asked about yet (migration 15).
_UNPAGED_FIRST_PAGES = _FIRST_PAGES + " AND NOT a.behind_sibling"
# Leasing an incident's first call or SMS puts its other first calls and SMS behind the
# first pages of incidents not paged at all. Rows another sender holds are skipped, not
# waited for: two senders leasing the same incident's voice and SMS must not deadlock.
_BEHIND_SIBLING = """
    UPDATE notification_attempts SET behind_sibling = true
    WHERE id IN (
        SELECT b.id FROM notification_attempts b
        WHERE b.incident_id = %(incident)s AND b.id <> %(leased)s AND b.state = 'pending'
          AND b.purpose = 'page' AND b.round = 0 AND b.step = 0 AND b.attempt = 1
          AND b.channel IN ('voice', 'sms') AND NOT b.behind_sibling
        FOR UPDATE SKIP LOCKED
    )
"""


def settle(
    conn: Conn, lease: Lease, result: SendResult, now: datetime, worker: str, detail: dict[str, Any]
) -> str | None:
    """Record a send's outcome, in the caller's (new) transaction; the attempt's state, or None if fenced out.

    A keypress may have answered the call before its sid came back: the attempt keeps
    ``answered`` and gets its sid. A failure is retried or given up (``alerts.retry``).
    """
    from alerts.retry import after_failure  # retry queues attempts through this module's rules

    lock_incident(conn, lease.incident_id)
    outcome = result.outcome.value
    row = conn.execute(
        """
        UPDATE notification_attempts
        SET state = CASE WHEN state = 'pending' THEN %s ELSE state END,
            provider_id = coalesce(provider_id, %s), error = coalesce(%s, error),
            sent_at = CASE WHEN %s THEN %s ELSE sent_at END,
            leased_by = NULL, lease_pid = NULL, leased_until = NULL, updated_at = %s
        WHERE id = %s AND leased_by = %s
        RETURNING state
        """,
        (
            outcome,
            result.provider_id,
            result.error,
            result.outcome is SendOutcome.SENT,
            now,
            now,
            lease.attempt_id,
            lease.token,
        ),
    ).fetchone()
    if row is None:
        log.warning("attempt %s: lease %s was taken over; its result is not recorded", lease.attempt_id, lease.token)
        add_event(
            conn,
            lease.incident_id,
            now,
            "attempt_result_late",
            worker,
            {"attempt_id": lease.attempt_id, "outcome": outcome, "provider_id": result.provider_id},
        )
        return None
    add_event(
        conn,
        lease.incident_id,
        now,
        "attempt_" + outcome,
        worker,
        detail | {"attempt_id": lease.attempt_id, "provider_id": result.provider_id, "error": result.error},
    )
    if result.outcome is SendOutcome.FAILED and row[0] == outcome:
        after_failure(conn, lease.attempt_id, now, final=result.final)
    return str(row[0])
