"""Device liveness: who is online, who went silent, and why.

A message proves a device alive. Each device has a window — heartbeat interval ×
misses; the registry's per-device values override ``SHOUHU_HEARTBEAT_INTERVAL_S`` ×
``SHOUHU_HEARTBEAT_MISSES`` — and its ``deadline`` is the ``received_at`` of its last
message plus that window (``received_at``: the hub's clock; device clocks drift).

Rules (DESIGN.md, "Liveness"):

- A refreshing sighting sets ``last_seen`` and the deadline, and marks the device
  online — unless it reports itself offline (a camera's health report with
  ``online: false``), which gives ``offline_reason = 'reported:<its reason>'``.
- A retained delivery proves nothing and changes nothing. An ``offline`` status (a
  Last Will) does not refresh either, but marks the device offline with reason
  ``last_will`` — unless a message received after the will is already stored: the
  newer evidence wins, whichever order hubs commit them in (``device_state.state_at``
  is the receipt time of the evidence behind ``online``).
- The sweeper marks ``no_heartbeat`` every online device whose deadline has passed.
  The transition is dated at the deadline, when the device actually fell silent.
- Within a batch, the latest sighting by ``received_at`` (ties: the later in the
  batch) decides online/offline; battery, worn and position take their newest given
  value from refreshing sightings, so an SOS without a battery reading does not hide
  the telemetry just before it. ``worn_since`` is when ``worn`` last changed value
  (the care sweeper asks how long a band has lain unworn). A transition — unknown → online/offline, online ⇄
  offline — writes a ``device_events`` row; a new reason while already offline does
  not.

How the writer spells each message as a :class:`~hub.sightings.Sighting` (the
dataclass has no ``retained`` flag, so this is the contract):

- telemetry, SOS, fall, live ``online`` status: ``refreshes=True``;
- camera health: ``refreshes=True``, ``reported_online`` and ``reported_reason`` from
  the payload;
- live ``offline`` status (a will): ``refreshes=False, reported_online=False,
  reported_reason='last_will'``;
- any retained delivery: ``refreshes=False`` and ``reported_online`` None (or True) —
  never False, or a stale retained will would read as a live one.

The ingest-outage rule. While no hub can ingest — its own outage, the broker's, the
database's — silence proves nothing about devices: that time is ``unknown``.

1. Each hub calls :func:`beat` about once a second while it is connected to both the
   broker and the database. The newest ``ingest_heartbeats.alive_at`` across hubs is
   the last moment ingest was known to work (one hub alive is enough).
2. :func:`sweep` judges only up to that moment (``deadline < min(now, newest
   alive_at)``), and if it is older than :data:`INGEST_GRACE` ingest is down: it
   marks nothing, and opens an ``ingest_gaps`` row starting at that newest
   ``alive_at``.
3. The first :func:`beat` after an outage closes the gap (or records it, if no sweeper
   ran during the outage — the sweeper usually dies with the hub, so the heartbeat
   table, not the sweeper, is what remembers when ingest stopped).
4. The next sweep, before it marks anything, applies each closed gap once: every
   online device whose deadline had not passed when the gap started has its deadline
   pushed by the silence the gap stole from it (``ended_at - greatest(last_seen,
   started_at)``), in one UPDATE. A device already past its deadline before the gap
   is not pushed, and goes offline.

All of this state is in the database, so it holds with several hubs and across
restarts of any of them. The clock is always passed in; nothing here reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from psycopg.pq import TransactionStatus
from psycopg.rows import class_row, kwargs_row

from devices.kinds import DeviceKind
from hub.sightings import Sighting
from shouhu.db import Conn
from shouhu.settings import Settings

# An arbitrary constant: the advisory lock that elects one liveness sweeper among hubs.
# (…0001 is the migrations', …0002 the escalation router's.)
SWEEP_LOCK_KEY = 0x5348_4F55_4855_0003
# Heartbeats come about every second; a silence longer than this is an ingest outage.
INGEST_GRACE = timedelta(seconds=10)
# Rows marked offline per statement and transaction, so a sweep after a long silence
# never holds a hundred thousand row locks at once.
SWEEP_CHUNK = 5_000


class OfflineReason(StrEnum):
    NO_HEARTBEAT = "no_heartbeat"
    LAST_WILL = "last_will"
    REPORTED = "reported"  # stored as 'reported:<the device's own reason>'


class Liveness(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    UNKNOWN = "unknown"  # never heard from, or nothing known


class UnknownDeviceError(ValueError):
    """A sighting names a device that is not registered; nothing was recorded."""


@dataclass(frozen=True, slots=True)
class LivenessDefaults:
    """The window for devices whose registry entry does not set their own."""

    interval_s: int
    misses: int

    def __post_init__(self) -> None:
        """Refuse a window that would never (or always) expire."""
        if self.interval_s <= 0 or self.misses < 1:
            raise ValueError(f"heartbeat interval must be > 0 and misses >= 1, not {self.interval_s}, {self.misses}")

    @classmethod
    def from_settings(cls, settings: Settings) -> LivenessDefaults:
        return cls(settings.heartbeat_interval_s, settings.heartbeat_misses)

    def window(self, interval_s: int | None = None, misses: int | None = None) -> timedelta:
        """Silence allowed before offline; a device's own values override the defaults."""
        return timedelta(seconds=(interval_s or self.interval_s) * (misses or self.misses))


@dataclass(frozen=True, slots=True)
class Transition:
    """A device went online or offline (or was heard from for the first time)."""

    device_id: str
    kind: DeviceKind
    at: datetime
    online: bool
    reason: str | None  # why offline; None when online


@dataclass(frozen=True, slots=True)
class DeviceState:
    """The liveness columns of one ``device_state`` row; all None before a first sighting."""

    online: bool | None = None
    offline_reason: str | None = None
    last_seen: datetime | None = None
    deadline: datetime | None = None
    state_at: datetime | None = None
    battery: int | None = None
    worn: bool | None = None
    lat: float | None = None
    lon: float | None = None
    worn_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class LockedDevice:
    """A ``device_state`` row locked for a batch of sightings, with its device's window."""

    device_id: str
    kind: DeviceKind
    interval_s: int | None
    misses: int | None
    state: DeviceState


def _locked_device(
    *, device_id: str, kind: str, interval_s: int | None, misses: int | None, **state: Any
) -> LockedDevice:
    return LockedDevice(
        device_id=device_id, kind=DeviceKind(kind), interval_s=interval_s, misses=misses, state=DeviceState(**state)
    )


@dataclass(frozen=True, slots=True)
class IngestGap:
    started_at: datetime
    ended_at: datetime

    @property
    def length(self) -> timedelta:
        return self.ended_at - self.started_at


@dataclass(frozen=True, slots=True)
class SweepReport:
    leader: bool  # False: another hub's sweeper holds the lock; nothing was done
    ingest_alive: bool = True  # False: ingest is down, time is unknown, nothing was judged
    gaps_applied: tuple[IngestGap, ...] = ()
    deadlines_pushed: int = 0
    chunks: int = 0
    transitions: tuple[Transition, ...] = ()

    @property
    def marked_offline(self) -> int:
        return len(self.transitions)


def _require_aware(at: datetime) -> None:
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at!r}: liveness works in timezone-aware UTC")


def _latest(*times: datetime | None) -> datetime | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _decides(sighting: Sighting) -> bool:
    """Whether a sighting can change online/offline: a message, or a live Last Will."""
    return sighting.refreshes or sighting.reported_online is False


def _verdict(sighting: Sighting) -> tuple[bool, str | None]:
    if not sighting.refreshes:
        return False, sighting.reported_reason or OfflineReason.LAST_WILL.value
    if sighting.reported_online is False:
        reason = sighting.reported_reason
        return False, f"{OfflineReason.REPORTED}:{reason}" if reason else OfflineReason.REPORTED.value
    return True, None


def apply_sightings(current: DeviceState, sightings: Sequence[Sighting], window: timedelta) -> DeviceState:
    """One device's new state after ``sightings`` (its own, in the order received).

    Pure: the rules of the module docstring, given the stored state. Ties in
    ``received_at`` go to the later sighting in the batch.
    """
    new = current
    # Data: each field takes its newest value, from messages no older than what is stored.
    # Kept in locals and written once: a backlog brings a device several times a batch.
    worn, worn_since, battery, lat, lon = current.worn, current.worn_since, current.battery, current.lat, current.lon
    last_seen: datetime | None = None
    for sighting in sorted((s for s in sightings if s.refreshes), key=lambda s: s.received_at):
        if current.last_seen is not None and sighting.received_at < current.last_seen:
            continue
        if sighting.worn is not None:
            if sighting.worn != worn or worn_since is None:
                worn_since = sighting.received_at
            worn = sighting.worn
        last_seen = sighting.received_at
        if sighting.battery is not None:
            battery = round(sighting.battery)
        if sighting.lat is not None:
            lat = sighting.lat
        if sighting.lon is not None:
            lon = sighting.lon
    if last_seen is not None:
        new = replace(
            new,
            worn_since=worn_since,
            last_seen=last_seen,
            deadline=last_seen + window,
            battery=battery,
            worn=worn,
            lat=lat,
            lon=lon,
        )
    deciding = [(s.received_at, i) for i, s in enumerate(sightings) if _decides(s)]
    if deciding:
        at, index = max(deciding)
        since = _latest(current.state_at, current.last_seen)
        if since is None or at >= since:
            online, reason = _verdict(sightings[index])
            new = replace(new, online=online, offline_reason=reason, state_at=at)
    return new


_ENSURE_ROWS = """
    INSERT INTO device_state (device_id)
    SELECT id FROM devices WHERE id = ANY(%s) ORDER BY id
    ON CONFLICT (device_id) DO NOTHING
"""

# Locks in device_id order, as every other multi-row writer here does, so two hubs'
# batches (or a batch and a gap push) wait for each other instead of deadlocking.
_LOCK_ROWS = """
    SELECT s.device_id, d.kind,
           coalesce(d.heartbeat_interval_s, h.interval_s) AS interval_s,
           coalesce(d.heartbeat_misses, h.misses) AS misses,
           s.online, s.offline_reason, s.last_seen, s.deadline, s.state_at,
           s.battery, s.worn, s.lat, s.lon, s.worn_since
    FROM device_state s JOIN devices d ON d.id = s.device_id
    LEFT JOIN heartbeat_policies h ON h.kind = d.kind
    WHERE s.device_id = ANY(%s)
    ORDER BY s.device_id
    FOR UPDATE OF s
"""

_WRITE_STATES = """
    UPDATE device_state s SET
        online = u.online, offline_reason = u.offline_reason, state_at = u.state_at,
        last_seen = u.last_seen, deadline = u.deadline,
        battery = u.battery, worn = u.worn, lat = u.lat, lon = u.lon, worn_since = u.worn_since,
        updated_at = now()
    FROM unnest(%s::text[], %s::boolean[], %s::text[], %s::timestamptz[], %s::timestamptz[],
                %s::timestamptz[], %s::smallint[], %s::boolean[], %s::float8[], %s::float8[], %s::timestamptz[])
         AS u(device_id, online, offline_reason, state_at, last_seen, deadline, battery, worn, lat, lon, worn_since)
    WHERE s.device_id = u.device_id
"""

_WRITE_EVENTS = """
    INSERT INTO device_events (device_id, at, event, reason, detail)
    SELECT device_id, at, CASE WHEN online THEN 'online' ELSE 'offline' END, reason,
           jsonb_build_object('from', previous)
    FROM unnest(%s::text[], %s::timestamptz[], %s::boolean[], %s::text[], %s::text[])
         AS e(device_id, at, online, reason, previous)
"""


def _state_name(online: bool | None) -> Liveness:
    return Liveness.UNKNOWN if online is None else Liveness.ONLINE if online else Liveness.OFFLINE


def record_sightings(conn: Conn, sightings: Sequence[Sighting], defaults: LivenessDefaults) -> list[Transition]:
    """Apply a batch of sightings to ``device_state``, in the caller's transaction.

    A constant number of statements whatever the batch size. Writes a
    ``device_events`` row for every transition (including a device's first
    sighting) and returns the transitions, ordered by device id.

    The writer drops messages of unregistered devices (dead-lettered as
    ``unknown_device``) before calling this; a sighting that still names one is a
    bug, and is refused loudly rather than lost quietly.

    Raises:
        UnknownDeviceError: a sighting names an unregistered device; nothing was written.
        ValueError: a ``received_at`` is naive.
    """
    transitions, _states = _record(conn, _by_device(sightings), defaults)
    return transitions


def _by_device(sightings: Sequence[Sighting]) -> dict[str, list[Sighting]]:
    by_device: dict[str, list[Sighting]] = {}
    for sighting in sightings:
        _require_aware(sighting.received_at)
        # Retained deliveries change nothing: they must not even create a row.
        by_device.setdefault(sighting.device_id, []).append(sighting)
    return by_device


def _record(
    conn: Conn, by_device: dict[str, list[Sighting]], defaults: LivenessDefaults
) -> tuple[list[Transition], dict[str, tuple[DeviceState, timedelta]]]:
    """``record_sightings``'s work; also returns every locked device's state after it, with its window."""
    ids = sorted(device_id for device_id, own in by_device.items() if any(_decides(s) for s in own))
    if not ids:
        return [], {}
    conn.execute(_ENSURE_ROWS, (ids,))
    rows = conn.cursor(row_factory=kwargs_row(_locked_device)).execute(_LOCK_ROWS, (ids,)).fetchall()
    missing = set(ids) - {row.device_id for row in rows}
    if missing:
        raise UnknownDeviceError(f"sightings of unregistered devices: {sorted(missing)}")
    changed: list[tuple[str, DeviceState]] = []
    transitions: list[tuple[Transition, Liveness]] = []
    states: dict[str, tuple[DeviceState, timedelta]] = {}
    for row in rows:
        current = row.state
        window = defaults.window(row.interval_s, row.misses)
        new = apply_sightings(current, by_device[row.device_id], window)
        states[row.device_id] = (new, window)
        if new != current:
            changed.append((row.device_id, new))
        if new.online is not None and new.online != current.online:
            assert new.state_at is not None
            transition = Transition(row.device_id, row.kind, new.state_at, new.online, new.offline_reason)
            transitions.append((transition, _state_name(current.online)))
    if changed:
        conn.execute(
            _WRITE_STATES,
            (
                [d for d, _ in changed],
                [s.online for _, s in changed],
                [s.offline_reason for _, s in changed],
                [s.state_at for _, s in changed],
                [s.last_seen for _, s in changed],
                [s.deadline for _, s in changed],
                [s.battery for _, s in changed],
                [s.worn for _, s in changed],
                [s.lat for _, s in changed],
                [s.lon for _, s in changed],
                [s.worn_since for _, s in changed],
            ),
        )
    if transitions:
        conn.execute(
            _WRITE_EVENTS,
            (
                [t.device_id for t, _ in transitions],
                [t.at for t, _ in transitions],
                [t.online for t, _ in transitions],
                [t.reason for t, _ in transitions],
                [previous.value for _, previous in transitions],
            ),
        )
    return [t for t, _ in transitions], states


# A device heard again within this much of what this hub last wrote for it, with
# nothing material changed, is not written: a chatty device or a drained backlog
# costs one row write per device per REFRESH, not one per batch. Never more than a
# tenth of the device's window, so a deadline is at most that much early.
REFRESH = timedelta(seconds=15)
_MEMORY_MAX = 200_000


@dataclass(frozen=True, slots=True)
class _Written:
    state: DeviceState
    window: timedelta


class LivenessRecorder:
    """``record_sightings`` for a hub's lanes, remembering what it last wrote per device.

    A device's sightings are skipped — no read, no lock, no write — when, applied to
    what this hub last wrote for it, they change nothing but ``last_seen``,
    ``deadline``, ``state_at`` and position, and ``last_seen`` moves less than the
    refresh interval (REFRESH, or a tenth of the window if smaller). What that costs:
    ``device_state`` may trail the newest message by up to that interval (its
    position too; the telemetry rows hold every point), so a deadline can fall that
    much early. Anything material — online/offline, a reason, battery, worn — and a
    device this hub has not written yet go to the database as before. Both lanes
    share one recorder: a Last Will stored by the alarm lane is what the bulk lane's
    next sighting is compared with. If the transaction that wrote a device rolls
    back, the memory is ahead of the table for at most one interval, after which the
    device is read and written again.
    """

    def __init__(self, defaults: LivenessDefaults, refresh: timedelta = REFRESH) -> None:
        self.defaults = defaults
        self.refresh = refresh
        self._written: dict[str, _Written] = {}
        self._lock = threading.Lock()

    def __call__(self, conn: Conn, sightings: Sequence[Sighting]) -> list[Transition]:
        by_device = _by_device(sightings)
        with self._lock:
            needed = {d: own for d, own in by_device.items() if not self._immaterial(self._written.get(d), own)}
        transitions, states = _record(conn, needed, self.defaults)
        with self._lock:
            if len(self._written) + len(states) > _MEMORY_MAX:
                self._written.clear()
            for device_id, (state, window) in states.items():
                self._written[device_id] = _Written(state, window)
        return transitions

    def _immaterial(self, written: _Written | None, own: Sequence[Sighting]) -> bool:
        if written is None or written.state.last_seen is None:
            return False
        before, seen = written.state, written.state.last_seen
        after = apply_sightings(before, own, written.window)
        if after.last_seen is None or after.last_seen - seen >= min(self.refresh, written.window / 10):
            return False
        return (after.online, after.offline_reason, after.battery, after.worn, after.worn_since) == (
            before.online,
            before.offline_reason,
            before.battery,
            before.worn,
            before.worn_since,
        )


_BEAT = """
    WITH previous AS (SELECT max(alive_at) AS newest FROM ingest_heartbeats),
    gap AS (
        INSERT INTO ingest_gaps (started_at, ended_at)
        SELECT newest, %(now)s FROM previous WHERE newest < %(now)s - %(grace)s
        ON CONFLICT (started_at) DO UPDATE SET ended_at = EXCLUDED.ended_at
            WHERE ingest_gaps.ended_at IS NULL
        RETURNING started_at, ended_at
    ),
    stamp AS (
        INSERT INTO ingest_heartbeats (hub_id, alive_at) VALUES (%(hub_id)s, %(now)s)
        ON CONFLICT (hub_id) DO UPDATE
            SET alive_at = greatest(ingest_heartbeats.alive_at, EXCLUDED.alive_at)
    )
    SELECT started_at, ended_at FROM gap
"""


def beat(conn: Conn, hub_id: str, now: datetime, *, grace: timedelta = INGEST_GRACE) -> IngestGap | None:
    """Record that ``hub_id`` can ingest at ``now``, in the caller's transaction (keep it short).

    Call about once a second, only while connected to both the broker and the
    database. If no hub had beaten for longer than ``grace``, this is the end of an
    ingest outage: the gap is recorded (two hubs ending it at once record it once)
    and returned, and the next sweep pauses deadlines by it.
    """
    _require_aware(now)
    cursor = conn.cursor(row_factory=class_row(IngestGap))
    return cursor.execute(_BEAT, {"hub_id": hub_id, "now": now, "grace": grace}).fetchone()


# One chunk of the sweep. The partial index device_state_deadline_idx (deadline WHERE
# online) serves the range and the order, and LIMIT stops the scan: the cost follows
# the expired rows, not the table. SKIP LOCKED: a row a hub is refreshing right now is
# not silent; the next sweep looks again. The ids go through an array rather than a
# join so the UPDATE finds its rows by primary key (a join lets the planner hash the
# chunk against a scan of the whole table).
SWEEP_CHUNK_SQL = """
    WITH marked AS (
        UPDATE device_state s
        SET online = false, offline_reason = 'no_heartbeat', state_at = s.last_seen,
            updated_at = %(now)s
        WHERE s.device_id = ANY(ARRAY(
            SELECT device_id FROM device_state
            WHERE online AND deadline < %(cutoff)s
            ORDER BY deadline
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING s.device_id, s.deadline
    ),
    logged AS (
        INSERT INTO device_events (device_id, at, event, reason, detail)
        SELECT device_id, deadline, 'offline', 'no_heartbeat',
               jsonb_build_object('from', 'online', 'swept_at', %(now)s::timestamptz)
        FROM marked
    )
    SELECT m.device_id, d.kind, m.deadline FROM marked m JOIN devices d ON d.id = m.device_id
    ORDER BY m.deadline, m.device_id
"""

# Locked in device_id order like record_sightings, so the push and hubs catching up
# after the outage wait for each other rather than deadlock.
_PUSH_DEADLINES = """
    UPDATE device_state s
    SET deadline = s.deadline + (%(ended)s - greatest(s.last_seen, %(started)s))
    FROM (
        SELECT device_id FROM device_state
        WHERE online AND deadline > %(started)s AND last_seen < %(ended)s
        ORDER BY device_id
        FOR UPDATE
    ) AS paused
    WHERE s.device_id = paused.device_id
"""


def _newest_alive(conn: Conn) -> datetime | None:
    row = conn.execute("SELECT max(alive_at) FROM ingest_heartbeats").fetchone()
    return row[0] if row is not None else None


def _apply_gaps(conn: Conn, now: datetime, newest: datetime) -> tuple[tuple[IngestGap, ...], int]:
    # A gap still open though ingest is back was missed by beat() (hub clocks apart by
    # more than the grace): close it at the newest heartbeat, which errs long — unknown
    # rather than a false offline.
    conn.execute(
        "UPDATE ingest_gaps SET ended_at = %(newest)s WHERE ended_at IS NULL AND started_at < %(newest)s",
        {"newest": newest},
    )
    pending = conn.execute(
        "SELECT id, started_at, ended_at FROM ingest_gaps"
        " WHERE applied_at IS NULL AND ended_at IS NOT NULL ORDER BY started_at FOR UPDATE"
    ).fetchall()
    pushed = 0
    for gap_id, started, ended in pending:
        count = conn.execute(_PUSH_DEADLINES, {"started": started, "ended": ended}).rowcount
        conn.execute(
            "UPDATE ingest_gaps SET applied_at = %s, deadlines_pushed = %s WHERE id = %s", (now, count, gap_id)
        )
        pushed += count
    return tuple(IngestGap(started, ended) for _, started, ended in pending), pushed


def _mark_chunk(conn: Conn, now: datetime, cutoff: datetime, limit: int) -> list[Transition]:
    rows = conn.execute(SWEEP_CHUNK_SQL, {"cutoff": cutoff, "limit": limit, "now": now}).fetchall()
    return [
        Transition(device_id, DeviceKind(kind), deadline, False, OfflineReason.NO_HEARTBEAT.value)
        for device_id, kind, deadline in rows
    ]


def sweep(
    conn: Conn,
    now: datetime,
    *,
    lock_key: int,
    grace: timedelta = INGEST_GRACE,
    chunk_size: int = SWEEP_CHUNK,
) -> SweepReport:
    """Mark ``no_heartbeat`` every online device whose deadline passed, if this hub leads.

    Leadership is ``pg_try_advisory_xact_lock(lock_key)``, taken again by each chunk's
    transaction: another sweeper holding it means an empty report. The sweep commits
    every ``chunk_size`` devices, so ``conn`` must not be inside a transaction.
    Ingest outages pause deadlines instead (module docstring).

    Raises:
        ValueError: ``conn`` is inside a transaction, or ``now`` is naive.
    """
    _require_aware(now)
    if conn.info.transaction_status is not TransactionStatus.IDLE:
        raise ValueError("sweep commits each chunk itself: call it outside a transaction")
    gaps: tuple[IngestGap, ...] = ()
    pushed = 0
    chunks = 0
    cutoff: datetime | None = None
    transitions: list[Transition] = []
    while True:
        with conn.transaction():
            (leader,) = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (lock_key,)).fetchone() or (False,)
            if not leader:
                # Lost between chunks: whoever took over finishes the job.
                break
            if cutoff is None:
                newest = _newest_alive(conn)
                if newest is None or newest < now - grace:
                    if newest is not None:
                        conn.execute(
                            "INSERT INTO ingest_gaps (started_at) VALUES (%s) ON CONFLICT (started_at) DO NOTHING",
                            (newest,),
                        )
                    return SweepReport(leader=True, ingest_alive=False)
                gaps, pushed = _apply_gaps(conn, now, newest)
                # Only judge time ingest is known to have covered.
                cutoff = min(now, newest)
            marked = _mark_chunk(conn, now, cutoff, chunk_size)
        chunks += 1
        transitions.extend(marked)
        if len(marked) < chunk_size:
            break
    return SweepReport(
        leader=chunks > 0,
        gaps_applied=gaps,
        deadlines_pushed=pushed,
        chunks=chunks,
        transitions=tuple(transitions),
    )


def device_counts(conn: Conn) -> dict[tuple[DeviceKind, Liveness], int]:
    """Active devices by kind and liveness, every pair present (zero included), for the gauge."""
    counts = {(kind, state): 0 for kind in DeviceKind for state in Liveness}
    rows = conn.execute(
        """
        SELECT d.kind, CASE WHEN s.online THEN 'online' WHEN NOT s.online THEN 'offline' ELSE 'unknown' END,
               count(*)
        FROM devices d LEFT JOIN device_state s ON s.device_id = d.id
        WHERE d.active
        GROUP BY 1, 2
        """
    ).fetchall()
    for kind, state, count in rows:
        counts[DeviceKind(kind), Liveness(state)] = count
    return counts
