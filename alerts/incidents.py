"""Red incidents from alarms: the ledger check, open-or-join, and the first step.

``record_alarm`` runs inside the hub's transaction for one SOS or fall message, so
the ledger row, the incident, its timeline and its first escalation action commit
together — and only then is the message acknowledged to the broker.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from alerts.acknowledge import Result, cancel_from_device, repage_acknowledger
from alerts.escalation import schedule_first_step
from alerts.policy import PolicySnapshot, default_unregistered_policy, resolve_policy
from alerts.states import OPEN_SQL, IncidentState
from alerts.timeline import add_event, add_events, wake_routers
from devices.kinds import IncidentKind, Severity
from shouhu.db import Conn
from shouhu.settings import DEFAULT_CANCEL_WINDOW_S

CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"  # no 0/O, 1/I/L: read out over the phone
CODE_LENGTH = 5


class AlarmResult(StrEnum):
    OPENED = "opened"
    JOINED = "joined"
    REDELIVERY = "redelivery"
    CANCELLED = "cancelled"
    CANCEL_REFUSED = "cancel_refused"


@dataclass(frozen=True, slots=True)
class Alarm:
    """One SOS press or cancel, or one fall, as the hub received it."""

    device_id: str
    kind: IncidentKind  # SOS or FALL, as the topic says
    msg_id: str | None  # None when the payload could not be read
    raw: bytes
    payload_hash: bytes
    received_at: datetime
    cancel: bool = False
    lat: float | None = None
    lon: float | None = None
    detail: dict[str, Any] | None = None

    @property
    def ledger_key(self) -> str:
        # An unreadable payload has no msg_id: key it by the hash of its bytes, so a
        # redelivery of the same bytes is still one incident.
        return self.msg_id if self.msg_id is not None else "raw:" + self.payload_hash.hex()[:60]


@dataclass(frozen=True, slots=True)
class AlarmOutcome:
    """What storing an alarm did; an opened or joined incident's code and state as its
    statement returned them (the receipt needs no query of its own)."""

    result: AlarmResult
    incident_id: int | None
    code: str | None = None
    state: IncidentState | None = None


# A group of alarms stored in one transaction resolves each (kind, area) policy once.
PolicyCache = dict[tuple[IncidentKind, str | None, int], PolicySnapshot]
# A device as an alarm needs it: its kind, its resident and the resident's grid.
DeviceRow = tuple[str, str | None, str | None]
_DEVICE_SQL = """
    SELECT d.id, d.kind, d.resident_id, r.grid_id FROM devices d
    LEFT JOIN residents r ON r.id = d.resident_id WHERE d.id = ANY(%s)
"""


@dataclass(slots=True)
class AlarmGroup:
    """What the alarms stored in one transaction share (``hub.ingest.Writer.store_group``):
    each (kind, area) policy resolved once, every device read in one statement up front,
    and the routers woken once after the last alarm instead of once per incident opened
    (a mass event's alarms are committed together; the routers act on the commit anyway)."""

    policies: PolicyCache = field(default_factory=dict)
    devices: dict[str, DeviceRow | None] = field(default_factory=dict)
    opened: bool = False

    def read_devices(self, conn: Conn, device_ids: Collection[str]) -> None:
        """Read these devices in one statement; one not registered is remembered as None."""
        wanted = sorted(set(device_ids) - self.devices.keys())
        if not wanted:
            return
        found = {str(row[0]): (str(row[1]), row[2], row[3]) for row in conn.execute(_DEVICE_SQL, (wanted,))}
        for device_id in wanted:
            self.devices[device_id] = found.get(device_id)


def _device(conn: Conn, device_id: str, group: AlarmGroup | None) -> DeviceRow | None:
    """The device as the group read it; read now if the group has not (or for an alarm alone)."""
    group = group if group is not None else AlarmGroup()
    group.read_devices(conn, [device_id])
    return group.devices[device_id]


def _ledger(conn: Conn, alarm: Alarm, channel: str) -> str | None:
    """Record the message in the ledger; None when it is a redelivery.

    Returns the ledger key used: a reused msg_id with a different payload gets its
    own key, because an SOS or fall on a reused id is paged as new.
    """
    key = alarm.ledger_key
    for _ in range(2):
        inserted = conn.execute(
            """
            INSERT INTO message_ledger (device_id, msg_id, payload_hash, channel, received_at)
            VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1
            """,
            (alarm.device_id, key, alarm.payload_hash, channel, alarm.received_at),
        ).fetchone()
        if inserted:
            return key
        row = conn.execute(
            "SELECT payload_hash FROM message_ledger WHERE device_id = %s AND msg_id = %s",
            (alarm.device_id, key),
        ).fetchone()
        if row is not None and bytes(row[0]) == alarm.payload_hash:
            return None
        key = f"{key[:40]}#reused:{alarm.payload_hash.hex()[:16]}"
    return key


def _county(conn: Conn) -> str | None:
    row = conn.execute("SELECT id FROM areas WHERE parent_id IS NULL AND active ORDER BY id LIMIT 1").fetchone()
    return row[0] if row else None


def draw_code() -> str:
    """A short random incident code, read out over the phone and typed into an SMS reply."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def _insert_incident(conn: Conn, values: dict[str, Any]) -> tuple[int, str] | None:
    """Insert an open red incident: its id and code; None when the resident (or device) already has one."""
    conflict = (
        # Word for word the partial unique indexes' predicates (a parameter cannot stand in).
        f"(resident_id) WHERE severity = 'red' AND state IN {OPEN_SQL} AND resident_id IS NOT NULL"
        if values["resident_id"] is not None
        else f"(device_id) WHERE kind = 'sos_unregistered' AND state IN {OPEN_SQL}"
    )
    while True:
        code = draw_code()
        try:
            with conn.transaction():
                row = conn.execute(_INSERT_INCIDENT.format(conflict=conflict), {**values, "code": code}).fetchone()
        except psycopg.errors.UniqueViolation:
            continue  # the random code collided; draw another
        return (int(row[0]), str(row[1])) if row else None


_INSERT_INCIDENT = """
    INSERT INTO incidents (code, kind, severity, resident_id, device_id, area_id,
        opened_at, payload_unreadable, policy_snapshot, lat, lon)
    VALUES (%(code)s, %(kind)s, 'red', %(resident_id)s, %(device_id)s, %(area_id)s,
        %(opened_at)s, %(unreadable)s, %(snapshot)s, %(lat)s, %(lon)s)
    ON CONFLICT {conflict} DO NOTHING
    RETURNING id, code
"""
# Tries to open or join before giving up (the writer then retries and, in the end, opens
# the fallback incident). A try fails only when the resident's open incident closed
# between the insert and the join, or a drawn code was taken (about one in 280 with
# 100,000 incidents stored): eight in a row do not happen.
OPEN_TRIES = 8


def _try_insert_incident(conn: Conn, values: dict[str, Any]) -> tuple[int, str] | None:
    """:func:`_insert_incident` without its savepoint, for the hub's alarms (two statements
    fewer per alarm in a mass event): any unique conflict inserts nothing and returns None —
    the resident's (or the device's) open incident, which the caller then joins, or, rarely,
    a code drawn twice, after which the caller finds nothing to join and draws again."""
    row = conn.execute(_INSERT_INCIDENT.format(conflict=""), {**values, "code": draw_code()}).fetchone()
    return (int(row[0]), str(row[1])) if row else None


def _join(conn: Conn, alarm: Alarm, resident_id: str | None) -> tuple[int, IncidentState, str | None, str] | None:
    column, value = ("resident_id", resident_id) if resident_id else ("device_id", alarm.device_id)
    kind_filter = "" if resident_id else " AND kind = 'sos_unregistered'"
    row = conn.execute(
        f"""
        UPDATE incidents SET urgency = urgency + 1, updated_at = %s
        WHERE {column} = %s AND severity = 'red' AND state IN {OPEN_SQL}
        {kind_filter}
        RETURNING id, state, acknowledged_by, code
        """,
        (alarm.received_at, value),
    ).fetchone()
    return (int(row[0]), IncidentState(row[1]), row[2], str(row[3])) if row else None


def record_alarm(
    conn: Conn,
    alarm: Alarm,
    *,
    ack_timeout_s: int,
    hub_id: str,
    cancel_window_s: int = DEFAULT_CANCEL_WINDOW_S,
    group: AlarmGroup | None = None,
) -> AlarmOutcome:
    """Store one alarm: ledger, then open or join the red incident, then its first step.

    Runs in the caller's transaction. A press or fall whose resident already has an
    open red incident joins it (raising its urgency); otherwise it opens one with a
    frozen policy snapshot and a step-0 action due at once. ``group``: what the alarms
    of this transaction share (policies and devices read once); with a group, the
    caller wakes the routers once its last alarm is stored (``group.opened``).
    """
    key = _ledger(conn, alarm, alarm.kind.value)
    if key is None:
        return AlarmOutcome(AlarmResult.REDELIVERY, None)
    device = _device(conn, alarm.device_id, group)
    registered = device is not None and device[0] == "wristband" and device[1] is not None
    resident_id: str | None = device[1] if registered and device else None
    area_id: str | None = device[2] if registered and device else _county(conn)
    kind = alarm.kind if registered else IncidentKind.SOS_UNREGISTERED
    message_detail = {
        "device_id": alarm.device_id,
        "msg_id": alarm.msg_id,
        "ledger_key": key,
        "hub_id": hub_id,
        "payload_unreadable": alarm.msg_id is None,
        **(alarm.detail or {}),
    }
    if alarm.cancel:
        joined = conn.execute(
            f"SELECT id FROM incidents WHERE device_id = %s AND state IN {OPEN_SQL} ORDER BY opened_at DESC LIMIT 1",
            (alarm.device_id,),
        ).fetchone()
        if joined is None:
            return AlarmOutcome(AlarmResult.CANCEL_REFUSED, None)
        add_event(conn, joined[0], alarm.received_at, "cancel_received", alarm.device_id, message_detail)
        result = cancel_from_device(
            conn, joined[0], alarm.device_id, alarm.received_at, cancel_window_s=cancel_window_s
        )
        cancelled = AlarmResult.CANCELLED if result is Result.DONE else AlarmResult.CANCEL_REFUSED
        return AlarmOutcome(cancelled, joined[0])
    for _ in range(OPEN_TRIES):
        policy_key = (kind, area_id, ack_timeout_s)
        snapshot = group.policies.get(policy_key) if group is not None else None
        if snapshot is None:
            snapshot = resolve_policy(conn, kind, area_id, ack_timeout_s)
            if group is not None:
                group.policies[policy_key] = snapshot
        opened = _try_insert_incident(
            conn,
            {
                "kind": kind.value,
                "resident_id": resident_id,
                "device_id": alarm.device_id,
                "area_id": area_id,
                "opened_at": alarm.received_at,
                "unreadable": alarm.msg_id is None,
                "snapshot": Jsonb(snapshot.to_json()),
                "lat": alarm.lat,
                "lon": alarm.lon,
            },
        )
        if opened is not None:
            incident_id, code = opened
            add_events(
                conn,
                [
                    (
                        incident_id,
                        alarm.received_at,
                        "opened",
                        alarm.device_id,
                        {"kind": kind.value, "severity": Severity.RED.value, "policy": snapshot.policy_id},
                    ),
                    (incident_id, alarm.received_at, "stored", hub_id, message_detail),
                ],
            )
            schedule_first_step(conn, incident_id, alarm.received_at)
            if group is None:
                wake_routers(conn, str(incident_id))
            else:
                group.opened = True
            return AlarmOutcome(AlarmResult.OPENED, incident_id, code, IncidentState.OPEN)
        joined_row = _join(conn, alarm, resident_id)
        if joined_row is not None:
            incident_id, state, acknowledged_by, code = joined_row
            cause = add_event(
                conn,
                incident_id,
                alarm.received_at,
                "joined",
                alarm.device_id,
                {**message_detail, "kind": alarm.kind.value, "state": state, "acknowledged_by": acknowledged_by},
            )
            if state is IncidentState.ACKNOWLEDGED:
                # Pressed again after someone took it: that person hears about it now.
                repage_acknowledger(conn, incident_id, cause, alarm.received_at)
            return AlarmOutcome(AlarmResult.JOINED, incident_id, code, state)
        # The open incident closed between our insert and the join, or the code was taken: again.
    raise RuntimeError(f"could not open or join an incident for {alarm.device_id}")


def open_fallback_incident(conn: Conn, device_id: str, received_at: datetime, *, ack_timeout_s: int) -> int | None:
    """The last resort for an alarm the normal path could not store: a red incident for
    the county operators, keyed by the device (joining one already open for it).

    Deliberately plain — no ledger, no resident lookup, the built-in operators policy —
    so that whatever broke the normal path is unlikely to break this one too.
    """
    snapshot = default_unregistered_policy(ack_timeout_s)
    opened = _insert_incident(
        conn,
        {
            "kind": IncidentKind.SOS_UNREGISTERED.value,
            "resident_id": None,
            "device_id": device_id,
            "area_id": _county(conn),
            "opened_at": received_at,
            "unreadable": True,
            "snapshot": Jsonb(snapshot.to_json()),
            "lat": None,
            "lon": None,
        },
    )
    if opened is None:
        return None  # one is already open for this device: it is escalating
    incident_id = opened[0]
    add_event(
        conn,
        incident_id,
        received_at,
        "opened",
        device_id,
        {"kind": IncidentKind.SOS_UNREGISTERED.value, "fallback": "the alarm could not be stored normally"},
    )
    schedule_first_step(conn, incident_id, received_at)
    wake_routers(conn, str(incident_id))
    return incident_id
