"""Camera uptime (在线率): time-weighted online ratio from state transitions.

The ratio is seconds online ÷ seconds monitored, never a count of checks. A camera's
time in a window falls in exactly one of four parts, tried in this order:

1. ``unknown`` — before its first transition, during an ingest outage (nobody could
   hear it), or after the report's "now": not monitored;
2. ``maintenance`` — inside a maintenance window on the camera or on its area or an
   area above: not monitored;
3. ``online`` or 4. ``offline`` (by the reason of the transition that took it
   offline) — the monitored time.

Everything here is arithmetic over values passed in: no clock, no database. The
SQL that gathers the inputs lives in :mod:`devices.uptime_store`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

UNSPECIFIED_REASON = "unspecified"


@dataclass(frozen=True, slots=True)
class Span:
    """A half-open stretch of time ``[start, end)``."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        """Refuse naive times and spans that end before they start."""
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("span times must be timezone-aware")
        if self.end < self.start:
            raise ValueError(f"span ends ({self.end}) before it starts ({self.start})")


@dataclass(frozen=True, slots=True)
class StateChange:
    """One ``device_events`` transition: from here on the camera is online, or offline for ``reason``."""

    at: datetime
    online: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Uptime:
    """Seconds of each kind in one window for one camera or a roll-up of many.

    Adding two gives their time-weighted sum: a roll-up's ratio is the sum of
    online seconds over the sum of monitored seconds, never a mean of ratios.
    """

    online_s: float = 0.0
    offline_s: float = 0.0
    maintenance_s: float = 0.0
    unknown_s: float = 0.0
    # Sorted (reason, seconds) pairs: a tuple keeps the value frozen.
    offline_reasons: tuple[tuple[str, float], ...] = ()
    outages: int = 0
    repairs_closed: int = 0
    repair_s: float = 0.0
    cameras: int = 0

    @property
    def monitored_s(self) -> float:
        return self.online_s + self.offline_s

    @property
    def ratio(self) -> float | None:
        """Online ÷ monitored; None when nothing was monitored (a ratio of 0/0 is not 0 %)."""
        return self.online_s / self.monitored_s if self.monitored_s > 0 else None

    @property
    def mttr_s(self) -> float | None:
        """Mean time to repair of the repair orders closed in the window."""
        return self.repair_s / self.repairs_closed if self.repairs_closed else None

    def offline_by_reason(self) -> dict[str, float]:
        return dict(self.offline_reasons)

    def __add__(self, other: Uptime) -> Uptime:
        return total((self, other))


def total(values: Iterable[Uptime]) -> Uptime:
    """The time-weighted sum of ``values``: seconds and counts added, reasons merged."""
    online = offline = maintenance = unknown = repair = 0.0
    outages = repairs = cameras = 0
    reasons: dict[str, float] = {}
    for value in values:
        online += value.online_s
        offline += value.offline_s
        maintenance += value.maintenance_s
        unknown += value.unknown_s
        outages += value.outages
        repairs += value.repairs_closed
        repair += value.repair_s
        cameras += value.cameras
        for reason, seconds in value.offline_reasons:
            reasons[reason] = reasons.get(reason, 0.0) + seconds
    return Uptime(online, offline, maintenance, unknown, tuple(sorted(reasons.items())), outages, repairs, repair,
                  cameras)


def merge(spans: Iterable[Span]) -> list[Span]:
    """The union of ``spans`` as sorted, disjoint, non-touching spans."""
    merged: list[Span] = []
    for span in sorted(spans, key=lambda s: s.start):
        if span.end <= span.start:
            continue
        if merged and span.start <= merged[-1].end:
            if span.end > merged[-1].end:
                merged[-1] = Span(merged[-1].start, span.end)
        else:
            merged.append(span)
    return merged


def _inside(merged: Sequence[Span], starts: Sequence[datetime], at: datetime) -> bool:
    index = bisect_right(starts, at) - 1
    return index >= 0 and at < merged[index].end


@dataclass(slots=True)
class _Tally:
    online: float = 0.0
    offline: float = 0.0
    maintenance: float = 0.0
    unknown: float = 0.0
    reasons: dict[str, float] = field(default_factory=dict)
    outages: int = 0

    def freeze(self) -> Uptime:
        return Uptime(
            online_s=self.online,
            offline_s=self.offline,
            maintenance_s=self.maintenance,
            unknown_s=self.unknown,
            offline_reasons=tuple(sorted(self.reasons.items())),
            outages=self.outages,
            cameras=1,
        )


def _sweep(
    changes: Sequence[StateChange], buckets: Sequence[Span], gaps: Sequence[Span], held: Sequence[Span],
    ordered: Sequence[datetime],
) -> list[_Tally]:
    """Tally each piece between consecutive ``ordered`` points into its bucket."""
    # Pointers that only move forward rather than a bisect per piece: a report
    # measures hundreds of cameras per request.
    tallies = [_Tally() for _ in buckets]
    b = c = g = m = 0
    for piece_start, piece_end in pairwise(ordered):
        while buckets[b].end <= piece_start:
            b += 1
        while c < len(changes) and changes[c].at <= piece_start:
            c += 1
        while g < len(gaps) and gaps[g].end <= piece_start:
            g += 1
        while m < len(held) and held[m].end <= piece_start:
            m += 1
        tally = tallies[b]
        seconds = (piece_end - piece_start).total_seconds()
        if c == 0 or (g < len(gaps) and gaps[g].start <= piece_start):
            tally.unknown += seconds
        elif m < len(held) and held[m].start <= piece_start:
            tally.maintenance += seconds
        elif changes[c - 1].online:
            tally.online += seconds
        else:
            tally.offline += seconds
            reason = changes[c - 1].reason or UNSPECIFIED_REASON
            tally.reasons[reason] = tally.reasons.get(reason, 0.0) + seconds
    return tallies


def measure(
    changes: Sequence[StateChange],
    buckets: Sequence[Span],
    *,
    unknown: Iterable[Span] = (),
    maintenance: Iterable[Span] = (),
) -> list[Uptime]:
    """One camera's uptime in each bucket.

    Args:
        changes: the camera's transitions in time order, including the last one at or
            before the first bucket's start when there is one (it gives the state the
            window opens in). Time before the first change is unknown.
        buckets: contiguous windows in time order (one for a period, one per local day).
        unknown: ingest outages and the time after "now".
        maintenance: the camera's maintenance windows, its own and its areas'.

    Returns:
        One :class:`Uptime` per bucket, each with ``cameras=1``. An outage is counted in
        the bucket where the camera went offline, and only if it went offline in
        monitored time, so the buckets' outages add up to the period's.
    """
    if not buckets:
        return []
    for earlier, later in pairwise(buckets):
        if earlier.end != later.start:
            raise ValueError("buckets must be contiguous and in time order")
    start, end = buckets[0].start, buckets[-1].end
    gaps = merge(unknown)
    held = merge(maintenance)
    gap_starts = [s.start for s in gaps]
    held_starts = [s.start for s in held]
    bucket_starts = [b.start for b in buckets]

    points = {start, end}
    points.update(b.end for b in buckets)
    points.update(change.at for change in changes if start < change.at < end)
    for span in (*gaps, *held):
        points.update(t for t in (span.start, span.end) if start < t < end)
    tallies = _sweep(changes, buckets, gaps, held, sorted(points))
    for change in changes:
        if change.online or not start <= change.at < end:
            continue
        if _inside(gaps, gap_starts, change.at) or _inside(held, held_starts, change.at):
            continue
        tallies[bisect_right(bucket_starts, change.at) - 1].outages += 1
    return [tally.freeze() for tally in tallies]


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone)


def day_buckets(window: Span, zone: ZoneInfo) -> list[tuple[date, Span]]:
    """``window`` cut at local midnights in ``zone``, each piece with its local date.

    The first and last pieces may be partial days when the window does not start or
    end at a local midnight.
    """
    buckets: list[tuple[date, Span]] = []
    day = window.start.astimezone(zone).date()
    while True:
        day_start = max(window.start, local_midnight(day, zone))
        day_end = min(window.end, local_midnight(day + timedelta(days=1), zone))
        if day_start >= window.end:
            return buckets
        buckets.append((day, Span(day_start.astimezone(UTC), day_end.astimezone(UTC))))
        day += timedelta(days=1)


def ancestry(parents: Mapping[str, str | None], area_id: str) -> list[str]:
    """The area and every area above it (``parents`` maps every area to its parent)."""
    chain: list[str] = []
    current: str | None = area_id
    # The membership test guards against a cycle in a damaged area table.
    while current is not None and current not in chain:
        chain.append(current)
        current = parents.get(current)
    return chain


def roll_up(
    cameras: Iterable[tuple[str, Sequence[Uptime]]],
    parents: Mapping[str, str | None],
    keep: frozenset[str],
) -> dict[str, list[Uptime]]:
    """Each kept area's buckets: the sum over every camera in it or below it.

    Args:
        cameras: each camera's area and its buckets (all the same length).
        parents: every area's parent (the whole tree, so a camera's ancestry is complete).
        keep: the areas to report.
    """
    members: dict[str, list[Sequence[Uptime]]] = {}
    for area_id, buckets in cameras:
        for area in ancestry(parents, area_id):
            if area in keep:
                members.setdefault(area, []).append(buckets)
    return {
        area: [total(camera[i] for camera in inside) for i in range(len(inside[0]))]
        for area, inside in members.items()
    }
