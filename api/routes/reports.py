"""Reports: the month's visit rate (探视率) by area, against the 100 % target.

Follow-up visits after an SOS or a fall and the registry's recurring visits count;
visits about a device (offline, not worn) do not — the device coming back may
withdraw those. Admins, operators and grid workers read it, each within its areas.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from alerts.visits import VISIT_RATE_TARGET, VisitRate, parse_month, period_of, total, visit_rates
from api.access import VISIT_REPORT_READERS
from api.deps import API_PREFIX, ConnDep, CurrentToken, Now, Scope, Zone, area_filter
from devices.kinds import VisitFrequency

router = APIRouter(prefix=f"{API_PREFIX}/reports", tags=["reports"])


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
