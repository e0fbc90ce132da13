"""The ``shouhu`` command line: every verb of DESIGN.md.

A verb whose issue has not landed says so and exits with status 3; it never
pretends to run.
"""

from __future__ import annotations

import asyncio
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
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn
from urllib.parse import urlsplit

import typer
from pydantic import ValidationError

from shouhu.settings import TWILIO_DEFAULT_API_BASE, Settings

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from alerts.care_sweep import CareSweeper
    from alerts.router import Router
    from hub.service import Hub

# Plain help: typer's rich help prints a "<bool>" type column beside every flag.
app = typer.Typer(
    name="shouhu",
    help="Shouhu (守护): elder-care and safety monitoring hub.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
registry_app = typer.Typer(
    help="The registry of areas, people and devices.", no_args_is_help=True, rich_markup_mode=None
)
token_app = typer.Typer(help="API bearer tokens.", no_args_is_help=True, rich_markup_mode=None)
simulate_app = typer.Typer(
    help="Simulated wristbands, cameras, phone network and emergency platform.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(registry_app, name="registry")
app.add_typer(token_app, name="token")
app.add_typer(simulate_app, name="simulate")

NOT_LANDED_EXIT = 3
# The hub ended because a lane or connection broke (EX_SOFTWARE): restart it.
EXIT_HUB_FAILED = 70
DEMO_COUNTY = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _not_landed(verb: str, issue: int, what: str) -> NoReturn:
    _fail(f"`shouhu {verb}` is not available yet: {what} lands with issue #{issue}.", NOT_LANDED_EXIT)


def _version(value: bool) -> None:
    if value:
        from shouhu import __version__

        typer.echo(f"shouhu {__version__}")
        raise typer.Exit


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Shouhu (守护): elder-care and safety monitoring hub."""


def _in_use_message(exc: OSError, host: str, port: int, setting: str) -> str:
    """Why ``host:port`` could not be listened on, and which setting moves it."""
    if exc.errno == errno.EADDRINUSE:
        why = f"port {port} is already in use on {host} (another process listens there: stop it"
    elif exc.errno == errno.EACCES:
        why = f"port {port} on {host} needs privileges this user does not have (use a port above 1023"
    else:
        why = f"cannot listen on {host}:{port}: {exc.strerror or exc} (check SHOUHU_API_HOST"
    return f"{why}, or choose another port with {setting})"


def _listen(host: str, port: int, setting: str) -> socket.socket:
    """A listening socket on ``host:port``, or a one-line failure (exit 2) naming the setting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        _fail(_in_use_message(exc, host, port, setting), 2)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"  SHOUHU_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors() if e["loc"]]
        _fail("invalid configuration:\n" + "\n".join(lines), 2)


def database_url(settings: Settings) -> str:
    """The configured database, or the embedded one a running ``shouhu up`` recorded."""
    if settings.database_url:
        return settings.database_url
    from shouhu.embedded.defaults import default_data_dir, recorded_database_url

    url = recorded_database_url(default_data_dir(settings.data_dir))
    if url is None:
        _fail(
            "no database: set SHOUHU_DATABASE_URL, or start `shouhu up` to run the embedded one",
            2,
        )
    return url


def _run_migrations(url: str, settings: Settings) -> None:
    from shouhu.migrations import MigrationContext, MigrationError, migrate

    try:
        report = migrate(url, MigrationContext(settings.retention_days, datetime.now(UTC), settings.timezone))
    except MigrationError as exc:
        _fail(f"migration refused: {exc}")
    applied = ", ".join(map(str, report.applied)) or "none (up to date)"
    typer.echo(f"migrations applied: {applied}; storage: {report.storage_mode}")
    if report.partitions_created or report.partitions_dropped:
        typer.echo(
            f"partitions: {len(report.partitions_created)} made, "
            f"{len(report.partitions_dropped)} dropped past retention"
        )


@app.command()
def migrate() -> None:
    """Create or upgrade the schema (and make time partitions ahead)."""
    settings = load_settings()
    _run_migrations(database_url(settings), settings)


def _load_registry_file(url: str, path: Path) -> None:
    from devices.registry import load_registry
    from devices.registry_file import RegistryFileError, parse_registry
    from shouhu.db import connect

    try:
        registry = parse_registry(path)
    except RegistryFileError as exc:
        _fail(
            f"{path}: nothing loaded; {len(exc.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in exc.problems)
        )
    with connect(url) as conn:
        report = load_registry(conn, registry)
    counts = ", ".join(f"{n} {t}" for t, n in report.counts.items())
    typer.echo(f"registry loaded from {path}: {counts} active")
    for table, change in report.changes.items():
        if change.upserted or change.deactivated:
            typer.echo(f"  {table}: {change.upserted} added or changed, {change.deactivated} deactivated")
    if not report.changed:
        typer.echo("  no changes")
    if report.residents_without_guardian:
        typer.secho(
            f"residents with no reachable guardian ({len(report.residents_without_guardian)}): "
            + ", ".join(report.residents_without_guardian),
            fg=typer.colors.YELLOW,
        )
    gaps = report.coverage_gaps
    if gaps:
        typer.secho(
            f"{len(gaps)} grid(s) have hours with no grid worker on duty; pages there fall back up the area tree",
            fg=typer.colors.YELLOW,
        )
    for gap in gaps:
        if gap.uncovered_after_fallback:
            typer.secho(
                f"grid {gap.grid_id}: nobody on duty, grid or above, {gap.uncovered_after_fallback:g} h/week",
                fg=typer.colors.RED,
            )


@registry_app.command("load")
def registry_load(
    file: Annotated[Path, typer.Argument(help="Registry YAML file", exists=False)],
) -> None:
    """Load the registry from YAML: upsert, deactivate what is missing, report gaps."""
    settings = load_settings()
    _load_registry_file(database_url(settings), file)


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="admin, operator, grid_worker, technician or platform")],
    area: Annotated[list[str] | None, typer.Option(help="Bind to an area and its descendants (repeatable)")] = None,
    label: Annotated[str, typer.Option(help="Who or what the token is for")] = "",
    expires_days: Annotated[int, typer.Option(min=1, help="Days until the token expires")] = 365,
) -> None:
    """Print a new API bearer token (stored hashed; shown once)."""
    from shouhu.db import connect
    from shouhu.tokens import Role, create_token

    try:
        parsed_role = Role(role)
    except ValueError:
        _fail(f"--role: {role!r} is not one of {', '.join(r.value for r in Role)}", 2)
    settings = load_settings()
    now = datetime.now(UTC)
    with connect(database_url(settings)) as conn:
        try:
            secret = create_token(
                conn,
                role=parsed_role,
                areas=list(area or []),
                label=label,
                now=now,
                expires_at=now + timedelta(days=expires_days),
            )
        except ValueError as exc:
            _fail(f"--area: {exc}", 2)
        conn.commit()
    typer.echo(secret)


def _api_address(settings: Settings) -> str:
    """Where a user on this host reaches the API, and where it listens when that differs."""
    host = settings.api_host
    if host in ("0.0.0.0", "::"):  # noqa: S104 - describing the bind, not making it
        return f"http://127.0.0.1:{settings.api_port} (listening on every address, {host})"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{settings.api_port}"


def _serve_api(url: str, settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve the API on ``SHOUHU_API_HOST``:``SHOUHU_API_PORT`` (``sock`` if already bound)."""
    import uvicorn

    from api.main import create_app

    # Bound here, not by uvicorn: a port in use is one line naming the setting, not a traceback.
    sock = sock or _listen(settings.api_host, settings.api_port, "SHOUHU_API_PORT")
    config = uvicorn.Config(
        create_app(settings.model_copy(update={"database_url": url})),
        host=settings.api_host,
        port=settings.api_port,
        log_level="info",
    )
    uvicorn.Server(config).run(sockets=[sock])


@app.command()
def api() -> None:
    """Serve the HTTP API, health checks and metrics."""
    settings = load_settings()
    url = database_url(settings)
    sock = _listen(settings.api_host, settings.api_port, "SHOUHU_API_PORT")
    typer.echo(f"API: {_api_address(settings)}")
    _serve_api(url, settings, sock)


def _mqtt_url(settings: Settings) -> str:
    if settings.mqtt_url:
        return settings.mqtt_url
    from shouhu.embedded.broker import DEFAULT_PORT

    return f"mqtt://127.0.0.1:{DEFAULT_PORT}"


def _make_hub(settings: Settings, url: str, mqtt_url: str, *, metrics_port: int | None, leave: bool = False) -> Hub:
    from hub.service import build_hub

    hub_worker, _upkeep = build_hub(settings, url, mqtt_url, metrics_port=metrics_port, leave=leave)
    return hub_worker


def _run_hub_or_exit(worker: Hub) -> None:
    """Run the hub; if a lane or connection broke, end the whole process non-zero so its
    supervisor restarts it (the broker redelivers whatever was not acknowledged)."""
    from hub.service import LaneFailed
    from shouhu.health_server import PortInUse

    try:
        worker.run()
    except PortInUse as exc:
        _fail(str(exc), 2)
    except LaneFailed as exc:
        logging.getLogger("shouhu.hub").critical("hub failed: %s; exiting", exc)
        sys.stderr.flush()
        os._exit(EXIT_HUB_FAILED)


TWILIO_SETTINGS = "SHOUHU_TWILIO_ACCOUNT_SID, SHOUHU_TWILIO_AUTH_TOKEN and SHOUHU_TWILIO_FROM"


def _make_router(settings: Settings, url: str, *, exercise: bool = False, phone_optional: bool = False) -> Router:
    """The escalation worker with its notifiers.

    ``phone_optional`` (``shouhu up``): with no Twilio settings it runs on the consoles
    and the emergency platform alone, and says so loudly; ``shouhu router`` refuses to.
    """
    from alerts.notifiers.base import Notifier
    from alerts.notifiers.console import ConsoleNotifier
    from alerts.notifiers.twilio import TwilioNotifier
    from alerts.notifiers.webhook import WebhookNotifier
    from alerts.router import Router, RouterConfig
    from devices.kinds import Channel

    notifiers: dict[Channel, Notifier] = {Channel.CONSOLE: ConsoleNotifier()}
    if settings.twilio_account_sid and settings.twilio_auth_token and settings.twilio_from:
        twilio = TwilioNotifier.from_settings(settings)
        notifiers |= {Channel.SMS: twilio, Channel.VOICE: twilio}
    elif phone_optional:
        typer.secho(
            "NO PHONE PROVIDER: no SMS and no voice call will go out; SOS pages reach only the consoles"
            " and the emergency platform.\n"
            f"  To page by phone set {TWILIO_SETTINGS}; to try Shouhu with a simulated phone network,"
            " run `shouhu up --demo`.",
            fg=typer.colors.RED,
            bold=True,
            err=True,
        )
    else:
        _fail(f"{TWILIO_SETTINGS} must be set: without them the router cannot page anyone by phone", 2)
    platform = None
    if settings.emergency_webhook_url:
        try:
            platform = WebhookNotifier.from_settings(settings, exercise=exercise)
        except ValueError as exc:
            _fail(str(exc), 2)
    else:
        typer.secho(
            "SHOUHU_EMERGENCY_WEBHOOK_URL is not set: the emergency-platform step will record no_recipients",
            fg=typer.colors.YELLOW,
            err=True,
        )
    return Router(
        url,
        RouterConfig(router_id=f"router-{settings.hub_id}", zone=settings.zone),
        notifiers,
        platform=platform,
        exercise=exercise,
    )


def _run_until_signal(stop: Callable[[], None]) -> None:
    def handler(_signum: int, _frame: object) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@app.command()
def hub(
    leave: Annotated[
        bool,
        typer.Option(
            "--leave",
            help="On stop, give up this hub's broker sessions and telemetry shares for good (scaling down); "
            "without it a stop keeps them and the broker holds messages for the hub's return.",
        ),
    ] = False,
) -> None:
    """Bridge MQTT into the database (SOS and falls open incidents)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings()
    worker = _make_hub(
        settings, database_url(settings), _mqtt_url(settings), metrics_port=settings.metrics_port, leave=leave
    )
    _run_until_signal(worker.stop)
    _run_hub_or_exit(worker)


@app.command()
def router() -> None:
    """Run escalation steps as they fall due and send their notifications."""
    from shouhu.health_server import PortInUse, start_health_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings()
    url = database_url(settings)
    worker = _make_router(settings, url)
    care = _care_sweeper(settings, url)
    from alerts.router import DEFAULT_SENDERS

    care_thread: threading.Thread | None = None
    try:
        # Healthy only while both run: a care sweeper that died would leave visits unopened.
        start_health_server(
            settings.metrics_port,
            lambda: not worker.stopping.is_set() and care_thread is not None and care_thread.is_alive(),
        )
    except PortInUse as exc:
        _fail(str(exc), 2)
    care_thread = _thread(care.run, "care")
    def stop() -> None:
        care.stop()
        worker.stop()

    _run_until_signal(stop)
    worker.run(senders=DEFAULT_SENDERS)
    care.stop()
    care_thread.join(15)


def _care_sweeper(settings: Settings, url: str) -> CareSweeper:
    """Visits, repairs and battery notices run beside the router (one leader across routers)."""
    from alerts.care_sweep import CareRules, CareSweeper

    return CareSweeper(url, CareRules.from_settings(settings))


@simulate_app.command("wristbands")
def simulate_wristbands(
    press: Annotated[list[str] | None, typer.Option(help="Press SOS on this wristband (repeatable)")] = None,
    cancel: Annotated[list[str] | None, typer.Option(help="Send an SOS cancel from this wristband")] = None,
    fall: Annotated[list[str] | None, typer.Option(help="Report a fall from this wristband")] = None,
    receipt_timeout: Annotated[
        float, typer.Option(help="Seconds to wait (re-sending) for the hub's receipt of each alarm")
    ] = 30.0,
) -> None:
    """Simulated wristbands: SOS presses, cancels and falls, each re-sent until the hub's
    receipt comes back (telemetry fleets: issue #5)."""
    from simulators.wristband import Wristband

    settings = load_settings()
    if not (press or cancel or fall):
        _not_landed("simulate wristbands", 5, "the telemetry fleet (without --press, --cancel or --fall)")
    url = _mqtt_url(settings)
    sends = [
        *((d, "sos", "press", "SOS press") for d in press or []),
        *((d, "sos", "cancel", "SOS cancel") for d in cancel or []),
        *((d, "fall", None, "fall") for d in fall or []),
    ]
    unanswered = 0
    for device_id, channel, action, label in sends:
        band = Wristband(url, device_id)
        try:
            msg_id = band.alarm(channel, action=action)
            typer.echo(f"{device_id}: {label} {msg_id}")
            receipt = band.wait_for_receipt(msg_id, timeout=receipt_timeout)
        finally:
            band.close()
        if receipt is None:
            unanswered += 1
            typer.secho(f"{device_id}: no receipt within {receipt_timeout:.0f}s (is `shouhu hub` running?)", err=True)
        else:
            typer.echo(f"{device_id}: receipt: incident {receipt.get('incident')} ({receipt.get('state')})")
    if unanswered:
        raise typer.Exit(1)


@simulate_app.command("cameras")
def simulate_cameras() -> None:
    """Simulated cameras: health reports, outages."""
    _not_landed("simulate cameras", 5, "the camera fleet")


@simulate_app.command("phone-network")
def simulate_phone_network(
    port: Annotated[int, typer.Option(help="Port to listen on (127.0.0.1)")] = 8100,
) -> None:
    """A Twilio-compatible phone network that records calls and messages."""
    from simulators.phone_network import serve_phone_network

    settings = load_settings()
    sid, token = _demo_twilio_credentials(settings)
    typer.echo(f"phone network: http://127.0.0.1:{port}; it accepts only these credentials — point Shouhu at it with")
    typer.echo(f"  SHOUHU_TWILIO_API_BASE=http://127.0.0.1:{port}")
    typer.echo(f"  SHOUHU_TWILIO_ACCOUNT_SID={sid}")
    # Never echo a token the user set (it may be a real Twilio one): only the demo's.
    shown = token if token == DEMO_AUTH_TOKEN else "<the SHOUHU_TWILIO_AUTH_TOKEN set here>"
    typer.echo(f"  SHOUHU_TWILIO_AUTH_TOKEN={shown}")
    typer.echo(f"  SHOUHU_TWILIO_FROM={settings.twilio_from or DEMO_FROM}")
    serve_phone_network("127.0.0.1", port, sid, token)


@simulate_app.command("emergency-platform")
def simulate_emergency_platform(
    port: Annotated[int, typer.Option(help="Port to listen on (127.0.0.1)")] = 8200,
    dispatch_token: Annotated[
        str, typer.Option(help="A platform-role token: a dispatcher acknowledges every alert through the API")
    ] = "",
) -> None:
    """An emergency call platform that verifies and records signed CAP alerts."""
    import uvicorn

    from simulators.emergency_platform import Dispatcher, create_emergency_platform

    settings = load_settings()
    secret = settings.emergency_webhook_secret or DEMO_WEBHOOK_SECRET
    dispatcher = Dispatcher(settings.public_url, dispatch_token) if dispatch_token else None
    typer.echo(f"emergency platform: http://127.0.0.1:{port}/cap (set SHOUHU_EMERGENCY_WEBHOOK_URL to this)")
    if dispatcher is not None:
        typer.echo(f"a dispatcher acknowledges every alert through {settings.public_url}")
    uvicorn.run(create_emergency_platform(secret, dispatcher=dispatcher), host="127.0.0.1", port=port)


def _resolve_broker(settings: Settings, stack: ExitStack) -> str:
    if settings.mqtt_url:
        return settings.mqtt_url
    from shouhu.embedded.broker import DEFAULT_PORT, ensure_local_broker

    process = ensure_local_broker(DEFAULT_PORT)
    if process is None:
        typer.echo(f"MQTT: using the broker already listening on 127.0.0.1:{DEFAULT_PORT}")
    else:
        stack.callback(_stop_process, process)
        typer.echo(f"MQTT: embedded broker (amqtt, MQTT 3.1.1) on 127.0.0.1:{DEFAULT_PORT}")
    return f"mqtt://127.0.0.1:{DEFAULT_PORT}"


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


class PhoneNetwork(StrEnum):
    """Where ``shouhu up`` sends SMS and calls."""

    TWILIO = "twilio"
    SIMULATE = "simulate"


DEMO_ACCOUNT_SID = "AC" + "de" * 16
DEMO_AUTH_TOKEN = "demo-auth-token"  # noqa: S105 - only ever sent to the local simulator
DEMO_FROM = "+12025550100"
DEMO_WEBHOOK_SECRET = "demo-webhook-secret"  # noqa: S105 - only ever sent to the local simulator
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _demo_twilio_credentials(settings: Settings) -> tuple[str, str]:
    return (
        settings.twilio_account_sid or DEMO_ACCOUNT_SID,
        settings.twilio_auth_token or DEMO_AUTH_TOKEN,
    )


def _thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def _join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(10)


def _quiet_http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol without the access log, for the simulators beside the API.

    uvicorn decides per connection from the process-wide ``uvicorn.access`` logger,
    which the API's own server turns on (``access_log=False`` in a Config is not
    consulted), so the phone network's requests would fill the demo terminal.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class QuietH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.access_log = False

    return QuietH11Protocol


def _serve_beside(app: ASGIApp, name: str, stack: ExitStack) -> int:
    """Serve a simulator on a free 127.0.0.1 port from a thread, stopped with ``stack``; the port."""
    import uvicorn

    from shouhu.embedded.postgres import free_port

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=_quiet_http_protocol())
    server = uvicorn.Server(config)
    _thread(server.run, name)
    stack.callback(setattr, server, "should_exit", True)
    return port


def _start_phone_network(settings: Settings, stack: ExitStack, sid: str, token: str) -> str:
    """Run the phone-network simulator beside the API, stopped with ``stack``; its base URL."""
    from simulators.phone_network import create_phone_network

    network = create_phone_network(
        sid,
        token,
        sms_url=f"http://127.0.0.1:{settings.api_port}/callbacks/twilio/sms",
        number=settings.twilio_from or DEMO_FROM,
    )
    base = f"http://127.0.0.1:{_serve_beside(network, 'phone-network', stack)}"
    typer.echo(f"phone network: simulated, {base} (no real phone is ever called)")
    return base


def _simulated_phone_network(settings: Settings, stack: ExitStack) -> Settings:
    """``--phone-network simulate`` without ``--demo``: a staging county's pages go to the
    simulator, which prints them; every other setting stays the user's."""
    if settings.twilio_api_base != TWILIO_DEFAULT_API_BASE:
        typer.secho(
            f"--phone-network simulate: SHOUHU_TWILIO_API_BASE={settings.twilio_api_base} is not used", err=True
        )
    sid, token = _demo_twilio_credentials(settings)
    base = _start_phone_network(settings, stack, sid, token)
    return settings.model_copy(
        update={
            "twilio_api_base": base,
            "twilio_account_sid": sid,
            "twilio_auth_token": token,
            "twilio_from": settings.twilio_from or DEMO_FROM,
        }
    )


def _demo_providers(settings: Settings, stack: ExitStack) -> Settings:
    """Point Twilio and the emergency webhook at local simulators; refuse real providers."""
    base = settings.twilio_api_base
    if base != TWILIO_DEFAULT_API_BASE:
        host = urlsplit(base).hostname or ""
        if host not in LOCAL_HOSTS:
            _fail(f"--demo refuses SHOUHU_TWILIO_API_BASE={base}: a demo never reaches a real phone network", 2)
        sid, token = _demo_twilio_credentials(settings)
        typer.echo(f"phone network: {base} (yours)")
    else:
        sid, token = _demo_twilio_credentials(settings)
        base = _start_phone_network(settings, stack, sid, token)
    webhook = settings.emergency_webhook_url
    secret = settings.emergency_webhook_secret or DEMO_WEBHOOK_SECRET
    if webhook:
        if (urlsplit(webhook).hostname or "") not in LOCAL_HOSTS:
            _fail(f"--demo refuses SHOUHU_EMERGENCY_WEBHOOK_URL={webhook}: a demo never reaches a real platform", 2)
    else:
        from simulators.emergency_platform import create_emergency_platform

        platform_port = _serve_beside(create_emergency_platform(secret), "emergency-platform", stack)
        webhook = f"http://127.0.0.1:{platform_port}/cap"
        typer.echo(f"emergency platform: simulated, {webhook} (CAP status Exercise)")
    # The simulators call back the API they run beside: keypresses, SMS replies, statuses.
    public_url = settings.public_url
    if (urlsplit(public_url).hostname or "") in LOCAL_HOSTS:
        public_url = f"http://127.0.0.1:{settings.api_port}"
    return settings.model_copy(
        update={
            "public_url": public_url,
            "emergency_webhook_url": webhook,
            "emergency_webhook_secret": secret,
            "twilio_api_base": base,
            "twilio_account_sid": sid,
            "twilio_auth_token": token,
            "twilio_from": settings.twilio_from or DEMO_FROM,
        }
    )


def _demo_press(url: str, broker_url: str, settings: Settings) -> None:
    """Press SOS on a wristband whose grid has a grid worker on duty now."""
    from datetime import UTC, datetime

    from alerts.recipients import duty_chain
    from shouhu.db import connect
    from simulators.wristband import publish_alarm

    with connect(url) as conn:
        rows = conn.execute(
            "SELECT d.id, r.name, r.grid_id FROM devices d JOIN residents r ON r.id = d.resident_id"
            " WHERE d.kind = 'wristband' AND d.active ORDER BY d.id"
        ).fetchall()
        now = datetime.now(UTC)
        candidates = [(row, duty_chain(conn, row[2], now, settings.zone)) for row in rows]
    # Prefer a grid whose own grid worker is on duty now, so the demo rings a 网格员.
    (device_id, name, grid_id), people = next(
        ((row, people) for row, people in candidates if people and people[0].area_id == row[2]),
        candidates[0],
    )
    who = ", ".join(f"{p.name} {p.phone}" for p in people) or "nobody"
    typer.echo(f"demo: {name}'s wristband {device_id} (grid {grid_id}) presses SOS; on duty: {who}")
    publish_alarm(broker_url, device_id, "sos", action="press")
    typer.echo(
        "demo: press again with `shouhu simulate wristbands --press <id>` or "
        f"mosquitto_pub -q 1 -t shouhu/v1/wristband/<id>/sos -m '{{...}}' on {broker_url}"
    )


@app.command()
def up(
    demo: Annotated[
        bool, typer.Option("--demo", help="Also load the demo county, simulate a phone network and press SOS")
    ] = False,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the embedded database keeps its data (default: SHOUHU_DATA_DIR)")
    ] = None,
    phone_network: Annotated[
        PhoneNetwork,
        typer.Option(
            case_sensitive=False,
            help="twilio: page through SHOUHU_TWILIO_*; simulate: a local simulated phone network that prints"
            " every call and SMS (a staging county; --demo always simulates)",
        ),
    ] = PhoneNetwork.TWILIO,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, metavar="PORT", help="The API's port (default: SHOUHU_API_PORT, 8000)"),
    ] = None,
) -> None:
    """Run everything in one process tree, with embedded defaults where nothing is configured."""
    from shouhu.embedded.defaults import default_data_dir, start_embedded_database

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings()
    if port is not None:
        update: dict[str, object] = {"api_port": port}
        # A local callback address follows the API (a public one is the operator's to set).
        if (urlsplit(settings.public_url).hostname or "") in LOCAL_HOSTS:
            update["public_url"] = f"http://127.0.0.1:{port}"
        settings = settings.model_copy(update=update)
    # The API's port first: taken, it fails here in one line, before anything starts.
    api_socket = _listen(settings.api_host, settings.api_port, "--port or SHOUHU_API_PORT")
    with ExitStack() as stack:
        stack.callback(api_socket.close)
        if demo:
            settings = _demo_providers(settings, stack)
        elif phone_network is PhoneNetwork.SIMULATE:
            settings = _simulated_phone_network(settings, stack)
        if data_dir is not None and not settings.data_dir:
            # --data-dir also holds the hub's alarm spool (SHOUHU_SPOOL_DIR's default).
            settings = settings.model_copy(update={"data_dir": str(data_dir.resolve())})
        url = settings.database_url
        if not url:
            directory = (data_dir or default_data_dir(settings.data_dir)).resolve()
            typer.echo(f"database: embedded PostgreSQL, data kept under {directory}")
            database = start_embedded_database(directory)
            stack.callback(database.cluster.stop)
            url = database.url
            typer.echo(f"database: {url}")
        else:
            typer.echo("database: SHOUHU_DATABASE_URL")
        broker_url = _resolve_broker(settings, stack)
        _run_migrations(url, settings)
        if demo:
            _load_registry_file(url, DEMO_COUNTY)
        router_worker = _make_router(settings, url, exercise=demo, phone_optional=True)
        hub_worker = _make_hub(settings, url, broker_url, metrics_port=None)
        from alerts.router import DEFAULT_SENDERS

        care = _care_sweeper(settings, url)
        threads = [
            _thread(lambda: _run_hub_or_exit(hub_worker), "hub"),
            _thread(lambda: router_worker.run(senders=DEFAULT_SENDERS), "router"),
            _thread(care.run, "care"),
        ]
        stack.callback(_join_all, threads)
        stack.callback(care.stop)
        stack.callback(router_worker.stop)
        stack.callback(hub_worker.stop)
        if not hub_worker.ready.wait(30):
            _fail(f"the hub did not become ready: its start-up probe did not come back from {broker_url}")
        typer.echo(f"hub: {settings.hub_id} ready on {broker_url}; router running")
        address = _api_address(settings)
        typer.echo(f"API: {address} — /api/v1 (make a token with `shouhu token create --role operator`)")
        typer.echo(f"consoles: {address.split(' ', 1)[0]}/console (log in with such a token)")
        if demo:
            _demo_press(url, broker_url, settings)
        _serve_api(url, settings, api_socket)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(app())
