"""Camera online ratios for the technician board, and their chart as inline SVG.

The chart is drawn on the server: no chart library to vendor, nothing fetched from
the internet, and it reads without script. The ratios come from the uptime module
the API's ``/cameras/uptime`` route uses.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from html import escape
from zoneinfo import ZoneInfo

from api.deps import tuple_rows
from devices.uptime import Span, Uptime, local_midnight, total
from devices.uptime_store import uptime_report
from shouhu.db import DictConn

WIDTH, HEIGHT, PAD = 640, 200, 32


def svg_chart(series: list[tuple[date, float | None]], *, title: str) -> str:
    """A line of daily online ratios (0–100 %); days without data leave a gap.

    Returns markup with a text alternative (``role="img"``, a ``<title>`` and a
    ``<desc>`` listing every value), so a screen reader gets the numbers.
    """
    days = len(series)
    desc = "; ".join(f"{day.isoformat()}: {'—' if r is None else f'{r * 100:.1f}%'}" for day, r in series)
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def x(index: int) -> float:
        return PAD + (inner_w * index / max(days - 1, 1))

    def y(ratio: float) -> float:
        return PAD + inner_h * (1 - ratio)

    segments: list[list[str]] = [[]]
    for index, (_day, ratio) in enumerate(series):
        if ratio is None:
            segments.append([])
        else:
            segments[-1].append(f"{x(index):.1f},{y(ratio):.1f}")
    lines = "".join(
        f'<polyline fill="none" stroke="#0b57d0" stroke-width="2" points="{" ".join(points)}"/>'
        for points in segments
        if points
    )
    dots = "".join(
        f'<circle cx="{x(i):.1f}" cy="{y(r):.1f}" r="3" fill="#0b57d0"/>'
        for i, (_d, r) in enumerate(series)
        if r is not None
    )
    grid = "".join(
        f'<line x1="{PAD}" x2="{WIDTH - PAD}" y1="{y(level):.1f}" y2="{y(level):.1f}" stroke="#d9d9d9"/>'
        f'<text x="2" y="{y(level) + 4:.1f}">{int(level * 100)}%</text>'
        for level in (0.0, 0.5, 0.9, 1.0)
    )
    labels = ""
    if series:
        labels = (
            f'<text x="{PAD}" y="{HEIGHT - 8}">{series[0][0].strftime("%m-%d")}</text>'
            f'<text x="{WIDTH - PAD - 30}" y="{HEIGHT - 8}">{series[-1][0].strftime("%m-%d")}</text>'
        )
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart-title chart-desc">'
        f'<title id="chart-title">{escape(title)}</title><desc id="chart-desc">{escape(desc)}</desc>'
        f"{grid}{lines}{dots}{labels}</svg>"
    )


def area_ratios(
    conn: DictConn, scope: list[str] | None, since: datetime, until: datetime, zone: ZoneInfo
) -> dict[str, float | None]:
    """Each area's time-weighted online ratio over [since, until), of the cameras the
    area itself holds — the ones the board counts on the same row (an area's row once
    showed "1/1" beside the ratio of everything below it)."""
    if until <= since:
        return {}
    with tuple_rows(conn) as plain:
        report = uptime_report(plain, roots=scope, window=Span(since, until), now=until, zone=zone, by_day=False)
    own: dict[str, list[Uptime]] = {}
    for camera in report.cameras:
        own.setdefault(camera.area_id, []).append(camera.buckets[0])
    return {area_id: total(figures).ratio for area_id, figures in own.items()}


def daily_ratios(
    conn: DictConn, scope: list[str] | None, start: date, end: date, zone: ZoneInfo, now: datetime
) -> list[tuple[date, float | None]]:
    """The online ratio of every camera in scope together, day by local day (inclusive)."""
    window = Span(local_midnight(start, zone), local_midnight(end + timedelta(days=1), zone))
    with tuple_rows(conn) as plain:
        report = uptime_report(plain, roots=scope, window=window, now=now, zone=zone, by_day=True)
    return [(day or start, uptime.ratio) for (day, _span), uptime in zip(report.buckets, report.totals, strict=True)]
