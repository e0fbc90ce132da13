"""The county's cameras, simulated: a health report every interval, outages with the
reasons cameras give, flapping cameras, and repairs.

Each camera publishes its retained ``status`` ``online`` when it first connects, a
second later its first ``health`` report, then one every interval (the registry's ``heartbeat_interval_s`` for it,
else the fleet's). An outage is one of:

- ``video_lost`` and ``storage``: the camera is up and says so every interval
  (``"online": false`` with the reason) until repaired;
- ``power`` and ``network``: its last word is a health report with the reason, then
  silence until repaired; back, it publishes ``status`` ``online`` again, as a device
  does on reconnecting.

A few cameras are flaky: short outages, often, so the hub's repair orders see flaps.

Deterministic: each camera draws from its own generator seeded by the fleet's seed
and its id, and only the times the core is asked at move it on — no clock, no broker.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from simulators.fleet import CameraSpec, Publish, Schedule, json_message, rfc3339, status

KIND = "camera"


class Outage(StrEnum):
    """Why a camera is down, as its health report says (docs/contract.md, "Payloads")."""

    VIDEO_LOST = "video_lost"
    POWER = "power"
    NETWORK = "network"
    STORAGE = "storage"


# The camera falls silent after saying why: no power, no network.
SILENT = frozenset({Outage.POWER, Outage.NETWORK})
# How often each reason is the cause, relative to the others.
WEIGHTS = {Outage.VIDEO_LOST: 4, Outage.NETWORK: 3, Outage.POWER: 2, Outage.STORAGE: 1}
# A camera's first health report follows its connection (and its status) by this:
# its video pipeline comes up after the network.
GREETING = timedelta(seconds=1)
# A flaky camera's outages: a picture or link that drops for a moment.
FLAKY_REASONS = (Outage.VIDEO_LOST, Outage.NETWORK)


@dataclass(frozen=True, slots=True)
class CameraPace:
    """How the fleet behaves; the defaults suit a demo watched for minutes."""

    interval_s: float = 60.0  # between health reports, where the registry sets none
    mtbf_s: float = 7200.0  # mean time between outages of one camera
    repair_s: tuple[float, float] = (120.0, 900.0)  # an outage lasts this long (uniform)
    down_at_start: float = 0.1  # share of cameras already out when the fleet starts
    flaky_share: float = 0.06  # share of cameras that flap
    flap_every_intervals: float = 4.0  # a flaky camera's mean time between outages, in intervals
    flap_intervals: tuple[float, float] = (1.0, 2.5)  # a flap lasts this many intervals

    def __post_init__(self) -> None:
        """Refuse a pace that would never report or never repair."""
        if self.interval_s <= 0 or self.mtbf_s <= 0 or not 0 < self.repair_s[0] <= self.repair_s[1]:
            raise ValueError(f"invalid camera pace: {self}")


@dataclass(slots=True)
class _Camera:
    spec: CameraSpec
    rng: random.Random
    interval: timedelta
    flaky: bool
    outage: Outage | None = None
    back_at: datetime | None = None
    connected: bool = False
    greeted: bool = False  # its first health report since connecting went out
    counter: int = 0


class CameraFleet:
    """The cameras of a registry, stepped by the times they are asked at."""

    name = "cameras"

    def __init__(
        self,
        cameras: Sequence[CameraSpec],
        *,
        seed: int,
        start: datetime,
        zone: ZoneInfo,
        boot_id: str,
        pace: CameraPace | None = None,
        stretch: float = 1.0,
    ) -> None:
        """Set every camera up and schedule its first report within its first interval.

        Args:
            cameras: the registry's active cameras.
            seed: the same seed gives the same fleet.
            start: when the fleet starts (timezone-aware).
            zone: the zone of the payloads' ``ts``.
            boot_id: this run's part of every ``msg_id`` (``{boot_id}-{counter}``): a
                new one each run, so ids stay unique for each camera's whole life.
            pace: the fleet's behaviour.
            stretch: every interval is multiplied by this (≥ 1), to keep a rate bound.
        """
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self.pace = pace or CameraPace()
        self.zone = zone
        self.boot_id = boot_id
        self.cameras: list[_Camera] = []
        self.schedule = Schedule()
        for index, spec in enumerate(cameras):
            rng = random.Random(f"{seed}:{spec.id}")  # noqa: S311 - a simulation, not a secret
            interval = timedelta(seconds=(spec.interval_s or self.pace.interval_s) * stretch)
            camera = _Camera(spec, rng, interval, flaky=rng.random() < self.pace.flaky_share)
            if rng.random() < self.pace.down_at_start:
                camera.outage = self._reason(camera)
                camera.back_at = start + self._repair_time(camera)
            self.cameras.append(camera)
            # First reports spread over the fleet's interval (a device reports on connecting).
            self.schedule.add(start + min(interval, timedelta(seconds=self.pace.interval_s)) * rng.random(), index)

    @property
    def intervals_s(self) -> list[float]:
        return [c.interval.total_seconds() for c in self.cameras]

    def next_at(self) -> datetime | None:
        return self.schedule.next_at()

    def due(self, now: datetime) -> list[Publish]:
        """Every message due at or before ``now``, in the order the cameras were due."""
        messages: list[Publish] = []
        for at, index in self.schedule.pop_due(now):
            camera = self.cameras[index]
            sent, next_at = self._tick(camera, at)
            messages.extend(sent)
            self.schedule.add(next_at, index)
        return messages

    def offline(self) -> dict[str, Outage]:
        """Each camera out right now and why."""
        return {c.spec.id: c.outage for c in self.cameras if c.outage is not None}

    def summary(self) -> str:
        reasons = Counter(self.offline().values())
        detail = ", ".join(f"{reason} {reasons[reason]}" for reason in Outage if reasons[reason])
        out = sum(reasons.values())
        flaky = sum(c.flaky for c in self.cameras)
        return (
            f"{len(self.cameras) - out} online, {out} offline"
            + (f" ({detail})" if detail else "")
            + (f", {flaky} flaky")
        )

    # -- one camera ----------------------------------------------------------------------

    def _reason(self, camera: _Camera) -> Outage:
        if camera.flaky:
            return camera.rng.choice(FLAKY_REASONS)
        return camera.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]

    def _repair_time(self, camera: _Camera) -> timedelta:
        if camera.flaky:
            return camera.interval * camera.rng.uniform(*self.pace.flap_intervals)
        return timedelta(seconds=camera.rng.uniform(*self.pace.repair_s))

    def _breaks(self, camera: _Camera) -> bool:
        mean_s = camera.interval.total_seconds() * self.pace.flap_every_intervals if camera.flaky else self.pace.mtbf_s
        return camera.rng.random() < 1 - math.exp(-camera.interval.total_seconds() / mean_s)

    def _tick(self, camera: _Camera, at: datetime) -> tuple[list[Publish], datetime]:
        if not camera.connected:
            # (Re)connected: its status now, its first health report a moment later.
            camera.connected, camera.greeted = True, False
            return [status(KIND, camera.spec.id, online=True)], at + min(GREETING, camera.interval / 2)
        if not camera.greeted:
            camera.greeted = True
            return [self._health(camera, at)], self._next(camera, at)
        if camera.outage is not None and camera.back_at is not None and at >= camera.back_at:
            was = camera.outage
            camera.outage = camera.back_at = None
            if was in SILENT:
                camera.connected = False  # repaired: it connects again
                return self._tick(camera, at)
        elif camera.outage is not None:
            sent = [] if camera.outage in SILENT else [self._health(camera, at)]
            return sent, self._next(camera, at)
        elif self._breaks(camera):
            camera.outage = self._reason(camera)
            camera.back_at = at + self._repair_time(camera)
        return [self._health(camera, at)], self._next(camera, at)

    def _next(self, camera: _Camera, at: datetime) -> datetime:
        if camera.outage in SILENT and camera.back_at is not None:
            return max(camera.back_at, at + timedelta(microseconds=1))  # silent until repaired
        return at + camera.interval

    def _health(self, camera: _Camera, at: datetime) -> Publish:
        camera.counter += 1
        body: dict[str, Any] = {"msg_id": f"{self.boot_id}-{camera.counter:010d}", "ts": rfc3339(at, self.zone)}
        if camera.outage is None:
            body |= {
                "online": True,
                "fps": camera.rng.choice((25, 25, 25, 24, 20)),
                "bitrate_kbps": round(camera.rng.gauss(2048, 120)),
                "storage_ok": True,
            }
        else:
            body |= {
                "online": False,
                "reason": camera.outage.value,
                "fps": 0,
                "bitrate_kbps": 0,
                "storage_ok": camera.outage is not Outage.STORAGE,
            }
        return json_message(KIND, camera.spec.id, "health", body)
