"""The watch gateway under 10,000 connected watches: its CPU and memory, and SOS latency.

Starts its own Mosquitto and PostgreSQL 18, writes a registry file — the demo county
plus ``--watches`` synthetic residents, each with a wristband whose ``watch_id`` is
``87`` + 8 digits — loads it with `shouhu registry load` and gives it to the gateway
(``SHOUHU_REGISTRY_FILE``), rewrites ``default-sos`` to grid worker → guardians →
operators with a long wait (only the first page is measured), and runs `shouhu hub`,
`shouhu router` and `shouhu gateway watch` as processes, with the phone-network
simulator in this process.

The watches are asyncio clients in this process speaking the TCP protocol (frames from
simulators/watch.py): each connects, sends an ``LK`` heartbeat and then one every
``--interval`` s (phases spread over the interval), each awaiting the gateway's ``LK``
answer. Every heartbeat is a registered watch's, so the gateway publishes it as
telemetry and the hub stores it, as in production.

Measured:

- the gateway's RSS (``/proc/PID/status`` VmRSS) before any watch connects and with all
  of them connected, and its CPU seconds (``/proc/PID/stat``) while connecting them and in
  each run's window of heartbeats: per 1,000 connections;
- in each of ``--runs`` windows of ``--window`` s, the demo county's ten watches
  (``8600000061`` … ``8600000070``, each holding its own connection) each send one ``AL``
  SOS frame, spread over the window: frame written (CLOCK_MONOTONIC) → the phone
  simulator's first provider request for that incident (p50/p99/max; the issue's goal is
  p99 < 1 s), and frame written → the gateway's ``AL`` answer (sent once the hub's receipt
  is in). Between runs the incidents are closed by SQL.

    .venv/bin/python -m bench.watch_gateway                      # 10,000 watches, 3 runs
    .venv/bin/python -m bench.watch_gateway --watches 500 --window 20 --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import yaml

from bench.escalation import DEMO, PHONE_CHANNELS, SID, TOKEN, close_all, shipped_max_inflight, short_policy, summary
from bench.stats import load_average, percentile, postmaster_pid, tree_cpu
from shouhu.embedded.postgres import create_database, free_port, wheel_bin_dir
from shouhu.migrations import MigrationContext, migrate
from shouhu.settings import DEFAULT_TIMEZONE
from simulators.phone_network import PhoneNetwork, create_phone_network
from simulators.watch import SOS_STATUS, alarm_content, frame, heartbeat_content
from tests.support.services import SHOUHU_BIN, Mosquitto, ShouhuProcess, serve_app, shouhu_env, start_postgres

# The demo county's watches (simulators/demo_county.yaml, ``watch_id``): they press SOS.
PRESS_WATCHES = [f"86{index:08d}" for index in range(61, 71)]
ANSWER_TIMEOUT_S = 30.0
# Connections opened at once while the fleet connects (the gateway's listen backlog).
CONNECT_CONCURRENCY = 200


def fleet_watch_id(index: int) -> str:
    return f"87{index:08d}"


def write_registry(path: Path, watches: int) -> None:
    """The demo county plus ``watches`` synthetic residents, one registered watch each
    (no guardians: they only send heartbeats)."""
    registry: dict[str, Any] = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    grids = [a["id"] for a in registry["areas"] if a.get("level") == "grid"]
    for index in range(watches):
        registry["residents"].append(
            {
                "id": f"bench-r-{index:05d}",
                "name": f"压测老人{index}",
                "grid": grids[index % len(grids)],
                "address": f"压测地址 {index} 号",
            }
        )
        registry["devices"].append(
            {
                "id": f"bench-wb-{index:05d}",
                "kind": "wristband",
                "resident": f"bench-r-{index:05d}",
                "model": "bench",
                "watch_id": fleet_watch_id(index),
                "protocol": "watch",
            }
        )
    path.write_text(yaml.safe_dump(registry, allow_unicode=True, sort_keys=False), encoding="utf-8")


def raise_open_files(needed: int) -> int:
    """Raise this process's RLIMIT_NOFILE to its hard limit (the gateway, started from
    here, inherits it); fail early when even that is too few."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed: raise it (ulimit -Hn) or pass fewer --watches")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_s: float  # user + system
    rss_kib: int


def sample(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return ProcSample(cpu, rss)


@dataclass
class FleetCounts:
    connected: int = 0
    heartbeats: int = 0
    answered: int = 0
    answer_s: list[float] = field(default_factory=list)  # LK written → LK answer read
    errors: list[str] = field(default_factory=list)


async def answer_to(reader: asyncio.StreamReader, command: str) -> None:
    """Read the gateway's answers until one whose content starts with ``command``."""
    while True:
        answer = await reader.readuntil(b"]")
        content = answer.rsplit(b"*", 1)[-1]
        if content.split(b",", 1)[0].rstrip(b"]").decode("ascii", errors="replace") == command:
            return


class Watch:
    """One simulated watch holding its connection to the gateway."""

    def __init__(self, watch_id: str) -> None:
        self.watch_id = watch_id
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sent = 0

    async def connect(self, port: int, counts: FleetCounts) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        counts.connected += 1
        await self.heartbeat(counts)  # a watch's first frame after connecting

    async def heartbeat(self, counts: FleetCounts) -> None:
        assert self.reader is not None
        assert self.writer is not None
        started = time.monotonic()
        self.writer.write(frame(self.watch_id, heartbeat_content(steps=self.sent)))
        await self.writer.drain()
        self.sent += 1
        counts.heartbeats += 1
        await asyncio.wait_for(answer_to(self.reader, "LK"), ANSWER_TIMEOUT_S)
        counts.answered += 1
        counts.answer_s.append(time.monotonic() - started)

    async def beat(self, interval: float, counts: FleetCounts) -> None:
        """Heartbeats every ``interval`` s from a random phase, until cancelled."""
        await asyncio.sleep(random.uniform(0, interval))  # noqa: S311 (spreading load, not secrets)
        while True:
            started = time.monotonic()
            try:
                await self.heartbeat(counts)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                counts.errors.append(f"{self.watch_id}: {exc!r}")
                return
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def press(self, zone: ZoneInfo) -> tuple[float, float]:
        """An SOS ``AL``: (monotonic when written, seconds until the gateway's ``AL`` answer)."""
        assert self.reader is not None
        assert self.writer is not None
        alarm = frame(self.watch_id, alarm_content(datetime.now(zone), SOS_STATUS))
        written = time.monotonic()
        self.writer.write(alarm)
        await self.writer.drain()
        await asyncio.wait_for(answer_to(self.reader, "AL"), 60.0)
        return written, time.monotonic() - written

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def connect_all(watches: list[Watch], port: int, counts: FleetCounts) -> None:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(watch: Watch) -> None:
        async with gate:
            try:
                await watch.connect(port, counts)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                counts.errors.append(f"{watch.watch_id}: connect: {exc!r}")

    await asyncio.gather(*(one(w) for w in watches))


def max_incident_id(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM incidents").fetchone()
    return int(row[0]) if row else 0


def first_pages(url: str, network: PhoneNetwork, after_id: int, devices: list[str]) -> dict[str, float]:
    """Wristband → CLOCK_MONOTONIC of the first provider request of its incident opened
    after incident ``after_id`` (this run's press)."""
    stamps = {r.sid: r.monotonic for r in network.calls()} | {r.sid: r.monotonic for r in network.messages()}
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT i.device_id, a.provider_id FROM incidents i JOIN notification_attempts a ON a.incident_id = i.id
            WHERE i.id > %s AND i.device_id = ANY(%s) AND a.provider_id IS NOT NULL AND a.channel = ANY(%s)
            """,
            (after_id, devices, list(PHONE_CHANNELS)),
        ).fetchall()
    first: dict[str, float] = {}
    for device, sid in rows:
        if sid in stamps:
            first[str(device)] = min(first.get(str(device), float("inf")), stamps[sid])
    return first


@dataclass
class RunResult:
    sos_s: list[float]  # AL written → first provider request
    answer_s: list[float]  # AL written → the gateway's AL answer
    gateway_cpu_s: float
    window_s: float
    heartbeats: int
    tree_cpu: dict[str, float]


async def one_run(
    args: argparse.Namespace,
    url: str,
    network: PhoneNetwork,
    pressers: dict[str, Watch],
    wristband_of: dict[str, str],
    gateway_pid: int,
    roots: tuple[int, ...],
    counts: FleetCounts,
) -> RunResult:
    zone = ZoneInfo(DEFAULT_TIMEZONE)  # the watches keep the county's local time
    after_id = await asyncio.to_thread(max_incident_id, url)
    before, beats_before = sample(gateway_pid), counts.heartbeats
    tree_before = await asyncio.to_thread(tree_cpu, *roots)
    started = time.monotonic()
    gap = args.window / len(pressers)
    written: dict[str, float] = {}
    answers: list[float] = []

    async def press_at(offset: float, watch: Watch) -> None:
        await asyncio.sleep(offset)
        at, answered = await watch.press(zone)
        written[wristband_of[watch.watch_id]] = at
        answers.append(answered)

    await asyncio.gather(
        *(press_at(gap * (i + 0.5), w) for i, w in enumerate(pressers.values())),
        asyncio.sleep(args.window),
    )
    window_s = time.monotonic() - started
    after = sample(gateway_pid)
    tree_after = await asyncio.to_thread(tree_cpu, *roots)
    beats = counts.heartbeats - beats_before
    deadline = time.monotonic() + args.timeout
    devices = list(written)
    while True:
        firsts = await asyncio.to_thread(first_pages, url, network, after_id, devices)
        if len(firsts) >= len(devices) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    spent: dict[str, float] = {}
    for pid, (seconds, name) in tree_after.items():
        label = "gateway" if pid == gateway_pid else name
        spent[label] = spent.get(label, 0.0) + seconds - tree_before.get(pid, (0.0, name))[0]
    await asyncio.to_thread(close_all, url)
    return RunResult(
        sos_s=[firsts[d] - written[d] for d in devices if d in firsts],
        answer_s=answers,
        gateway_cpu_s=after.cpu_s - before.cpu_s,
        window_s=window_s,
        heartbeats=beats,
        tree_cpu=spent,
    )


def spread(name: str, values: list[float], unit: str = "", digits: int = 1) -> str:
    """Min, median and max over the runs (the figure repeated, to judge its noise)."""
    if not values:
        return f"{name}: no run"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{name}: min {low:.{digits}f}{unit} median {mid:.{digits}f}{unit} max {high:.{digits}f}{unit}"


async def measure(
    args: argparse.Namespace, url: str, network: PhoneNetwork, port: int, gateway_pid: int, roots: tuple[int, ...]
) -> list[str]:
    counts = FleetCounts()
    baseline = sample(gateway_pid)
    fleet = [Watch(fleet_watch_id(i)) for i in range(args.watches)]
    pressers = {w: Watch(w) for w in PRESS_WATCHES}
    wristband_of = {w: f"wb-{int(w[2:]):04d}" for w in PRESS_WATCHES}
    started = time.monotonic()
    await connect_all([*fleet, *pressers.values()], port, counts)
    connect_s = time.monotonic() - started
    first_lk = len(counts.answer_s)  # the first heartbeats: in the connecting burst
    await asyncio.sleep(2.0)  # let the gateway settle after the burst of first heartbeats
    connected = sample(gateway_pid)
    if counts.errors:
        print(f"{len(counts.errors)} watches failed to connect, e.g. {counts.errors[:3]}", flush=True)
    print(f"{counts.connected} watches connected in {connect_s:.1f} s", flush=True)
    beating = [asyncio.create_task(w.beat(args.interval, counts)) for w in fleet]
    runs: list[RunResult] = []
    try:
        for number in range(args.runs):
            run = await one_run(args, url, network, pressers, wristband_of, gateway_pid, roots, counts)
            runs.append(run)
            print(
                f"run {number + 1}: {summary('AL → first provider request', run.sos_s)};"
                f" {summary('AL → AL answer', run.answer_s)};"
                f" gateway CPU {run.gateway_cpu_s:.2f} s over {run.window_s:.0f} s, {run.heartbeats} heartbeats",
                flush=True,
            )
        end = sample(gateway_pid)
    finally:
        for task in beating:
            task.cancel()
        await asyncio.gather(*beating, return_exceptions=True)
        for watch in [*fleet, *pressers.values()]:
            watch.close()
    held = counts.connected
    per_k = held / 1000
    sos = [v for r in runs for v in r.sos_s]
    answered = [v for r in runs for v in r.answer_s]
    cpu_per_k_min = [r.gateway_cpu_s / per_k / (r.window_s / 60) for r in runs]
    lk = counts.answer_s
    presses = len(PRESS_WATCHES) * args.runs
    return [
        f"{held} watches connected (of {args.watches + len(PRESS_WATCHES)}) in {connect_s:.1f} s;"
        f" heartbeats every {args.interval:g} s ({args.watches / args.interval:.0f}/s);"
        f" {counts.heartbeats} heartbeats sent, {counts.answered} answered, {len(counts.errors)} errors",
        f"  gateway RSS: {baseline.rss_kib / 1024:.1f} MiB with no watch, {connected.rss_kib / 1024:.1f} MiB connected"
        f" ({end.rss_kib / 1024:.1f} MiB after the runs)"
        f" → {(connected.rss_kib - baseline.rss_kib) / 1024 / per_k:.2f} MiB per 1,000 connections",
        f"  gateway CPU connecting them (and their first heartbeat): {connected.cpu_s - baseline.cpu_s:.2f} s"
        f" → {(connected.cpu_s - baseline.cpu_s) / per_k:.3f} s per 1,000 connections",
        "  "
        + spread(
            "gateway CPU holding them, per 1,000 connections per minute of heartbeats (runs)", cpu_per_k_min, " s", 3
        ),
        "  "
        + spread(
            "gateway CPU per 1,000 heartbeats (runs)",
            [r.gateway_cpu_s / r.heartbeats * 1000 for r in runs if r.heartbeats],
            " s",
            3,
        ),
        "  " + spread("gateway CPU share of one core (runs)", [r.gateway_cpu_s / r.window_s * 100 for r in runs], " %"),
        "  " + summary("LK written → LK answer (first heartbeats, while connecting)", lk[:first_lk]),
        "  " + summary("LK written → LK answer (heartbeats in the runs)", lk[first_lk:]),
        f"SOS: {len(sos)} of {presses} presses paged",
        "  " + summary("AL written → first provider request (all runs)", sos),
        "  " + spread("  p50 of the runs", [statistics.median(r.sos_s) * 1000 for r in runs if r.sos_s], " ms"),
        "  " + spread("  p99 of the runs", [percentile(r.sos_s, 0.99) * 1000 for r in runs if r.sos_s], " ms"),
        "  " + spread("  max of the runs", [max(r.sos_s) * 1000 for r in runs if r.sos_s], " ms"),
        f"  goal p99 < 1 s: {'met' if sos and percentile(sos, 0.99) < 1.0 else 'NOT met'}",
        "  " + summary("AL written → the gateway's AL answer (hub receipt in)", answered),
        "CPU seconds in the runs' windows, by process (all runs): "
        + ", ".join(
            f"{name} {seconds:.1f}"
            for name, seconds in sorted(
                {n: sum(r.tree_cpu.get(n, 0.0) for r in runs) for n in {k for r in runs for k in r.tree_cpu}}.items(),
                key=lambda kv: -kv[1],
            )
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watches", type=int, default=10_000, help="connected watches sending heartbeats")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between a watch's heartbeats")
    parser.add_argument("--runs", type=int, default=3, help="windows, each with one SOS from each of the 10 watches")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of each run's window")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up waiting for a run's pages after this")
    args = parser.parse_args()
    if not 0 <= args.watches <= 99_999_999:
        parser.error("--watches: 0 to 99,999,999")
    command = " ".join([".venv/bin/python -m bench.watch_gateway", *sys.argv[1:]])
    # The machine is often shared: say how busy it was, so a figure can be judged.
    load_at_start = load_average()
    limit = raise_open_files(args.watches + len(PRESS_WATCHES) + 500)

    broker = Mosquitto(max_inflight=shipped_max_inflight())
    broker.start()
    cluster = start_postgres(wheel_bin_dir())
    create_database(cluster.url(), "bench")
    url = cluster.url("bench")
    migrate(url, MigrationContext(90, datetime.now(UTC)))
    processes: list[ShouhuProcess] = []
    app = create_phone_network(SID, TOKEN, announce=lambda _line: None)
    network: PhoneNetwork = app.state.network
    phone = serve_app(app)
    phone_base = next(phone)
    scratch = Path(tempfile.mkdtemp(prefix="shouhu-bench-watch-"))
    try:
        registry = scratch / "registry.yaml"
        write_registry(registry, args.watches)
        watch_port = free_port()
        env = shouhu_env(
            SHOUHU_DATABASE_URL=url,
            SHOUHU_MQTT_URL=broker.url,
            SHOUHU_HUB_ID="bench-hub",
            SHOUHU_TWILIO_ACCOUNT_SID=SID,
            SHOUHU_TWILIO_AUTH_TOKEN=TOKEN,
            SHOUHU_TWILIO_FROM="+12025550100",
            SHOUHU_TWILIO_API_BASE=phone_base,
            SHOUHU_REGISTRY_FILE=str(registry),
            SHOUHU_WATCH_PORT=str(watch_port),
        )
        loaded = time.monotonic()
        subprocess.run([SHOUHU_BIN, "registry", "load", str(registry)], env=env, check=True, capture_output=True)
        print(f"registry: demo county + {args.watches} watches loaded in {time.monotonic() - loaded:.1f} s", flush=True)
        short_policy(url, 600)  # only the first page is measured: later steps must not fall due
        for verb in (["hub"], ["router"], ["gateway", "watch"]):
            port = free_port()
            processes.append(
                ShouhuProcess(
                    verb, {**env, "SHOUHU_METRICS_PORT": str(port)}, ready_url=f"http://127.0.0.1:{port}/readyz"
                ).start(timeout=120)
            )
        gateway = processes[-1].process
        assert gateway is not None
        roots = (postmaster_pid(cluster.spec.data_dir),)
        lines = asyncio.run(measure(args, url, network, watch_port, gateway.pid, roots))
        print()
        print(f"command: {command}")
        print(f"machine: {os.cpu_count()} CPUs; RLIMIT_NOFILE {limit}; Python {sys.version.split()[0]}")
        print(f"load average (1, 5, 15 min): at the start {load_at_start}, at the end {load_average()}")
        print("\n".join(lines))
    finally:
        for process in processes:
            process.stop()
        for _ in phone:
            pass
        broker.remove()
        cluster.remove()


if __name__ == "__main__":
    main()
