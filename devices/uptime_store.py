"""Camera uptime from the database: gather transitions and exclusions, then measure.

The source of truth is ``device_events``: one row per state transition, written by
``hub/liveness.py``. A camera that flaps a few times a week has a few dozen rows a
month, so a township's report reads thousands of rows through the index on
``(device_id, at)`` — never the 5-minute ``camera_health`` samples, which are a
hundred times more. Per camera it reads the transitions inside the window plus the
last one before it (the state the window opens in), the ingest outages, the
maintenance windows and the repair orders; :mod:`devices.uptime` does the arithmetic.

With TimescaleDB, :func:`timescaledb_statements` adds a continuous aggregate of the
health samples per camera and local day (see docs/architecture.md, "Camera uptime",
for why the ratio itself is not one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg.rows import tuple_row

from devices.uptime import Span, StateChange, Uptime, ancestry, day_buckets, measure, roll_up, total

# At most this long a report: a year and a leap day's worth of daily buckets.
MAX_PERIOD_DAYS = 366


@dataclass(frozen=True, slots=True)
class AreaNode:
    id: str
    parent_id: str | None
    level: str
    name: str


@dataclass(frozen=True, slots=True)
class CameraUptime:
    device_id: str
    area_id: str
    buckets: tuple[Uptime, ...]
    open_repair_orders: int


@dataclass(frozen=True, slots=True)
class AreaUptime:
    area: AreaNode
    buckets: tuple[Uptime, ...]
    open_repair_orders: int


@dataclass(frozen=True, slots=True)
class UptimeReport:
    """Every camera and every area with cameras, over the same buckets."""

    window: Span
    # (local day, span) per day, or a single (None, window) for the whole period.
    buckets: tuple[tuple[date | None, Span], ...]
    totals: tuple[Uptime, ...]
    open_repair_orders: int
    areas: tuple[AreaUptime, ...]
    cameras: tuple[CameraUptime, ...]


_AREAS = "SELECT id, parent_id, level, name FROM areas"

# Deactivated cameras are left out: the registry deactivates a camera it no longer
# lists, and its silence after that is not an outage.
_CAMERAS = """
    SELECT id, area_id FROM devices
    WHERE kind = 'camera' AND active AND area_id = ANY(%(areas)s)
    ORDER BY id
"""

# The transitions in the window, plus each camera's last one before it. Status
# messages also land in device_events ('status_online', …); only transitions count.
_CHANGES = """
    SELECT e.device_id, e.at, e.event = 'online', e.reason
    FROM device_events e
    WHERE e.device_id = ANY(%(ids)s) AND e.at >= %(start)s AND e.at < %(end)s
      AND e.event IN ('online', 'offline')
    UNION ALL
    SELECT c.id, p.at, p.online, p.reason
    FROM unnest(%(ids)s::text[]) AS c(id)
    CROSS JOIN LATERAL (
        SELECT at, event = 'online' AS online, reason FROM device_events
        WHERE device_id = c.id AND at < %(start)s AND event IN ('online', 'offline')
        ORDER BY at DESC, id DESC LIMIT 1
    ) p
    ORDER BY 1, 2
"""

# An outage still open counts up to now.
_GAPS = """
    SELECT started_at, coalesce(ended_at, %(now)s) FROM ingest_gaps
    WHERE started_at < %(end)s AND coalesce(ended_at, %(now)s) > %(start)s
"""

# A cancelled window never happened; one ended early already has its new ends_at.
_MAINTENANCE = """
    SELECT device_id, area_id, starts_at, ends_at FROM maintenance_windows
    WHERE cancelled_at IS NULL AND starts_at < %(end)s AND ends_at > %(start)s
"""

# Time to repair counts from when the camera fell silent to when it came back (or,
# failing that, when the order was closed). Summed per camera and bucket here: a
# township's month has thousands of orders. width_bucket gives the 1-based bucket
# whose start is the last at or before closed_at.
_REPAIRS = """
    SELECT device_id, width_bucket(closed_at, %(starts)s::timestamptz[]) - 1, count(*)::int,
           sum(extract(epoch FROM coalesce(recovered_at, closed_at) - problem_since))::float8
    FROM care_tasks
    WHERE kind = 'repair' AND state = 'closed' AND closed_at >= %(start)s AND closed_at < %(end)s
      AND device_id = ANY(%(ids)s)
    GROUP BY 1, 2
"""

_OPEN_ORDERS = """
    SELECT device_id, count(*) FROM care_tasks
    WHERE kind = 'repair' AND state <> 'closed' AND device_id = ANY(%(ids)s)
    GROUP BY device_id
"""


def subtree(parents: Mapping[str, str | None], roots: Sequence[str]) -> frozenset[str]:
    """``roots`` and every area below them."""
    children: dict[str, list[str]] = {}
    for child, parent in parents.items():
        if parent is not None:
            children.setdefault(parent, []).append(child)
    found: set[str] = set()
    stack = [r for r in roots if r in parents]
    while stack:
        area = stack.pop()
        if area not in found:
            found.add(area)
            stack.extend(children.get(area, ()))
    return frozenset(found)


def report_buckets(window: Span, zone: ZoneInfo, by_day: bool) -> tuple[tuple[date | None, Span], ...]:
    if by_day:
        return tuple(day_buckets(window, zone))
    return ((None, window),)


def uptime_report(
    conn: psycopg.Connection[Any],
    *,
    roots: Sequence[str] | None,
    window: Span,
    now: datetime,
    zone: ZoneInfo,
    by_day: bool,
) -> UptimeReport:
    """The uptime of every active camera in ``roots`` and below (everywhere when None).

    Time after ``now`` is unknown. Runs its reads in one transaction; on an
    autocommit connection (the API's) that is the caller's only boundary.
    """
    buckets = report_buckets(window, zone, by_day)
    spans = [span for _, span in buckets]
    params: dict[str, Any] = {
        "start": window.start,
        "end": min(window.end, max(now, window.start)),
        "now": now,
        "starts": [span.start for span in spans],
    }
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        nodes = {row[0]: AreaNode(*row) for row in cur.execute(_AREAS).fetchall()}
        parents = {node.id: node.parent_id for node in nodes.values()}
        selected = subtree(parents, list(nodes) if roots is None else roots)
        cameras = cur.execute(_CAMERAS, {"areas": sorted(selected)}).fetchall()
        params["ids"] = [device_id for device_id, _ in cameras]
        changes: dict[str, list[StateChange]] = {}
        for device_id, at, online, reason in cur.execute(_CHANGES, params).fetchall():
            changes.setdefault(device_id, []).append(StateChange(at, online, reason))
        gaps = [Span(start, end) for start, end in cur.execute(_GAPS, params).fetchall() if end > start]
        windows = cur.execute(_MAINTENANCE, params).fetchall()
        repairs = cur.execute(_REPAIRS, params).fetchall()
        open_orders: dict[str, int] = dict(cur.execute(_OPEN_ORDERS, params).fetchall())

    if now < window.end:
        gaps.append(Span(max(now, window.start), window.end))
    held_by_device: dict[str, list[Span]] = {}
    held_by_area: dict[str, list[Span]] = {}
    for device_id, area_id, starts_at, ends_at in windows:
        target = held_by_device.setdefault(device_id, []) if device_id else held_by_area.setdefault(area_id, [])
        target.append(Span(starts_at, ends_at))
    repaired: dict[str, list[Uptime]] = {}
    for device_id, index, count, seconds in repairs:
        repaired.setdefault(device_id, [Uptime()] * len(spans))[index] = Uptime(repairs_closed=count, repair_s=seconds)

    measured: list[CameraUptime] = []
    for device_id, area_id in cameras:
        held = list(held_by_device.get(device_id, ()))
        for area in ancestry(parents, area_id):
            held.extend(held_by_area.get(area, ()))
        figures = measure(changes.get(device_id, []), spans, unknown=gaps, maintenance=held)
        if device_id in repaired:
            figures = [a + b for a, b in zip(figures, repaired[device_id], strict=True)]
        measured.append(CameraUptime(device_id, area_id, tuple(figures), open_orders.get(device_id, 0)))

    by_area = roll_up(((c.area_id, c.buckets) for c in measured), parents, selected)
    orders_by_area: dict[str, int] = {}
    for camera in measured:
        for area in ancestry(parents, camera.area_id):
            if area in selected:
                orders_by_area[area] = orders_by_area.get(area, 0) + camera.open_repair_orders
    areas = tuple(
        AreaUptime(nodes[area_id], tuple(figures), orders_by_area.get(area_id, 0))
        for area_id, figures in sorted(by_area.items())
    )
    totals = tuple(total(c.buckets[i] for c in measured) for i in range(len(spans)))
    return UptimeReport(
        window=window,
        buckets=buckets,
        totals=totals,
        open_repair_orders=sum(c.open_repair_orders for c in measured),
        areas=areas,
        cameras=tuple(measured),
    )


# The health samples' continuous aggregate refreshes the last three days every hour,
# leaving the newest hour to settle. Three days is far inside the raw retention
# (SHOUHU_RETENTION_DAYS, 90), so a refresh never runs over dropped chunks, and the
# daily rows outlive the samples they summarise.
HEALTH_DAILY = "camera_health_daily"


def timescaledb_statements(zone: str) -> list[str]:
    """A continuous aggregate of the 5-minute health samples per camera and local day.

    It is the sample side of the picture — how many reports, how many said "offline",
    mean frame rate and bitrate — kept after raw retention drops the samples. The
    uptime report does not read it: the ratio is time-weighted from transitions. The
    day is bucketed in ``zone`` (SHOUHU_TIMEZONE when the migration ran), which
    ``time_bucket`` accepts in a continuous aggregate from TimescaleDB 2.8.
    """
    try:
        ZoneInfo(zone)  # refuse an unknown zone before it reaches SQL
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {zone!r}") from exc
    literal = zone.replace("'", "''")
    return [
        f"""CREATE MATERIALIZED VIEW {HEALTH_DAILY}
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 day', received_at, '{literal}') AS day,
       device_id,
       count(*) AS samples,
       count(*) FILTER (WHERE NOT online) AS offline_samples,
       count(*) FILTER (WHERE storage_ok = false) AS storage_faults,
       avg(fps) AS mean_fps,
       avg(bitrate_kbps) AS mean_bitrate_kbps,
       min(received_at) AS first_sample,
       max(received_at) AS last_sample
FROM camera_health
GROUP BY day, device_id
WITH NO DATA""",
        f"""SELECT add_continuous_aggregate_policy('{HEALTH_DAILY}',
    start_offset => INTERVAL '3 days',
    end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '1 hour')""",
    ]


def create_timescaledb_views(conn: psycopg.Connection[Any], zone: str) -> None:
    """Migration step 11: the continuous aggregate, its days in ``zone``, on the TimescaleDB path only."""
    row = conn.execute("SELECT value FROM shouhu_meta WHERE key = 'storage_mode'").fetchone()
    if row is None or row[0] != "timescaledb":
        return
    for statement in timescaledb_statements(zone):
        conn.execute(statement.encode())
