"""A hung provider against everyone else's pages (issue 13): the same load with and without the hang.

Starts its own PostgreSQL 18, loads the demo county plus synthetic residents, sets
``default-sos`` to grid worker (voice, SMS, console) → guardians → the emergency
platform → operators with 1 s waits, and runs `shouhu router` as a process (its
sender pools, a real clock) with the phone-network and emergency-platform
simulators in this process. Presses are written as the hub writes them
(``record_alarm``), so the router alone is measured.

Each round runs three scenarios on a fresh router process, in turn:

- ``baseline``: every provider answers;
- ``platform-hang``: the platform URL is a server that takes the request and never
  answers (the notifier's 10 s timeout ends each try);
- ``twilio-hang``: the phone network holds every call and SMS 60 s (its ``hang``
  fault on ``*``): only the console channel can page.

In each: ``--early`` presses whose escalations reach the platform step (with the
platform hung, their CAP alerts hang), then ``--new`` presses at ``--rate``/s.
Measured: each new SOS's first page (press → the first of its first step's
attempts settled as sent, any channel: an upper bound of the provider request) and
every step's lateness (its ``step_started`` − its due time), for all incidents.

    .venv/bin/python -m bench.slow_provider
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from datetime import UTC, datetime

import httpx
import psycopg
from psycopg.types.json import Jsonb

from alerts.incidents import Alarm, record_alarm
from bench.escalation import DEMO, add_residents, close_all
from bench.stats import percentile
from devices.contract import payload_hash
from devices.kinds import IncidentKind
from shouhu.embedded.postgres import create_database, free_port, wheel_bin_dir
from shouhu.migrations import MigrationContext, migrate
from simulators.emergency_platform import create_emergency_platform
from simulators.phone_network import create_phone_network
from tests.support.escalation import HangingProvider
from tests.support.services import SHOUHU_BIN, ShouhuProcess, serve_app, shouhu_env, start_postgres

SID, TOKEN, SECRET = "AC" + "4" * 32, "bench-token", "bench-platform-secret"
SCENARIOS = ("baseline", "platform-hang", "twilio-hang")
STEPS = [
    {"target": "grid_worker", "channels": ["voice", "sms", "console"], "wait_s": 1},
    {"target": "guardians", "channels": ["voice", "sms"], "wait_s": 1},
    {"target": "emergency_platform", "channels": ["webhook"], "wait_s": 1},
    {"target": "operators", "channels": ["voice", "sms", "console"], "wait_s": 60},
]


def _press(url: str, device: str, tag: str) -> int:
    with psycopg.connect(url) as conn:
        outcome = record_alarm(
            conn,
            Alarm(device, IncidentKind.SOS, tag, b"{}", payload_hash(tag.encode()), datetime.now(UTC)),
            ack_timeout_s=120,
            hub_id="bench",
        )
    assert outcome.incident_id is not None
    return outcome.incident_id


def _first_pages(
    url: str, incidents: list[int], channels: tuple[str, ...] = ("voice", "sms", "console")
) -> list[float]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM min(a.sent_at) - i.opened_at)::float8 FROM incidents i"
            " JOIN notification_attempts a ON a.incident_id = i.id AND a.round = 0 AND a.step = 0"
            " AND a.purpose = 'page' AND a.sent_at IS NOT NULL AND a.channel = ANY(%s)"
            " WHERE i.id = ANY(%s) GROUP BY i.id",
            (list(channels), incidents),
        ).fetchall()
    if len(rows) != len(incidents):
        raise RuntimeError(f"{len(incidents) - len(rows)} of {len(incidents)} new SOS had no first page")
    return [float(r[0]) for r in rows]


def _lateness(url: str, incidents: list[int]) -> list[float]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM e.at - a.due_at)::float8 FROM incident_events e"
            " JOIN escalation_actions a ON a.incident_id = e.incident_id AND a.kind = 'step'"
            " AND a.step = (e.detail->>'step')::int AND a.round = (e.detail->>'round')::int"
            " WHERE e.event IN ('step_started', 'no_recipients') AND e.incident_id = ANY(%s)",
            (incidents,),
        ).fetchall()
    return [float(r[0]) for r in rows]


def run_scenario(
    scenario: str, url: str, env: dict[str, str], bands: list[str], args: argparse.Namespace, phone: str, tag: str
) -> tuple[list[float], list[float], list[float]]:
    """One scenario on a fresh router process: new SOS first-page delays (any channel; by
    phone, empty with Twilio hung), and step lateness."""
    hung = HangingProvider() if scenario == "platform-hang" else None
    env = dict(env)
    if hung is not None:
        env["SHOUHU_EMERGENCY_WEBHOOK_URL"] = f"{hung.url}/cap"
    if scenario == "twilio-hang":
        httpx.post(f"{phone}/_sim/faults", json={"to": "*", "fail": "hang", "hang_s": 60}).raise_for_status()
    port = free_port()
    router = ShouhuProcess(
        ["router"], {**env, "SHOUHU_METRICS_PORT": str(port)}, ready_url=f"http://127.0.0.1:{port}/readyz"
    ).start()
    try:
        early = [_press(url, band, f"{tag}-e") for band in bands[: args.early]]
        time.sleep(3.5)  # grid worker at 0, guardians at 1 s, the platform at 2 s: its alerts are out
        new: list[int] = []
        for band in bands[args.early : args.early + args.new]:
            new.append(_press(url, band, f"{tag}-n"))
            time.sleep(1 / args.rate)
        time.sleep(4.0)  # the new incidents' later steps
        firsts = _first_pages(url, new)
        phoned = [] if scenario == "twilio-hang" else _first_pages(url, new, ("voice", "sms"))
        late = _lateness(url, early + new)
    finally:
        router.stop()
        if hung is not None:
            hung.close()
        httpx.post(f"{phone}/_sim/faults", json={"to": "*", "fail": None}).raise_for_status()
        close_all(url)
    return firsts, phoned, late


def _ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms, p99 {percentile(values, 0.99) * 1000:.0f} ms"


def _spread(values: list[float], unit: str = "") -> str:
    return f"min {min(values):.2f}{unit} / median {statistics.median(values):.2f}{unit} / max {max(values):.2f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--early", type=int, default=4, help="escalations reaching the platform before the window")
    parser.add_argument("--new", type=int, default=30, help="new presses per scenario")
    parser.add_argument("--rate", type=float, default=5.0, help="new presses per second")
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    cluster = start_postgres(wheel_bin_dir())
    create_database(cluster.url(), "bench")
    url = cluster.url("bench")
    migrate(url, MigrationContext(90, datetime.now(UTC)))
    phone_app = create_phone_network(SID, TOKEN, announce=lambda _line: None)
    platform_app = create_emergency_platform(SECRET, announce=lambda _line: None)
    phone_server, platform_server = serve_app(phone_app), serve_app(platform_app)
    phone, platform = next(phone_server), next(platform_server)
    results: dict[str, list[tuple[list[float], list[float], list[float]]]] = {s: [] for s in SCENARIOS}
    try:
        env = shouhu_env(
            SHOUHU_DATABASE_URL=url,
            SHOUHU_TWILIO_ACCOUNT_SID=SID,
            SHOUHU_TWILIO_AUTH_TOKEN=TOKEN,
            SHOUHU_TWILIO_FROM="+12025550100",
            SHOUHU_TWILIO_API_BASE=phone,
            SHOUHU_EMERGENCY_WEBHOOK_URL=f"{platform}/cap",
            SHOUHU_EMERGENCY_WEBHOOK_SECRET=SECRET,
        )
        subprocess.run([SHOUHU_BIN, "registry", "load", str(DEMO)], env=env, check=True, capture_output=True)
        per_run = args.early + args.new
        bands = add_residents(url, per_run * len(SCENARIOS) * args.rounds)
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE escalation_policies SET steps = %s WHERE id = 'default-sos'", (Jsonb(STEPS),))
        n = 0
        for round_ in range(args.rounds):
            for scenario in SCENARIOS:
                mine = bands[n * per_run : (n + 1) * per_run]
                n += 1
                results[scenario].append(run_scenario(scenario, url, env, mine, args, phone, f"r{round_}-{scenario}"))
                print(f"round {round_ + 1} {scenario}: first page {_ms(results[scenario][-1][0])}", flush=True)
    finally:
        for server in (phone_server, platform_server):
            for _ in server:
                pass
        cluster.remove()
    print()
    print(f"policy: grid worker → guardians → platform → operators, 1 s waits; {args.early} early escalations,")
    print(
        f"{args.new} new SOS at {args.rate:g}/s per scenario, {args.rounds} rounds; `shouhu router` (default senders)"
    )
    print(
        f"load average (1, 5, 15 min): at the start {' '.join(f'{a:.2f}' for a in load_at_start)},"
        f" at the end {' '.join(f'{a:.2f}' for a in os.getloadavg())}"
    )
    for label, index in (("first page, any channel", 0), ("first page by voice or SMS", 1)):
        print(f"{label}:")
        base = [percentile(run[index], 0.99) for run in results["baseline"]]
        for scenario in SCENARIOS:
            if not results[scenario][0][index]:
                print(f"{scenario:>16}: none (Twilio hung)")
                continue
            p99s = [percentile(run[index], 0.99) for run in results[scenario]]
            line = f"{scenario:>16}: p99 {_spread([p * 1000 for p in p99s], ' ms')}"
            if scenario != "baseline":
                ratios = [p / b for p, b in zip(p99s, base, strict=True)]
                line += f"; ÷ baseline p99 of the same round {_spread(ratios)}"
            print(line)
    print("step lateness (step started − due), max per run:")
    for scenario in SCENARIOS:
        print(f"{scenario:>16}: {_spread([max(run[2]) for run in results[scenario]], ' s')}")


if __name__ == "__main__":
    main()
