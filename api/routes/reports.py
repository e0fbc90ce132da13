"""Reports for the governance centre, the figures a county files.

- ``/response``: how fast SOS and falls were taken, against the telecare targets; the
  figures are computed in ``alerts/response.py`` and the overview shows the same ones.
- ``/visits``: the month's visit rate (探视率) by area, against the 100 % target.
  Follow-up visits after an SOS or a fall and the registry's recurring visits count;
  visits about a device (offline, not worn) do not — the device coming back may
  withdraw those. Admins, operators and grid workers read it, each within its areas.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from alerts import response
from alerts.visits import VISIT_RATE_TARGET, VisitRate, parse_month, period_of, total, visit_rates
from api.access import RESPONSE_READERS, VISIT_REPORT_READERS
from api.deps import API_PREFIX, ConnDep, CurrentToken, Now, Scope, Zone, area_filter, tuple_rows
from api.routes.uptime import report_window
from devices.kinds import AreaLevel, VisitFrequency

router = APIRouter(prefix=f"{API_PREFIX}/reports", tags=["reports"])


class By(StrEnum):
    TOWNSHIP = "township"
    GRID = "grid"


class WindowFigures(BaseModel):
    seconds: int
    target: float
    """The telecare target share: 0.975 within 60 s, 0.99 within 180 s."""
    within: int
    """Incidents a person took within the window."""
    decided: int
    """Incidents whose outcome for the window is known: taken (in time or not), or the window ran out."""
    share: float | None
    """within ÷ decided; null when nothing is decided."""
    meets_target: bool | None


class ResponseFigures(BaseModel):
    incidents: int
    """Red incidents (SOS, fall, unregistered SOS) opened in the period; cancels by the wristband left out."""
    cancelled: int
    """SOS presses the wristband stood down in the cancel window (nobody needed)."""
    answered: int
    """Incidents a person took: the first acknowledgement, or a resolve without one."""
    median_ack_s: float | None
    """Median seconds from the press to being taken, over the answered ones."""
    within_60s: WindowFigures
    within_180s: WindowFigures
    unreached: int
    """Incidents where every step ran and nobody took them (at least once)."""


class AreaResponseFigures(ResponseFigures):
    area_id: str
    """The township (or grid) the incidents are in; the county for an unregistered wristband's."""
    area_name: str


class ResponseReport(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    area: str | None
    from_: datetime = Field(alias="from")
    to: datetime
    by: By
    targets: dict[str, float]
    """The telecare targets, {"within_60s": 0.975, "within_180s": 0.99}."""
    total: ResponseFigures
    areas: list[AreaResponseFigures]
    """The same figures per township (or grid, with by=grid) that had incidents, by area id."""


def _public(figures: response.Figures) -> dict[str, object]:
    def window(w: response.Window) -> WindowFigures:
        return WindowFigures(
            seconds=int(w.seconds),
            target=w.target,
            within=w.within,
            decided=w.decided,
            share=w.share,
            meets_target=w.meets_target,
        )

    return {
        "incidents": figures.incidents,
        "cancelled": figures.cancelled,
        "answered": figures.answered,
        "median_ack_s": figures.median_ack_s,
        "within_60s": window(figures.within_60s),
        "within_180s": window(figures.within_180s),
        "unreached": figures.unreached,
    }


@router.get(
    "/response",
    responses={
        403: {"description": "The token's role may not read the response figures."},
        404: {"description": "The area does not exist or is outside the token's areas."},
    },
)
def read_response_report(
    *,
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
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
    by: Annotated[By, Query(description="Group the areas by township or by grid.")] = By.TOWNSHIP,
) -> ResponseReport:
    """SOS and fall response: taken within 60 s and 180 s, median time to take, unreached; by area."""
    if token.role not in RESPONSE_READERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot read the response figures")
    window = report_window(from_, to, now, zone)
    within = area_filter(conn, scope, area)
    areas_param = within if within is not None else scope.as_param()
    with tuple_rows(conn) as plain:
        alarms = response.read_alarms(plain, window.start, window.end, areas_param)
        areas = response.read_areas(plain)
    level = AreaLevel.TOWNSHIP if by is By.TOWNSHIP else AreaLevel.GRID
    groups = response.by_group(alarms, areas, level, now)
    return ResponseReport.model_validate(
        {
            "area": area,
            "from": window.start,
            "to": window.end,
            "by": by,
            "targets": {"within_60s": response.TARGET_WITHIN_60S, "within_180s": response.TARGET_WITHIN_180S},
            "total": _public(response.figures(alarms, now)),
            "areas": [
                {**_public(f), "area_id": key, "area_name": areas[key].name if key in areas else ""}
                for key, f in groups.items()
            ],
        }
    )



class VisitFigures(BaseModel):
    due: int
    """Visits whose deadline fell in the month and has passed."""
    on_time: int
    """Of those, closed at or before the deadline."""
    late: int
    """Of those, closed after the deadline."""
    missed: int
    """Of those, still open."""
    upcoming: int
    """Deadline later in the month, not yet passed: not in the rate yet."""
    rate: float | None
    """on_time ÷ due; null when nothing was due yet."""
    target: float
    """The policy target: every visit on time (1.0)."""


class AreaVisitFigures(VisitFigures):
    area_id: str
    """The grid the visits are for (the resident's grid)."""
    area_name: str


class VisitReport(BaseModel):
    model_config = ConfigDict(
        populate_by_name=True,
        json_schema_extra={
            "example": {
                "month": "2026-12",
                "area": None,
                "from": "2026-11-30T16:00:00Z",
                "to": "2026-12-31T16:00:00Z",
                "timezone": "Asia/Shanghai",
                "total": {"due": 4, "on_time": 3, "late": 1, "missed": 0, "upcoming": 2, "rate": 0.75,
                          "target": 1.0},
                "areas": [
                    {"area_id": "wg-gh-1", "area_name": "广惠园第一网格", "due": 4, "on_time": 3, "late": 1,
                     "missed": 0, "upcoming": 2, "rate": 0.75, "target": 1.0},
                ],
            }
        },
    )

    month: str
    area: str | None
    """The area asked for (it and everything below it); null for everything the token sees."""
    from_: datetime = Field(alias="from")
    """The month's start, local midnight (SHOUHU_TIMEZONE), in UTC."""
    to: datetime
    """The month's end: a deadline exactly here (a monthly visit's) belongs to this month."""
    timezone: str
    total: VisitFigures
    areas: list[AreaVisitFigures]
    """Each grid with a visit due in the month, by id."""


def _figures(value: VisitRate) -> dict[str, Any]:
    return {
        "due": value.due,
        "on_time": value.on_time,
        "late": value.late,
        "missed": value.missed,
        "upcoming": value.upcoming,
        "rate": value.rate,
        "target": VISIT_RATE_TARGET,
    }


@router.get("/visits", response_model_by_alias=True)
def read_visit_report(
    *,
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
    zone: Zone,
    now: Now,
    month: Annotated[
        str | None, Query(description="YYYY-MM, local to SHOUHU_TIMEZONE; the current month by default.")
    ] = None,
    area: Annotated[str | None, Query(description="An area id: it and everything below it.")] = None,
) -> VisitReport:
    """The month's visit rate by area: follow-ups and recurring visits done on time, against 100 %."""
    if token.role not in VISIT_REPORT_READERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot read the visit report")
    try:
        period = parse_month(month, zone) if month is not None else period_of(VisitFrequency.MONTHLY, now, zone)
    except ValueError as exc:
        raise RequestValidationError(
            [{"loc": ("query", "month"), "msg": str(exc), "type": "value_error"}]
        ) from None
    rates = visit_rates(conn, period, now, scope=scope.as_param(), within=area_filter(conn, scope, area))
    return VisitReport.model_validate(
        {
            "month": period.key,
            "area": area,
            "from": period.start,
            "to": period.end,
            "timezone": zone.key,
            "total": _figures(total(rates)),
            "areas": [{"area_id": r.area_id, "area_name": r.area_name, **_figures(r)} for r in rates],
        }
    )
