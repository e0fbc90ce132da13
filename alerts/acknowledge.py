"""Acknowledge, decline, resolve and cancel: how an escalation ends, or goes on.

Each runs in the caller's transaction with the incident row locked, writes its
timeline entry, and queues what people must be told as attempt rows the router
sends: an acknowledgement tells everyone already paged who took it; a cancel
tells those paged that it is stood down; a change the emergency platform was told
of becomes a CAP Update or Cancel. Bumping the incident's fencing token retires
every action queued under the old one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from psycopg.rows import class_row

from alerts import escalation
from alerts.attempts import cancel_pending, queue_notice, queue_platform_message, queue_repage
from alerts.escalation import advance
from alerts.locks import lock_incident
from alerts.retry import nobody_left
from alerts.states import ACTIVE, CLOSED, AttemptState, IncidentState
from alerts.timeline import add_event, wake_routers
from devices.kinds import AttemptPurpose, Channel, IncidentKind, Outcome
from shouhu.accounts import person_label
from shouhu.db import Conn

__all__ = [
    "Actor",
    "IncidentRow",
    "Result",
    "acknowledge",
    "cancel_from_device",
    "decline",
    "queue_notice",
    "queue_platform_message",
    "repage_acknowledger",
    "resolve",
]


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a staff member or guardian (by phone or console), or an integration's token."""

    kind: str  # "staff", "guardian", "integration" ("token" before staff accounts), "system"
    id: str
    name: str  # the plain name; timeline details keep it with the role, so a page can word the role
    phone: str | None = None
    role: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"

    @property
    def label(self) -> str:
        """How every answer and notice names them: a person with their role, ``董思远（网格员）``;
        an integration or the system by its name alone."""
        return person_label(self.name, self.role) if self.kind in ("staff", "guardian") else self.name


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
    state: IncidentState
    opened_at: datetime
    acknowledged_by: str | None
    acknowledged_by_name: str | None
    resident_name: str


def _lock(conn: Conn, incident_id: int) -> IncidentRow | None:
    if lock_incident(conn, incident_id) is None:
        return None
    row = conn.cursor(row_factory=class_row(IncidentRow)).execute(
        """
        SELECT i.id, i.code, i.kind, i.state, i.opened_at, i.acknowledged_by, i.acknowledged_by_name,
               coalesce(r.name, '未登记手环') AS resident_name
        FROM incidents i LEFT JOIN residents r ON r.id = i.resident_id
        WHERE i.id = %s
        """,
        (incident_id,),
    ).fetchone()
    return None if row is None else replace(row, state=IncidentState(row.state))


def _stop_escalation(conn: Conn, incident_id: int, now: datetime) -> int:
    """Retire every queued step (fencing token bumped) and every page not yet started; the new token.

    A page in flight (leased) goes on: its person is told who took it
    (:func:`_paged_people`). See :func:`alerts.escalation.stop` and
    :func:`alerts.attempts.cancel_pending` for the rows a router holds right now.
    """
    token = escalation.stop(conn, incident_id, now)
    cancel_pending(conn, incident_id, now, pages_only=True)
    return token


def _paged_people(conn: Conn, incident_id: int) -> list[tuple[str, str, str]]:
    """(recipient kind, id, phone) of everyone a page reached the provider for, or is reaching (in flight)."""
    rows = conn.execute(
        """
        SELECT DISTINCT recipient_kind, recipient_id, address FROM notification_attempts
        WHERE incident_id = %(incident)s AND purpose = ANY(%(pages)s) AND channel = ANY(%(phones)s)
          AND (state NOT IN (%(pending)s, %(cancelled)s) OR (state = %(pending)s AND leased_by IS NOT NULL))
        ORDER BY 1, 2
        """,
        {
            "incident": incident_id,
            "pages": [AttemptPurpose.PAGE.value, AttemptPurpose.REPAGE.value],
            "phones": [Channel.SMS.value, Channel.VOICE.value],
            "pending": AttemptState.PENDING,
            "cancelled": AttemptState.CANCELLED,
        },
    ).fetchall()
    return [(str(k), str(i), str(a)) for k, i, a in rows]


def acknowledge(
    conn: Conn, incident_id: int, actor: Actor, via: str, now: datetime, *, resolve_timeout_s: int
) -> Result:
    """Take the incident: the escalation stops and everyone already paged is told who took it.

    A re-escalation check is queued: acknowledged but unresolved after
    ``resolve_timeout_s`` puts the incident back on the chain.
    """
    incident = _lock(conn, incident_id)
    if incident is None or incident.state in CLOSED:
        return Result.CLOSED
    if incident.state is IncidentState.ACKNOWLEDGED:
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
    token = _stop_escalation(conn, incident.id, now)
    conn.execute(
        """
        UPDATE incidents SET state = %s, acknowledged_at = %s, acknowledged_by = %s,
            acknowledged_by_name = %s, acknowledged_via = %s, updated_at = %s
        WHERE id = %s
        """,
        (IncidentState.ACKNOWLEDGED, now, actor.key, actor.label, via, now, incident.id),
    )
    cause = add_event(
        conn, incident.id, now, "acknowledged", actor.key, {"name": actor.name, "role": actor.role, "via": via}
    )
    others = [p for p in _paged_people(conn, incident.id) if f"{p[0]}:{p[1]}" != actor.key]
    queue_notice(
        conn,
        incident.id,
        cause,
        f"【守护】{incident.code} {incident.resident_name}的求助已由{actor.label}接单处置。",
        others,
        now,
    )
    queue_platform_message(conn, incident.id, cause, AttemptPurpose.CAP_UPDATE, now)
    escalation.schedule_resolve_check(conn, incident.id, token, now + timedelta(seconds=resolve_timeout_s))
    wake_routers(conn)
    return Result.DONE


def decline(conn: Conn, incident_id: int, actor: Actor, via: str, now: datetime) -> Result:
    """ "I cannot": recorded; when nobody paged in the current step can still take it
    (each declined, or every channel to them failed for good), the next step is due at
    once instead of after its wait."""
    incident = _lock(conn, incident_id)
    if incident is None or incident.state not in ACTIVE:
        return Result.CLOSED
    add_event(conn, incident.id, now, "declined", actor.key, {"name": actor.name, "role": actor.role, "via": via})
    current = conn.execute(
        """
        SELECT round, step FROM notification_attempts
        WHERE incident_id = %s AND purpose = ANY(%s) ORDER BY round DESC, step DESC LIMIT 1
        """,
        (incident.id, [AttemptPurpose.PAGE.value, AttemptPurpose.CAP_ALERT.value]),
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
    if incident is None or incident.state in CLOSED:
        return Result.CLOSED
    _stop_escalation(conn, incident.id, now)
    conn.execute(
        "UPDATE incidents SET state = %s, resolved_at = %s, outcome = %s, resolution_note = %s, updated_at = %s"
        " WHERE id = %s",
        (IncidentState.RESOLVED, now, outcome.value, note, now, incident.id),
    )
    cause = add_event(
        conn,
        incident.id,
        now,
        "resolved",
        actor.key,
        {"name": actor.name, "role": actor.role, "outcome": outcome.value, "note": note},
    )
    purpose = AttemptPurpose.CAP_CANCEL if outcome is Outcome.FALSE_ALARM else AttemptPurpose.CAP_UPDATE
    queue_platform_message(conn, incident.id, cause, purpose, now)
    wake_routers(conn)
    return Result.DONE


def cancel_from_device(conn: Conn, incident_id: int, device_id: str, now: datetime, *, cancel_window_s: int) -> Result:
    """A wristband's cancel: stands an SOS down only within the window and before anyone
    acknowledged — never a fall. Whoever was paged is told."""
    incident = _lock(conn, incident_id)
    if incident is None or incident.state in CLOSED:
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
        "UPDATE incidents SET state = %s, cancelled_at = %s, updated_at = %s WHERE id = %s",
        (IncidentState.CANCELLED, now, now, incident.id),
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
        "SELECT acknowledged_by FROM incidents WHERE id = %s AND state = %s", (incident_id, IncidentState.ACKNOWLEDGED)
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
    queue_repage(conn, incident_id, cause_event, (kind, person, str(phone[0])), now)
    wake_routers(conn)
    return True
