"""Escalation under load: new presses while 1,000 escalations run, then a burst of 1,000 presses.

Starts its own Mosquitto and PostgreSQL 18, loads the demo county and adds synthetic
residents (each with one wristband and two guardians, in the county's existing grids)
by SQL, rewrites the ``default-sos`` policy to grid worker → guardians → operators
with a short wait (``--wait-s``) so steps keep falling due during the run, and runs
`shouhu hub` and `shouhu router` as processes with the phone-network simulator in
this process.

Phase 1: ``--inflight`` presses on distinct wristbands open escalations; once each
has had its first page, new presses arrive at ``--rate``/s for ``--window`` s on
other wristbands (after ``--lead-s`` s, so that with long waits the in-flight
escalations' later steps fall due inside the window). Measured: press (publish,
CLOCK_MONOTONIC) → the simulator receiving the incident's first provider request (the attempts' provider ids matched
to the simulator's sids), and step lateness for steps run during the window, from
``escalation_actions`` (``done_at − due_at``: the router ran the step) and from
``notification_attempts`` (first ``sent_at`` of the step − ``due_at``: its pages
went out).

Phase 2: phase 1's incidents are closed (by SQL), then ``--burst`` presses on fresh
wristbands are published as fast as one client can; measured until every one of
those incidents has had its first page.

    .venv/bin/python -m bench.escalation
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from psycopg.types.json import Jsonb

from bench.stats import cpu_spent, percentile, postmaster_pid, tree_cpu
from shouhu.embedded.postgres import create_database, free_port, wheel_bin_dir
from shouhu.migrations import MigrationContext, migrate
from simulators.phone_network import PhoneNetwork, create_phone_network
from tests.support.services import SHOUHU_BIN, Mosquitto, ShouhuProcess, serve_app, shouhu_env, start_postgres

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
SID, TOKEN = "AC" + "3" * 32, "bench-token"
PHONE_CHANNELS = ("voice", "sms")


def shipped_max_inflight() -> int:
    text = (Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    match = re.search(r"^max_inflight_messages\s+(\d+)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("deploy/mosquitto/mosquitto.conf sets no max_inflight_messages")
    return int(match.group(1))


def summary(name: str, values: list[float], unit: str = "ms") -> str:
    if not values:
        return f"{name}: n=0"
    scaled = [v * 1000 for v in values] if unit == "ms" else values
    return (
        f"{name}: n={len(scaled)} p50={statistics.median(scaled):.1f} {unit}"
        f" p99={percentile(scaled, 0.99):.1f} {unit} max={max(scaled):.1f} {unit}"
    )


def _load(averages: tuple[float, float, float]) -> str:
    return " ".join(f"{a:.2f}" for a in averages)


def add_residents(url: str, count: int) -> list[str]:
    """``count`` synthetic residents spread over the existing grids, each with a wristband
    and two guardians (fictional +1 202 555 numbers). Returns the wristband ids."""
    if count > 4999:
        raise ValueError("at most 4,999 synthetic residents: guardian numbers are +1 202 555 0000–9999")
    with psycopg.connect(url) as conn:
        grids = [r[0] for r in conn.execute("SELECT id FROM areas WHERE level = 'grid' AND active ORDER BY id")]
        residents = [
            (f"bench-r-{i:05d}", f"压测老人{i}", grids[i % len(grids)], f"压测地址 {i} 号") for i in range(count)
        ]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO residents (id, name, grid_id, address) VALUES (%s, %s, %s, %s)", residents)
            cur.executemany(
                "INSERT INTO devices (id, kind, resident_id, model) VALUES (%s, 'wristband', %s, 'bench')",
                [(f"bench-wb-{i:05d}", f"bench-r-{i:05d}") for i in range(count)],
            )
            cur.executemany(
                "INSERT INTO guardians (id, resident_id, name, phone, relation, priority)"
                " VALUES (%s, %s, %s, %s, '子女', %s)",
                [
                    (f"bench-g-{i:05d}-{n}", f"bench-r-{i:05d}", f"家属{i}-{n}", f"+1202555{2 * i + n:04d}", n)
                    for i in range(count)
                    for n in (1, 2)
                ],
            )
    return [f"bench-wb-{i:05d}" for i in range(count)]


def short_policy(url: str, wait_s: int) -> None:
    steps = [
        {"target": "grid_worker", "channels": ["voice", "sms", "console"], "wait_s": wait_s},
        {"target": "guardians", "channels": ["voice", "sms"], "wait_s": wait_s},
        {"target": "operators", "channels": ["voice", "sms", "console"], "wait_s": wait_s},
    ]
    with psycopg.connect(url) as conn:
        updated = conn.execute(
            "UPDATE escalation_policies SET steps = %s WHERE id = 'default-sos'", (Jsonb(steps),)
        ).rowcount
    if updated != 1:
        raise RuntimeError("the demo county has no default-sos policy")


class Presser:
    """One MQTT client publishing SOS presses at QoS 1; remembers when each was published."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.published: dict[str, float] = {}

    def press(self, device: str) -> None:
        payload = json.dumps(
            {"msg_id": str(uuid.uuid4()), "ts": datetime.now(UTC).isoformat(timespec="seconds"), "action": "press"}
        )
        self.published[device] = time.monotonic()
        self.client.publish(f"shouhu/v1/wristband/{device}/sos", payload, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def paged(url: str, devices: list[str]) -> set[str]:
    """Which of these wristbands' incidents have a phone attempt the provider accepted."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT DISTINCT i.device_id FROM incidents i JOIN notification_attempts a ON a.incident_id = i.id
            WHERE i.device_id = ANY(%s) AND a.provider_id IS NOT NULL AND a.channel = ANY(%s)
            """,
            (devices, list(PHONE_CHANNELS)),
        ).fetchall()
    return {str(r[0]) for r in rows}


def wait_all_paged(url: str, devices: list[str], timeout: float) -> float:
    """Poll until every wristband's incident has been paged; returns the monotonic time it was seen.

    Each poll asks only about the wristbands not seen paged yet: the observer must not
    cost PostgreSQL much of what it measures (asking about all of them every 0.2 s was
    ~0.6 s of the database's CPU in a burst).
    """
    deadline = time.monotonic() + timeout
    remaining = list(devices)
    while True:
        done = paged(url, remaining)
        remaining = [d for d in remaining if d not in done]
        if not remaining:
            return time.monotonic()
        if time.monotonic() > deadline:
            seen = len(devices) - len(remaining)
            raise RuntimeError(f"only {seen} of {len(devices)} incidents paged after {timeout:.0f} s")
        time.sleep(0.2)


def first_requests(url: str, network: PhoneNetwork, devices: Iterable[str]) -> dict[str, float]:
    """Wristband → CLOCK_MONOTONIC of the first provider request for its incident."""
    stamps = {r.sid: r.monotonic for r in network.calls()} | {r.sid: r.monotonic for r in network.messages()}
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT i.device_id, a.provider_id FROM incidents i JOIN notification_attempts a ON a.incident_id = i.id
            WHERE i.device_id = ANY(%s) AND a.provider_id IS NOT NULL AND a.channel = ANY(%s)
            """,
            (list(devices), list(PHONE_CHANNELS)),
        ).fetchall()
    first: dict[str, float] = {}
    for device, sid in rows:
        if sid in stamps:
            first[device] = min(first.get(device, float("inf")), stamps[sid])
    return first


def first_attempts_written(url: str, devices: Iterable[str]) -> dict[str, float]:
    """Wristband → when the router's step wrote its incident's first call or SMS, on
    CLOCK_MONOTONIC (the row's wall-clock time, moved by this process's offset)."""
    offset = time.time() - time.monotonic()
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT i.device_id, min(a.created_at) FROM incidents i JOIN notification_attempts a ON a.incident_id = i.id
            WHERE i.device_id = ANY(%s) AND a.channel = ANY(%s) AND a.round = 0 AND a.step = 0 GROUP BY i.device_id
            """,
            (list(devices), list(PHONE_CHANNELS)),
        ).fetchall()
    return {str(device): written.timestamp() - offset for device, written in rows}


def step_lateness(url: str, start: datetime, end: datetime) -> dict[str, list[float]]:
    """Lateness of the steps run in [start, end): all, later steps only, and to their first page."""
    with psycopg.connect(url) as conn:
        rows: list[tuple[Any, ...]] = conn.execute(
            """
            SELECT x.step, x.round, extract(epoch FROM x.done_at - x.due_at)::float8,
                   (SELECT extract(epoch FROM min(a.sent_at) - x.due_at)::float8 FROM notification_attempts a
                    WHERE a.action_id = x.id AND a.channel = ANY(%s) AND a.sent_at IS NOT NULL)
            FROM escalation_actions x
            WHERE x.kind = 'step' AND x.state = 'done' AND x.done_at >= %s AND x.done_at < %s
            """,
            (list(PHONE_CHANNELS), start, end),
        ).fetchall()
    later = [r for r in rows if (r[0], r[1]) != (0, 0)]
    return {
        "run": [float(r[2]) for r in rows],
        "run_later": [float(r[2]) for r in later],
        "page_later": [float(r[3]) for r in later if r[3] is not None],
    }


def close_all(url: str) -> None:
    """Close every open incident and drop its queued work, so phase 2 starts on a quiet stack.

    The router is still running and locks these rows too: a deadlock is retried.
    """
    for _ in range(10):
        try:
            _close_all(url)
            return
        except psycopg.errors.DeadlockDetected:
            time.sleep(0.2)
    _close_all(url)


def _close_all(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE incidents SET state = 'resolved', resolved_at = now(), outcome = 'other', updated_at = now()"
            " WHERE state IN ('open', 'acknowledged', 'unreached')"
        )
        conn.execute("UPDATE escalation_actions SET state = 'cancelled', done_at = now() WHERE state = 'pending'")
        conn.execute(
            "UPDATE notification_attempts SET state = 'cancelled', error = 'bench: closed before phase 2',"
            " updated_at = now() WHERE state = 'pending'"
        )


def phase_one(
    url: str, network: PhoneNetwork, presser: Presser, inflight: list[str], new: list[str], args: argparse.Namespace
) -> list[str]:
    """Open the in-flight escalations, then new presses at a steady rate; returns the report lines."""
    started = time.monotonic()
    for device in inflight:
        presser.press(device)
    opened = wait_all_paged(url, inflight, args.timeout)
    print(f"phase 1: {len(inflight)} escalations opened and first-paged in {opened - started:.1f} s", flush=True)
    if args.lead_s > 0:
        # With long waits the in-flight escalations' next steps fall due only
        # wait_s after their first: start the window where they do.
        print(f"phase 1: waiting {args.lead_s:g} s before the window", flush=True)
        time.sleep(args.lead_s)

    window_start = datetime.now(UTC)
    t0 = time.monotonic()
    for index, device in enumerate(new):
        delay = t0 + index / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        presser.press(device)
    window_end = datetime.now(UTC)
    behind = max(presser.published[d] - (t0 + i / args.rate) for i, d in enumerate(new))
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM notification_attempts WHERE state = 'pending'").fetchone()
        backlog = int(row[0]) if row else 0
    wait_all_paged(url, new, args.timeout)
    firsts = first_requests(url, network, new)
    latencies = [firsts[d] - presser.published[d] for d in new if d in firsts]
    lateness = step_lateness(url, window_start, window_end)
    received = [r.received_at for r in network.calls()] + [r.received_at for r in network.messages()]
    in_window = sum(1 for at in received if window_start <= at < window_end)
    window_s = (window_end - window_start).total_seconds()
    return [
        f"phase 1: {len(inflight)} escalations in flight; {len(new)} new presses at {args.rate:g}/s "
        f"over {window_s:.1f} s (publisher at most {behind * 1000:.0f} ms behind schedule)",
        summary("  press → first provider request (new presses)", latencies),
        f"  new presses over 250 ms: {sum(1 for v in latencies if v >= 0.25)} of {len(latencies)}",
        summary("  step lateness, every step run in the window (done_at − due_at)", lateness["run"], "s"),
        summary("  step lateness, later steps only (done_at − due_at)", lateness["run_later"], "s"),
        summary("  step lateness, later steps to first page sent (sent_at − due_at)", lateness["page_later"], "s"),
        f"  provider requests in the window: {in_window} ({in_window / window_s:.0f}/s);"
        f" pending attempts at the window's end: {backlog}",
    ]


class CommitWatcher(threading.Thread):
    """Polls every 20 ms which of these wristbands have an incident committed; notes when
    each first appeared (CLOCK_MONOTONIC), so the hub's part of a burst is measured."""

    def __init__(self, url: str, devices: list[str]) -> None:
        super().__init__(daemon=True)
        self.url, self.devices = url, devices
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        # Only rows newer than the last seen id, through the primary key: the observer
        # must not cost PostgreSQL what it measures (a scan of every incident each 20 ms
        # was ~1.2 s of the database's CPU in a burst).
        wanted, last_id = set(self.devices), 0
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set() and len(self.seen) < len(self.devices):
                rows = conn.execute(
                    "SELECT id, device_id FROM incidents WHERE id > %s ORDER BY id", (last_id,)
                ).fetchall()
                now = time.monotonic()
                for incident_id, device in rows:
                    last_id = max(last_id, int(incident_id))
                    if device in wanted:
                        self.seen.setdefault(str(device), now)
                self.stop.wait(0.02)


def enable_statements(cluster: Any) -> None:
    """Restart the cluster with ``pg_stat_statements`` loaded (``--statements``)."""
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
    cluster.stop()
    cluster.start()


def reset_statements(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")


def statement_report(url: str, top: int, incidents: int) -> list[str]:
    """The statements PostgreSQL ran since the reset: totals, and the ``top`` by calls and by time."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT calls, total_exec_time, regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements"
            " WHERE query NOT ILIKE '%%pg_stat_statements%%' ORDER BY calls DESC"
        ).fetchall()
    calls = sum(int(r[0]) for r in rows)
    exec_ms = sum(float(r[1]) for r in rows)
    lines = [
        f"  statements: {calls} calls ({calls / max(incidents, 1):.1f} per incident),"
        f" {exec_ms / 1000:.2f} s of execution; the {top} most called:"
    ]
    lines += [f"    {int(c):7d} {t:8.1f} ms  {q[:150]}" for c, t, q in rows[:top]]
    lines.append(f"  the {top} longest in total:")
    lines += [
        f"    {int(c):7d} {t:8.1f} ms  {q[:150]}" for c, t, q in sorted(rows, key=lambda r: -float(r[1]))[:top]
    ]
    return lines


def phase_two(
    url: str,
    network: PhoneNetwork,
    presser: Presser,
    burst: list[str],
    timeout: float,
    postgres: int,
    statements: int = 0,
    spread_s: float = 0.0,
) -> list[str]:
    """Close phase 1's incidents, publish the burst (over ``spread_s``), wait until every incident is paged."""
    close_all(url)
    time.sleep(1.0)
    if statements:
        reset_statements(url)
    watcher = CommitWatcher(url, burst)
    watcher.start()
    cpu_before = tree_cpu(postgres)
    burst_start = time.monotonic()
    for n, device in enumerate(burst):
        # Evenly over ``spread_s`` (the "1,000 presses within 2 s"), or all at once.
        due = burst_start + spread_s * n / len(burst)
        while time.monotonic() < due:
            time.sleep(min(due - time.monotonic(), 0.005))
        presser.press(device)
    last_press = time.monotonic()
    published_s = last_press - burst_start
    all_paged = wait_all_paged(url, burst, timeout)
    cpu = cpu_spent(cpu_before, tree_cpu(postgres))
    watcher.join(timeout)
    watcher.stop.set()
    firsts = first_requests(url, network, burst)
    latencies = [firsts[d] - presser.published[d] for d in burst if d in firsts]
    committed = [watcher.seen[d] - presser.published[d] for d in burst if d in watcher.seen]
    written = first_attempts_written(url, burst)
    # Where the time goes: the hub's commit, then the router's step writing the first
    # call and SMS, then a sender leasing and sending one.
    to_step = [written[d] - watcher.seen[d] for d in burst if d in written and d in watcher.seen]
    to_send = [firsts[d] - written[d] for d in burst if d in written and d in firsts]
    lines = [
        f"phase 2: {len(burst)} presses published in {published_s * 1000:.0f} ms",
        summary("  press → incident committed (burst; polled every 20 ms)", committed),
        f"  every incident committed: {max(watcher.seen.values()) - last_press:.2f} s after the last press",
        summary("  incident committed (seen) → its first call and SMS written by the router's step", to_step),
        f"  every first call and SMS written: {max(written.values()) - last_press:.2f} s after the last press",
        summary("  first call and SMS written → the first of them requested from the provider", to_send),
        summary("  press → first provider request (burst)", latencies),
        f"  every first page sent: {max(firsts.values()) - burst_start:.2f} s after the first publish,"
        f" {max(firsts.values()) - last_press:.2f} s after the last press"
        f" (seen paged by polling at {all_paged - burst_start:.2f} s)",
        "  CPU seconds from the first press until every incident was paged: "
        + ", ".join(f"{name} {seconds:.2f}" for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1])),
    ]
    if statements:
        lines += statement_report(url, statements, len(burst))
    return lines


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inflight", type=int, default=1000, help="escalations opened before the window")
    parser.add_argument("--rate", type=float, default=20.0, help="new presses per second during the window")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of new presses")
    parser.add_argument("--burst", type=int, default=1000, help="simultaneous presses in phase 2")
    parser.add_argument("--wait-s", type=int, default=10, help="wait_s of every step of default-sos")
    parser.add_argument(
        "--lead-s",
        type=float,
        default=0.0,
        help="seconds between the in-flight escalations' first pages and the window (e.g. 100 with --wait-s 120)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="give up waiting for pages after this")
    parser.add_argument("--burst-only", action="store_true", help="skip phase 1: only the burst of --burst presses")
    parser.add_argument(
        "--burst-over",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="publish the burst's presses evenly over this many seconds (issue 13: 1,000 within 2 s); 0: at once",
    )
    parser.add_argument("--routers", type=int, default=1, help="`shouhu router` processes (they share by row locks)")
    parser.add_argument(
        "--statements",
        type=int,
        default=0,
        metavar="N",
        help="load pg_stat_statements and print the burst's statement count and its N most called and costly",
    )
    args = parser.parse_args()
    if args.burst_only:
        args.inflight, args.window = 0, 0.0
    return args


def main() -> None:
    args = arguments()
    # The machine is often shared: say how busy it was, so a figure can be judged.
    load_at_start = os.getloadavg()
    new_count = round(args.rate * args.window)

    # The shipped broker's in-flight window, so the hub's alarm groups are as large as in production.
    broker = Mosquitto(max_inflight=shipped_max_inflight())
    broker.start()
    cluster = start_postgres(wheel_bin_dir())
    if args.statements:
        enable_statements(cluster)
    create_database(cluster.url(), "bench")
    url = cluster.url("bench")
    migrate(url, MigrationContext(90, datetime.now(UTC)))
    processes: list[ShouhuProcess] = []
    app = create_phone_network(SID, TOKEN, announce=lambda _line: None)
    network: PhoneNetwork = app.state.network
    phone = serve_app(app)
    phone_base = next(phone)
    presser: Presser | None = None
    try:
        env = shouhu_env(
            SHOUHU_DATABASE_URL=url,
            SHOUHU_MQTT_URL=broker.url,
            SHOUHU_HUB_ID="bench-hub",
            SHOUHU_TWILIO_ACCOUNT_SID=SID,
            SHOUHU_TWILIO_AUTH_TOKEN=TOKEN,
            SHOUHU_TWILIO_FROM="+12025550100",
            SHOUHU_TWILIO_API_BASE=phone_base,
        )
        subprocess.run([SHOUHU_BIN, "registry", "load", str(DEMO)], env=env, check=True, capture_output=True)
        wristbands = add_residents(url, args.inflight + new_count + args.burst)
        short_policy(url, args.wait_s)
        for verb in ("hub", *["router"] * args.routers):
            port = free_port()
            processes.append(
                ShouhuProcess(
                    [verb], {**env, "SHOUHU_METRICS_PORT": str(port)}, ready_url=f"http://127.0.0.1:{port}/readyz"
                ).start()
            )
        presser = Presser(broker.port)
        lines = (
            []
            if args.burst_only
            else phase_one(
                url,
                network,
                presser,
                wristbands[: args.inflight],
                wristbands[args.inflight : args.inflight + new_count],
                args,
            )
        )
        burst = wristbands[args.inflight + new_count :]
        lines += phase_two(
            url,
            network,
            presser,
            burst,
            args.timeout,
            postmaster_pid(cluster.spec.data_dir),
            args.statements,
            spread_s=args.burst_over,
        )
        print()
        print(f"policy default-sos: grid_worker → guardians → operators, wait_s={args.wait_s} each;"
              f" {args.routers} router process(es)")
        print(f"load average (1, 5, 15 min): at the start {_load(load_at_start)}, at the end {_load(os.getloadavg())}")
        print("\n".join(lines))
    finally:
        if presser is not None:
            presser.close()
        for process in processes:
            process.stop()
        for _ in phone:
            pass
        broker.remove()
        cluster.remove()


if __name__ == "__main__":
    main()
