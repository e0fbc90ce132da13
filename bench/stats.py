"""Percentiles, load and CPU accounting shared by the benchmarks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path


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


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").glob("*"))
    except OSError:  # the process ended while the tree was read (a backend, a sender)
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _cpu_and_name(pid: int) -> tuple[float, str] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK"), cmdline


def component(cmdline: str) -> str:
    """Which part of a benchmark's process tree a command line is."""
    for marker, name in (("shouhu hub", "hub"), ("shouhu router", "router"), ("mosquitto", "broker")):
        if marker in cmdline:
            return name
    return "postgres" if "postgres" in cmdline else "benchmark (clients, simulators)"


def postmaster_pid(data_dir: Path) -> int:
    """The pid of the PostgreSQL cluster in ``data_dir`` (pg_ctl detaches it from its starter)."""
    return int((data_dir / "postmaster.pid").read_text().split()[0])


def tree_cpu(*roots: int) -> dict[int, tuple[float, str]]:
    """CPU seconds (user + system) of every live process under ``roots`` and this one, by pid.

    CPU time, unlike wall time, barely moves with what else the machine runs: it says
    which part of a benchmark costs what even on a shared machine.
    """
    pending, seen = [os.getpid(), *roots], {}
    while pending:
        pid = pending.pop()
        sample = _cpu_and_name(pid)
        if sample is not None:
            seen[pid] = (sample[0], component(sample[1]))
        pending += _children(pid)
    return seen


def cpu_spent(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]]) -> dict[str, float]:
    """CPU seconds spent between two ``tree_cpu`` samples, by component (new processes count in full)."""
    spent: dict[str, float] = {}
    for pid, (seconds, name) in after.items():
        spent[name] = spent.get(name, 0.0) + seconds - before.get(pid, (0.0, name))[0]
    return spent
