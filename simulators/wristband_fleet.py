"""The county's wristbands, simulated: telemetry every interval — battery draining and
charging, worn or not, heart rate and SpO₂ while worn, steps by day, positions near
home — and bands whose battery fails.

Each band publishes its retained ``status`` ``online`` when it first connects, then
``telemetry`` every interval (the registry's ``heartbeat_interval_s`` for it, else
the fleet's). Its elder has one of three habits:

- ``wears``: worn, until the battery runs low; then it comes off to charge (not worn)
  and goes back on once charged;
- ``drawer``: left in a drawer, never worn (the hub's not-worn visit);
- ``failing``: a battery that no longer holds a charge: it drops a point a report, and
  at 0 % the band dies: its last report, and one interval later its Last Will
  ``offline``, as the broker publishes it once it notices the silence (the hub's
  offline visit).

With ``falls_per_hour`` a worn band now and then detects a fall: an alarm, which the
connection re-sends until the hub's receipt (:class:`simulators.fleet.MqttPublisher`).
SOS presses are a person's, not the fleet's: ``shouhu simulate wristbands --press``.

Deterministic: each band draws from its own generator seeded by the fleet's seed and
its id; local days (steps) are in the zone given, from the times the core is asked at.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from simulators.fleet import Publish, Schedule, WristbandSpec, json_message, rfc3339, status

KIND = "wristband"
LOW_BATTERY_PCT = 20  # only for the summary line: SHOUHU_BATTERY_LOW_PCT's default


class Habit(StrEnum):
    WEARS = "wears"
    DRAWER = "drawer"
    FAILING = "failing"


@dataclass(frozen=True, slots=True)
class WristbandPace:
    """How the fleet behaves; the defaults suit a demo watched for minutes."""

    interval_s: float = 60.0  # between telemetry reports, where the registry sets none
    drain_pct_per_h: float = 2.0
    charge_pct_per_h: float = 60.0
    drawer_share: float = 0.03
    failing_share: float = 0.02
    day_hours: tuple[int, int] = (7, 20)  # local hours an elder is up and about
    walk_share: float = 0.25  # chance, each report by day, that a worn band's elder sets out or comes home
    falls_per_hour: float = 0.0  # across the whole fleet; only a worn band detects a fall

    def __post_init__(self) -> None:
        """Refuse a pace that would never report."""
        if self.interval_s <= 0 or self.drain_pct_per_h < 0 or self.charge_pct_per_h <= 0 or self.falls_per_hour < 0:
            raise ValueError(f"invalid wristband pace: {self}")


@dataclass(slots=True)
class _Band:
    spec: WristbandSpec
    rng: random.Random
    interval: timedelta
    habit: Habit
    battery: float
    charge_at: float
    heart_rate: float
    charging: bool = False
    steps: int = 0
    day: date | None = None
    walking: bool = False
    dlat: float = 0.0
    dlon: float = 0.0
    connected: bool = False
    flat: bool = False  # the battery is empty: its last report went out
    dead: bool = False  # and its Last Will too
    counter: int = 0

    @property
    def worn(self) -> bool:
        return self.habit is not Habit.DRAWER and not self.charging and not self.flat


class WristbandFleet:
    """The wristbands of a registry, stepped by the times they are asked at."""

    name = "wristbands"

    def __init__(
        self,
        bands: Sequence[WristbandSpec],
        *,
        seed: int,
        start: datetime,
        zone: ZoneInfo,
        boot_id: str,
        pace: WristbandPace | None = None,
        stretch: float = 1.0,
    ) -> None:
        """Set every band up and schedule its first report within its first interval.

        Args: as :class:`simulators.camera_fleet.CameraFleet`.
        """
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self.pace = pace or WristbandPace()
        self.zone = zone
        self.boot_id = boot_id
        self.bands: list[_Band] = []
        self.schedule = Schedule()
        self.falls = 0
        self._falls_per_band_h = self.pace.falls_per_hour / max(len(bands), 1)
        for index, spec in enumerate(bands):
            rng = random.Random(f"{seed}:{spec.id}")  # noqa: S311 - a simulation, not a secret
            interval = timedelta(seconds=(spec.interval_s or self.pace.interval_s) * stretch)
            draw = rng.random()
            if draw < self.pace.failing_share:
                habit, battery = Habit.FAILING, rng.uniform(2, 5)
            elif draw < self.pace.failing_share + self.pace.drawer_share:
                habit, battery = Habit.DRAWER, rng.uniform(40, 90)
            else:
                habit, battery = Habit.WEARS, rng.uniform(18, 100)
            band = _Band(
                spec, rng, interval, habit, battery, charge_at=rng.uniform(5, 15), heart_rate=rng.uniform(62, 84)
            )
            self.bands.append(band)
            # First reports spread over the fleet's interval (a device reports on connecting).
            self.schedule.add(start + min(interval, timedelta(seconds=self.pace.interval_s)) * rng.random(), index)

    @property
    def intervals_s(self) -> list[float]:
        return [b.interval.total_seconds() for b in self.bands]

    def next_at(self) -> datetime | None:
        return self.schedule.next_at()

    def due(self, now: datetime) -> list[Publish]:
        """Every message due at or before ``now``, in the order the bands were due."""
        messages: list[Publish] = []
        for at, index in self.schedule.pop_due(now):
            band = self.bands[index]
            messages.extend(self._tick(band, at))
            if not band.dead:  # a dead band is heard no more
                self.schedule.add(at + band.interval, index)
        return messages

    def habits(self) -> dict[str, Habit]:
        return {b.spec.id: b.habit for b in self.bands}

    def summary(self) -> str:
        live = [b for b in self.bands if not b.flat]
        worn = sum(b.worn for b in live)
        charging = sum(b.charging for b in live)
        low = sum(round(b.battery) <= LOW_BATTERY_PCT for b in live)
        dead = len(self.bands) - len(live)
        return (
            f"{worn} worn, {len(live) - worn} not worn ({charging} charging), {dead} dead; "
            f"{low} at or below {LOW_BATTERY_PCT} %" + (f"; {self.falls} falls" if self.falls else "")
        )

    # -- one band ------------------------------------------------------------------------

    def _tick(self, band: _Band, at: datetime) -> list[Publish]:
        sent: list[Publish] = []
        if not band.connected:
            band.connected = True
            sent.append(status(KIND, band.spec.id, online=True))
        local = at.astimezone(self.zone)
        if band.day != local.date():
            band.day, band.steps = local.date(), 0
        if band.flat:
            # The broker has noticed the silent connection: it publishes the Last Will.
            band.dead = True
            return [*sent, status(KIND, band.spec.id, online=False)]
        self._battery(band)
        if band.battery <= 0:
            band.battery, band.flat = 0.0, True
            return [*sent, self._telemetry(band, at, daytime=False)]  # its last report
        daytime = self.pace.day_hours[0] <= local.hour < self.pace.day_hours[1]
        sent.append(self._telemetry(band, at, daytime=daytime))
        if self._falls_per_band_h and band.worn and band.rng.random() < self._fall_chance(band):
            sent.append(self._fall(band, at))
        return sent

    def _fall_chance(self, band: _Band) -> float:
        return 1 - math.exp(-self._falls_per_band_h * band.interval.total_seconds() / 3600)

    def _fall(self, band: _Band, at: datetime) -> Publish:
        """A fall the band detected: an alarm, re-sent until the hub's receipt."""
        self.falls += 1
        band.counter += 1
        body: dict[str, Any] = {
            "msg_id": f"{self.boot_id}-{band.counter:010d}",
            "ts": rfc3339(at, self.zone),
            "confidence": round(band.rng.uniform(0.75, 0.99), 2),
        }
        if band.spec.lat is not None and band.spec.lon is not None:
            body["lat"] = round(band.spec.lat + band.dlat, 6)
            body["lon"] = round(band.spec.lon + band.dlon, 6)
        return json_message(KIND, band.spec.id, "fall", body)

    def _battery(self, band: _Band) -> None:
        hours = band.interval.total_seconds() / 3600
        if band.habit is Habit.FAILING:
            band.battery -= 1.0
        elif band.charging:
            band.battery = min(100.0, band.battery + self.pace.charge_pct_per_h * hours)
            if band.battery >= 95:
                band.charging = False  # back on the wrist
        else:
            band.battery = max(0.0, band.battery - self.pace.drain_pct_per_h * hours)
            if band.habit is Habit.WEARS and band.battery <= band.charge_at:
                band.charging = True  # off the wrist, on the charger

    def _move(self, band: _Band, daytime: bool) -> None:
        rng = band.rng
        if band.worn and daytime and rng.random() < self.pace.walk_share:
            band.walking = not band.walking
        if not (band.worn and daytime):
            band.walking = False
        if band.walking:
            # A stroll: a few tens of metres a report, never far from home.
            band.dlat = max(-0.004, min(0.004, band.dlat + rng.uniform(-0.0003, 0.0003)))
            band.dlon = max(-0.004, min(0.004, band.dlon + rng.uniform(-0.0003, 0.0003)))
            band.steps += rng.randint(10, 30) * max(1, round(band.interval.total_seconds() / 60))
        else:
            band.dlat, band.dlon = band.dlat * 0.3, band.dlon * 0.3  # home again
            if band.worn and daytime:
                band.steps += rng.randint(0, 8)

    def _telemetry(self, band: _Band, at: datetime, *, daytime: bool) -> Publish:
        self._move(band, daytime)
        band.counter += 1
        rng = band.rng
        body: dict[str, Any] = {
            "msg_id": f"{self.boot_id}-{band.counter:010d}",
            "ts": rfc3339(at, self.zone),
            "battery": round(band.battery),
            "worn": band.worn,
            "steps": band.steps,
        }
        if band.worn:
            effort = 14 if band.walking else 0
            body["heart_rate"] = max(40, min(160, round(band.heart_rate + effort + rng.gauss(0, 3))))
            body["spo2"] = rng.randint(94, 99)
        if band.spec.lat is not None and band.spec.lon is not None:
            # GPS scatter of a few metres around where the elder is.
            body["lat"] = round(band.spec.lat + band.dlat + rng.gauss(0, 0.00003), 6)
            body["lon"] = round(band.spec.lon + band.dlon + rng.gauss(0, 0.00003), 6)
        return json_message(KIND, band.spec.id, "telemetry", body)
