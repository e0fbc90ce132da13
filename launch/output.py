"""What the verbs print: one-line failures with their exit status, and the reports of
migrations and registry loads."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from devices.registry import LoadReport
    from shouhu.backup import Progress
    from shouhu.migrations import MigrationReport
    from shouhu.settings import Settings


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` in red on stderr and exit with ``code``."""
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def problems_text(path: object, problems: list[str], outcome: str) -> str:
    """``<path>: <outcome>; N problem(s):`` and one line per problem, for a refused file."""
    return f"{path}: {outcome}; {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)


def api_address(settings: Settings) -> str:
    """Where a user on this host reaches the API, and where it listens when that differs."""
    host = settings.api_host
    if host in ("0.0.0.0", "::"):  # noqa: S104 - describing the bind, not making it
        return f"http://127.0.0.1:{settings.api_port} (listening on every address, {host})"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{settings.api_port}"


def report_migrations(report: MigrationReport) -> None:
    applied = ", ".join(map(str, report.applied)) or "none (up to date)"
    typer.echo(f"migrations applied: {applied}; storage: {report.storage_mode}")
    if report.partitions_created or report.partitions_dropped:
        typer.echo(
            f"partitions: {len(report.partitions_created)} made, "
            f"{len(report.partitions_dropped)} dropped past retention"
        )


def report_registry(path: Path, report: LoadReport) -> None:
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


@contextmanager
def progress_printer(verb: str) -> Iterator[Callable[[Progress], None]]:
    """A table-by-table progress display on stderr: one line rewritten on a terminal,
    a line per table otherwise (a log keeps them all)."""
    terminal = sys.stderr.isatty()
    shown = False

    def show(progress: Progress) -> None:
        nonlocal shown
        width = 24
        filled = width * progress.done // max(progress.total, 1)
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {progress.done}/{progress.total} tables {verb}: {progress.table}"
        if terminal:
            sys.stderr.write("\r\x1b[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        shown = True

    try:
        yield show
    finally:
        if terminal and shown:
            sys.stderr.write("\n")
