"""The fleet in the API's ``/metrics``: devices by kind, liveness and township, and camera uptime (在线率).

Read from the database at scrape time, like the response figures (alerts/response.py),
and for the same reasons: the database holds the one true state, and every API process
exports the same values (aggregate with ``max``, not ``sum``). The hub's
``shouhu_devices{kind,state}`` counts the whole fleet; this adds where the devices are.

The uptime is devices/uptime_store.py's report for the last day, the same
time-weighted ratio as ``GET /api/v1/uptime``. Each area is reported at most every
:data:`UPTIME_REFRESH_S`: a county's day of transitions is read once per refresh, not at
each scrape. A scrape while the database is away leaves these out rather than fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from prometheus_client.core import GaugeMetricFamily, Metric

from alerts.response import group_of, read_areas
from devices.kinds import AreaLevel
from devices.uptime import Span
from devices.uptime_store import uptime_report
from shouhu.db import Conn
from shouhu.db_collector import DatabaseCollector

UPTIME_WINDOW = timedelta(days=1)
UPTIME_REFRESH_S = 300.0
# The levels the uptime gauge reports: a county's grids would be hundreds of series.
UPTIME_LEVELS = frozenset({AreaLevel.COUNTY, AreaLevel.TOWNSHIP})

# Active devices; a wristband has no area of its own, it is where its resident's grid is.
_DEVICES_BY_AREA = """
    SELECT d.kind,
           CASE WHEN s.online THEN 'online' WHEN NOT s.online THEN 'offline' ELSE 'unknown' END,
           coalesce(d.area_id, r.grid_id), count(*)
    FROM devices d
    LEFT JOIN device_state s ON s.device_id = d.id
    LEFT JOIN residents r ON r.id = d.resident_id
    WHERE d.active
    GROUP BY 1, 2, 3
"""


def devices_by_township(conn: Conn) -> dict[tuple[str, str, str], int]:
    """Active devices by (kind, liveness, township); a device above any township counts at its own area."""
    areas = read_areas(conn)
    counts: dict[tuple[str, str, str], int] = {}
    for kind, state, area_id, n in conn.execute(_DEVICES_BY_AREA).fetchall():
        key = (str(kind), str(state), group_of(areas, area_id, AreaLevel.TOWNSHIP) or "")
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def camera_uptime(conn: Conn, now: datetime) -> dict[tuple[str, str], float]:
    """(area, level) → the cameras' online share over the day before ``now``, for the county and townships.

    An area whose cameras were not monitored at all (all unknown or in maintenance)
    has no ratio and is left out: 0/0 is not 0 %.
    """
    # The zone only places day buckets; one bucket for the whole window needs none.
    report = uptime_report(
        conn, roots=None, window=Span(now - UPTIME_WINDOW, now), now=now, zone=ZoneInfo("UTC"), by_day=False
    )
    ratios: dict[tuple[str, str], float] = {}
    for area in report.areas:
        ratio = area.buckets[0].ratio if area.buckets else None
        if ratio is not None and area.area.level in UPTIME_LEVELS:
            ratios[area.area.id, area.area.level] = ratio
    return ratios


class FleetCollector(DatabaseCollector):
    """``shouhu_devices_by_area{kind,state,township}`` and ``shouhu_camera_uptime_ratio{area,level}``."""

    figures = "fleet figures"

    def __init__(
        self,
        connect: Callable[[], AbstractContextManager[Conn]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        refresh_s: float = UPTIME_REFRESH_S,
    ) -> None:
        super().__init__(connect)
        self._clock = clock
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._uptime: dict[tuple[str, str], float] = {}
        self._uptime_read: float | None = None

    def read(self, conn: Conn) -> Iterator[Metric]:
        devices = devices_by_township(conn)
        uptime = self._camera_uptime(conn)
        by_area = GaugeMetricFamily(
            "shouhu_devices_by_area",
            "Active devices by kind, liveness (online, offline, unknown) and township",
            labels=["kind", "state", "township"],
        )
        for (kind, state, township), n in sorted(devices.items()):
            by_area.add_metric([kind, state, township], n)
        ratio = GaugeMetricFamily(
            "shouhu_camera_uptime_ratio",
            f"Cameras' time-weighted online share (在线率) over the last {UPTIME_WINDOW.days} day, by area",
            labels=["area", "level"],
        )
        for (area, level), value in sorted(uptime.items()):
            ratio.add_metric([area, level], value)
        yield from (by_area, ratio)

    def _camera_uptime(self, conn: Conn) -> dict[tuple[str, str], float]:
        # One scrape at a time reads; the others reuse what it read.
        with self._lock:
            if self._uptime_read is None or time.monotonic() - self._uptime_read >= self._refresh_s:
                self._uptime = camera_uptime(conn, self._clock())
                self._uptime_read = time.monotonic()
            return self._uptime
