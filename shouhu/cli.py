"""The ``shouhu`` command line: every verb of DESIGN.md.

A verb whose issue has not landed says so and exits with status 3; it never
pretends to run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError

from shouhu.settings import Settings

app = typer.Typer(
    name="shouhu",
    help="Shouhu (守护): elder-care and safety monitoring hub.",
    no_args_is_help=True,
    add_completion=False,
)
registry_app = typer.Typer(help="The registry of areas, people and devices.", no_args_is_help=True)
token_app = typer.Typer(help="API bearer tokens.", no_args_is_help=True)
simulate_app = typer.Typer(
    help="Simulated wristbands, cameras, phone network and emergency platform.",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")
app.add_typer(token_app, name="token")
app.add_typer(simulate_app, name="simulate")

NOT_LANDED_EXIT = 3
DEMO_COUNTY = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _not_landed(verb: str, issue: int, what: str) -> NoReturn:
    _fail(f"`shouhu {verb}` is not available yet: {what} lands with issue #{issue}.", NOT_LANDED_EXIT)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = [
            f"  SHOUHU_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors() if e["loc"]
        ]
        _fail("invalid configuration:\n" + "\n".join(lines), 2)


def database_url(settings: Settings) -> str:
    """The configured database, or the embedded one a running ``shouhu up`` recorded."""
    if settings.database_url:
        return settings.database_url
    from shouhu.embedded.defaults import recorded_database_url

    url = recorded_database_url()
    if url is None:
        _fail(
            "no database: set SHOUHU_DATABASE_URL, or start `shouhu up` to run the embedded one",
            2,
        )
    return url


def _run_migrations(url: str, settings: Settings) -> None:
    from shouhu.migrations import MigrationContext, MigrationError, migrate

    try:
        report = migrate(url, MigrationContext(settings.retention_days, datetime.now(UTC)))
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
        _fail(f"{path}: nothing loaded; {len(exc.problems)} problem(s):\n" + "\n".join(
            f"  - {p}" for p in exc.problems
        ))
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
    for gap in report.coverage_gaps:
        colour = typer.colors.RED if gap.uncovered_after_fallback else typer.colors.YELLOW
        typer.secho(
            f"grid {gap.grid_id}: no grid worker on duty {gap.uncovered_hours_per_week:g} h/week; "
            f"nobody up the area tree either for {gap.uncovered_after_fallback:g} h/week",
            fg=colour,
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
    area: Annotated[
        list[str] | None, typer.Option(help="Bind to an area and its descendants (repeatable)")
    ] = None,
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
                conn, role=parsed_role, areas=list(area or []), label=label, now=now,
                expires_at=now + timedelta(days=expires_days),
            )
        except ValueError as exc:
            _fail(f"--area: {exc}", 2)
        conn.commit()
    typer.echo(secret)


def _serve_api(url: str, settings: Settings) -> None:
    import uvicorn

    from api.main import create_app

    uvicorn.run(create_app(url), host="0.0.0.0", port=settings.api_port, log_level="info")  # noqa: S104


@app.command()
def api() -> None:
    """Serve the HTTP API, health checks and metrics."""
    settings = load_settings()
    _serve_api(database_url(settings), settings)


@app.command()
def hub() -> None:
    """Bridge MQTT into the database and sweep device liveness."""
    _not_landed("hub", 3, "the MQTT bridge")


@app.command()
def router() -> None:
    """Run escalation steps as they fall due."""
    _not_landed("router", 3, "the escalation router")


@simulate_app.command("wristbands")
def simulate_wristbands() -> None:
    """Simulated wristbands: telemetry, SOS presses, falls."""
    _not_landed("simulate wristbands", 3, "the wristband fleet")


@simulate_app.command("cameras")
def simulate_cameras() -> None:
    """Simulated cameras: health reports, outages."""
    _not_landed("simulate cameras", 5, "the camera fleet")


@simulate_app.command("phone-network")
def simulate_phone_network() -> None:
    """A Twilio-compatible phone network that records calls and messages."""
    _not_landed("simulate phone-network", 3, "the phone-network simulator")


@simulate_app.command("emergency-platform")
def simulate_emergency_platform() -> None:
    """An emergency call platform that receives signed CAP alerts."""
    _not_landed("simulate emergency-platform", 4, "the emergency-platform simulator")


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


@app.command()
def up(
    demo: Annotated[bool, typer.Option(help="Also load the demo county")] = False,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the embedded database keeps its data")
    ] = None,
) -> None:
    """Run everything in one process tree, with embedded defaults where nothing is configured."""
    from shouhu.embedded.defaults import default_data_dir, start_embedded_database

    settings = load_settings()
    with ExitStack() as stack:
        url = settings.database_url
        if not url:
            directory = (data_dir or default_data_dir()).resolve()
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
        typer.echo(
            f"API: http://127.0.0.1:{settings.api_port}/api/v1 (make a token with "
            "`shouhu token create --role operator`)"
        )
        typer.echo(
            f"hub and router: not yet part of `shouhu up` (issue #3); broker at {broker_url}"
        )
        _serve_api(url, settings)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(app())
