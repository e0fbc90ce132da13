"""The registry YAML file: areas, staff, duty rosters, residents, guardians, devices, policies.

Validated with pydantic at the boundary. Cross-references (a resident's grid, a
device's resident, a roster's staff) are checked here too, so a bad file is refused
whole, with errors that name the entry and the field, before anything is written.
"""

from __future__ import annotations

import re
from datetime import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import phonenumbers
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from devices.kinds import (
    AreaLevel,
    Channel,
    DeviceKind,
    EscalationTarget,
    IncidentKind,
    StaffRole,
    VisitFrequency,
    Weekday,
)

# libyaml's safe loader where PyYAML was built with it (the wheels are): the same
# documents, a third of the time — the demo county (6,000 lines) loads in 0.1 s, not 0.4.
SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
EntryId = Annotated[str, Field(pattern=ID_PATTERN)]


def _e164(value: str) -> str:
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"{value!r} is not an E.164 phone number (+<country><number>)") from exc
    formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if formatted != value or not phonenumbers.is_valid_number(number):
        raise ValueError(f"{value!r} is not a valid E.164 phone number (+<country><number>)")
    return value


Phone = Annotated[str, AfterValidator(_e164)]

# C0 and C1 controls and DEL: Excel's in-cell line break (\x0b), a stray bell (\x07),
# a NUL. XML 1.0 cannot carry most of them even escaped, so one in a name or an
# address would make every call's TwiML for that resident malformed.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Line breaks and tabs an address may hold (pasted from a form or a spreadsheet
# cell): folded into one space, since an address is said and texted on one line.
_ADDRESS_BREAKS = re.compile(r"[ \t]*(?:\r\n|[\r\n\t])[ \t\r\n]*")


def _control_problem(value: str, allowed: str = "") -> str | None:
    found = sorted({char for char in _CONTROL.findall(value) if char not in allowed})
    if not found:
        return None
    shown = ", ".join(repr(char) for char in found)
    return f"control character {shown} is not allowed (a spreadsheet's in-cell line break is '\\x0b'): remove it"


def _one_line(value: str) -> str:
    problem = _control_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _address(value: str) -> str:
    value = _ADDRESS_BREAKS.sub(" ", value).strip()
    problem = _control_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _notes(value: str) -> str:
    problem = _control_problem(value, allowed="\t\n\r")
    if problem:
        raise ValueError(problem)
    return value


# Free text: one line, no control character at all (names, relations, models).
Line = Annotated[str, AfterValidator(_one_line)]
# An address: line breaks and tabs become one space; any other control is refused.
Address = Annotated[str, AfterValidator(_address)]
# Medical notes (only the emergency platform sees them): may span lines.
Notes = Annotated[str, AfterValidator(_notes)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class AreaEntry(_Entry):
    id: EntryId
    name: Line = Field(min_length=1)
    level: AreaLevel
    parent: EntryId | None = None


class StaffEntry(_Entry):
    id: EntryId
    name: Line = Field(min_length=1)
    role: StaffRole
    phone: Phone
    areas: list[EntryId] = Field(min_length=1)


def _clock(value: Any) -> Any:
    # YAML 1.1 reads an unquoted 08:00 as sexagesimal 480; accept that and "08:00".
    if isinstance(value, int) and not isinstance(value, bool):
        return time(value // 60, value % 60)
    return value


ClockTime = Annotated[time, Field(description="HH:MM, local time in SHOUHU_TIMEZONE")]


class _DailyWindow(_Entry):
    """A ``start``–``end`` window of local time; ``end`` at or before ``start`` ends next day."""

    start: ClockTime
    end: ClockTime

    @model_validator(mode="before")
    @classmethod
    def _sexagesimal_times(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {**data, **{k: _clock(data[k]) for k in ("start", "end") if k in data}}
        return data


class RosterEntry(_DailyWindow):
    """A recurring duty shift; ``end`` at or before ``start`` means the shift ends next day."""

    staff: EntryId
    area: EntryId
    days: list[Weekday] = Field(default_factory=lambda: list(Weekday), min_length=1)


class GuardianEntry(_Entry):
    id: EntryId
    name: Line = Field(min_length=1)
    phone: Phone
    relation: Line = ""
    priority: int = Field(default=1, ge=1)


class ResidentEntry(_Entry):
    id: EntryId
    name: Line = Field(min_length=1)
    grid: EntryId
    address: Address = Field(min_length=1)
    lives_alone: bool = True
    phone: Phone | None = None
    medical_notes: Notes = ""
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    guardians: list[GuardianEntry] = Field(default_factory=list)
    # A recurring visit by the grid worker: monthly (特困老人) or weekly (high-risk); none by default.
    visits: VisitFrequency | None = None


class WatchProtocol(StrEnum):
    """The protocol a wristband speaks when it is not Shouhu's own MQTT."""

    # The 4G elder watches' text protocol over TCP (``[3G*ID*LEN*…]``), `shouhu gateway watch`.
    WATCH = "watch"


class DeviceEntry(_Entry):
    id: EntryId
    kind: DeviceKind
    resident: EntryId | None = None
    area: EntryId | None = None
    model: Line = ""
    heartbeat_interval_s: int | None = Field(default=None, gt=0)
    heartbeat_misses: int | None = Field(default=None, ge=1)
    # A 4G watch's own id (the ``ID`` of its frames): the gateway publishes its frames as
    # this wristband. Quoted in YAML, so leading zeros stay.
    watch_id: str | None = Field(default=None, pattern=r"^[0-9]{10,15}$")
    protocol: WatchProtocol | None = None
    # Raised by one to re-issue this device's broker password alone (`shouhu broker
    # credentials`); the old one stops working when the broker re-reads its files.
    credential_version: int = Field(default=1, ge=1)

    @field_validator("watch_id", mode="before")
    @classmethod
    def _quoted_watch_id(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(
                f"watch id {value} must be quoted ('{value}'): YAML reads an unquoted one as a number"
                " and drops its leading zeros"
            )
        return value

    @model_validator(mode="after")
    def _bound(self) -> DeviceEntry:
        if self.kind is DeviceKind.WRISTBAND and self.resident is None:
            raise ValueError("a wristband must name its resident")
        if self.watch_id is not None and self.kind is not DeviceKind.WRISTBAND:
            raise ValueError("only a wristband may have a watch_id")
        if self.protocol is not None and self.watch_id is None:
            raise ValueError("a protocol needs the watch_id it applies to")
        if self.kind is DeviceKind.CAMERA and self.area is None:
            raise ValueError("a camera must name its area")
        if self.kind is DeviceKind.CAMERA and self.resident is not None:
            raise ValueError("a camera is bound to an area, not a resident")
        return self


class PolicyStep(_Entry):
    target: EscalationTarget
    channels: list[Channel] = Field(min_length=1)
    wait_s: int | None = Field(default=None, gt=0, description="None: SHOUHU_ACK_TIMEOUT_S")
    repeats: int = Field(default=0, ge=0)


class PolicyEntry(_Entry):
    """An escalation policy for one incident kind, the default (no area) or an area's."""

    id: EntryId
    kind: IncidentKind
    area: EntryId | None = None
    steps: list[PolicyStep] = Field(min_length=1)


class HeartbeatEntry(_Entry):
    """A device kind's liveness window: offline after ``interval_s`` × ``misses`` of silence."""

    interval_s: int = Field(gt=0)
    misses: int = Field(ge=1)


class QuietHoursEntry(_DailyWindow):
    """Quiet hours of an area and everything below it (nearest area wins): non-urgent
    (blue) notices wait until they end. Never an SOS, a fall or a visit."""

    area: EntryId

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHoursEntry:
        if self.start == self.end:
            raise ValueError("start and end are the same time: quiet hours must be a window")
        return self


# The providers that carry phone pages: the values of ``alerts.notifiers.base.Provider``
# (devices/ sits below alerts/, so the names are repeated here; tests/test_provider_failover.py
# checks they agree).
PhoneProvider = Literal["twilio", "aliyun"]


class PhoneProvidersEntry(_Entry):
    """The providers that carry an area's voice and SMS pages, and everything below it
    (the nearest area wins): the primary, and the secondary a page fails over to."""

    area: EntryId
    primary: PhoneProvider
    secondary: PhoneProvider | None = None

    @model_validator(mode="after")
    def _two_providers(self) -> PhoneProvidersEntry:
        if self.secondary == self.primary:
            raise ValueError(f"the secondary is the primary ({self.primary}): name another provider or none")
        return self


class RegistryFile(_Entry):
    areas: list[AreaEntry] = Field(default_factory=list)
    staff: list[StaffEntry] = Field(default_factory=list)
    rosters: list[RosterEntry] = Field(default_factory=list)
    residents: list[ResidentEntry] = Field(default_factory=list)
    devices: list[DeviceEntry] = Field(default_factory=list)
    policies: list[PolicyEntry] = Field(default_factory=list)
    heartbeats: dict[DeviceKind, HeartbeatEntry] = Field(default_factory=dict)
    quiet_hours: list[QuietHoursEntry] = Field(default_factory=list)
    phone_providers: list[PhoneProvidersEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> RegistryFile:
        problems = reference_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _duplicates(section: str, ids: list[str]) -> list[str]:
    seen: set[str] = set()
    problems = []
    for index, entry_id in enumerate(ids):
        if entry_id in seen:
            problems.append(f"{section}[{index}] id {entry_id!r}: duplicate id")
        seen.add(entry_id)
    return problems


def _watch_id_problems(registry: RegistryFile) -> list[str]:
    # One watch, one wristband: two would make the gateway page the wrong resident.
    owner: dict[str, str] = {}
    problems = []
    for index, device in enumerate(registry.devices):
        if device.watch_id is None:
            continue
        if device.watch_id in owner:
            problems.append(
                f"devices[{index}] ({device.id}) field 'watch_id': {device.watch_id!r} is "
                f"already {owner[device.watch_id]!r}'s"
            )
        owner.setdefault(device.watch_id, device.id)
    return problems


def _area_problems(registry: RegistryFile, areas: dict[str, AreaEntry]) -> list[str]:
    problems = []
    for index, area in enumerate(registry.areas):
        where = f"areas[{index}] ({area.id}) field 'parent'"
        if area.parent is None:
            if area.level is not AreaLevel.COUNTY:
                problems.append(f"{where}: only a county may have no parent")
            continue
        parent = areas.get(area.parent)
        if parent is None:
            problems.append(f"{where}: unknown area {area.parent!r}")
        elif parent.level.depth >= area.level.depth:
            problems.append(f"{where}: a {area.level} cannot sit under {parent.level} {parent.id!r}")
    # A cycle would make every walk up the tree loop forever.
    for area in registry.areas:
        seen = {area.id}
        node = area
        while node.parent is not None and node.parent in areas:
            if node.parent in seen:
                problems.append(f"areas ({area.id}) field 'parent': cycle through {node.parent!r}")
                break
            seen.add(node.parent)
            node = areas[node.parent]
    return problems


def _roster_problems(registry: RegistryFile, areas: dict[str, AreaEntry]) -> list[str]:
    problems: list[str] = []
    staff_ids = {s.id for s in registry.staff}
    staff_areas = {s.id: set(s.areas) for s in registry.staff}
    for index, roster in enumerate(registry.rosters):
        where = f"rosters[{index}]"
        if roster.staff not in staff_ids:
            problems.append(f"{where} field 'staff': unknown staff {roster.staff!r}")
        elif roster.area not in staff_areas[roster.staff]:
            problems.append(f"{where} field 'area': {roster.staff!r} is not assigned to {roster.area!r}")
        if roster.area not in areas:
            problems.append(f"{where} field 'area': unknown area {roster.area!r}")
    return problems


def _resident_device_problems(registry: RegistryFile, areas: dict[str, AreaEntry]) -> list[str]:
    problems: list[str] = []
    resident_ids = {r.id for r in registry.residents}
    for index, resident in enumerate(registry.residents):
        grid = areas.get(resident.grid)
        where = f"residents[{index}] ({resident.id}) field 'grid'"
        if grid is None:
            problems.append(f"{where}: unknown area {resident.grid!r}")
        elif grid.level not in (AreaLevel.GRID, AreaLevel.MICRO_GRID):
            problems.append(f"{where}: {resident.grid!r} is a {grid.level}, not a grid")
    for index, device in enumerate(registry.devices):
        where = f"devices[{index}] ({device.id})"
        if device.resident is not None and device.resident not in resident_ids:
            problems.append(f"{where} field 'resident': unknown resident {device.resident!r}")
        if device.area is not None and device.area not in areas:
            problems.append(f"{where} field 'area': unknown area {device.area!r}")
    return problems


def reference_problems(registry: RegistryFile) -> list[str]:
    """Every dangling or duplicate reference, each naming its entry and field."""
    areas = {a.id: a for a in registry.areas}
    problems: list[str] = []
    problems += _duplicates("areas", [a.id for a in registry.areas])
    problems += _duplicates("staff", [s.id for s in registry.staff])
    problems += _duplicates("residents", [r.id for r in registry.residents])
    problems += _duplicates("devices", [d.id for d in registry.devices])
    problems += _watch_id_problems(registry)
    problems += _duplicates("policies", [p.id for p in registry.policies])
    problems += _duplicates("guardians", [g.id for r in registry.residents for g in r.guardians])
    problems += _area_problems(registry, areas)
    for index, staff in enumerate(registry.staff):
        for area_id in staff.areas:
            if area_id not in areas:
                problems.append(f"staff[{index}] ({staff.id}) field 'areas': unknown area {area_id!r}")
    problems += _roster_problems(registry, areas)
    problems += _resident_device_problems(registry, areas)
    scopes: set[tuple[str, str | None]] = set()
    for index, policy in enumerate(registry.policies):
        if (policy.kind, policy.area) in scopes:
            problems.append(
                f"policies[{index}] ({policy.id}) field 'area': a second {policy.kind} policy for "
                + (repr(policy.area) if policy.area else "the default scope")
            )
        scopes.add((policy.kind, policy.area))
        if policy.area is not None and policy.area not in areas:
            problems.append(f"policies[{index}] ({policy.id}) field 'area': unknown area {policy.area!r}")
    problems += _per_area_problems("quiet_hours", [q.area for q in registry.quiet_hours], areas)
    problems += _per_area_problems("phone_providers", [p.area for p in registry.phone_providers], areas)
    return problems


def _per_area_problems(section: str, area_ids: list[str], areas: dict[str, AreaEntry]) -> list[str]:
    """A section of per-area settings (one entry per area at most): unknown and repeated areas."""
    problems = []
    seen: set[str] = set()
    for index, area_id in enumerate(area_ids):
        if area_id not in areas:
            problems.append(f"{section}[{index}] field 'area': unknown area {area_id!r}")
        if area_id in seen:
            problems.append(f"{section}[{index}] field 'area': a second entry for {area_id!r}")
        seen.add(area_id)
    return problems


class RegistryFileError(Exception):
    """The registry file cannot be loaded; ``problems`` name each entry and field."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


def _location(loc: tuple[int | str, ...], data: Any) -> str:
    """Turn pydantic's ``('residents', 3, 'guardians', 0, 'phone')`` into readable text."""
    parts: list[str] = []
    node = data
    for step in loc:
        if isinstance(step, int):
            entry_id = (
                node[step].get("id")
                if isinstance(node, list) and step < len(node) and isinstance(node[step], dict)
                else None
            )
            parts[-1] = f"{parts[-1]}[{step}]" + (f" ({entry_id})" if entry_id else "")
            node = node[step] if isinstance(node, list) and step < len(node) else None
        else:
            parts.append(str(step))
            node = node.get(step) if isinstance(node, dict) else None
    if len(parts) > 1:
        return ".".join(parts[:-1]) + f" field {parts[-1]!r}"
    return parts[0] if parts else "file"


def parse_registry(path: Path) -> RegistryFile:
    """Read and validate a registry file.

    Raises:
        RegistryFileError: the file is unreadable, not YAML, or fails validation.
    """
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER)  # noqa: S506 (a safe loader)
    except OSError as exc:
        raise RegistryFileError(path, [f"cannot read: {exc.strerror}"]) from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RegistryFileError(path, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise RegistryFileError(path, ["the file must be a mapping of sections (areas, staff, …)"])
    try:
        return RegistryFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["loc"]:
                problems.append(f"{_location(tuple(error['loc']), data)}: {message}")
            else:
                problems.extend(message.split("; "))
        raise RegistryFileError(path, problems) from exc


def watch_wristbands(registry: RegistryFile) -> dict[str, str]:
    """Watch id → wristband id, for the watch gateway. Not written to the database: the
    gateway reads it from the registry file itself (``SHOUHU_REGISTRY_FILE``)."""
    return {d.watch_id: d.id for d in registry.devices if d.watch_id is not None}
