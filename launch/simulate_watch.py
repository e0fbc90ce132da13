"""`shouhu simulate watch`: simulated 4G watches (simulators/watch.py) against a gateway."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass

import typer

from launch.output import fail
from shouhu.settings import Settings
from simulators.watch import FleetCounts, fleet_ids, press_alarm, run_fleet


@dataclass(frozen=True, slots=True)
class PressOptions:
    press: list[str]
    fall: list[str]
    receipt_timeout_s: float
    resend_s: float


@dataclass(frozen=True, slots=True)
class FleetOptions:
    size: int
    first_id: str
    heartbeats: int  # per watch; 0: until SIGTERM or SIGINT
    interval_s: float
    answer_s: float


def _gateway_address(settings: Settings, gateway: str) -> tuple[str, int]:
    host, _, port = (gateway or f"127.0.0.1:{settings.watch_port}").rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        fail(f"--gateway: {gateway!r} is not HOST:PORT", 2)
    return host, int(port)


def _presses(settings: Settings, host: str, port: int, options: PressOptions) -> int:
    """Each alarm until answered; the number never answered."""
    unanswered = 0
    alarms = [*((w, False) for w in options.press), *((w, True) for w in options.fall)]
    for watch_id, is_fall in alarms:
        label = "fall" if is_fall else "SOS press"
        try:
            result = asyncio.run(
                press_alarm(
                    host,
                    port,
                    watch_id,
                    zone=settings.zone,
                    fall=is_fall,
                    resend_s=options.resend_s,
                    timeout_s=options.receipt_timeout_s,
                )
            )
        except ValueError as exc:
            fail(f"--{'fall' if is_fall else 'press'}: {exc}", 2)
        if result.answered:
            typer.echo(f"{watch_id}: {label} answered (AL) after {result.sends} send(s)")
        else:
            unanswered += 1
            typer.secho(
                f"{watch_id}: {label} not answered within {options.receipt_timeout_s:.0f}s after {result.sends}"
                " send(s) (is `shouhu gateway watch` running, the hub with it?)",
                err=True,
            )
    return unanswered


def _fleet(host: str, port: int, options: FleetOptions) -> int:
    """The fleet until its heartbeats are sent (or a signal); the number of failed watches."""
    try:
        ids = fleet_ids(options.first_id, options.size)
    except ValueError as exc:
        fail(f"--first-id: {exc}", 2)
    typer.echo(f"fleet: {options.size} watches from {ids[0]} to {host}:{port}")
    counts = FleetCounts()
    # SIGTERM as SIGINT: both end a fleet that runs until stopped, with its counts printed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        asyncio.run(
            run_fleet(
                host,
                port,
                ids,
                heartbeats=options.heartbeats,
                interval_s=options.interval_s,
                answer_s=options.answer_s,
                counts=counts,
            )
        )
    except KeyboardInterrupt:
        typer.echo("fleet: stopped")
    typer.echo(f"fleet: {counts.connected} connected, {counts.answered} of {counts.heartbeats} heartbeats answered")
    for error in counts.errors[:10]:
        typer.secho(f"  {error}", err=True)
    return len(counts.errors)


def simulate_watches(settings: Settings, gateway: str, presses: PressOptions, fleet: FleetOptions) -> None:
    """The presses, then the fleet; exit 1 if an alarm or a heartbeat went unanswered."""
    host, port = _gateway_address(settings, gateway)
    failed = _presses(settings, host, port, presses)
    if fleet.size:
        failed += _fleet(host, port, fleet)
    if failed:
        raise typer.Exit(1)
