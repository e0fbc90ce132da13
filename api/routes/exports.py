"""Exports for the county's reports: incidents, visits, repair orders and camera uptime
(在线率) for a period and an area, as CSV or Excel with Chinese headers.

Each export is gated like the list or report it mirrors (``api/access.py``): incidents
as the incident list (a technician gets camera incidents only), visits as the visit
report, repair orders and uptime as the technician's routes; another area is 404. The
rows are read through a server-side cursor on a connection of the export's own and
streamed (``api/exports.py``), so a year of a county's incidents is never in memory at
once. Every export is written to the audit log (who, what, which period and area).
Residents appear by id only, never by name, phone or location.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import StreamingResponse
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool

from api.access import CAMERA_CARETAKERS, VISIT_REPORT_READERS, visible_incident_kinds
from api.consoles.i18n import Lang, maybe
from api.deps import (
    API_PREFIX,
    ConnDep,
    CurrentToken,
    Now,
    PoolDep,
    Scope,
    Zone,
    area_filter,
    pooled,
    tuple_rows,
    write_audit,
)
from api.exports import MEDIA_TYPES, Column, ExportFormat, Table, csv_stream, local_time, xlsx_stream
from api.routes.uptime import report_window
from devices.uptime import Span, Uptime
from devices.uptime_store import uptime_report
from shouhu.tokens import TokenIdentity

router = APIRouter(prefix=f"{API_PREFIX}/exports", tags=["exports"])

# Rows fetched from the server-side cursor at a time.
CURSOR_ROWS = 2000

AreaQuery = Annotated[str | None, Query(description="This area and below; default: every area the token sees.")]
FromQuery = Annotated[
    str | None,
    Query(
        alias="from",
        description="Start (inclusive): a time with an offset, or a date for its local midnight. "
        "Default: a week before `to`.",
    ),
]
ToQuery = Annotated[
    str | None,
    Query(description="End (exclusive): a time with an offset, or a date for its local midnight. Default: now."),
]
FormatQuery = Annotated[ExportFormat, Query(alias="format", description="csv (UTF-8 with a BOM) or xlsx.")]

_FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The export, as an attachment.",
        "content": {MEDIA_TYPES[ExportFormat.CSV]: {}, MEDIA_TYPES[ExportFormat.XLSX]: {}},
    },
    403: {"description": "The token's role may not read these figures."},
    404: {"description": "The area does not exist or is outside the token's areas."},
}

_LEVELS = {"county": "县", "township": "乡镇", "community": "社区（村）", "grid": "网格", "micro_grid": "微网格"}


def _word(value: Any) -> Any:
    return maybe(Lang.ZH, value) if isinstance(value, str) else value


def _yes_no(value: Any) -> str:
    return "" if value is None else ("是" if value else "否")


def _time_columns(zone: ZoneInfo, *headers: str) -> tuple[Column, ...]:
    cell = local_time(zone)
    return tuple(Column(f"{h}（{zone.key}）", cell) for h in headers)


def _incidents_table(zone: ZoneInfo) -> Table:
    opened, taken, resolved = _time_columns(zone, "发生时间", "接单时间", "办结时间")
    return Table(
        "事件",
        (
            Column("事件编号"), Column("类型", _word), Column("级别", _word), Column("状态", _word),
            Column("区域"), Column("区域编号"), Column("老人编号"), Column("设备编号"),
            opened, taken, Column("接单人"), Column("响应用时（秒）"), resolved, Column("处置结果", _word),
        ),
    )


_INCIDENTS = """
    SELECT i.code, i.kind, i.severity, i.state, a.name, i.area_id, i.resident_id, i.device_id,
           i.opened_at, i.acknowledged_at, i.acknowledged_by_name,
           round(extract(epoch FROM i.acknowledged_at - i.opened_at))::int, i.resolved_at, i.outcome
    FROM incidents i LEFT JOIN areas a ON a.id = i.area_id
    WHERE i.kind = ANY(%(kinds)s)
      AND (%(scope)s::text[] IS NULL OR i.area_id = ANY(%(scope)s))
      AND (%(within)s::text[] IS NULL OR i.area_id = ANY(%(within)s))
      AND i.opened_at >= %(start)s AND i.opened_at < %(end)s
    ORDER BY i.opened_at, i.id
"""


def _visits_table(zone: ZoneInfo) -> Table:
    opened, deadline, due, started, closed = _time_columns(
        zone, "派发时间", "首次期限", "当前期限", "开始时间", "办结时间"
    )
    return Table(
        "探视",
        (
            Column("任务编号"), Column("事件编号"), Column("原因", _word), Column("网格"), Column("网格编号"),
            Column("老人编号"), Column("设备编号"), opened, deadline, due, Column("升级次数"), Column("状态", _word),
            Column("按时完成", _yes_no), started, closed, Column("办结人"), Column("结果", _word), Column("备注"),
        ),
    )


def _repairs_table(zone: ZoneInfo) -> Table:
    since, opened, due, recovered, closed = _time_columns(zone, "故障开始", "派单时间", "期限", "恢复时间", "销号时间")
    return Table(
        "维修工单",
        (
            Column("工单编号"), Column("事件编号"), Column("摄像头编号"), Column("区域"), Column("区域编号"),
            Column("故障原因"), since, opened, due, Column("升级次数"), Column("状态", _word), recovered,
            Column("再次离线次数"), closed, Column("销号人"), Column("结果", _word), Column("修复用时（秒）"),
        ),
    )


# Visits and repair orders opened in the period. A visit is on time when it was closed
# by its first deadline (the one an escalation never moves), as the visit rate counts.
_TASKS = """
    SELECT t.id, i.code, {columns}
    FROM care_tasks t JOIN incidents i ON i.id = t.incident_id LEFT JOIN areas a ON a.id = t.area_id
    WHERE t.kind = %(kind)s
      AND (%(scope)s::text[] IS NULL OR t.area_id = ANY(%(scope)s))
      AND (%(within)s::text[] IS NULL OR t.area_id = ANY(%(within)s))
      AND t.opened_at >= %(start)s AND t.opened_at < %(end)s
    ORDER BY t.opened_at, t.id
"""
_VISIT_COLUMNS = """
    t.reason, a.name, t.area_id, t.resident_id, t.device_id, t.opened_at, coalesce(t.deadline, t.due_at), t.due_at,
    t.level, t.state,
    CASE WHEN t.state = 'closed' THEN t.closed_at <= coalesce(t.deadline, t.due_at) END,
    t.started_at, t.closed_at, t.closed_by_name, t.outcome, t.note
"""
_REPAIR_COLUMNS = """
    t.device_id, a.name, t.area_id, t.reason, t.problem_since, t.opened_at, t.due_at, t.level, t.state,
    t.recovered_at, t.flaps, t.closed_at, t.closed_by_name, t.outcome,
    round(extract(epoch FROM coalesce(t.recovered_at, t.closed_at) - t.problem_since))::int
"""


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 3600, 2)


def _percent(ratio: float | None) -> float | None:
    return None if ratio is None else round(ratio * 100, 2)


_UPTIME = Table(
    "在线率",
    (
        Column("类别"), Column("编号"), Column("名称或所在区域"), Column("层级"), Column("摄像头数"),
        Column("在线率（%）", _percent), Column("在线时长（小时）", _hours), Column("离线时长（小时）", _hours),
        Column("维护时长（小时）", _hours), Column("未知时长（小时）", _hours), Column("离线次数"),
        Column("修复工单数"), Column("平均修复时长（小时）", _hours),
    ),
)


def _figures(value: Uptime) -> tuple[Any, ...]:
    return (
        value.cameras, value.ratio, value.online_s, value.offline_s, value.maintenance_s, value.unknown_s,
        value.outages, value.repairs_closed, value.mttr_s,
    )


def _cursor_rows(pool: ConnectionPool, query: str, params: dict[str, Any]) -> Iterator[Sequence[Any]]:
    """The query's rows from a server-side cursor, on a connection of its own held while they stream."""
    with (
        pooled(pool) as conn,
        conn.transaction(),
        conn.cursor(name="shouhu_export", row_factory=tuple_row) as cursor,
    ):
        cursor.itersize = CURSOR_ROWS
        cursor.execute(query.encode(), params)
        yield from cursor


def _respond(what: str, table: Table, rows: Iterator[Sequence[Any]], fmt: ExportFormat, window: Span,
             zone: Any) -> StreamingResponse:
    start = window.start.astimezone(zone).date()
    end = (window.end - timedelta(microseconds=1)).astimezone(zone).date()
    body = csv_stream(table, rows) if fmt is ExportFormat.CSV else xlsx_stream(table, rows)
    return StreamingResponse(
        body,
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="shouhu-{what}-{start}-{end}.{fmt.value}"'},
    )


def _audit(conn: ConnDep, token: TokenIdentity, now: Any, what: str, window: Span, area: str | None,
           fmt: ExportFormat) -> None:
    detail = {"from": window.start.isoformat(), "to": window.end.isoformat(), "area": area, "format": fmt.value}
    write_audit(conn, token, now, "export", f"export:{what}", detail)


@router.get("/incidents", response_class=StreamingResponse, responses=_FILE_RESPONSES)
def export_incidents(
    *, conn: ConnDep, pool: PoolDep, token: CurrentToken, scope: Scope, now: Now, zone: Zone,
    area: AreaQuery = None, from_: FromQuery = None, to: ToQuery = None, fmt: FormatQuery = ExportFormat.CSV,
) -> StreamingResponse:
    """Incidents opened in the period, oldest first, as the incident list shows them; CSV or Excel."""
    window = report_window(from_, to, now, zone)
    params = {
        "kinds": sorted(k.value for k in visible_incident_kinds(token.role)),
        "scope": scope.as_param(),
        "within": area_filter(conn, scope, area),
        "start": window.start,
        "end": window.end,
    }
    _audit(conn, token, now, "incidents", window, area, fmt)
    return _respond("incidents", _incidents_table(zone), _cursor_rows(pool, _INCIDENTS, params), fmt, window, zone)


def _tasks(conn: ConnDep, pool: PoolDep, token: TokenIdentity, scope: Scope, now: Any, zone: Any, *,
           what: str, area: str | None, from_: str | None, to: str | None, fmt: ExportFormat) -> StreamingResponse:
    window = report_window(from_, to, now, zone)
    visit = what == "visits"
    params = {
        "kind": "visit" if visit else "repair",
        "scope": scope.as_param(),
        "within": area_filter(conn, scope, area),
        "start": window.start,
        "end": window.end,
    }
    query = _TASKS.format(columns=_VISIT_COLUMNS if visit else _REPAIR_COLUMNS)
    _audit(conn, token, now, what, window, area, fmt)
    table = _visits_table(zone) if visit else _repairs_table(zone)
    return _respond(what, table, _cursor_rows(pool, query, params), fmt, window, zone)


@router.get("/visits", response_class=StreamingResponse, responses=_FILE_RESPONSES)
def export_visits(
    *, conn: ConnDep, pool: PoolDep, token: CurrentToken, scope: Scope, now: Now, zone: Zone,
    area: AreaQuery = None, from_: FromQuery = None, to: ToQuery = None, fmt: FormatQuery = ExportFormat.CSV,
) -> StreamingResponse:
    """Visits (探视) opened in the period, with whether each was done by its deadline; CSV or Excel."""
    if token.role not in VISIT_REPORT_READERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot export visits")
    return _tasks(conn, pool, token, scope, now, zone, what="visits", area=area, from_=from_, to=to, fmt=fmt)


@router.get("/repairs", response_class=StreamingResponse, responses=_FILE_RESPONSES)
def export_repairs(
    *, conn: ConnDep, pool: PoolDep, token: CurrentToken, scope: Scope, now: Now, zone: Zone,
    area: AreaQuery = None, from_: FromQuery = None, to: ToQuery = None, fmt: FormatQuery = ExportFormat.CSV,
) -> StreamingResponse:
    """Camera repair orders opened in the period, with their time to repair; CSV or Excel."""
    if token.role not in CAMERA_CARETAKERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot export repair orders")
    return _tasks(conn, pool, token, scope, now, zone, what="repairs", area=area, from_=from_, to=to, fmt=fmt)


@router.get("/uptime", response_class=StreamingResponse, responses=_FILE_RESPONSES)
def export_uptime(
    *, conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, zone: Zone,
    area: AreaQuery = None, from_: FromQuery = None, to: ToQuery = None, fmt: FormatQuery = ExportFormat.CSV,
) -> StreamingResponse:
    """Camera uptime (在线率) over the period: each area, then each camera, as /cameras/uptime; CSV or Excel."""
    if token.role not in CAMERA_CARETAKERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot export camera uptime")
    window = report_window(from_, to, now, zone)
    within = area_filter(conn, scope, area)
    roots = [area] if within is not None and area is not None else scope.as_param()
    with tuple_rows(conn) as plain:
        report = uptime_report(plain, roots=roots, window=window, now=now, zone=zone, by_day=False)
    names = {a.area.id: a.area.name for a in report.areas}
    rows: list[Sequence[Any]] = [
        ("区域", a.area.id, a.area.name, _LEVELS.get(a.area.level, a.area.level), *_figures(a.buckets[0]))
        for a in report.areas
    ]
    rows += [
        ("摄像头", c.device_id, names.get(c.area_id, c.area_id), "摄像头", *_figures(c.buckets[0]))
        for c in report.cameras
    ]
    _audit(conn, token, now, "uptime", window, area, fmt)
    return _respond("uptime", _UPTIME, iter(rows), fmt, window, zone)
