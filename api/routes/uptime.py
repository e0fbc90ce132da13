"""Camera uptime (在线率) by camera and area, by local day or over a period.

Technicians watch it to plan repair rounds, operators to report it upward; admins
see it too. Grid workers (their cameras are not theirs to repair) and the emergency
platform get 403. A token bound to areas sees those areas and below; another area
is 404, as everywhere.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from api.access import CAMERA_CARETAKERS
from api.deps import API_PREFIX, ConnDep, CurrentToken, Now, Page, Scope, Zone, area_filter, tuple_rows
from devices.uptime import Span, Uptime, local_midnight
from devices.uptime_store import MAX_PERIOD_DAYS, uptime_report

router = APIRouter(prefix=f"{API_PREFIX}/cameras", tags=["cameras"])

DEFAULT_PERIOD = timedelta(days=7)


class By(StrEnum):
    DAY = "day"
    PERIOD = "period"


class UptimeFigures(BaseModel):
    online_ratio: float | None
    """Seconds online ÷ seconds monitored; null when nothing was monitored."""
    online_s: float
    """Seconds online."""
    offline_s: float
    """Seconds offline, whatever the reason."""
    monitored_s: float
    """online_s + offline_s: the ratio's denominator."""
    maintenance_s: float
    """Seconds under a maintenance window (the camera's own or its areas'); not monitored."""
    unknown_s: float
    """Seconds not known: before the camera was first heard, during ingest outages, after now."""
    offline_by_reason: dict[str, float]
    """offline_s by reason: no_heartbeat, last_will, reported:<the camera's reason>."""
    outages: int
    """Times a camera went offline in monitored time in this bucket."""
    repairs_closed: int
    """Repair orders closed in this bucket."""
    mttr_s: float | None
    """Mean time to repair of those orders: from the camera falling silent to its return."""
    cameras: int
    """Cameras counted."""


class AreaUptimeFigures(UptimeFigures):
    area_id: str


class CameraUptimeFigures(UptimeFigures):
    device_id: str
    area_id: str


class UptimeBucket(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    day: date | None
    """The local day (SHOUHU_TIMEZONE) with by=day; null with by=period."""
    from_: datetime = Field(alias="from")
    to: datetime
    total: UptimeFigures
    """Every camera of the report."""
    areas: list[AreaUptimeFigures]
    """Each area with cameras, summed over the cameras in it and below it."""
    cameras: list[CameraUptimeFigures]
    """The page of cameras (limit, offset), by id."""


class AreaSummary(BaseModel):
    id: str
    parent_id: str | None
    level: str
    """county, township, community, grid or micro_grid."""
    name: str
    cameras: int
    """Active cameras in this area and below."""
    open_repair_orders: int
    """Repair orders not yet closed, now."""


_EXAMPLE_FIGURES: dict[str, Any] = {
    "online_ratio": 0.7273,
    "online_s": 57600.0,
    "offline_s": 21600.0,
    "monitored_s": 79200.0,
    "maintenance_s": 7200.0,
    "unknown_s": 0.0,
    "offline_by_reason": {"no_heartbeat": 14400.0, "reported:video_lost": 7200.0},
    "outages": 2,
    "repairs_closed": 1,
    "mttr_s": 5400.0,
    "cameras": 1,
}


class CameraUptimeReport(BaseModel):
    model_config = ConfigDict(
        populate_by_name=True,
        json_schema_extra={
            "example": {
                "area": "xz-shiqiao",
                "from": "2026-11-23T16:00:00Z",
                "to": "2026-11-24T16:00:00Z",
                "by": "period",
                "timezone": "Asia/Shanghai",
                "camera_count": 1,
                "open_repair_orders": 0,
                "areas": [
                    {"id": "xz-shiqiao", "parent_id": "xz", "level": "township", "name": "石桥镇",
                     "cameras": 1, "open_repair_orders": 0},
                ],
                "buckets": [
                    {
                        "day": None,
                        "from": "2026-11-23T16:00:00Z",
                        "to": "2026-11-24T16:00:00Z",
                        "total": _EXAMPLE_FIGURES,
                        "areas": [{**_EXAMPLE_FIGURES, "area_id": "xz-shiqiao"}],
                        "cameras": [{**_EXAMPLE_FIGURES, "device_id": "cam-001", "area_id": "xz-shiqiao"}],
                    }
                ],
            }
        },
    )

    area: str | None
    """The area asked for; null for everything the token sees."""
    from_: datetime = Field(alias="from")
    to: datetime
    by: By
    timezone: str
    """Where local days begin (SHOUHU_TIMEZONE)."""
    camera_count: int
    """All cameras in the report; each bucket lists one page of them."""
    open_repair_orders: int
    """Repair orders not yet closed, now, over every camera of the report."""
    areas: list[AreaSummary]
    buckets: list[UptimeBucket]


def _figures(value: Uptime) -> dict[str, Any]:
    return {
        "online_ratio": value.ratio,
        "online_s": value.online_s,
        "offline_s": value.offline_s,
        "monitored_s": value.monitored_s,
        "maintenance_s": value.maintenance_s,
        "unknown_s": value.unknown_s,
        "offline_by_reason": value.offline_by_reason(),
        "outages": value.outages,
        "repairs_closed": value.repairs_closed,
        "mttr_s": value.mttr_s,
        "cameras": value.cameras,
    }


def _invalid(name: str, message: str) -> RequestValidationError:
    """The app's 422 shape: "invalid request: query parameter 'name': message"."""
    return RequestValidationError([{"loc": ("query", name), "msg": message, "type": "value_error"}])


def parse_bound(name: str, text: str, zone: ZoneInfo) -> datetime:
    """An ISO time with an offset, or a date meaning its local midnight in ``zone``."""
    try:
        if len(text) == 10:
            return local_midnight(date.fromisoformat(text), zone).astimezone(UTC)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _invalid(name, f"{text!r} is neither a date (2026-11-24) nor a time with an offset") from None
    if value.tzinfo is None:
        raise _invalid(name, f"{text!r} has no offset; give one (2026-11-24T00:00:00+08:00) or a date")
    return value.astimezone(UTC)


def report_window(from_text: str | None, to_text: str | None, now: datetime, zone: ZoneInfo) -> Span:
    """The ``[from, to)`` asked for: ``to`` defaults to now, ``from`` to a week before ``to``."""
    end = parse_bound("to", to_text, zone) if to_text else now
    start = parse_bound("from", from_text, zone) if from_text else end - DEFAULT_PERIOD
    if start >= end:
        raise _invalid("from", "must be before 'to'")
    if end - start > timedelta(days=MAX_PERIOD_DAYS):
        raise _invalid("to", f"the period is longer than {MAX_PERIOD_DAYS} days")
    return Span(start, end)


@router.get(
    "/uptime",
    responses={
        403: {"description": "The token's role may not read camera uptime."},
        404: {"description": "The area does not exist or is outside the token's areas."},
    },
)
def read_camera_uptime(
    *,
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
    page: Page,
    now: Now,
    zone: Zone,
    area: Annotated[str | None, Query(description="This area and below; default: every area the token sees.")] = None,
    from_: Annotated[
        str | None,
        Query(
            alias="from",
            description="Start (inclusive): a time with an offset, or a date for its local midnight. "
            "Default: a week before `to`.",
        ),
    ] = None,
    to: Annotated[
        str | None,
        Query(description="End (exclusive): a time with an offset, or a date for its local midnight. Default: now."),
    ] = None,
    by: Annotated[By, Query(description="One bucket per local day, or one for the whole period.")] = By.PERIOD,
) -> CameraUptimeReport:
    """Time-weighted camera uptime by camera and area, with offline reasons and repair times."""
    if token.role not in CAMERA_CARETAKERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot read camera uptime")
    window = report_window(from_, to, now, zone)
    within = area_filter(conn, scope, area)
    roots = [area] if within is not None and area is not None else scope.as_param()
    with tuple_rows(conn) as plain:
        report = uptime_report(plain, roots=roots, window=window, now=now, zone=zone, by_day=by is By.DAY)
    shown = report.cameras[page.offset : page.offset + page.limit]
    return CameraUptimeReport.model_validate(
        {
            "area": area,
            "from": window.start,
            "to": window.end,
            "by": by,
            "timezone": zone.key,
            "camera_count": len(report.cameras),
            "open_repair_orders": report.open_repair_orders,
            "areas": [
                {
                    "id": a.area.id,
                    "parent_id": a.area.parent_id,
                    "level": a.area.level,
                    "name": a.area.name,
                    "cameras": a.buckets[0].cameras if a.buckets else 0,
                    "open_repair_orders": a.open_repair_orders,
                }
                for a in report.areas
            ],
            "buckets": [
                {
                    "day": day,
                    "from": span.start,
                    "to": span.end,
                    "total": _figures(report.totals[i]),
                    "areas": [{**_figures(a.buckets[i]), "area_id": a.area.id} for a in report.areas],
                    "cameras": [
                        {**_figures(c.buckets[i]), "device_id": c.device_id, "area_id": c.area_id} for c in shown
                    ],
                }
                for i, (day, span) in enumerate(report.buckets)
            ],
        }
    )
