"""Percentiles shared by the latency benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime


def percentile(values: list[float], fraction: float) -> float:
    """The value at ``fraction`` of the sorted values (index ``int(fraction * n)``, capped at the last)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages, as a benchmark prints them."""
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextmanager
def migrated_database(now: datetime) -> Iterator[str]:
    """A PostgreSQL 18 of the benchmark's own with a migrated database; yields its URL, removes it after."""
    from shouhu.embedded.postgres import create_database, wheel_bin_dir
    from shouhu.migrations import MigrationContext, migrate
    from tests.support.services import start_postgres

    cluster = start_postgres(wheel_bin_dir())
    try:
        create_database(cluster.url(), "bench")
        url = cluster.url("bench")
        migrate(url, MigrationContext(retention_days=90, now=now))
        yield url
    finally:
        cluster.remove()
