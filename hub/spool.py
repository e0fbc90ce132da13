"""The hub's local durable alarm spool: an SOS is paged even while PostgreSQL is down.

When the hub cannot store an SOS or fall, it writes the press to a journal file and
fsyncs it (``record``), then pages the first step's people at once (``page``) from a
roster snapshot it refreshed from the registry every minute while the database was up
(``refresh``). When PostgreSQL is back, ``reconcile`` stores each spooled alarm the
normal way (``hub.ingest.store_message``: ledger, incident, first escalation action)
and, in the same transaction, records the spool's pages as the first step's
notification attempts. The router's first step then pages only whom the spool did not
(the attempts' unique key makes the others no-ops), and its wait runs from the spool's
first page: the chain goes on from there, with no second first page to anyone.

Files in the spool directory (``SHOUHU_SPOOL_DIR``), both mode 0600 — they hold names,
phone numbers and addresses (PIPL):

- ``roster.json``: the snapshot, replaced atomically (temp file, fsync, rename, fsync
  of the directory), so a hub restarted during the outage still has it;
- ``journal.jsonl``: one JSON record per line — an alarm, a page, an alarm done —
  appended and fsynced before the call that wrote it returns. A line torn by a crash
  can only be the last one, whose call never returned: it is dropped on load.

Threads: ``record``, ``page``, ``reconcile`` and ``refresh`` may be called from any
thread; one lock guards the journal and the in-memory state, and is never held across a
provider request or a database call.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import psycopg
from prometheus_client import Counter, Gauge, Histogram
from psycopg.pq import TransactionStatus

from alerts.attempts import record_spooled_page
from alerts.escalation import first_step_id
from alerts.incidents import draw_code, open_fallback_incident
from alerts.notifiers.base import Delivery, Message, Notifier, SendOutcome, SendResult
from alerts.policy import resolve_policy
from alerts.recipients import Recipient, RosterData, Rosters, Shift, read_roster_data
from alerts.retry import after_failure
from alerts.states import OPEN_SQL
from alerts.timeline import add_event
from devices.contract import DEVICE_ID, DeviceMessage, SosPayload, parse_message, payload_hash
from devices.kinds import Channel, EscalationTarget, IncidentKind
from hub.batch import SightingSink
from hub.ingest import IngestConfig, store_message
from hub.mqtt import Received
from shouhu.db import Conn
from shouhu.settings import DEFAULT_ACK_TIMEOUT_S

if TYPE_CHECKING:
    from shouhu.settings import Settings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

SNAPSHOT_FILE = "roster.json"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "lock"
SNAPSHOT_FORMAT = 1
# A hard limit on each provider request: a provider that hangs must not hold the
# hub's pages, and the first page must go out within 10 s of the press.
REQUEST_TIMEOUT_S = 5.0
# Reconciled entries are remembered (without their payload) as long as the ledger
# keeps keys, so a broker redelivery after reconciling is still recognised.
KEEP_DONE = timedelta(days=7)
# Incidents a spooled press may have joined: an open red incident older than this is
# not looked for (an incident does not stay open for a week).
JOIN_HORIZON = timedelta(days=7)
# The hub pages by phone; the console and the platform's webhook need the database.
PHONE_CHANNELS = (Channel.VOICE, Channel.SMS)
ALARM_CHANNELS = {"sos": IncidentKind.SOS, "fall": IncidentKind.FALL}
TIMELINE_EVENT = "spool_paged"

SPOOLED = Counter("shouhu_spool_alarms_total", "Alarms written to the spool while the database was down", ["channel"])
SPOOL_REDELIVERIES = Counter(
    "shouhu_spool_redeliveries_total", "Alarms offered to the spool that it already held (not paged again)"
)
SPOOL_PAGES = Counter(
    "shouhu_spool_pages_total", "Pages sent from the spool, by channel and outcome", ["channel", "outcome"]
)
SPOOL_PENDING = Gauge("shouhu_spool_pending", "Spooled alarms not yet stored in PostgreSQL")
SPOOL_RECONCILED = Counter(
    "shouhu_spool_reconciled_total", "Spooled alarms stored in PostgreSQL, by result", ["result"]
)
SNAPSHOT_TAKEN = Gauge("shouhu_spool_snapshot_timestamp_seconds", "When the roster snapshot was read (Unix time)")
SPOOL_PRESS_TO_FIRST_REQUEST = Histogram(
    "shouhu_spool_press_to_first_request_seconds",
    "From the hub receiving an alarm to the spool's first provider request for it",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30),
)


def utc_now() -> datetime:
    return datetime.now(UTC)


class SpoolBusy(Exception):
    """Another process holds this spool directory."""


# -- the roster snapshot ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wristband:
    """A registered wristband's resident: what a page says and whose rosters decide it."""

    resident_id: str
    name: str
    address: str
    phone: str  # the callback number a page gives
    grid_id: str


@dataclass(frozen=True, slots=True)
class FirstStep:
    """The first step of the policy an incident would get: whom, on which channels."""

    target: EscalationTarget
    channels: tuple[Channel, ...]


# What the router's built-in policies start with (alerts/policy.py), for a grid the
# snapshot has no policy for.
DEFAULT_FIRST_STEP = FirstStep(EscalationTarget.GRID_WORKER, PHONE_CHANNELS)
UNREGISTERED_FIRST_STEP = FirstStep(EscalationTarget.OPERATORS, PHONE_CHANNELS)


@dataclass(frozen=True, slots=True)
class PagePlan:
    """Whom a spooled alarm pages, and what they are told."""

    kind: IncidentKind
    recipients: tuple[Recipient, ...]
    channels: tuple[Channel, ...]
    resident_name: str
    address: str
    callback_number: str
    reason: str  # why these people: "first step", "nobody on duty: operators", …


@dataclass(frozen=True, slots=True)
class RosterSnapshot:
    """What the hub needs to decide, without the database, whom an alarm pages.

    Shifts, not who is on duty: the snapshot is evaluated at the moment of the press
    in ``SHOUHU_TIMEZONE`` with the router's own rules (``alerts.recipients.Rosters``),
    so one read an hour ago is still right now.
    """

    taken_at: datetime
    wristbands: Mapping[str, Wristband]
    rosters: RosterData
    first_steps: Mapping[str, Mapping[str, FirstStep]]  # incident kind → grid (or county) → first step
    county_id: str | None
    county_name: str

    @classmethod
    def read(cls, conn: Conn, now: datetime, *, ack_timeout_s: int = DEFAULT_ACK_TIMEOUT_S) -> RosterSnapshot:
        """Read the registry: wristbands and residents, areas, shifts, operators, guardians, policies."""
        wristbands = {
            str(device_id): Wristband(str(resident_id), str(name), str(address), str(phone or ""), str(grid_id))
            for device_id, resident_id, name, address, phone, grid_id in conn.execute(
                """
                SELECT d.id, r.id, r.name, r.address, r.phone, r.grid_id FROM devices d
                JOIN residents r ON r.id = d.resident_id WHERE d.kind = 'wristband'
                """
            ).fetchall()
        }
        county = conn.execute(
            "SELECT id, name FROM areas WHERE parent_id IS NULL AND active ORDER BY id LIMIT 1"
        ).fetchone()
        county_id = str(county[0]) if county else None
        # The policy each incident would get, resolved as record_alarm resolves it.
        first_steps: dict[str, dict[str, FirstStep]] = {}
        for kind in (IncidentKind.SOS, IncidentKind.FALL):
            for grid_id in sorted({band.grid_id for band in wristbands.values()}):
                steps = resolve_policy(conn, kind, grid_id, ack_timeout_s).steps
                if steps:
                    first_steps.setdefault(kind.value, {})[grid_id] = FirstStep(steps[0].target, steps[0].channels)
        unregistered = resolve_policy(conn, IncidentKind.SOS_UNREGISTERED, county_id, ack_timeout_s).steps
        if unregistered and county_id:
            first_steps[IncidentKind.SOS_UNREGISTERED.value] = {
                county_id: FirstStep(unregistered[0].target, unregistered[0].channels)
            }
        return cls(
            taken_at=now,
            wristbands=wristbands,
            rosters=read_roster_data(conn),
            first_steps=first_steps,
            county_id=county_id,
            county_name=str(county[1]) if county else "",
        )

    def plan(self, device_id: str, kind: IncidentKind, at: datetime, zone: ZoneInfo) -> PagePlan:
        """Whom an alarm of ``device_id`` pressed at ``at`` pages.

        The first step of its policy, resolved at ``at`` as the router would resolve it
        (grid workers on duty, walking up the tree when nobody is). An unregistered
        wristband, or a step that reaches nobody, pages the county operators
        (DESIGN.md: sos_unregistered → operators): the hub cannot run later steps.
        """
        rosters = Rosters(None, at, zone, data=self.rosters)
        band = self.wristbands.get(device_id)
        if band is None:
            step = self._first_step(IncidentKind.SOS_UNREGISTERED, self.county_id, UNREGISTERED_FIRST_STEP)
            return PagePlan(
                IncidentKind.SOS_UNREGISTERED,
                tuple(rosters.operators()),
                _phone_channels(step),
                device_id,
                self.county_name,
                "",
                "unregistered wristband: operators",
            )
        step = self._first_step(kind, band.grid_id, DEFAULT_FIRST_STEP)
        target = step.target
        if target not in (EscalationTarget.GRID_WORKER, EscalationTarget.GUARDIANS, EscalationTarget.OPERATORS):
            # The hub cannot send the platform's webhook: the grid workers, as DESIGN.md says.
            target = EscalationTarget.GRID_WORKER
        people = rosters.resolve(target, resident_id=band.resident_id, area_id=band.grid_id)
        reason = f"first step: {target.value}"
        if not people:
            people = rosters.operators()
            reason = f"nobody reachable for {target.value}: operators"
        return PagePlan(kind, tuple(people), _phone_channels(step), band.name, band.address, band.phone, reason)

    def _first_step(self, kind: IncidentKind, area_id: str | None, default: FirstStep) -> FirstStep:
        return self.first_steps.get(kind.value, {}).get(area_id or "", default)

    def to_json(self) -> dict[str, Any]:
        data = self.rosters
        return {
            "format": SNAPSHOT_FORMAT,
            "taken_at": self.taken_at.isoformat(),
            "county_id": self.county_id,
            "county_name": self.county_name,
            "wristbands": {
                device: [b.resident_id, b.name, b.address, b.phone, b.grid_id] for device, b in self.wristbands.items()
            },
            "first_steps": {
                kind: {area: [s.target.value, [c.value for c in s.channels]] for area, s in steps.items()}
                for kind, steps in self.first_steps.items()
            },
            "chains": {area: list(chain) for area, chain in data.chains.items()},
            "shifts": {area: [_shift_json(s) for s in shifts] for area, shifts in data.shifts.items()},
            "operator_areas": list(data.operator_areas),
            "operators": [_recipient_json(r) for r in data.operators],
            "guardians": {
                resident: [_recipient_json(r) for r in people] for resident, people in data.guardians.items()
            },
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RosterSnapshot:
        if raw.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"roster snapshot format {raw.get('format')!r}, expected {SNAPSHOT_FORMAT}")
        return cls(
            taken_at=datetime.fromisoformat(raw["taken_at"]),
            wristbands={device: Wristband(*values) for device, values in raw["wristbands"].items()},
            rosters=RosterData(
                chains={area: tuple(chain) for area, chain in raw["chains"].items()},
                shifts={area: tuple(_shift(s) for s in shifts) for area, shifts in raw["shifts"].items()},
                operator_areas=tuple(raw["operator_areas"]),
                operators=tuple(_recipient(r) for r in raw["operators"]),
                guardians={
                    resident: tuple(_recipient(r) for r in people) for resident, people in raw["guardians"].items()
                },
            ),
            first_steps={
                kind: {
                    area: FirstStep(EscalationTarget(target), tuple(Channel(c) for c in channels))
                    for area, (target, channels) in steps.items()
                }
                for kind, steps in raw["first_steps"].items()
            },
            county_id=raw["county_id"],
            county_name=raw["county_name"],
        )


def _phone_channels(step: FirstStep) -> tuple[Channel, ...]:
    # The step's phone channels; a step with none (console only) still gets both: the
    # console is not watched from a hub whose database is down.
    return tuple(c for c in step.channels if c in PHONE_CHANNELS) or PHONE_CHANNELS


def _shift_json(shift: Shift) -> list[Any]:
    return [
        shift.area_id,
        shift.staff_id,
        shift.name,
        shift.phone,
        shift.role,
        list(shift.weekdays),
        shift.start.isoformat(),
        shift.end.isoformat(),
    ]


def _shift(values: list[Any]) -> Shift:
    area, staff, name, phone, role, weekdays, start, end = values
    return Shift(
        area, staff, name, phone, role, tuple(weekdays), clock_time.fromisoformat(start), clock_time.fromisoformat(end)
    )


def _recipient_json(person: Recipient) -> list[Any]:
    return [person.kind, person.id, person.name, person.phone, person.role, person.area_id]


def _recipient(values: list[Any]) -> Recipient:
    return Recipient(*values)


# -- the spool's records -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One alarm as the hub received it, with the ledger key and code it will be stored under."""

    id: str
    device_id: str
    channel: str  # "sos" or "fall"
    topic: str
    payload: bytes
    payload_hash: bytes
    received_at: datetime
    ledger_key: str  # msg_id, or "raw:" + the payload's sha256 (alerts.incidents.Alarm.ledger_key)
    msg_id: str | None
    code: str  # the incident code the pages carry, drawn before the incident exists
    cancel: bool = False

    @property
    def kind(self) -> IncidentKind:
        return ALARM_CHANNELS[self.channel]

    def to_json(self) -> dict[str, Any]:
        return {
            "t": "alarm",
            "id": self.id,
            "device_id": self.device_id,
            "channel": self.channel,
            "topic": self.topic,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "payload_hash": self.payload_hash.hex(),
            "received_at": self.received_at.isoformat(),
            "ledger_key": self.ledger_key,
            "msg_id": self.msg_id,
            "code": self.code,
            "cancel": self.cancel,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SpoolEntry:
        return cls(
            id=raw["id"],
            device_id=raw["device_id"],
            channel=raw["channel"],
            topic=raw["topic"],
            payload=base64.b64decode(raw["payload"]),
            payload_hash=bytes.fromhex(raw["payload_hash"]),
            received_at=datetime.fromisoformat(raw["received_at"]),
            ledger_key=raw["ledger_key"],
            msg_id=raw["msg_id"],
            code=raw["code"],
            cancel=bool(raw["cancel"]),
        )


@dataclass(frozen=True, slots=True)
class SpoolPage:
    """One SMS or call the spool sent (or failed to send) for an entry."""

    entry_id: str
    recipient: Recipient
    channel: Channel
    outcome: SendOutcome
    provider_id: str | None
    error: str | None
    started_at: datetime
    finished_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "t": "page",
            "entry": self.entry_id,
            "recipient": _recipient_json(self.recipient),
            "channel": self.channel.value,
            "outcome": self.outcome.value,
            "provider_id": self.provider_id,
            "error": self.error,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SpoolPage:
        return cls(
            entry_id=raw["entry"],
            recipient=_recipient(raw["recipient"]),
            channel=Channel(raw["channel"]),
            outcome=SendOutcome(raw["outcome"]),
            provider_id=raw["provider_id"],
            error=raw["error"],
            started_at=datetime.fromisoformat(raw["started_at"]),
            finished_at=datetime.fromisoformat(raw["finished_at"]),
        )


@dataclass(frozen=True, slots=True)
class Spooled:
    """What ``record`` did: the entry, and whether it is new (a redelivery is not)."""

    entry: SpoolEntry
    new: bool


@dataclass(frozen=True, slots=True)
class Reconciled:
    """One entry stored in PostgreSQL by ``reconcile``."""

    entry: SpoolEntry
    incident_id: int | None
    result: str  # "opened", "joined", "cancel", "already_stored", "fallback", "no_incident"
    attempts_recorded: int


@dataclass
class _Slot:
    """One send in flight; settled once, by its result or by the deadline, whichever is first."""

    recipient: Recipient
    channel: Channel
    started_at: datetime
    settled: bool = False


@dataclass
class _State:
    """The journal replayed: entries in order, their pages, which are done."""

    entries: dict[str, SpoolEntry] = field(default_factory=dict)
    pages: dict[str, list[SpoolPage]] = field(default_factory=dict)
    done: dict[str, datetime] = field(default_factory=dict)
    by_key: dict[tuple[str, str], str] = field(default_factory=dict)


# -- files -------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    # A rename or a new file is durable only once its directory entry is.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: all of it or none of it, even across a crash."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    _fsync_dir(path.parent)


def _read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's records; a torn last line (a crash mid-append) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        log.warning("spool journal %s: dropping a torn last record of %d bytes", path, len(data) - len(complete))
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
            os.fsync(handle.fileno())
    records = []
    for number, line in enumerate(complete.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):
            log.error("spool journal %s: line %d is unreadable; skipped", path, number)
    return records


# -- the spool ---------------------------------------------------------------------


def _alarm_topic(topic: str) -> tuple[str, str]:
    """(device id, "sos" or "fall") of a wristband's alarm topic; ValueError for anything else.

    Extra levels after the channel (``…/sos/x``) still make an alarm: an alarm of a
    known wristband on a malformed alarm topic pages (DESIGN.md).
    """
    parts = topic.split("/")
    if len(parts) < 5 or parts[:3] != ["shouhu", "v1", "wristband"] or parts[4] not in ALARM_CHANNELS:
        raise ValueError(f"not a wristband alarm topic: {topic[:200]!r}")
    if not DEVICE_ID.fullmatch(parts[3]):
        raise ValueError(f"device id {parts[3][:80]!r} is not [A-Za-z0-9_.-]{{1,64}}")
    return parts[3], parts[4]


def _read_alarm(device_id: str, channel: str, raw: bytes) -> tuple[str | None, bool]:
    """(msg_id, is a cancel) of an alarm payload; (None, False) when it cannot be read.

    Never raises: a hostile payload is an unreadable alarm, which still pages.
    """
    try:
        parsed = parse_message(f"shouhu/v1/wristband/{device_id}/{channel}", raw)
    except Exception:  # deep nesting, a huge number: unreadable, not a reason to drop the alarm
        return None, False
    if not isinstance(parsed, DeviceMessage):
        return None, False
    cancel = isinstance(parsed.payload, SosPayload) and parsed.payload.action == "cancel"
    return parsed.payload.msg_id, cancel


def _reused_key(key: str, digest: bytes) -> str:
    # alerts.incidents._ledger's key for a reused msg_id with another payload.
    return f"{key[:40]}#reused:{digest.hex()[:16]}"


class Spool:
    """The local durable alarm spool of one hub (one process per directory).

    Args:
        directory: where the snapshot and the journal live (``SHOUHU_SPOOL_DIR``).
        notifier: SMS and voice (the router's Twilio notifier); None pages nobody,
            loudly, but still spools for reconciling.
        hub_id: recorded on the timeline.
        zone: ``SHOUHU_TIMEZONE``, where shifts are evaluated.
        clock: the time of pages and reconciling; tests drive it.
        request_timeout_s: the hard limit of each provider request.
    """

    def __init__(
        self,
        directory: Path,
        notifier: Notifier | None,
        *,
        hub_id: str,
        zone: ZoneInfo,
        clock: Clock = utc_now,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        ack_timeout_s: int = DEFAULT_ACK_TIMEOUT_S,
    ) -> None:
        self.directory = directory
        self.notifier = notifier
        self.hub_id = hub_id
        self.zone = zone
        self.clock = clock
        self.request_timeout_s = request_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self._lock = threading.Lock()
        self._paged = threading.Condition(self._lock)
        self._paging: set[str] = set()
        # Entries a reconcile is storing: not paged from now on (their pages would
        # miss the transaction that records them, and the router pages after it).
        self._reconciling: set[str] = set()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = self._take_directory()
        self.snapshot: RosterSnapshot | None = self._load_snapshot()
        self._state = self._replay(_read_journal(self._journal_path))
        self._journal: IO[bytes] = self._open_journal()
        SPOOL_PENDING.set(len(self.pending()))

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock = utc_now) -> Spool:
        """The spool of ``SHOUHU_SPOOL_DIR``, paging through the configured phone providers:
        the settings' primary, then its secondary when the primary cannot carry a page
        (``ChainNotifier``; the registry's per-area choice is in the database, which is
        down when the spool pages). Each provider's request is cut at ``REQUEST_TIMEOUT_S``.

        Without a phone provider it still spools (and reconciles), but pages nobody.
        """
        from alerts.providers import ChainNotifier, PhoneProviders, configured_notifiers, settings_choice

        notifier: Notifier | None = None
        providers = 1
        try:
            phone = PhoneProviders.build(
                configured_notifiers(settings, timeout=REQUEST_TIMEOUT_S), settings_choice(settings)
            )
        except ValueError as exc:
            log.error("the spool cannot page while the database is down: %s", exc)
        else:
            if phone.default is None:
                log.error("the spool cannot page while the database is down: no phone provider is configured")
            else:
                notifier = ChainNotifier(phone, phone.default)
                providers = 2 if phone.default.secondary is not None else 1
        return cls(
            settings.spool_path,
            notifier,
            hub_id=settings.hub_id,
            zone=settings.zone,
            clock=clock,
            ack_timeout_s=settings.ack_timeout_s,
            # A page may wait for the primary's timeout, then go out on the secondary.
            request_timeout_s=REQUEST_TIMEOUT_S * providers,
        )

    # -- files ---------------------------------------------------------------------

    @property
    def _journal_path(self) -> Path:
        return self.directory / JOURNAL_FILE

    @property
    def _snapshot_path(self) -> Path:
        return self.directory / SNAPSHOT_FILE

    def _take_directory(self) -> IO[bytes]:
        # Two hubs appending to one journal would interleave records: refuse the second.
        handle = (self.directory / LOCK_FILE).open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SpoolBusy(f"another process uses the spool directory {self.directory}") from None
        return handle

    def _open_journal(self) -> IO[bytes]:
        created = not self._journal_path.exists()
        fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if created:
            _fsync_dir(self.directory)
        return os.fdopen(fd, "ab")

    def _append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it; the caller holds the lock."""
        if self._journal.closed:
            raise RuntimeError(f"the spool in {self.directory} is closed: record {record.get('t')!r} not kept")
        self._journal.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def close(self) -> None:
        """Release the directory (another Spool, or process, may then open it)."""
        with self._lock:
            self._journal.close()
            self._lock_file.close()

    def _load_snapshot(self) -> RosterSnapshot | None:
        if not self._snapshot_path.exists():
            log.warning("no roster snapshot in %s yet: until one is read, a spooled alarm pages nobody", self.directory)
            return None
        try:
            snapshot = RosterSnapshot.from_json(json.loads(self._snapshot_path.read_bytes()))
        except (ValueError, KeyError, TypeError) as exc:
            log.error("roster snapshot %s is unreadable (%s): ignored", self._snapshot_path, exc)
            return None
        SNAPSHOT_TAKEN.set(snapshot.taken_at.timestamp())
        return snapshot

    def _replay(self, records: list[dict[str, Any]]) -> _State:
        state = _State()
        for record in records:
            try:
                kind = record["t"]
                if kind == "alarm":
                    entry = SpoolEntry.from_json(record)
                    state.entries[entry.id] = entry
                    state.pages.setdefault(entry.id, [])
                    state.by_key[(entry.device_id, entry.ledger_key)] = entry.id
                elif kind == "page":
                    state.pages.setdefault(record["entry"], []).append(SpoolPage.from_json(record))
                elif kind == "done":
                    state.done[record["entry"]] = datetime.fromisoformat(record["at"])
            except (KeyError, ValueError, TypeError, binascii.Error) as exc:
                log.error("spool journal: a record could not be read (%s); skipped", exc)
        return state

    # -- the snapshot --------------------------------------------------------------

    def refresh(self, conn: Conn, now: datetime) -> RosterSnapshot:
        """Read the roster snapshot from the database and persist it; the hub calls this every minute.

        Database errors propagate: the previous snapshot stays in use.
        """
        with conn.transaction():  # no transaction left open on the caller's connection
            snapshot = RosterSnapshot.read(conn, now, ack_timeout_s=self.ack_timeout_s)
        write_atomically(self._snapshot_path, json.dumps(snapshot.to_json(), ensure_ascii=False).encode())
        self.snapshot = snapshot
        SNAPSHOT_TAKEN.set(now.timestamp())
        return snapshot

    # -- recording -----------------------------------------------------------------

    def record(self, received: Received) -> Spooled:
        """Spool one SOS or fall message, fsynced before this returns.

        A copy of an alarm the spool already holds (the same device and ledger key,
        the same bytes: a broker redelivery, also after a hub restart) returns the
        entry it has, ``new`` False: it is not paged again. The same msg_id with
        other bytes is a reused id, spooled (and paged) as a new alarm, as the
        ledger does.

        Raises:
            ValueError: the topic is not a wristband's ``sos`` or ``fall``.
        """
        device_id, channel = _alarm_topic(received.topic)
        msg_id, cancel = _read_alarm(device_id, channel, received.payload)
        digest = payload_hash(received.payload)
        key = msg_id if msg_id is not None else "raw:" + digest.hex()[:60]
        with self._lock:
            for candidate in (key, _reused_key(key, digest)):
                known = self._state.by_key.get((device_id, candidate))
                if known is None:
                    key = candidate
                    break
                existing = self._state.entries[known]
                if existing.payload_hash == digest:
                    SPOOL_REDELIVERIES.inc()
                    return Spooled(existing, new=False)
            else:
                # A msg_id reused more than once: the bytes themselves are the key.
                key = "raw:" + digest.hex()[:60]
            entry = SpoolEntry(
                id=uuid.uuid4().hex,
                device_id=device_id,
                channel=channel,
                topic=received.topic,
                payload=received.payload,
                payload_hash=digest,
                received_at=received.received_at,
                ledger_key=key,
                msg_id=msg_id,
                code=draw_code(),
                cancel=cancel,
            )
            self._append(entry.to_json())
            self._state.entries[entry.id] = entry
            self._state.pages[entry.id] = []
            self._state.by_key[(device_id, key)] = entry.id
            SPOOLED.labels(channel).inc()
            SPOOL_PENDING.set(self._pending_count())
        log.critical("alarm %s of %s spooled (database unavailable); code %s", channel, device_id, entry.code)
        return Spooled(entry, new=True)

    def pending(self) -> list[SpoolEntry]:
        """Entries not yet stored in PostgreSQL, oldest first."""
        with self._lock:
            return [e for e in self._state.entries.values() if e.id not in self._state.done]

    def _pending_count(self) -> int:
        return sum(1 for e in self._state.entries if e not in self._state.done)

    def pages(self, entry: SpoolEntry) -> tuple[SpoolPage, ...]:
        """The pages recorded for ``entry``."""
        with self._lock:
            return tuple(self._state.pages.get(entry.id, ()))

    def is_done(self, entry: SpoolEntry) -> bool:
        with self._lock:
            return entry.id in self._state.done

    # -- paging --------------------------------------------------------------------

    def plan(self, entry: SpoolEntry) -> PagePlan | None:
        """Whom ``entry`` pages, from the snapshot at the moment of the press; None without a snapshot."""
        snapshot = self.snapshot
        return None if snapshot is None else snapshot.plan(entry.device_id, entry.kind, entry.received_at, self.zone)

    def page(self, entry: SpoolEntry) -> tuple[SpoolPage, ...]:
        """Page ``entry``'s people now, by SMS and call at once, each request cut at ``request_timeout_s``.

        Returns the entry's pages. Who was already paged for it (before a hub restart)
        is not paged again; a cancel, a reconciled entry or one being paged by another
        thread pages nobody. Blocks at most about ``request_timeout_s``.
        """
        with self._lock:
            busy = entry.id in self._paging or entry.id in self._reconciling
            if entry.cancel or entry.id in self._state.done or busy:
                return tuple(self._state.pages.get(entry.id, ()))
            self._paging.add(entry.id)
            paged = {(p.recipient.id, p.channel) for p in self._state.pages.get(entry.id, ())}
        try:
            plan = self.plan(entry)
            if plan is None or not plan.recipients:
                log.critical(
                    "spooled alarm %s of %s: nobody to page (%s)",
                    entry.id,
                    entry.device_id,
                    "no roster snapshot" if plan is None else plan.reason,
                )
            elif self.notifier is None:
                log.critical("spooled alarm %s of %s: no notifier, nobody paged", entry.id, entry.device_id)
            else:
                todo = [(r, c) for r in plan.recipients for c in plan.channels if (r.id, c) not in paged and r.phone]
                if todo:
                    self._send_all(entry, plan, todo, self.notifier)
        finally:
            with self._lock:
                self._paging.discard(entry.id)
                self._paged.notify_all()
        return self.pages(entry)

    def page_in_background(self, entry: SpoolEntry) -> threading.Thread:
        """``page`` on a thread of its own, so the caller (the alarm lane) is not held."""
        thread = threading.Thread(target=self.page, args=(entry,), name=f"spool-page-{entry.id[:8]}", daemon=True)
        thread.start()
        return thread

    def page_unpaged(self) -> list[threading.Thread]:
        """Page, in the background, every pending entry not fully paged: for a hub started with a spool."""
        return [self.page_in_background(entry) for entry in self.pending() if not entry.cancel]

    def _send_all(
        self, entry: SpoolEntry, plan: PagePlan, todo: list[tuple[Recipient, Channel]], notifier: Notifier
    ) -> None:
        # No incident row exists yet: incident_id and attempt_id 0. The Twilio notifier
        # then asks for no keypress (nothing could record it); the SMS carries the code
        # that works once the spool is reconciled.
        message = Message(0, entry.code, plan.kind.value, plan.resident_name, plan.address, plan.callback_number)
        deadline = time.monotonic() + self.request_timeout_s
        started = self.clock()
        SPOOL_PRESS_TO_FIRST_REQUEST.observe(max((started - entry.received_at).total_seconds(), 0.0))
        slots = [_Slot(recipient, channel, started) for recipient, channel in todo]
        threads = [
            threading.Thread(
                target=self._send_one,
                args=(entry, slot, notifier, message),
                name=f"spool-send-{entry.id[:8]}-{n}",
                daemon=True,  # a request that hangs past its timeout must not keep the hub from exiting
            )
            for n, slot in enumerate(slots)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        for slot in slots:
            error = f"no answer from the provider within {self.request_timeout_s:g} s (spool's hard timeout)"
            self._settle(entry, slot, SendResult(SendOutcome.FAILED, error=error))

    def _send_one(self, entry: SpoolEntry, slot: _Slot, notifier: Notifier, message: Message) -> None:
        try:
            result = notifier.send(Delivery(0, slot.channel, slot.recipient.phone, message))
        except Exception as exc:  # a notifier must not take the hub down
            log.exception("spool page of %s to %s raised", entry.id, slot.recipient.id)
            result = SendResult(SendOutcome.FAILED, error=repr(exc)[:500])
        self._settle(entry, slot, result)

    def _settle(self, entry: SpoolEntry, slot: _Slot, result: SendResult) -> None:
        with self._lock:
            if slot.settled:
                if result.outcome is SendOutcome.SENT:
                    # Recorded as timed out already: reconciling retries it (at least once).
                    log.warning(
                        "spool page %s to %s went out after its timeout (%s)",
                        entry.id,
                        slot.recipient.id,
                        result.provider_id,
                    )
                return
            slot.settled = True
            page = SpoolPage(
                entry.id,
                slot.recipient,
                slot.channel,
                result.outcome,
                result.provider_id,
                result.error,
                slot.started_at,
                self.clock(),
            )
            self._state.pages.setdefault(entry.id, []).append(page)
            try:
                self._append(page.to_json())
            except RuntimeError:
                # A page that returned after close() (the hub stopping): it went out,
                # but this process can no longer keep it.
                log.exception("spool page %s to %s not kept", entry.id, slot.recipient.id)
        SPOOL_PAGES.labels(slot.channel.value, result.outcome.value).inc()
        log.warning(
            "spool paged %s by %s for %s: %s %s",
            slot.recipient.id,
            slot.channel.value,
            entry.device_id,
            result.outcome.value,
            result.provider_id or result.error,
        )

    def _claim(self, entry: SpoolEntry) -> bool:
        """Take ``entry`` for reconciling once no thread is paging it; False if one still is after a timeout.

        From the claim on, ``page`` leaves it alone: every page it has is recorded by
        the transaction that stores it, and none is sent after.
        """
        deadline = time.monotonic() + self.request_timeout_s + 2.0
        with self._lock:
            while entry.id in self._paging:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._paged.wait(remaining)
            self._reconciling.add(entry.id)
        return True

    # -- reconciling ---------------------------------------------------------------

    def reconcile(
        self, conn: Conn, config: IngestConfig, *, record_sightings: SightingSink | None = None
    ) -> list[Reconciled]:
        """Store every pending entry in PostgreSQL, one transaction each, oldest first.

        Each transaction stores the alarm the normal way (``store_message``: ledger,
        open or join, first escalation action), gives an incident it opened the code
        the pages carried, records the spool's pages as the first step's attempts and
        adds a timeline entry. The entry is marked done only after the commit; run
        again after a crash in between, the ledger makes the store a no-op and the
        attempts' key makes their insert one. An entry still being paged is left for
        the next call (its pages must be recorded with it).

        ``conn`` must have no transaction open. A database error
        (``psycopg.OperationalError``) propagates: what was committed stays done.
        """
        if conn.info.transaction_status != TransactionStatus.IDLE:
            raise RuntimeError("reconcile needs a connection with no transaction open: each entry commits")
        done: list[Reconciled] = []
        for entry in self.pending():
            if not self._claim(entry):
                log.warning("spooled alarm %s is still being paged: reconciled next time", entry.id)
                continue
            try:
                outcome = self._reconcile_one(conn, entry, config, record_sightings)
            except BaseException:
                with self._lock:
                    self._reconciling.discard(entry.id)  # not stored: it may still be paged
                raise
            with self._lock:
                # Done in memory first: if the append fails, this process still never
                # pages it again, and a restart reconciles it again as a no-op.
                self._state.done[entry.id] = self.clock()
                self._reconciling.discard(entry.id)
                SPOOL_PENDING.set(self._pending_count())
                self._append(
                    {
                        "t": "done",
                        "entry": entry.id,
                        "at": self._state.done[entry.id].isoformat(),
                        "incident_id": outcome.incident_id,
                        "result": outcome.result,
                    }
                )
            SPOOL_RECONCILED.labels(outcome.result).inc()
            log.warning(
                "spooled alarm %s of %s reconciled: %s, incident %s, %d attempts recorded",
                entry.id,
                entry.device_id,
                outcome.result,
                outcome.incident_id,
                outcome.attempts_recorded,
            )
            done.append(outcome)
        if done:
            self.compact()
        return done

    def _reconcile_one(
        self, conn: Conn, entry: SpoolEntry, config: IngestConfig, record_sightings: SightingSink | None
    ) -> Reconciled:
        pages = self.pages(entry)
        try:
            with conn.transaction():
                stored_before = _stored_key(conn, entry) is not None
                if not stored_before:
                    store_message(conn, self._received(entry), config, record_sightings)
                found = _incident_of(conn, entry)
                if found is None:
                    if entry.cancel or not pages:
                        return Reconciled(entry, None, "no_incident", 0)
                    # The spool paged it but the database's rules made no incident of it:
                    # when in doubt, page — the operators' fallback, as the writer does.
                    raise LookupError("stored without an incident")
                incident_id, event = found
                if event == "cancel_received":
                    return Reconciled(entry, incident_id, "cancel", 0)
                opened = event == "stored"
                recorded = self._record_pages(conn, entry, incident_id, pages, opened=opened)
                result = "already_stored" if stored_before else ("opened" if opened else "joined")
                return Reconciled(entry, incident_id, result, recorded)
        except psycopg.OperationalError:
            raise
        except Exception:
            log.exception(
                "spooled alarm %s of %s could not be stored normally: fallback incident", entry.id, entry.device_id
            )
        with conn.transaction():
            opened_id = open_fallback_incident(
                conn, entry.device_id, entry.received_at, ack_timeout_s=config.ack_timeout_s
            )
            incident_id = opened_id if opened_id is not None else _open_fallback_of(conn, entry.device_id)
            recorded = self._record_pages(conn, entry, incident_id, pages, opened=opened_id is not None)
        return Reconciled(entry, incident_id, "fallback", recorded)

    def _received(self, entry: SpoolEntry) -> Received:
        # Never acknowledged through this copy: generation -1 matches no connection.
        return Received(
            topic=entry.topic,
            payload=entry.payload,
            qos=1,
            retain=False,
            mid=0,
            generation=-1,
            received_at=entry.received_at,
            monotonic=time.monotonic(),
        )

    def _record_pages(
        self, conn: Conn, entry: SpoolEntry, incident_id: int, pages: tuple[SpoolPage, ...], *, opened: bool
    ) -> int:
        """The spool's pages as the first step's attempts, and a timeline entry; idempotent.

        Only for an incident this alarm opened: on one it joined, the first step ran
        long ago (or was the spool's, for an earlier press), so the pages go on the
        timeline only.
        """
        now = self.clock()
        detail: dict[str, Any] = {
            "hub_id": self.hub_id,
            "spool_entry": entry.id,
            "code": entry.code,
            "received_at": entry.received_at.isoformat(),
            "joined": not opened,
            "pages": [
                {
                    "recipient_kind": p.recipient.kind,
                    "recipient_id": p.recipient.id,
                    "name": p.recipient.name,
                    "channel": p.channel.value,
                    "to": p.recipient.phone,
                    "outcome": p.outcome.value,
                    "provider_id": p.provider_id,
                    "error": p.error,
                    "at": p.started_at.isoformat(),
                }
                for p in pages
            ],
        }
        seen = conn.execute(
            "SELECT 1 FROM incident_events WHERE incident_id = %s AND event = %s AND detail->>'spool_entry' = %s",
            (incident_id, TIMELINE_EVENT, entry.id),
        ).fetchone()
        if seen is None:
            if opened:
                detail["code_kept"] = self._give_code(conn, incident_id, entry.code)
            first = min((p.started_at for p in pages), default=now)
            add_event(conn, incident_id, first, TIMELINE_EVENT, self.hub_id, detail)
        if not opened or not pages:
            return 0
        action_id = first_step_id(conn, incident_id)
        recorded = 0
        for page in pages:
            sent = page.outcome is SendOutcome.SENT
            attempt_id = record_spooled_page(
                conn,
                incident_id,
                action_id,
                (page.recipient.kind, page.recipient.id, page.recipient.phone),
                page.channel,
                SendResult(page.outcome, page.provider_id, page.error),
                page.started_at,
                page.finished_at,
            )
            if attempt_id is None:
                continue  # recorded by an earlier run of this reconcile
            recorded += 1
            if not sent:
                # The normal retry: another try after the backoff, or the next channel.
                after_failure(conn, attempt_id, now)
        return recorded

    def _give_code(self, conn: Conn, incident_id: int, code: str) -> bool:
        """Give the incident the code the spool's pages carried, so an SMS reply with it works."""
        told = conn.execute(
            "SELECT 1 FROM notification_attempts WHERE incident_id = %s LIMIT 1", (incident_id,)
        ).fetchone()
        if told is not None:
            return False  # someone was already told the incident's own code
        try:
            with conn.transaction():
                conn.execute("UPDATE incidents SET code = %s WHERE id = %s", (code, incident_id))
        except psycopg.errors.UniqueViolation:
            log.error("incident %s: the spool's code %s belongs to another incident; kept its own", incident_id, code)
            return False
        return True

    # -- compaction ----------------------------------------------------------------

    def compact(self) -> None:
        """Rewrite the journal without what no longer matters, atomically.

        Pending entries keep everything. A reconciled entry keeps its key, without its
        payload, for ``KEEP_DONE`` (a redelivery is then still known); older ones go.
        """
        with self._lock:
            horizon = self.clock() - KEEP_DONE
            state = _State()
            lines: list[bytes] = []
            for entry in self._state.entries.values():
                done_at = self._state.done.get(entry.id)
                if done_at is not None and done_at < horizon:
                    continue
                kept = entry if done_at is None else replace(entry, payload=b"")
                state.entries[entry.id] = kept
                state.by_key[(entry.device_id, entry.ledger_key)] = entry.id
                state.pages[entry.id] = [] if done_at is not None else list(self._state.pages.get(entry.id, ()))
                lines.append(json.dumps(kept.to_json(), ensure_ascii=False).encode())
                lines.extend(json.dumps(p.to_json(), ensure_ascii=False).encode() for p in state.pages[entry.id])
                if done_at is not None:
                    state.done[entry.id] = done_at
                    lines.append(json.dumps({"t": "done", "entry": entry.id, "at": done_at.isoformat()}).encode())
            self._journal.close()
            write_atomically(self._journal_path, b"".join(line + b"\n" for line in lines))
            self._state = state
            self._journal = self._open_journal()


# -- finding what the database made of an entry ---------------------------------------


def _stored_key(conn: Conn, entry: SpoolEntry) -> str | None:
    """The ledger key the database holds this alarm's bytes under, or None if it has not stored it."""
    row = conn.execute(
        "SELECT msg_id FROM message_ledger WHERE device_id = %s AND msg_id = ANY(%s) AND payload_hash = %s",
        (entry.device_id, [entry.ledger_key, _reused_key(entry.ledger_key, entry.payload_hash)], entry.payload_hash),
    ).fetchone()
    return None if row is None else str(row[0])


def _incident_of(conn: Conn, entry: SpoolEntry) -> tuple[int, str] | None:
    """The incident the stored alarm opened ("stored"), joined ("joined") or cancelled ("cancel_received").

    Found by the timeline entry record_alarm writes with the message's device and
    ledger key, among incidents opened in the week before the press.
    """
    key = _stored_key(conn, entry)
    if key is None:
        return None
    row = conn.execute(
        """
        SELECT e.incident_id, e.event FROM incidents i JOIN incident_events e ON e.incident_id = i.id
        WHERE i.opened_at >= %s AND e.event IN ('stored', 'joined', 'cancel_received')
          AND e.detail->>'device_id' = %s AND e.detail->>'ledger_key' = %s
        ORDER BY e.id LIMIT 1
        """,
        (entry.received_at - JOIN_HORIZON, entry.device_id, key),
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def _open_fallback_of(conn: Conn, device_id: str) -> int:
    row = conn.execute(
        "SELECT id FROM incidents WHERE device_id = %s AND kind = 'sos_unregistered'"
        f" AND state IN {OPEN_SQL} ORDER BY id DESC LIMIT 1",
        (device_id,),
    ).fetchone()
    if row is None:
        raise RuntimeError(f"no fallback incident open for {device_id}")
    return int(row[0])
