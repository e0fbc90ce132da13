"""The incident list under a county's history: p50/p99 of ``GET /api/v1/incidents``.

Starts its own PostgreSQL 18, migrates, loads the demo county, then adds by SQL
1,000,000 telemetry rows (the last 90 days), 20,000 incidents over 90 days (every
kind; all closed but about 200 open red ones, one per resident, and the open camera
orders) with three timeline entries each. Serves the API with uvicorn on a real port
and asks the lists people ask for, as an operator for the county and as a grid
worker bound to one grid, ``--requests`` times each, one after another from one
client. The reference is ``GET /healthz`` through the same server and client: the
HTTP stack's own cost.

    .venv/bin/python -m bench.incident_list
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from api.main import create_app
from bench.stats import load_average, migrated_database, percentile
from devices.registry import load_registry
from devices.registry_file import parse_registry
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.services import serve_app

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
GOAL_P99_MS = 50.0


def fill(url: str, telemetry: int, incidents: int) -> dict[str, int]:
    """The county's history, by SQL on the server (generate_series), in a few statements."""
    with psycopg.connect(url, autocommit=True) as conn:
        load_registry(conn, parse_registry(DEMO))
        conn.execute(
            """
            INSERT INTO telemetry (device_id, msg_id, ts, received_at, battery, heart_rate, spo2, worn, steps)
            SELECT d.id, 'bench-' || g, t, t, 20 + mod(g, 80), 60 + mod(g, 40), 90 + mod(g, 10),
                   mod(g, 7) <> 0, mod(g, 5000)
            FROM generate_series(1, %(n)s) AS g
            CROSS JOIN LATERAL (SELECT now() - (g * interval '90 days') / %(n)s AS t) AS times
            JOIN LATERAL (
                SELECT id FROM devices WHERE kind = 'wristband' ORDER BY id OFFSET mod(g, 240) LIMIT 1
            ) AS d ON true
            """,
            {"n": telemetry},
        )
        conn.execute(
            """
            WITH residents_ AS (
                SELECT row_number() OVER (ORDER BY r.id) - 1 AS n, r.id, r.grid_id, d.id AS device
                FROM residents r JOIN devices d ON d.resident_id = r.id
            ), kinds AS (
                SELECT * FROM (VALUES (0, 'sos', 'red'), (1, 'fall', 'red'), (2, 'wristband_offline', 'yellow'),
                                      (3, 'not_worn', 'yellow'), (4, 'low_battery', 'blue')) AS k(n, kind, severity)
            )
            INSERT INTO incidents (code, kind, severity, state, resident_id, device_id, area_id, opened_at,
                                   acknowledged_at, resolved_at, outcome)
            SELECT 'B' || g, k.kind, k.severity, 'resolved', r.id, r.device, r.grid_id,
                   now() - (g * interval '90 days') / %(n)s,
                   now() - (g * interval '90 days') / %(n)s + interval '70 seconds',
                   now() - (g * interval '90 days') / %(n)s + interval '40 minutes',
                   CASE WHEN k.severity = 'red' THEN 'visited_fine' ELSE 'task_completed' END
            FROM generate_series(1, %(n)s) AS g
            JOIN residents_ r ON r.n = mod(g, (SELECT count(*) FROM residents_))
            JOIN kinds k ON k.n = mod(g, 5)
            """,
            {"n": incidents},
        )
        # Some still open: a red one for 200 residents, and the dark cameras' orders.
        conn.execute(
            """
            UPDATE incidents SET state = 'open', resolved_at = NULL, outcome = NULL, acknowledged_at = NULL
            WHERE id IN (SELECT DISTINCT ON (resident_id) id FROM incidents WHERE severity = 'red'
                         ORDER BY resident_id, opened_at DESC LIMIT 200)
            """
        )
        conn.execute(
            """
            INSERT INTO incidents (code, kind, severity, device_id, area_id, opened_at)
            SELECT 'C' || d.id, 'camera_offline', 'yellow', d.id, d.area_id, now() - interval '3 hours'
            FROM devices d WHERE d.kind = 'camera' AND d.id <= 'cam-030'
            """
        )
        conn.execute(
            """
            INSERT INTO incident_events (incident_id, at, event, actor, detail)
            SELECT i.id, i.opened_at + e.n * interval '1 minute', e.event, 'bench', '{}'
            FROM incidents i CROSS JOIN (VALUES (0, 'opened'), (1, 'step_started'), (2, 'acknowledged')) AS e(n, event)
            """
        )
        conn.execute("ANALYZE")
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in ("telemetry", "incidents", "incident_events", "residents", "devices")
        }


def timed(client: httpx.Client, path: str, headers: dict[str, str], requests: int) -> list[float]:
    for _ in range(5):  # warm the pool and the plans
        client.get(path, headers=headers).raise_for_status()
    seconds: list[float] = []
    for _ in range(requests):
        start = time.perf_counter()
        client.get(path, headers=headers).raise_for_status()
        seconds.append(time.perf_counter() - start)
    return seconds


def line(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    p50, p99 = percentile(ms, 0.50), percentile(ms, 0.99)
    return f"{name}: n={len(ms)} p50={p50:.1f} ms p99={p99:.1f} ms max={max(ms):.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--telemetry", type=int, default=1_000_000)
    parser.add_argument("--incidents", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    print(f"load average at the start: {load_average()}")
    now = datetime.now(UTC)
    with migrated_database(now) as url:
        started = time.monotonic()
        counts = fill(url, args.telemetry, args.incidents)
        print(f"filled in {time.monotonic() - started:.0f} s: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        with psycopg.connect(url, autocommit=True) as conn:
            operator = create_token(conn, role=Role.OPERATOR, areas=[], label="bench", now=now, expires_at=None)
            worker = create_token(
                conn, role=Role.GRID_WORKER, areas=["dongguan-01-g1"], label="bench", now=now, expires_at=None
            )
        since = (now - timedelta(days=30)).isoformat().replace("+00:00", "Z")
        asks = [
            ("county operator, newest 100", "/api/v1/incidents", operator),
            ("county operator, open", "/api/v1/incidents?state=open", operator),
            (
                "county operator, red in a township, last 30 days",
                f"/api/v1/incidents?severity=red&area=dongguan&since={since}",
                operator,
            ),
            ("county operator, page 50 of 100", "/api/v1/incidents?offset=5000&limit=100", operator),
            ("grid worker of one grid, newest 100", "/api/v1/incidents", worker),
        ]
        for base in serve_app(create_app(Settings(database_url=url))):
            with httpx.Client(base_url=base, timeout=30) as client:
                reference = timed(client, "/healthz", {}, args.requests)
                print(line("reference: GET /healthz", reference))
                worst = 0.0
                for name, path, secret in asks:
                    seconds = timed(client, path, {"Authorization": f"Bearer {secret}"}, args.requests)
                    worst = max(worst, percentile([s * 1000 for s in seconds], 0.99))
                    print(line(f"GET {path} ({name})", seconds))
                verdict = "met" if worst < GOAL_P99_MS else "NOT met"
                print(f"goal p99 < {GOAL_P99_MS:.0f} ms: {verdict} (worst p99 {worst:.1f} ms)")
        print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
