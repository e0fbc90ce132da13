"""The simulated fleets as processes: ``shouhu simulate cameras``,
``shouhu simulate wristbands --fleet``, and the two beside ``shouhu up --demo``.

The fleets themselves (deterministic, no broker) are in :mod:`simulators`; here they
get a registry file, a broker, the wall clock, a rate bound and a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from pathlib import Path

import typer

from launch.output import fail
from shouhu.settings import Settings
from simulators.camera_fleet import CameraFleet, CameraPace
from simulators.fleet import (
    Fleet,
    MqttPublisher,
    RateBound,
    Receipt,
    RegistryFileError,
    read_registry,
    run_fleet,
    stretch,
)
from simulators.watch import FleetCounts
from simulators.watch import run_fleet as run_watch_fleet
from simulators.wristband_fleet import WristbandFleet, WristbandPace

DEFAULT_RATE = 50.0


class FleetKind(StrEnum):
    CAMERAS = "cameras"
    WRISTBANDS = "wristbands"


@dataclass(frozen=True, slots=True)
class FleetOptions:
    """What the verbs' flags choose."""

    registry: Path
    seed: int
    rate: float  # messages a second, at most
    interval_s: float  # for devices whose registry entry sets no heartbeat interval
    falls_per_hour: float = 0.0  # wristbands: falls across the fleet, each re-sent until its receipt
    # Wristbands: leave out those with a watch id (the demo runs them as TCP watches).
    without_watches: bool = False


def build_fleet(kind: FleetKind, options: FleetOptions, settings: Settings, start: datetime) -> tuple[Fleet, str]:
    """The fleet of ``kind`` from the registry file, paced within ``options.rate``; and
    the line that says what it will publish."""
    try:
        registry = read_registry(options.registry)
    except RegistryFileError as exc:
        fail(f"--registry: {exc}", 2)
    boot_id = uuid.uuid4().hex[:12]  # a new one each run: msg_ids stay unique per device
    fleet: CameraFleet | WristbandFleet
    if kind is FleetKind.CAMERAS:
        specs_s = [c.interval_s or options.interval_s for c in registry.cameras]
        factor = stretch(specs_s, options.rate)
        fleet = CameraFleet(
            registry.cameras,
            seed=options.seed,
            start=start,
            zone=settings.zone,
            boot_id=boot_id,
            pace=CameraPace(interval_s=options.interval_s),
            stretch=factor,
        )
        what = "a health report"
    else:
        bands = [b for b in registry.wristbands if not (options.without_watches and b.watch_id)]
        specs_s = [b.interval_s or options.interval_s for b in bands]
        factor = stretch(specs_s, options.rate)
        fleet = WristbandFleet(
            bands,
            seed=options.seed,
            start=start,
            zone=settings.zone,
            boot_id=boot_id,
            pace=WristbandPace(interval_s=options.interval_s, falls_per_hour=options.falls_per_hour),
            stretch=factor,
        )
        what = "telemetry"
    if not fleet.intervals_s:
        fail(f"--registry: {options.registry} has no active {kind.value}", 2)
    steady = sum(1 / s for s in fleet.intervals_s)
    line = (
        f"{kind.value}: {len(fleet.intervals_s)} from {options.registry.name}, {what} every "
        f"{options.interval_s * factor:g} s (seed {options.seed}): about {steady:.1f} messages/s, "
        f"at most {options.rate:g}/s (--rate)"
    )
    if factor > 1:
        line += f"; intervals stretched ×{factor:.2f} to stay within --rate"
    window = settings.heartbeat_interval_s * settings.heartbeat_misses
    if options.interval_s * factor > window:
        line += f" — longer than the hub's heartbeat window ({window} s): the hub will see them go offline"
    return fleet, line


def run(
    kind: FleetKind,
    options: FleetOptions,
    settings: Settings,
    broker_url: str,
    stop: threading.Event,
    echo: Callable[[str], None] = typer.echo,
) -> int:
    """Run one fleet against the broker until ``stop`` is set; the messages published.

    Exits 1 when an alarm (a fall) is still without its receipt a re-send after the
    stop, as ``--press`` does.
    """
    fleet, line = build_fleet(kind, options, settings, datetime.now(UTC))
    echo(line)

    def receipted(receipt: Receipt) -> None:
        echo(
            f"{receipt.device_id}: fall {receipt.msg_id}: receipt: incident {receipt.incident} ({receipt.state})"
            f" after {receipt.sends} send(s)"
        )

    try:
        publisher = MqttPublisher(broker_url, f"shouhu-sim-{kind.value}-{uuid.uuid4().hex[:8]}", on_receipt=receipted)
    except OSError as exc:
        fail(f"cannot reach the MQTT broker at {broker_url} ({exc}): start it, or set SHOUHU_MQTT_URL", 2)
    try:
        published = run_fleet(
            fleet,
            publisher.publish,
            clock=lambda: datetime.now(UTC),
            wait=stop.wait,
            bound=RateBound(options.rate),
            report=lambda report: echo(report.line()),
        )
        unreceipted = _await_receipts(publisher)
    finally:
        publisher.close()
    if unreceipted:
        fail(f"{kind.value}: {len(unreceipted)} fall(s) got no receipt (is `shouhu hub` running?)", 1)
    return published


def _await_receipts(publisher: MqttPublisher) -> list[tuple[str, str]]:
    """Alarms still without a receipt once one more re-send has had its time."""
    pause = threading.Event()  # never set: a wait that cannot be cut short
    for _ in range(int(publisher.resend_s * 10) + 1):
        if not publisher.unreceipted:
            break
        pause.wait(0.1)
    return publisher.unreceipted


def start_demo_fleets(
    settings: Settings, broker_url: str, registry: Path, watch_port: int, stop: threading.Event
) -> None:
    """Both fleets on threads beside ``shouhu up --demo``, reporting at the hub's
    heartbeat interval, until ``stop`` is set; the registry's wristbands that have a
    watch id are simulated 4G watches instead, speaking TCP to the watch gateway."""
    from launch.wiring import start_thread

    for kind in FleetKind:
        options = FleetOptions(
            registry, seed=1, rate=DEFAULT_RATE, interval_s=settings.heartbeat_interval_s, without_watches=True
        )
        start_thread(partial(_quietly, run, kind, options, settings, broker_url, stop), f"fleet-{kind.value}")
    watch_ids = read_registry(registry).watch_ids
    if watch_ids:
        interval_s = settings.heartbeat_interval_s
        start_thread(lambda: _watches_quietly(watch_ids, watch_port, interval_s, stop), "fleet-watches")


def _watches_quietly(watch_ids: list[str], port: int, interval_s: float, stop: threading.Event) -> None:
    try:
        run_watches(watch_ids, port, interval_s, stop)
    except Exception as exc:  # as _quietly: the demo goes on without its watches
        typer.secho(f"watches: the simulated watches stopped: {exc}", err=True, fg=typer.colors.RED)


def run_watches(
    watch_ids: list[str], port: int, interval_s: float, stop: threading.Event, echo: Callable[[str], None] = typer.echo
) -> FleetCounts:
    """Simulated 4G watches heartbeating to the watch gateway on this host until ``stop``."""

    async def watches() -> None:
        await run_watch_fleet("127.0.0.1", port, watch_ids, interval_s=interval_s, counts=counts)

    finished = threading.Event()  # the fleet ended by itself: the waiting thread ends too

    def wait_for_stop() -> None:
        while not stop.wait(0.5) and not finished.is_set():
            pass

    async def stopped() -> None:
        await asyncio.to_thread(wait_for_stop)

    async def until_stopped() -> None:
        fleet, waiting = asyncio.create_task(watches()), asyncio.create_task(stopped())
        await asyncio.wait({fleet, waiting}, return_when=asyncio.FIRST_COMPLETED)
        fleet.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fleet
        finished.set()
        await waiting

    counts = FleetCounts()
    echo(f"watches: {len(watch_ids)} from the registry, a heartbeat (LK) every {interval_s:g} s to 127.0.0.1:{port}")
    asyncio.run(until_stopped())
    echo(f"watches: {counts.connected} connected, {counts.answered} of {counts.heartbeats} heartbeats answered")
    for error in counts.errors[:10]:
        echo(f"  {error}")
    return counts


def _quietly(
    target: Callable[[FleetKind, FleetOptions, Settings, str, threading.Event], int],
    kind: FleetKind,
    options: FleetOptions,
    settings: Settings,
    broker_url: str,
    stop: threading.Event,
) -> None:
    try:
        target(kind, options, settings, broker_url, stop)
    except Exception as exc:  # a demo fleet that fails must say so, not take the demo down
        typer.secho(f"{kind.value}: the simulated fleet stopped: {exc}", err=True, fg=typer.colors.RED)
