"""Response figures: how fast red incidents (SOS, falls) were taken, against the telecare targets.

The telecare standard asks that 97.5 % of alarms be answered within 60 s and 99 %
within 180 s. Here an alarm is *answered* when a person first took it: the first
acknowledgement on its timeline (a later re-acknowledgement after a re-escalation
does not count), or its resolution if somebody closed it without taking it first.
An SOS the wristband cancelled inside the cancel window needed nobody and is left
out (counted apart as ``cancelled``).

An incident counts towards a window's share once its outcome for that window is
known: answered (in time or late), or the window has run out unanswered. An SOS
pressed 20 s ago and still ringing is neither in time nor late yet, so a live
overview does not dip each time somebody presses.

The figures themselves are pure functions of :class:`RedAlarm` rows and the time
(:func:`figures`, :func:`by_group`); the reads are :func:`read_alarms` (for a period,
REST and the overview) and :func:`cumulative` (everything so far, for ``/metrics``).
Nothing here writes.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from devices.kinds import AreaLevel, IncidentState, Severity
from shouhu.db import Conn
from shouhu.db_collector import DatabaseCollector

log = logging.getLogger(__name__)

# The telecare targets (seed: 97.5 % answered within 60 s, 99 % within 180 s).
TARGET_WITHIN_60S = 0.975
TARGET_WITHIN_180S = 0.99
WINDOW_60S = 60.0
WINDOW_180S = 180.0
# The /metrics histogram's buckets: the two windows (and +Inf, which prometheus adds).
ACK_BUCKETS = (WINDOW_60S, WINDOW_180S)
# Timeline events that mean a person took the incident (alerts/acknowledge.py writes them).
ANSWER_EVENTS = ("acknowledged", "resolved")
UNREACHED_EVENT = "unreached"

__all__ = [
    "ACK_BUCKETS",
    "TARGET_WITHIN_60S",
    "TARGET_WITHIN_180S",
    "Area",
    "Cumulative",
    "Figures",
    "RedAlarm",
    "ResponseCollector",
    "Window",
    "by_group",
    "cumulative",
    "figures",
    "group_of",
    "read_alarms",
    "read_areas",
]


@dataclass(frozen=True, slots=True)
class RedAlarm:
    """One red incident as the figures need it."""

    id: int
    area_id: str | None
    opened_at: datetime
    answered_at: datetime | None  # the first time a person took it, or None
    cancelled: bool  # stood down by the wristband before anybody took it
    unreached: bool  # every step ran without anybody taking it, at least once

    @property
    def ack_s(self) -> float | None:
        if self.answered_at is None:
            return None
        return max(0.0, (self.answered_at - self.opened_at).total_seconds())


@dataclass(frozen=True, slots=True)
class Window:
    """One target window: how many were answered in time, out of how many are decided."""

    seconds: float
    target: float
    within: int
    decided: int

    @property
    def share(self) -> float | None:
        return self.within / self.decided if self.decided else None

    @property
    def meets_target(self) -> bool | None:
        share = self.share
        return None if share is None else share >= self.target


@dataclass(frozen=True, slots=True)
class Figures:
    """The response figures of a set of red incidents at one moment."""

    incidents: int  # red incidents, cancels left out
    cancelled: int
    answered: int
    median_ack_s: float | None
    p90_ack_s: float | None  # the same times' 90th percentile (linear, as PostgreSQL's percentile_cont)
    within_60s: Window
    within_180s: Window
    unreached: int


def _window(alarms: list[RedAlarm], seconds: float, target: float, now: datetime) -> Window:
    within = decided = 0
    for alarm in alarms:
        ack_s = alarm.ack_s
        if ack_s is not None:
            decided += 1
            within += ack_s <= seconds
        elif (now - alarm.opened_at).total_seconds() >= seconds:
            decided += 1  # ran out unanswered: late, whatever happens next
    return Window(seconds, target, within, decided)


def _percentile(values: list[float], fraction: float) -> float | None:
    """Linear interpolation between the closest ranks (PostgreSQL's ``percentile_cont``)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def figures(alarms: Iterable[RedAlarm], now: datetime) -> Figures:
    """The figures of ``alarms`` as they stand at ``now``."""
    all_alarms = list(alarms)
    counted = [a for a in all_alarms if not a.cancelled]
    times = [s for a in counted if (s := a.ack_s) is not None]
    return Figures(
        incidents=len(counted),
        cancelled=len(all_alarms) - len(counted),
        answered=len(times),
        median_ack_s=statistics.median(times) if times else None,
        p90_ack_s=_percentile(times, 0.9),
        within_60s=_window(counted, WINDOW_60S, TARGET_WITHIN_60S, now),
        within_180s=_window(counted, WINDOW_180S, TARGET_WITHIN_180S, now),
        unreached=sum(a.unreached for a in counted),
    )


# --- areas ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Area:
    id: str
    parent_id: str | None
    level: AreaLevel
    name: str


_DEPTH = {level: depth for depth, level in enumerate(AreaLevel)}


def group_of(areas: Mapping[str, Area], area_id: str | None, level: AreaLevel) -> str | None:
    """The ancestor of ``area_id`` at ``level`` (a grid's township); an area above that level is its own group.

    An unregistered wristband's incident sits at the county: it stays there rather
    than being dropped from a township breakdown.
    """
    current = areas.get(area_id) if area_id is not None else None
    while current is not None and _DEPTH[current.level] > _DEPTH[level]:
        parent = areas.get(current.parent_id) if current.parent_id is not None else None
        if parent is None:
            break
        current = parent
    return current.id if current is not None else area_id


def by_group(
    alarms: Iterable[RedAlarm], areas: Mapping[str, Area], level: AreaLevel, now: datetime
) -> dict[str, Figures]:
    """:func:`figures` for each area at ``level`` (incidents with no area under ``""``), sorted by area id."""
    groups: dict[str, list[RedAlarm]] = {}
    for alarm in alarms:
        groups.setdefault(group_of(areas, alarm.area_id, level) or "", []).append(alarm)
    return {key: figures(groups[key], now) for key in sorted(groups)}


# --- reads ------------------------------------------------------------------------------


def read_areas(conn: Conn) -> dict[str, Area]:
    """Every area, active or not (an old incident keeps its area)."""
    rows = conn.execute("SELECT id, parent_id, level, name FROM areas").fetchall()
    return {r[0]: Area(r[0], r[1], AreaLevel(r[2]), r[3]) for r in rows}


_ALARMS = f"""
    SELECT i.id, i.area_id, i.opened_at,
           (SELECT min(e.at) FROM incident_events e
            WHERE e.incident_id = i.id AND e.event = ANY(%(answers)s)) AS answered_at,
           i.state = '{IncidentState.CANCELLED}' AS cancelled,
           EXISTS (SELECT 1 FROM incident_events e WHERE e.incident_id = i.id AND e.event = %(unreached)s)
               AS unreached
    FROM incidents i
    WHERE i.severity = '{Severity.RED}' AND i.opened_at >= %(since)s AND i.opened_at < %(until)s
      AND (%(areas)s::text[] IS NULL OR i.area_id = ANY(%(areas)s))
    ORDER BY i.opened_at, i.id
"""


def read_alarms(conn: Conn, since: datetime, until: datetime, areas: list[str] | None) -> list[RedAlarm]:
    """The red incidents opened in [since, until), within ``areas`` (None: anywhere)."""
    rows = conn.execute(
        _ALARMS,
        {
            "since": since,
            "until": until,
            "areas": areas,
            "answers": list(ANSWER_EVENTS),
            "unreached": UNREACHED_EVENT,
        },
    ).fetchall()
    return [RedAlarm(int(r[0]), r[1], r[2], r[3], bool(r[4]), bool(r[5])) for r in rows]


@dataclass(frozen=True, slots=True)
class Cumulative:
    """Every red incident so far in one group, for the counters and histogram of ``/metrics``."""

    incidents: int  # cancels left out
    answered: int
    ack_seconds_sum: float
    within: tuple[int, ...]  # answered within each of ACK_BUCKETS
    unreached: int

    def __add__(self, other: Cumulative) -> Cumulative:
        return Cumulative(
            self.incidents + other.incidents,
            self.answered + other.answered,
            self.ack_seconds_sum + other.ack_seconds_sum,
            tuple(a + b for a, b in zip(self.within, other.within, strict=True)),
            self.unreached + other.unreached,
        )


_CUMULATIVE = f"""
    WITH red AS (
        SELECT i.area_id,
               extract(epoch FROM (SELECT min(e.at) FROM incident_events e
                                   WHERE e.incident_id = i.id AND e.event = ANY(%(answers)s)) - i.opened_at)
                   AS ack_s,
               EXISTS (SELECT 1 FROM incident_events e WHERE e.incident_id = i.id AND e.event = %(unreached)s)
                   AS unreached
        FROM incidents i
        WHERE i.severity = '{Severity.RED}' AND i.state <> '{IncidentState.CANCELLED}'
    )
    SELECT area_id, count(*), count(ack_s), coalesce(sum(greatest(ack_s, 0)), 0),
           count(*) FILTER (WHERE ack_s <= %(b1)s), count(*) FILTER (WHERE ack_s <= %(b2)s),
           count(*) FILTER (WHERE unreached)
    FROM red GROUP BY area_id
"""


def cumulative(conn: Conn, level: AreaLevel = AreaLevel.TOWNSHIP) -> dict[str, Cumulative]:
    """Every red incident so far, grouped by the area at ``level`` (the township)."""
    areas = read_areas(conn)
    rows = conn.execute(
        _CUMULATIVE,
        {"answers": list(ANSWER_EVENTS), "unreached": UNREACHED_EVENT, "b1": ACK_BUCKETS[0], "b2": ACK_BUCKETS[1]},
    ).fetchall()
    groups: dict[str, Cumulative] = {}
    for area_id, n, answered, total_s, in1, in2, unreached in rows:
        key = group_of(areas, area_id, level) or ""
        here = Cumulative(int(n), int(answered), float(total_s), (int(in1), int(in2)), int(unreached))
        groups[key] = groups[key] + here if key in groups else here
    return groups


# --- /metrics ---------------------------------------------------------------------------


class ResponseCollector(DatabaseCollector):
    """``shouhu_ack_seconds``, ``shouhu_red_incidents_total`` and ``shouhu_incidents_unreached_total``
    by township, read from the database at each scrape.

    Read rather than observed in-process: incidents are taken in the API (REST, consoles,
    Twilio's callbacks) and left unreached in the router, in any number of processes
    that restart; the database holds the one true count, and the figures equal the
    REST report's. Every API process exports the same counts (aggregate with ``max``,
    not ``sum``). A scrape while the database is away leaves these out rather than fail.
    """

    figures = "response figures"

    def read(self, conn: Conn) -> Iterator[Metric]:
        groups = cumulative(conn)
        ack = HistogramMetricFamily(
            "shouhu_ack_seconds",
            "Seconds from an SOS or fall to a person taking it, by township (cancels left out)",
            labels=["township"],
        )
        red = CounterMetricFamily(
            "shouhu_red_incidents",
            "Red incidents (SOS, falls) opened, by township (cancels left out)",
            labels=["township"],
        )
        unreached = CounterMetricFamily(
            "shouhu_incidents_unreached",
            "Red incidents where every step ran and nobody took them, by township",
            labels=["township"],
        )
        for township, c in sorted(groups.items()):
            buckets = [(f"{b:g}", float(n)) for b, n in zip(ACK_BUCKETS, c.within, strict=True)]
            ack.add_metric([township], [*buckets, ("+Inf", float(c.answered))], c.ack_seconds_sum)
            red.add_metric([township], c.incidents)
            unreached.add_metric([township], c.unreached)
        targets = GaugeMetricFamily(
            "shouhu_ack_target_ratio", "The telecare target share taken within the window", labels=["within_s"]
        )
        targets.add_metric([f"{WINDOW_60S:g}"], TARGET_WITHIN_60S)
        targets.add_metric([f"{WINDOW_180S:g}"], TARGET_WITHIN_180S)
        yield from (ack, red, unreached, targets)
