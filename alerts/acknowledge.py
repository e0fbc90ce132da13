"""Acknowledge, decline, resolve and cancel: how an escalation ends, or goes on.

Each runs in the caller's transaction with the incident row locked, writes its
timeline entry, and queues what people must be told as attempt rows the router
sends: an acknowledgement tells everyone already paged who took it; a cancel
tells those paged that it is stood down; a change the emergency platform was told
of becomes a CAP Update or Cancel. Bumping the incident's fencing token retires
every action queued under the old one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from psycopg.rows import class_row

from alerts.attempts import lock_incident
from alerts.retry import advance, nobody_left
from alerts.timeline import add_event, wake_routers
from devices.kinds import AttemptPurpose, Channel, IncidentKind, Outcome
from shouhu.db import Conn

ACTIVE = ("open", "unreached")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a staff member or guardian (by phone or console), or an API token."""

    kind: str  # "staff", "guardian", "token"
    id: str
    name: str
    phone: str | None = None
    role: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"


class Result(StrEnum):
    DONE = "done"
    ALREADY = "already"  # the same person did the same thing before
    TAKEN = "taken"  # someone else acknowledged first
    CLOSED = "closed"  # resolved or cancelled: nothing to do
    REFUSED = "refused"  # not allowed now (a cancel too late, a fall, after an acknowledgement)


@dataclass(frozen=True, slots=True)
class IncidentRow:
    id: int
    code: str
    kind: str
    state: str
    opened_at: datetime
    acknowledged_by: str | None
    acknowledged_by_name: str | None
    resident_name: str


def _lock(conn: Conn, incident_id: int) -> IncidentRow | None:
    if lock_incident(conn, incident_id) is None:
        return None
    return conn.cursor(row_factory=class_row(IncidentRow)).execute(
        """
        SELECT i.id, i.code, i.kind, i.state, i.opened_at, i.acknowledged_by, i.acknowledged_by_name,
               coalesce(r.name, '未登记手环') AS resident_name
        FROM incidents i LEFT JOIN residents r ON r.id = i.resident_id
        WHERE i.id = %s
        """,
        (incident_id,),
    ).fetchone()


def _stop_escalation(conn: Conn, incident_id: int, now: datetime) -> None:
    """Retire every queued step and every page not yet started (fencing token bumped).

    Rows a router holds right now are skipped, not waited for: a router claims an
    action or an attempt before it reads the incident. A skipped step is refused by
    the bumped token when the router reaches the incident; a skipped page is cancelled
    by the claim, which reads the incident under a share lock this transaction's
    ``FOR UPDATE`` conflicts with. A page in flight (leased) goes on: its person is
    told who took it (:func:`_paged_people`).
    """
    conn.execute(
        "UPDATE incidents SET escalation_token = escalation_token + 1, updated_at = %s WHERE id = %s",
        (now, incident_id),
    )
    conn.execute(
        """
        UPDATE escalation_actions SET state = 'cancelled', done_at = %s
        WHERE id IN (SELECT id FROM escalation_actions WHERE incident_id = %s AND state = 'pending'
                     FOR UPDATE SKIP LOCKED)
        """,
        (now, incident_id),
    )
    conn.execute(
        """
        UPDATE notification_attempts SET state = 'cancelled', updated_at = %s
        WHERE id IN (SELECT id FROM notification_attempts WHERE incident_id = %s AND state = 'pending'
                     AND purpose IN ('page', 'repage') AND leased_by IS NULL FOR UPDATE SKIP LOCKED)
        """,
        (now, incident_id),
    )


def _paged_people(conn: Conn, incident_id: int) -> list[tuple[str, str, str]]:
    """(recipient kind, id, phone) of everyone a page reached the provider for, or is reaching (in flight)."""
    rows = conn.execute(
        """
        SELECT DISTINCT recipient_kind, recipient_id, address FROM notification_attempts
        WHERE incident_id = %s AND purpose IN ('page', 'repage') AND channel IN ('sms', 'voice')
          AND (state NOT IN ('pending', 'cancelled') OR (state = 'pending' AND leased_by IS NOT NULL))
        ORDER BY 1, 2
        """,
        (incident_id,),
    ).fetchall()
    return [(str(k), str(i), str(a)) for k, i, a in rows]


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
    """An SMS to each of ``people``, keyed by the event that caused it (so it is queued once).

    ``not_before`` holds a non-urgent notice back (quiet hours); pages never use it.
    """
    for kind, recipient_id, phone in people:
        conn.execute(
            """
            INSERT INTO notification_attempts (incident_id, purpose, round, step, recipient_kind, recipient_id,
                address, channel, attempt, state, body, created_at, not_before)
            VALUES (%s, 'notice', 0, %s, %s, %s, %s, 'sms', 1, 'pending', %s, %s, %s) ON CONFLICT DO NOTHING
            """,
            (incident_id, cause_event, kind, recipient_id, phone, text, now, not_before),
        )
    return len(people)


def queue_platform_message(
    conn: Conn, incident_id: int, cause_event: int, purpose: AttemptPurpose, now: datetime
) -> bool:
    """A CAP Update or Cancel, if (and only if) the platform was sent the first alert, or it is on its way.

    An Alert in flight (leased) or between its tries: the Update is queued now and sent
    once the Alert got through (``alerts.attempts``), or dropped if it never did.
    """
    told = conn.execute(
        "SELECT 1 FROM notification_attempts WHERE incident_id = %s AND purpose = 'cap_alert'"
        " AND (state = 'sent' OR (state = 'pending' AND (leased_by IS NOT NULL OR attempt > 1)))",
        (incident_id,),
    ).fetchone()
    if not told:
        return False
    conn.execute(
        """
        INSERT INTO notification_attempts (incident_id, purpose, round, step, recipient_kind, recipient_id,
            address, channel, attempt, state, created_at)
        VALUES (%s, %s, 0, %s, 'platform', 'emergency-platform', '', 'webhook', 1, 'pending', %s)
        ON CONFLICT DO NOTHING
        """,
        (incident_id, purpose.value, cause_event, now),
    )
    return True


def acknowledge(
    conn: Conn, incident_id: int, actor: Actor, via: str, now: datetime, *, resolve_timeout_s: int
) -> Result:
    """Take the incident: the escalation stops and everyone already paged is told who took it.

    A re-escalation check is queued: acknowledged but unresolved after
    ``resolve_timeout_s`` puts the incident back on the chain.
    """
    incident = _lock(conn, incident_id)
    if incident is None or incident.state in ("resolved", "cancelled"):
        return Result.CLOSED
    if incident.state == "acknowledged":
        same = incident.acknowledged_by == actor.key
        add_event(
            conn,
            incident.id,
            now,
            "acknowledge_ignored",
            actor.key,
            {"via": via, "taken_by": incident.acknowledged_by_name},
        )
        return Result.ALREADY if same else Result.TAKEN
    _stop_escalation(conn, incident.id, now)
    conn.execute(
        """
        UPDATE incidents SET state = 'acknowledged', acknowledged_at = %s, acknowledged_by = %s,
            acknowledged_by_name = %s, acknowledged_via = %s, updated_at = %s
        WHERE id = %s
        """,
        (now, actor.key, actor.name, via, now, incident.id),
    )
    cause = add_event(
        conn, incident.id, now, "acknowledged", actor.key, {"name": actor.name, "role": actor.role, "via": via}
    )
    others = [p for p in _paged_people(conn, incident.id) if f"{p[0]}:{p[1]}" != actor.key]
    queue_notice(
        conn,
        incident.id,
        cause,
        f"【守护】{incident.code} {incident.resident_name}的求助已由{actor.name}接单处置。",
        others,
        now,
    )
    queue_platform_message(conn, incident.id, cause, AttemptPurpose.CAP_UPDATE, now)
    token = conn.execute("SELECT escalation_token FROM incidents WHERE id = %s", (incident.id,)).fetchone()
    assert token is not None
    conn.execute(
        "INSERT INTO escalation_actions (incident_id, kind, step, round, token, due_at)"
        " VALUES (%s, 'resolve_check', 0, 0, %s, %s)",
        (incident.id, token[0], now + timedelta(seconds=resolve_timeout_s)),
    )
    wake_routers(conn)
    return Result.DONE


def decline(conn: Conn, incident_id: int, actor: Actor, via: str, now: datetime) -> Result:
    """ "I cannot": recorded; when nobody paged in the current step can still take it
    (each declined, or every channel to them failed for good), the next step is due at
    once instead of after its wait."""
    incident = _lock(conn, incident_id)
    if incident is None or incident.state not in ACTIVE:
        return Result.CLOSED
    add_event(conn, incident.id, now, "declined", actor.key, {"name": actor.name, "via": via})
    current = conn.execute(
        """
        SELECT round, step FROM notification_attempts
        WHERE incident_id = %s AND purpose IN ('page', 'cap_alert') ORDER BY round DESC, step DESC LIMIT 1
        """,
        (incident.id,),
    ).fetchone()
    if current is None:
        return Result.DONE
    round_, step = current
    reason = nobody_left(conn, incident.id, round_, step)
    if reason is not None:
        advance(conn, incident.id, round_, step, now, reason)
    return Result.DONE


def resolve(conn: Conn, incident_id: int, outcome: Outcome, note: str, actor: Actor, now: datetime) -> Result:
    """Close the incident with its outcome; a platform that was told gets a CAP Update (a false alarm: Cancel)."""
    incident = _lock(conn, incident_id)
    if incident is None or incident.state in ("resolved", "cancelled"):
        return Result.CLOSED
    _stop_escalation(conn, incident.id, now)
    conn.execute(
        "UPDATE incidents SET state = 'resolved', resolved_at = %s, outcome = %s, resolution_note = %s, updated_at = %s"
        " WHERE id = %s",
        (now, outcome.value, note, now, incident.id),
    )
    cause = add_event(
        conn, incident.id, now, "resolved", actor.key, {"name": actor.name, "outcome": outcome.value, "note": note}
    )
    purpose = AttemptPurpose.CAP_CANCEL if outcome is Outcome.FALSE_ALARM else AttemptPurpose.CAP_UPDATE
    queue_platform_message(conn, incident.id, cause, purpose, now)
    wake_routers(conn)
    return Result.DONE


def cancel_from_device(conn: Conn, incident_id: int, device_id: str, now: datetime, *, cancel_window_s: int) -> Result:
    """A wristband's cancel: stands an SOS down only within the window and before anyone
    acknowledged — never a fall. Whoever was paged is told."""
    incident = _lock(conn, incident_id)
    if incident is None or incident.state in ("resolved", "cancelled"):
        return Result.CLOSED
    in_window = now - incident.opened_at <= timedelta(seconds=cancel_window_s)
    if incident.kind != IncidentKind.SOS.value or incident.state not in ACTIVE or not in_window:
        reason = (
            "not an SOS"
            if incident.kind != IncidentKind.SOS.value
            else "already acknowledged"
            if incident.state not in ACTIVE
            else f"after the {cancel_window_s}s cancel window"
        )
        add_event(conn, incident.id, now, "cancel_refused", f"device:{device_id}", {"reason": reason})
        return Result.REFUSED
    _stop_escalation(conn, incident.id, now)
    conn.execute(
        "UPDATE incidents SET state = 'cancelled', cancelled_at = %s, updated_at = %s WHERE id = %s",
        (now, now, incident.id),
    )
    cause = add_event(conn, incident.id, now, "cancelled", f"device:{device_id}", {"within_s": cancel_window_s})
    queue_notice(
        conn,
        incident.id,
        cause,
        f"【守护】{incident.code} {incident.resident_name}已在手环上取消求助，无需前往。",
        _paged_people(conn, incident.id),
        now,
    )
    queue_platform_message(conn, incident.id, cause, AttemptPurpose.CAP_CANCEL, now)
    wake_routers(conn)
    return Result.DONE


def repage_acknowledger(conn: Conn, incident_id: int, cause_event: int, now: datetime) -> bool:
    """A press after an acknowledgement: call and text whoever acknowledged, again."""
    row = conn.execute(
        "SELECT acknowledged_by FROM incidents WHERE id = %s AND state = 'acknowledged'", (incident_id,)
    ).fetchone()
    if row is None or row[0] is None:
        return False
    kind, _, person = str(row[0]).partition(":")
    table = {"staff": "staff", "guardian": "guardians"}.get(kind)
    if table is None:
        return False  # acknowledged through the API by a token: nobody to phone
    phone = conn.execute(f"SELECT phone FROM {table} WHERE id = %s", (person,)).fetchone()
    if phone is None:
        return False
    for channel in (Channel.VOICE, Channel.SMS):
        conn.execute(
            """
            INSERT INTO notification_attempts (incident_id, purpose, round, step, recipient_kind, recipient_id,
                address, channel, attempt, state, created_at)
            VALUES (%s, 'repage', 0, %s, %s, %s, %s, %s, 1, 'pending', %s) ON CONFLICT DO NOTHING
            """,
            (incident_id, cause_event, kind, person, phone[0], channel.value, now),
        )
    wake_routers(conn)
    return True
