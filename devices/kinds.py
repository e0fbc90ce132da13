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


class AttemptPurpose(StrEnum):
    PAGE = "page"  # part of an escalation step
    REPAGE = "repage"  # a press after an acknowledgement: whoever acknowledged, again
    NOTICE = "notice"  # who took it, a cancel: information, not a request
    CAP_ALERT = "cap_alert"
    CAP_UPDATE = "cap_update"
    CAP_CANCEL = "cap_cancel"
