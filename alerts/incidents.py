"""Red incidents from alarms: the ledger check, open-or-join, and the first step.

``record_alarm`` runs inside the hub's transaction for one SOS or fall message, so
the ledger row, the incident, its timeline and its first escalation action commit
together — and only then is the message acknowledged to the broker.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from alerts.acknowledge import Result, cancel_from_device, repage_acknowledger
from alerts.escalation import schedule_first_step, schedule_first_steps
from alerts.policy import PolicySnapshot, default_unregistered_policy, policy_rows, policy_snapshot, resolve_policy
from alerts.states import OPEN_SQL, IncidentState
from alerts.timeline import Event, add_event, add_events, wake_routers
from devices.kinds import IncidentKind, Severity
from shouhu.db import Conn
from shouhu.settings import DEFAULT_CANCEL_WINDOW_S

log = logging.getLogger(__name__)

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
    message_detail = _message_detail(alarm, key, hub_id)
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
    return _open_or_join(
        conn,
        _Opening(alarm, key, kind, resident_id, area_id, message_detail),
        ack_timeout_s=ack_timeout_s,
        group=group,
    )


@dataclass(frozen=True, slots=True)
class _Opening:
    """An alarm past the ledger, about to open or join its red incident."""

    alarm: Alarm
    key: str  # its ledger key
    kind: IncidentKind  # the alarm's kind, or SOS_UNREGISTERED
    resident_id: str | None
    area_id: str | None
    message_detail: dict[str, Any]

    def incident_values(self, snapshot: PolicySnapshot) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "resident_id": self.resident_id,
            "device_id": self.alarm.device_id,
            "area_id": self.area_id,
            "opened_at": self.alarm.received_at,
            "unreadable": self.alarm.msg_id is None,
            "snapshot": Jsonb(snapshot.to_json()),
            "lat": self.alarm.lat,
            "lon": self.alarm.lon,
        }

    def opening_events(self, incident_id: int, snapshot: PolicySnapshot) -> list[Event]:
        """The timeline of an incident this alarm opened: opened, then stored."""
        at, device_id = self.alarm.received_at, self.alarm.device_id
        opened = {"kind": self.kind.value, "severity": Severity.RED.value, "policy": snapshot.policy_id}
        return [
            (incident_id, at, "opened", device_id, opened),
            (incident_id, at, "stored", self.message_detail["hub_id"], self.message_detail),
        ]


def _message_detail(alarm: Alarm, key: str, hub_id: str) -> dict[str, Any]:
    return {
        "device_id": alarm.device_id,
        "msg_id": alarm.msg_id,
        "ledger_key": key,
        "hub_id": hub_id,
        "payload_unreadable": alarm.msg_id is None,
        **(alarm.detail or {}),
    }


def _policy(
    conn: Conn, kind: IncidentKind, area_id: str | None, ack_timeout_s: int, group: AlarmGroup | None
) -> PolicySnapshot:
    """The policy an alarm of this kind in this area escalates by; once per group."""
    policy_key = (kind, area_id, ack_timeout_s)
    snapshot = group.policies.get(policy_key) if group is not None else None
    if snapshot is None:
        snapshot = resolve_policy(conn, kind, area_id, ack_timeout_s)
        if group is not None:
            group.policies[policy_key] = snapshot
    return snapshot


def _open_or_join(conn: Conn, opening: _Opening, *, ack_timeout_s: int, group: AlarmGroup | None) -> AlarmOutcome:
    """Open the alarm's red incident with its first step, or join the one already open."""
    alarm = opening.alarm
    for _ in range(OPEN_TRIES):
        snapshot = _policy(conn, opening.kind, opening.area_id, ack_timeout_s, group)
        opened = _try_insert_incident(conn, opening.incident_values(snapshot))
        if opened is not None:
            incident_id, code = opened
            add_events(conn, opening.opening_events(incident_id, snapshot))
            schedule_first_step(conn, incident_id, alarm.received_at)
            if group is None:
                wake_routers(conn, str(incident_id))
            else:
                group.opened = True
            return AlarmOutcome(AlarmResult.OPENED, incident_id, code, IncidentState.OPEN)
        joined_row = _join(conn, alarm, opening.resident_id)
        if joined_row is not None:
            incident_id, state, acknowledged_by, code = joined_row
            cause = add_event(
                conn,
                incident_id,
                alarm.received_at,
                "joined",
                alarm.device_id,
                {
                    **opening.message_detail,
                    "kind": alarm.kind.value,
                    "state": state,
                    "acknowledged_by": acknowledged_by,
                },
            )
            if state is IncidentState.ACKNOWLEDGED:
                # Pressed again after someone took it: that person hears about it now.
                repage_acknowledger(conn, incident_id, cause, alarm.received_at)
            return AlarmOutcome(AlarmResult.JOINED, incident_id, code, state)
        # The open incident closed between our insert and the join, or the code was taken: again.
    raise RuntimeError(f"could not open or join an incident for {alarm.device_id}")


def open_alarms(
    conn: Conn, alarms: Sequence[Alarm], *, ack_timeout_s: int, hub_id: str, group: AlarmGroup
) -> list[AlarmOutcome | None]:
    """:func:`record_alarm` for a mass event's presses and falls, in a handful of statements.

    ``alarms``: all of a group's alarms, in the order received, cancels and unreadable
    ones included. The alarms this takes: readable presses and falls of registered
    wristbands whose devices the group has read, each its resident's first alarm in the
    group. All
    of their ledger rows go in one statement, their incidents in one, their timelines
    in one and their first steps in one, so a group of fifty costs a few round trips
    instead of some three hundred, at a moment when the CPU is what everyone waits
    for. An alarm whose resident already has an open incident, or whose drawn code
    was taken, then opens or joins by :func:`record_alarm`'s own path.

    Returns each alarm's outcome, or None for one it did not store (not of that kind,
    its policy cannot be resolved, or its msg_id is in the ledger already): the caller
    stores that one by :func:`record_alarm`, which tells a redelivery from a reused id
    and fails alone. Runs in the caller's savepoint: an exception here leaves nothing
    behind once the caller rolls it back, and the caller then stores every alarm alone.
    """
    outcomes: list[AlarmOutcome | None] = [None] * len(alarms)
    chosen: dict[int, tuple[Alarm, str, str | None]] = {}  # index → (alarm, resident, area)
    # Whose alarms came already, by resident (or device, for one with none): an alarm is
    # taken only as its resident's first in the group, so that storing it before the
    # others changes nothing — a cancel before it still cancels first, a press after it joins.
    seen: set[str] = set()
    for index, alarm in enumerate(alarms):
        device = group.devices.get(alarm.device_id)
        resident_id = device[1] if device is not None and device[0] == "wristband" else None
        owner = f"resident:{resident_id}" if resident_id is not None else f"device:{alarm.device_id}"
        first_of_owner = owner not in seen
        seen.add(owner)
        if not first_of_owner or alarm.cancel or alarm.msg_id is None or device is None or resident_id is None:
            continue
        chosen[index] = (alarm, resident_id, device[2])
    _read_policies(conn, [(alarm.kind, area_id) for alarm, _r, area_id in chosen.values()], ack_timeout_s, group)
    openings: dict[int, tuple[_Opening, PolicySnapshot]] = {}
    for index, (alarm, resident_id, area_id) in chosen.items():
        snapshot = group.policies.get((alarm.kind, area_id, ack_timeout_s))
        if snapshot is None:
            continue  # its policy cannot be resolved: record_alarm fails alone
        assert alarm.msg_id is not None
        detail = _message_detail(alarm, alarm.msg_id, hub_id)
        openings[index] = (_Opening(alarm, alarm.msg_id, alarm.kind, resident_id, area_id, detail), snapshot)
    if not openings:
        return outcomes
    new = {
        (str(device_id), str(key))
        for device_id, key in conn.execute(
            """
            INSERT INTO message_ledger (device_id, msg_id, payload_hash, channel, received_at)
            SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::text[], %s::timestamptz[])
            ON CONFLICT DO NOTHING RETURNING device_id, msg_id
            """,
            _columns(
                [(o.alarm.device_id, o.key, o.alarm.payload_hash, o.alarm.kind.value, o.alarm.received_at)
                 for o, _s in openings.values()],
                5,
            ),
        )
    }
    # Not new: a redelivery or a reused msg_id, which record_alarm tells apart.
    openings = {i: pair for i, pair in openings.items() if (pair[0].alarm.device_id, pair[0].key) in new}
    if not openings:
        return outcomes
    values = [o.incident_values(s) for o, s in openings.values()]
    columns = (
        "code", "kind", "resident_id", "device_id", "area_id", "opened_at", "unreadable", "snapshot", "lat", "lon"
    )
    rows = conn.execute(
        """
        INSERT INTO incidents (code, kind, severity, resident_id, device_id, area_id,
            opened_at, payload_unreadable, policy_snapshot, lat, lon)
        SELECT code, kind, 'red', resident_id, device_id, area_id, opened_at, unreadable, snapshot, lat, lon
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::boolean[],
            %s::jsonb[], %s::float8[], %s::float8[])
            AS t(code, kind, resident_id, device_id, area_id, opened_at, unreadable, snapshot, lat, lon)
        ON CONFLICT DO NOTHING
        RETURNING id, code, resident_id
        """,
        _columns([tuple(draw_code() if c == "code" else v[c] for c in columns) for v in values], len(columns)),
    ).fetchall()
    opened = {str(resident_id): (int(incident_id), str(code)) for incident_id, code, resident_id in rows}
    events: list[Event] = []
    first_steps: list[tuple[int, datetime]] = []
    for index, (opening, snapshot) in openings.items():
        assert opening.resident_id is not None
        if opening.resident_id in opened:
            incident_id, code = opened[opening.resident_id]
            events += opening.opening_events(incident_id, snapshot)
            first_steps.append((incident_id, opening.alarm.received_at))
            outcomes[index] = AlarmOutcome(AlarmResult.OPENED, incident_id, code, IncidentState.OPEN)
    add_events(conn, events)
    schedule_first_steps(conn, first_steps)
    group.opened = group.opened or bool(first_steps)
    for index, (opening, _snapshot) in openings.items():
        if outcomes[index] is None:
            # The resident has an open incident (or the drawn code was taken): its ledger row is in.
            outcomes[index] = _open_or_join(conn, opening, ack_timeout_s=ack_timeout_s, group=group)
    return outcomes


def _read_policies(
    conn: Conn, wanted: Collection[tuple[IncidentKind, str | None]], ack_timeout_s: int, group: AlarmGroup
) -> None:
    """Resolve the policies the group does not hold yet, one statement per kind; a policy
    the registry should never hold is left out (its alarms are stored alone, and fail there)."""
    by_kind: dict[IncidentKind, set[str | None]] = {}
    for kind, area_id in wanted:
        if (kind, area_id, ack_timeout_s) not in group.policies:
            by_kind.setdefault(kind, set()).add(area_id)
    for kind, areas in by_kind.items():
        for area_id, row in policy_rows(conn, kind, areas).items():
            try:
                group.policies[(kind, area_id, ack_timeout_s)] = policy_snapshot(kind, row, ack_timeout_s)
            except (KeyError, ValueError, TypeError):
                log.warning("the %s policy for %s cannot be resolved; its alarms are stored alone", kind, area_id)


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as ``width`` column lists, for ``unnest``."""
    return [[row[i] for row in rows] for i in range(width)]


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
