"""String enums stored in the database: device kinds, area levels, staff roles, incidents.

Stored as text with CHECK constraints (see ``shouhu/migrations.py``); the values here
and there must agree, and a test checks that they do.
"""

from __future__ import annotations

from enum import StrEnum


class DeviceKind(StrEnum):
    WRISTBAND = "wristband"
    CAMERA = "camera"


class AreaLevel(StrEnum):
    """The grid hierarchy, county down to micro-grid (县 → 乡镇/街道 → 村/社区 → 网格 → 微网格)."""

    COUNTY = "county"
    TOWNSHIP = "township"
    COMMUNITY = "community"
    GRID = "grid"
    MICRO_GRID = "micro_grid"

    @property
    def depth(self) -> int:
        return list(AreaLevel).index(self)


class StaffRole(StrEnum):
    GRID_WORKER = "grid_worker"  # 网格员
    TECHNICIAN = "technician"  # 雪亮工程 camera repair
    OPERATOR = "operator"  # 综治中心
    DUTY_OFFICER = "duty_officer"  # township / community duty officer (值班员)


class IncidentKind(StrEnum):
    SOS = "sos"
    FALL = "fall"
    SOS_UNREGISTERED = "sos_unregistered"
    WRISTBAND_OFFLINE = "wristband_offline"
    NOT_WORN = "not_worn"
    LOW_BATTERY = "low_battery"
    CAMERA_OFFLINE = "camera_offline"
    SCHEDULED_VISIT = "scheduled_visit"  # a recurring visit came due (the registry's `visits:`)


class Severity(StrEnum):
    """红黄蓝 three-level warnings."""

    RED = "red"
    YELLOW = "yellow"
    BLUE = "blue"


class IncidentState(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    UNREACHED = "unreached"
    RESOLVED = "resolved"
    CANCELLED = "cancelled"


SEVERITY_OF_KIND: dict[IncidentKind, Severity] = {
    IncidentKind.SOS: Severity.RED,
    IncidentKind.FALL: Severity.RED,
    IncidentKind.SOS_UNREGISTERED: Severity.RED,
    IncidentKind.WRISTBAND_OFFLINE: Severity.YELLOW,
    IncidentKind.NOT_WORN: Severity.YELLOW,
    IncidentKind.CAMERA_OFFLINE: Severity.YELLOW,
    IncidentKind.LOW_BATTERY: Severity.BLUE,
    IncidentKind.SCHEDULED_VISIT: Severity.BLUE,
}


class EscalationTarget(StrEnum):
    """Whom an escalation step pages; resolved to people when the step fires."""

    GRID_WORKER = "grid_worker"
    GUARDIANS = "guardians"
    EMERGENCY_PLATFORM = "emergency_platform"
    OPERATORS = "operators"
    TECHNICIANS = "technicians"


class Channel(StrEnum):
    VOICE = "voice"
    SMS = "sms"
    CONSOLE = "console"
    WEBHOOK = "webhook"


class Weekday(StrEnum):
    MON = "mon"
    TUE = "tue"
    WED = "wed"
    THU = "thu"
    FRI = "fri"
    SAT = "sat"
    SUN = "sun"

    @property
    def iso(self) -> int:
        """ISO weekday number, Monday = 1."""
        return list(Weekday).index(self) + 1


class Outcome(StrEnum):
    """How an incident ended, recorded when it is resolved."""

    FALSE_ALARM = "false_alarm"  # 误报
    VISITED_FINE = "visited_fine"  # 已上门，老人无恙
    SENT_TO_HOSPITAL = "sent_to_hospital"  # 已送医
    HANDLED_BY_GUARDIAN = "handled_by_guardian"  # 监护人已处置
    EMERGENCY_SERVICES = "emergency_services"  # 120/110 已处置
    OTHER = "other"
    # Care incidents (yellow, blue) end these ways too.
    DEVICE_RECOVERED = "device_recovered"  # the device came back before anyone started on it
    TASK_COMPLETED = "task_completed"  # the visit or repair was done; its task says how
    BATTERY_CHARGED = "battery_charged"


class AttemptPurpose(StrEnum):
    PAGE = "page"  # part of an escalation step
    REPAGE = "repage"  # a press after an acknowledgement: whoever acknowledged, again
    NOTICE = "notice"  # who took it, a cancel: information, not a request
    CAP_ALERT = "cap_alert"
    CAP_UPDATE = "cap_update"
    CAP_CANCEL = "cap_cancel"


class TaskKind(StrEnum):
    VISIT = "visit"  # 网格员探视: a wristband offline or not worn, after an SOS, or a recurring visit
    REPAIR = "repair"  # 雪亮工程 repair work order: a camera offline


class VisitFrequency(StrEnum):
    """A resident's recurring visit (the registry's ``visits:``): one per calendar month or ISO week."""

    MONTHLY = "monthly"  # 特困老人: every month
    WEEKLY = "weekly"  # high-risk: every week


class PlannedVisit(StrEnum):
    """Why a visit to a person (not about a device) opened: stored as the task's ``reason``."""

    FOLLOW_UP = "follow_up"  # after an SOS or a fall was resolved
    SCHEDULED = "scheduled"  # the resident's monthly or weekly visit


class TaskState(StrEnum):
    OPEN = "open"
    STARTED = "started"  # somebody is on the way: the device coming back no longer closes it
    CLOSED = "closed"


class TaskOutcome(StrEnum):
    """How a visit or repair ended, recorded by whoever closes it (or by the device coming back)."""

    RESIDENT_FINE = "resident_fine"  # 老人无恙
    BAND_CHARGED = "band_charged"  # 手环已充电
    BAND_REPLACED = "band_replaced"
    BAND_BROKEN = "band_broken"  # 手环损坏，待更换
    RESIDENT_AWAY = "resident_away"  # 老人外出/走亲戚
    RESIDENT_IN_HOSPITAL = "resident_in_hospital"
    REPAIRED = "repaired"
    REPLACED = "replaced"
    POWER_RESTORED = "power_restored"
    NETWORK_RESTORED = "network_restored"
    DEVICE_RECOVERED = "device_recovered"  # closed by the device itself, before anyone started
    OTHER = "other"


VISIT_OUTCOMES = frozenset(
    {
        TaskOutcome.RESIDENT_FINE,
        TaskOutcome.BAND_CHARGED,
        TaskOutcome.BAND_REPLACED,
        TaskOutcome.BAND_BROKEN,
        TaskOutcome.RESIDENT_AWAY,
        TaskOutcome.RESIDENT_IN_HOSPITAL,
        TaskOutcome.OTHER,
    }
)
REPAIR_OUTCOMES = frozenset(
    {
        TaskOutcome.REPAIRED,
        TaskOutcome.REPLACED,
        TaskOutcome.POWER_RESTORED,
        TaskOutcome.NETWORK_RESTORED,
        TaskOutcome.OTHER,
    }
)
