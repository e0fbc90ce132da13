"""Incidents with their timelines, scoped to the token's areas; a read naming a resident is audited."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from alerts.supervise import FIRST_WAIT_SQL, incident_due_at, is_overdue
from api.access import PHONE_READERS, may_see_incident, visible_incident_kinds
from api.deps import (
    API_PREFIX,
    ConnDep,
    CurrentToken,
    Now,
    Page,
    Rfc3339,
    Scope,
    SettingsDep,
    area_filter,
    not_found,
)
from devices.kinds import Channel, IncidentKind, IncidentState, Severity
from shouhu.settings import Settings

router = APIRouter(prefix=f"{API_PREFIX}/incidents", tags=["incidents"])

# Roles that see the phone numbers notifications went to; the others see them masked.
# Timeline detail keys that hold a phone number (masked for roles outside PHONE_READERS).
_PHONE_KEYS = frozenset({"to", "from", "phone", "callback_number"})
# Timeline detail keys never shown to anyone: health data stays on the resident's record.
_HIDDEN_KEYS = frozenset({"medical_notes"})


class IncidentPublic(BaseModel):
    id: int
    code: str
    """The short code read out over the phone and texted back to acknowledge."""
    kind: IncidentKind
    severity: Severity
    state: IncidentState
    opened_at: datetime
    urgency: int
    """1 when opened; raised by each further press or fall that joins the incident."""
    payload_unreadable: bool
    area_id: str | None
    resident_id: str | None
    device_id: str | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    resolved_at: datetime | None
    outcome: str | None
    due_at: datetime | None
    """When it should have been taken (red, not yet taken: the first step's wait after opening), resolved
    (red, taken: SHOUHU_RESOLVE_TIMEOUT_S after it was), or its task done (yellow); null when closed or blue."""
    overdue: bool
    """Open and past its due time: an operator may supervise it (POST …/supervise)."""


class IncidentsPublic(BaseModel):
    data: list[IncidentPublic]
    count: int


class IncidentEventPublic(BaseModel):
    at: datetime
    event: str
    """opened, stored, joined, step_started, no_recipients, attempt_sent, attempt_failed, …"""
    actor: str | None
    detail: dict[str, Any]


class NotificationAttemptPublic(BaseModel):
    step: int
    round: int
    attempt: int
    """1 for the first try; a retry of the same recipient and channel counts up."""
    channel: Channel
    recipient_kind: str
    recipient_id: str
    to: str
    """The address; masked for roles that may not read phone numbers."""
    state: str
    provider_id: str | None
    error: str | None
    created_at: datetime
    sent_at: datetime | None


class IncidentDetailPublic(IncidentPublic):
    timeline: list[IncidentEventPublic]
    """Every recorded event, oldest first."""
    attempts: list[NotificationAttemptPublic]
    """Every notification attempt, oldest first."""


_COLUMNS = f"""
    i.id, i.code, i.kind, i.severity, i.state, i.opened_at, i.urgency, i.payload_unreadable,
    i.area_id, i.resident_id, i.device_id, i.acknowledged_at, i.acknowledged_by,
    i.resolved_at, i.outcome, {FIRST_WAIT_SQL} AS first_wait_s,
    (SELECT t.due_at FROM care_tasks t WHERE t.incident_id = i.id) AS task_due_at
"""

_WHERE = """
    FROM incidents i
    WHERE i.kind = ANY(%(kinds)s)
      AND (%(scope)s::text[] IS NULL OR i.area_id = ANY(%(scope)s))
      AND (%(within)s::text[] IS NULL OR i.area_id = ANY(%(within)s))
      AND (%(state)s::text IS NULL OR i.state = %(state)s)
      AND (%(severity)s::text IS NULL OR i.severity = %(severity)s)
      AND (%(since)s::timestamptz IS NULL OR i.opened_at >= %(since)s)
      AND (%(until)s::timestamptz IS NULL OR i.opened_at < %(until)s)
"""


def mask_phone(address: str) -> str:
    """``+12025550100`` → ``+1202****0100``; anything short is masked whole."""
    if len(address) < 10:
        return "****"
    return address[:5] + "****" + address[-4:]


def _clean(value: Any, masked: bool) -> Any:
    """A timeline detail without health data, and with phone numbers masked when asked."""
    if isinstance(value, dict):
        return {
            key: mask_phone(item) if masked and key in _PHONE_KEYS and isinstance(item, str)
            else _clean(item, masked)
            for key, item in value.items()
            if key not in _HIDDEN_KEYS
        }
    if isinstance(value, list):
        return [_clean(item, masked) for item in value]
    return value


def _incident_public(row: dict[str, Any], settings: Settings, now: datetime) -> IncidentPublic:
    due_at = incident_due_at(
        Severity(row["severity"]),
        IncidentState(row["state"]),
        row["opened_at"],
        row["acknowledged_at"],
        settings.ack_timeout_s if row["first_wait_s"] is None else row["first_wait_s"],
        settings.resolve_timeout_s,
        row["task_due_at"],
    )
    stored = {name: row[name] for name in IncidentPublic.model_fields if name not in ("due_at", "overdue")}
    return IncidentPublic(**stored, due_at=due_at, overdue=is_overdue(due_at, now))


@router.get("")
def read_incidents(
    *,
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
    page: Page,
    now: Now,
    settings: SettingsDep,
    state: Annotated[IncidentState | None, Query(description="Only incidents in this state.")] = None,
    kind: Annotated[IncidentKind | None, Query(description="Only this kind of incident.")] = None,
    severity: Annotated[Severity | None, Query(description="Only this severity.")] = None,
    area: Annotated[
        str | None, Query(description="Only incidents in this area and its descendants.")
    ] = None,
    since: Annotated[
        Rfc3339 | None, Query(description="Only incidents opened at or after this time.")
    ] = None,
    until: Annotated[
        Rfc3339 | None, Query(description="Only incidents opened before this time.")
    ] = None,
) -> IncidentsPublic:
    """List the incidents the token may see, newest first."""
    kinds = visible_incident_kinds(token.role)
    if kind is not None:
        kinds = kinds & {kind}
    within = area_filter(conn, scope, area)
    params = {
        "kinds": sorted(k.value for k in kinds),
        "scope": scope.as_param(),
        "within": within,
        "state": None if state is None else state.value,
        "severity": None if severity is None else severity.value,
        "since": since,
        "until": until,
        "limit": page.limit,
        "offset": page.offset,
    }
    with conn.transaction():
        count_row = conn.execute("SELECT count(*) AS n" + _WHERE, params).fetchone()
        rows = conn.execute(
            "SELECT"
            + _COLUMNS
            + _WHERE
            + " ORDER BY i.opened_at DESC, i.id DESC LIMIT %(limit)s OFFSET %(offset)s",
            params,
        ).fetchall()
    assert count_row is not None
    return IncidentsPublic(data=[_incident_public(row, settings, now) for row in rows], count=count_row["n"])


@router.get("/{incident_id}")
def read_incident(
    conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, settings: SettingsDep, incident_id: int
) -> IncidentDetailPublic:
    """Read one incident with its timeline and notification attempts; audited when it names a resident."""
    masked = token.role not in PHONE_READERS
    # The read and its audit row commit together, or neither does.
    with conn.transaction():
        row = conn.execute(
            "SELECT" + _COLUMNS + " FROM incidents i WHERE i.id = %s", (incident_id,)
        ).fetchone()
        if row is None or not may_see_incident(token.role, scope, row["kind"], row["area_id"]):
            raise not_found("incident", str(incident_id))
        events = conn.execute(
            """
            SELECT at, event, actor, detail FROM incident_events
            WHERE incident_id = %s ORDER BY at, id
            """,
            (incident_id,),
        ).fetchall()
        attempts = conn.execute(
            """
            SELECT step, round, attempt, channel, recipient_kind, recipient_id, address,
                   state, provider_id, error, created_at, sent_at
            FROM notification_attempts
            WHERE incident_id = %s ORDER BY created_at, id
            """,
            (incident_id,),
        ).fetchall()
        if row["resident_id"] is not None:
            conn.execute(
                """
                INSERT INTO audit_log (at, token_id, role, action, subject, detail)
                VALUES (%s, %s, %s, 'read_incident', %s, %s)
                """,
                (
                    now,
                    token.id,
                    token.role.value,
                    f"incident:{incident_id}",
                    Jsonb({"resident_id": row["resident_id"]}),
                ),
            )
    incident = _incident_public(row, settings, now)
    return IncidentDetailPublic(
        **incident.model_dump(),
        timeline=[
            IncidentEventPublic(
                at=e["at"], event=e["event"], actor=e["actor"], detail=_clean(e["detail"], masked)
            )
            for e in events
        ],
        attempts=[
            NotificationAttemptPublic(
                step=a["step"],
                round=a["round"],
                attempt=a["attempt"],
                channel=Channel(a["channel"]),
                recipient_kind=a["recipient_kind"],
                recipient_id=a["recipient_id"],
                to=mask_phone(a["address"]) if masked else a["address"],
                state=a["state"],
                provider_id=a["provider_id"],
                error=a["error"],
                created_at=a["created_at"],
                sent_at=a["sent_at"],
            )
            for a in attempts
        ],
    )
