"""Wiring the packages into processes: settings, the database and broker to use, the
hub, the router, the care sweeper and the API, and the threads and signals that run
and stop them."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from pydantic import ValidationError

from launch.output import fail, problems_text, report_migrations, report_registry
from shouhu.mqtt_address import broker_url
from shouhu.settings import Settings

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from alerts.care_sweep import CareSweeper
    from alerts.providers import PhoneProviders
    from alerts.router import Router
    from hub.service import Hub

# The hub ended because a lane or connection broke (EX_SOFTWARE): restart it.
EXIT_HUB_FAILED = 70
TWILIO_SETTINGS = "SHOUHU_TWILIO_ACCOUNT_SID, SHOUHU_TWILIO_AUTH_TOKEN and SHOUHU_TWILIO_FROM"


def load_settings() -> Settings:
    """The settings from the environment, or a one-line failure per bad one (exit 2)."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = [
            f"  SHOUHU_{str(e['loc'][0]).upper()}: {e['msg']}" if e["loc"] else f"  {e['msg']}" for e in exc.errors()
        ]
        fail("invalid configuration:\n" + "\n".join(lines), 2)


def database_url(settings: Settings) -> str:
    """The configured database, or the embedded one a running ``shouhu up`` recorded."""
    if settings.database_url:
        return settings.database_url
    from shouhu.embedded.defaults import default_data_dir, recorded_database_url

    url = recorded_database_url(default_data_dir(settings.data_dir))
    if url is None:
        fail(
            "no database: set SHOUHU_DATABASE_URL, or start `shouhu up` to run the embedded one",
            2,
        )
    return url


def mqtt_url(settings: Settings) -> str:
    """The configured broker (with its TLS files), or the embedded one's address."""
    return broker_url(settings)


def _in_use_message(exc: OSError, host: str, port: int, setting: str) -> str:
    """Why ``host:port`` could not be listened on, and which setting moves it."""
    if exc.errno == errno.EADDRINUSE:
        why = f"port {port} is already in use on {host} (another process listens there: stop it"
    elif exc.errno == errno.EACCES:
        why = f"port {port} on {host} needs privileges this user does not have (use a port above 1023"
    else:
        why = f"cannot listen on {host}:{port}: {exc.strerror or exc} (check SHOUHU_API_HOST"
    return f"{why}, or choose another port with {setting})"


def listen(host: str, port: int, setting: str) -> socket.socket:
    """A listening socket on ``host:port``, or a one-line failure (exit 2) naming the setting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        fail(_in_use_message(exc, host, port, setting), 2)


def run_migrations(url: str, settings: Settings) -> None:
    """Migrate the schema and print what was done; a refused migration exits 1."""
    from shouhu.migrations import MigrationContext, MigrationError, migrate

    try:
        report = migrate(url, MigrationContext(settings.retention_days, datetime.now(UTC), settings.timezone))
    except MigrationError as exc:
        fail(f"migration refused: {exc}")
    report_migrations(report)


def load_registry_file(url: str, path: Path, settings: Settings | None = None) -> None:
    """Load the registry YAML at ``path`` and print the report; a bad file loads nothing.

    With ``settings`` the registry's watches that are connected to a watch gateway are
    then given their SOS numbers (``push_sos_numbers``)."""
    from devices.registry import load_registry
    from devices.registry_file import RegistryFileError, parse_registry, watch_wristbands
    from shouhu.db import connect

    try:
        registry = parse_registry(path)
    except RegistryFileError as exc:
        fail(problems_text(path, exc.problems, "nothing loaded"))
    with connect(url) as conn:
        report = load_registry(conn, registry)
    report_registry(path, report)
    watches = sorted(set(watch_wristbands(registry).values()))
    if settings is not None and watches:
        push_sos_numbers(url, settings, watches)


# How long `registry load` waits for a watch gateway's first answer (it answers every
# command at once, so silence means none runs) and then for all of them.
PUSH_FIRST_ANSWER_S = 1.0
PUSH_ANSWERS_S = 10.0


def push_sos_numbers(url: str, settings: Settings, wristbands: list[str], at: datetime | None = None) -> None:
    """Send each watch its SOS numbers as of ``at`` (now), through the broker and the
    watch gateway; print what reached connected watches. The registry is loaded either
    way: a broker or gateway that is away is reported, never an error."""
    import uuid

    from alerts.watch_numbers import sos_numbers_of
    from devices.command_exchange import BrokerUnavailable, exchange
    from devices.commands import CommandName, WatchCommand
    from shouhu.db import connect

    with connect(url) as conn:
        numbers = sos_numbers_of(conn, wristbands, at or datetime.now(UTC), settings.zone)
    commands = [
        (band, WatchCommand(command_id=uuid.uuid4().hex, command=CommandName.SET_SOS_NUMBERS, phones=phones))
        for band, phones in numbers.items()
        if phones
    ]
    nobody = len(numbers) - len(commands)
    try:
        results = exchange(broker_url(settings), commands, PUSH_ANSWERS_S, first_within=PUSH_FIRST_ANSWER_S)
    except BrokerUnavailable as exc:
        typer.echo(f"watches' SOS numbers not sent: the broker is unavailable ({exc})")
        return
    if commands and not results:
        typer.echo(f"watches' SOS numbers not sent: no watch gateway answered within {PUSH_FIRST_ANSWER_S:g} s")
        return
    delivered = sum(1 for result in results.values() if result.delivered)
    typer.echo(
        f"watches' SOS numbers: sent to {delivered} connected, "
        f"{len(results) - delivered} not connected or not written, {len(commands) - len(results)} unanswered"
        + (f"; {nobody} with nobody on duty and no guardian" if nobody else "")
    )


def serve_api(url: str, settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve the API on ``SHOUHU_API_HOST``:``SHOUHU_API_PORT`` (``sock`` if already bound)."""
    import uvicorn

    from api.main import create_app

    # Bound here, not by uvicorn: a port in use is one line naming the setting, not a traceback.
    sock = sock or listen(settings.api_host, settings.api_port, "SHOUHU_API_PORT")
    config = api_server_config(create_app(settings.model_copy(update={"database_url": url})), settings)
    uvicorn.Server(config).run(sockets=[sock])


def api_server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration of the API: behind a TLS proxy in SHOUHU_FORWARDED_ALLOW_IPS
    the request's scheme and client are the forwarded ones (session cookies ``Secure``)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="info",
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        # A console's live feed never ends by itself: without this a stop (Ctrl-C) waits
        # for every open console to be closed.
        timeout_graceful_shutdown=5,
    )


def make_hub(
    settings: Settings, url: str, broker_url: str, *, metrics_port: int | None, leave: bool = False, workers: int = 1
) -> Hub:
    from hub.service import build_hub

    # The hub owns its upkeep: it ticks it and closes it when run() ends.
    hub_worker, _upkeep = build_hub(
        settings, url, broker_url, metrics_port=metrics_port, leave=leave, workers=workers
    )
    return hub_worker


def run_hub_or_exit(worker: Hub) -> None:
    """Run the hub; if a lane or connection broke, end the whole process non-zero so its
    supervisor restarts it (the broker redelivers whatever was not acknowledged)."""
    from hub.service import GIL_SWITCH_S, LaneFailed
    from shouhu.health_server import PortInUse

    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        worker.run()
    except PortInUse as exc:
        fail(str(exc), 2)
    except LaneFailed as exc:
        logging.getLogger("shouhu.hub").critical("hub failed: %s; exiting", exc)
        sys.stderr.flush()
        os._exit(EXIT_HUB_FAILED)


def phone_providers(settings: Settings) -> PhoneProviders:
    """The configured phone providers' notifiers and the default choice
    (``SHOUHU_PHONE_PRIMARY`` / ``_SECONDARY``, else the one provider configured).

    A provider named but not configured is a one-line failure (exit 2).
    """
    from alerts.providers import PhoneProviders, configured_notifiers, settings_choice

    notifiers = configured_notifiers(settings)
    try:
        default = settings_choice(settings)
    except ValueError as exc:
        fail(str(exc), 2)
    try:
        phone = PhoneProviders.build(notifiers, default)
    except ValueError as exc:
        fail(str(exc), 2)
    if default is not None:
        for field, why in phone.unconfigured(default):
            fail(f"SHOUHU_PHONE_{field.upper()}: {why}", 2)
    return phone


def check_area_providers(url: str, phone: PhoneProviders) -> None:
    """Every provider the registry names for an area is configured, or a failure naming the area and field."""
    import psycopg

    from alerts.providers import area_choices
    from shouhu.db import connect

    try:
        with connect(url) as conn:
            choices = area_choices(conn)
    except psycopg.OperationalError as exc:
        # The router waits for its database as it always has; a page on a provider that
        # turns out not to be configured fails over to the area's other one when sent.
        typer.secho(f"registry phone providers not checked: the database is unreachable ({exc})", err=True)
        return
    problems = [
        f"phone_providers (area {area}) field '{field}': {why}"
        for area, choice in choices
        for field, why in phone.unconfigured(choice)
    ]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        fail(f"the registry names phone providers that are not configured:\n{lines}", 2)


def make_router(settings: Settings, url: str, *, exercise: bool = False, phone_optional: bool = False) -> Router:
    """The escalation worker with its notifiers.

    ``phone_optional`` (``shouhu up``): with no phone provider configured it runs on the
    consoles and the emergency platform alone, and says so loudly; ``shouhu router``
    refuses to. Every provider the settings or the registry name must be configured.
    """
    from alerts.notifiers.console import ConsoleNotifier
    from alerts.notifiers.webhook import WebhookNotifier
    from alerts.router import Router, RouterConfig

    phone = phone_providers(settings)
    if phone.default is not None:
        check_area_providers(url, phone)
    elif phone_optional:
        typer.secho(
            "NO PHONE PROVIDER: no SMS and no voice call will go out; SOS pages reach only the consoles"
            " and the emergency platform.\n"
            f"  To page by phone set {TWILIO_SETTINGS} (or SHOUHU_ALIYUN_*); to try Shouhu with a simulated"
            " phone network,"
            " run `shouhu up --demo`.",
            fg=typer.colors.RED,
            bold=True,
            err=True,
        )
    else:
        fail(
            f"{TWILIO_SETTINGS} (or SHOUHU_ALIYUN_*) must be set: without a phone provider the router cannot"
            " page anyone by phone",
            2,
        )
    platform = None
    if settings.emergency_webhook_url:
        try:
            platform = WebhookNotifier.from_settings(settings, exercise=exercise)
        except ValueError as exc:
            fail(str(exc), 2)
    else:
        typer.secho(
            "SHOUHU_EMERGENCY_WEBHOOK_URL is not set: the emergency-platform step will record no_recipients",
            fg=typer.colors.YELLOW,
            err=True,
        )
    return Router(
        url,
        RouterConfig(router_id=f"router-{settings.hub_id}", zone=settings.zone),
        phone,
        console=ConsoleNotifier(),
        platform=platform,
        exercise=exercise,
    )


def care_sweeper(settings: Settings, url: str) -> CareSweeper:
    """Visits, repairs and battery notices run beside the router (one leader across routers)."""
    from alerts.care_sweep import CareRules, CareSweeper

    return CareSweeper(url, CareRules.from_settings(settings))


def run_until_signal(stop: Callable[[], None]) -> None:
    """Call ``stop`` on SIGTERM or SIGINT."""

    def handler(_signum: int, _frame: object) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def resolve_broker(settings: Settings, stack: ExitStack, port: int | None = None) -> str:
    """The configured broker, one already on the local port (``port``, by default the
    embedded one's), or a local one started now and stopped with ``stack``: Mosquitto
    when installed (its state under the data directory), else the embedded amqtt."""
    if settings.mqtt_url:
        return broker_url(settings)
    from shouhu.embedded.broker import DEFAULT_PORT, is_listening, start_embedded_broker
    from shouhu.embedded.defaults import default_data_dir
    from shouhu.embedded.mosquitto import mosquitto_binary, start_local_mosquitto

    local = DEFAULT_PORT if port is None else port
    url = f"mqtt://127.0.0.1:{local}"
    if is_listening("127.0.0.1", local):
        typer.echo(f"MQTT: using the broker already listening on 127.0.0.1:{local}")
        return url
    binary = mosquitto_binary()
    if binary is not None:
        directory = default_data_dir(settings.data_dir) / "mosquitto"
        stack.callback(stop_process, start_local_mosquitto(directory, local, binary))
        typer.echo(f"MQTT: Mosquitto on 127.0.0.1:{local}, its sessions kept in {directory}")
        return url
    stack.callback(stop_process, start_embedded_broker(local))
    typer.echo(f"MQTT: embedded broker (amqtt, MQTT 3.1.1) on 127.0.0.1:{local}")
    # Measured (docs/BENCHMARKS.md): amqtt acknowledges a burst of QoS 1 messages and
    # delivers a few percent of it. Fine for the demo's 50 msg/s; say so plainly.
    typer.secho(
        "MQTT: the embedded broker is for a demo: it loses messages under a burst. For anything else install"
        " Mosquitto (apt-get install mosquitto; with its system service stopped, `systemctl disable --now"
        " mosquitto`, `shouhu up` starts its own, its state in the data directory), or set SHOUHU_MQTT_URL.",
        err=True,
    )
    return url


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(10)
