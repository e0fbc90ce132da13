"""Camera uptime: a township's 30-day report over 500 cameras with 90 days of health.

Starts its own PostgreSQL 18, migrates it, and builds a county with one township
holding every camera (the worst case for "a township's report"): 5 communities × 5
grids × 20 cameras. Each camera gets 90 days of history as the hub would have left
it:

- state transitions in ``device_events``: first heard 90 days ago, then outages at
  random (``--outages-per-week`` on average, exponential gaps), mostly minutes, some
  hours, a few days, with reasons ``no_heartbeat``, ``last_will``,
  ``reported:video_lost``, ``reported:power``;
- a repair order (``care_tasks`` with its ``camera_offline`` incident) for every
  outage past 5 minutes, closed 5 minutes after the camera came back;
- maintenance windows (one of 2 hours per camera per month, and a few on grids);
  three ingest outages;
- 5-minute ``camera_health`` samples by binary COPY — none while the camera was
  silent (no heartbeat, last will), ``online = false`` with the reason while it
  reported itself down — into daily partitions made first.

Then it serves the real API (uvicorn in a thread) and times ``GET
/api/v1/cameras/uptime?area=<township>&from=<30 days ago>&to=<now>`` (every camera
on one page) ``--runs`` times, and the same report by day, and the function the
route calls without HTTP.

    .venv/bin/python -m bench.uptime
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import psycopg
from psycopg.types.json import Jsonb

from api.main import create_app
from bench.stats import percentile
from devices.uptime import Span
from devices.uptime_store import uptime_report
from shouhu.embedded.postgres import create_database, wheel_bin_dir
from shouhu.migrations import MigrationContext, migrate
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.services import serve_app, start_postgres

ZONE = ZoneInfo("Asia/Shanghai")
TOWNSHIP = "bench-town"
SAMPLE_EVERY = timedelta(minutes=5)
REPAIR_HOLD = timedelta(minutes=5)
# (reason, weight, whether the camera still sends health samples while down)
REASONS = (("no_heartbeat", 5, False), ("last_will", 2, False), ("reported:video_lost", 2, True),
           ("reported:power", 1, False))


@dataclass(frozen=True, slots=True)
class Outage:
    start: datetime
    end: datetime  # may be after now: still down
    reason: str
    samples: bool


def outages(rng: random.Random, start: datetime, now: datetime, per_week: float) -> list[Outage]:
    found: list[Outage] = []
    at = start + timedelta(hours=rng.expovariate(per_week / 168))
    while at < now:
        roll = rng.random()
        minutes = rng.uniform(2, 30) if roll < 0.6 else rng.uniform(30, 360) if roll < 0.93 else rng.uniform(360, 2880)
        reason, _, samples = rng.choices(REASONS, weights=[w for _, w, _ in REASONS])[0]
        found.append(Outage(at, at + timedelta(minutes=minutes), reason, samples))
        at = found[-1].end + timedelta(hours=rng.expovariate(per_week / 168))
    return found


def build_areas(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    rows = [("bench-county", None, "county"), (TOWNSHIP, "bench-county", "township"),
            ("bench-town-2", "bench-county", "township")]
    grids: list[str] = []
    for m in range(5):
        rows.append((f"bench-m{m}", TOWNSHIP, "community"))
        for g in range(5):
            rows.append((f"bench-g{m}{g}", f"bench-m{m}", "grid"))
            grids.append(f"bench-g{m}{g}")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO areas (id, parent_id, level, name) VALUES (%s, %s, %s, %s)",
                        [(i, p, lvl, i) for i, p, lvl in rows])
    return grids


def build_history(url: str, cameras: int, days: int, per_week: float, now: datetime, seed: int) -> dict[str, int]:
    rng = random.Random(seed)  # noqa: S311 (repeatable bench data, not secrets)
    start = now - timedelta(days=days)
    with psycopg.connect(url) as conn:
        grids = build_areas(conn)
        ids = [f"bench-cam-{i:04d}" for i in range(cameras)]
        area_of = {cam: grids[i % len(grids)] for i, cam in enumerate(ids)}
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO devices (id, kind, area_id, model) VALUES (%s, 'camera', %s, 'bench')",
                            [(cam, area_of[cam]) for cam in ids])
        history = {cam: outages(rng, start, now, per_week) for cam in ids}

        with conn.cursor().copy(
            "COPY device_events (device_id, at, event, reason, detail) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "timestamptz", "text", "text", "jsonb"])
            for cam in ids:
                copy.write_row((cam, start, "online", None, Jsonb({"from": "unknown"})))
                for o in history[cam]:
                    copy.write_row((cam, o.start, "offline", o.reason, Jsonb({"from": "online"})))
                    if o.end < now:
                        copy.write_row((cam, o.end, "online", None, Jsonb({"from": "offline"})))

        # Repair orders: an incident each, then the task.
        orders = [(cam, o) for cam in ids for o in history[cam] if min(o.end, now) - o.start > REPAIR_HOLD]
        with conn.cursor().copy(
            "COPY incidents (code, kind, severity, state, device_id, area_id, opened_at) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "text", "text", "text", "text", "text", "timestamptz"])
            for n, (cam, o) in enumerate(orders):
                state = "resolved" if o.end + REPAIR_HOLD < now else "open"
                copy.write_row((f"BR-{n}", "camera_offline", "yellow", state, cam, area_of[cam], o.start + REPAIR_HOLD))
        conn.execute(
            """
            INSERT INTO care_tasks (incident_id, kind, device_id, area_id, owner_area_id, reason, state, opened_at,
                                    problem_since, due_at, recovered_at, closed_at, outcome)
            SELECT i.id, 'repair', i.device_id, i.area_id, i.area_id, 'bench',
                   CASE WHEN i.state = 'open' THEN 'open' ELSE 'closed' END, i.opened_at,
                   i.opened_at - interval '5 minutes', i.opened_at + interval '2 days',
                   o.recovered_at, CASE WHEN i.state = 'open' THEN NULL ELSE o.recovered_at + interval '5 minutes' END,
                   CASE WHEN i.state = 'open' THEN NULL ELSE 'device_recovered' END
            FROM incidents i
            JOIN unnest(%s::text[], %s::timestamptz[]) AS o(code, recovered_at) ON o.code = i.code
            """,
            ([f"BR-{n}" for n in range(len(orders))], [o.end if o.end < now else None for _, o in orders]),
        )

        windows: list[tuple[str | None, str | None, datetime, datetime]] = []
        for cam in ids:
            for month in range(days // 30):
                begins = start + timedelta(days=30 * month + rng.uniform(0, 29))
                windows.append((cam, None, begins, begins + timedelta(hours=2)))
        for g in grids[:5]:
            begins = now - timedelta(days=rng.uniform(1, 60))
            windows.append((None, g, begins, begins + timedelta(hours=6)))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO maintenance_windows (device_id, area_id, starts_at, ends_at, reason, created_by,"
                " created_at) VALUES (%s, %s, %s, %s, '检修', 'bench', now())",
                windows,
            )
            cur.executemany(
                "INSERT INTO ingest_gaps (started_at, ended_at, applied_at) VALUES (%s, %s, %s)",
                [(now - timedelta(days=d), now - timedelta(days=d, minutes=-m), now - timedelta(days=d, minutes=-m))
                 for d, m in ((80, 25), (41, 12), (9, 30))],
            )
        conn.commit()
    return {"cameras": cameras, "repair orders": len(orders), "maintenance windows": len(windows)}


def make_partitions(url: str, now: datetime, days: int) -> None:
    first = (now - timedelta(days=days)).astimezone(UTC).date()
    with psycopg.connect(url) as conn:
        existing = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'camera_health'")}
        for n in range(days + 2):
            day = first + timedelta(days=n)
            name = f"camera_health_p{day:%Y%m%d}"
            if name not in existing:
                conn.execute(
                    f"CREATE TABLE {name} PARTITION OF camera_health FOR VALUES FROM ('{day}') TO"
                    f" ('{day + timedelta(days=1)}')"
                )


def load_health(url: str, now: datetime, days: int, seed: int, per_week: float) -> tuple[int, float]:
    """Binary COPY of the 5-minute samples; returns (rows, seconds)."""
    rng = random.Random(seed)  # noqa: S311 (repeatable bench data, not secrets)
    start = now - timedelta(days=days)
    with psycopg.connect(url) as conn:
        cams = [r[0] for r in conn.execute("SELECT id FROM devices WHERE kind = 'camera' ORDER BY id")]
    history = {cam: outages(rng, start, now, per_week) for cam in cams}  # the same draws as build_history
    slots = int((now - start) / SAMPLE_EVERY)
    rows = 0
    began = time.perf_counter()
    with psycopg.connect(url) as conn, conn.cursor().copy(
        "COPY camera_health (device_id, msg_id, received_at, online, reason, fps, bitrate_kbps, storage_ok)"
        " FROM STDIN (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["text", "text", "timestamptz", "bool", "text", "float4", "float4", "bool"])
        for cam in cams:
            down = history[cam]
            k = 0
            for slot in range(slots):
                at = start + slot * SAMPLE_EVERY
                while k < len(down) and down[k].end <= at:
                    k += 1
                if k < len(down) and down[k].start <= at:
                    if not down[k].samples:
                        continue  # silent: no sample
                    copy.write_row((cam, f"{cam}-{slot}", at, False, down[k].reason.removeprefix("reported:"),
                                    0.0, 0.0, True))
                else:
                    copy.write_row((cam, f"{cam}-{slot}", at, True, None, 25.0, 2048.0, True))
                rows += 1
    return rows, time.perf_counter() - began


def summary(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (f"{name}: n={len(ms)} p50={statistics.median(ms):.1f} ms p99={percentile(ms, 0.99):.1f} ms"
            f" max={max(ms):.1f} ms")


def time_reports(url: str, secret: str, now: datetime, args: argparse.Namespace) -> list[str]:
    """The township report through HTTP by period and by day, then the function alone."""
    frm = (now - timedelta(days=args.report_days)).isoformat()
    params = {"area": TOWNSHIP, "from": frm, "to": now.isoformat(), "limit": "1000"}
    lines: list[str] = []
    server = serve_app(create_app(Settings(database_url=url)))
    base = next(server)
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as http:
            for by, runs in (("period", args.runs), ("day", max(5, args.runs // 5))):
                timings: list[float] = []
                for _ in range(runs + 2):
                    t0 = time.perf_counter()
                    response = http.get("/api/v1/cameras/uptime", params={**params, "by": by})
                    timings.append(time.perf_counter() - t0)
                    response.raise_for_status()
                body = response.json()
                ratio = body["buckets"][0]["total"]["online_ratio"] if by == "period" else None
                lines.append(summary(f"HTTP township report by={by}, {len(body['buckets'][0]['cameras'])} cameras,"
                                     f" {len(body['buckets'])} bucket(s), {len(response.content):,} bytes",
                                     timings[2:]))
                if ratio is not None:
                    lines.append(f"  township 30-day online ratio {ratio:.4f},"
                                 f" outages {body['buckets'][0]['total']['outages']}")
    finally:
        for _ in server:
            pass
    with psycopg.connect(url) as conn:
        window = Span(now - timedelta(days=args.report_days), now)
        timings = []
        for _ in range(args.runs + 2):
            t0 = time.perf_counter()
            uptime_report(conn, roots=[TOWNSHIP], window=window, now=now, zone=ZONE, by_day=False)
            timings.append(time.perf_counter() - t0)
        lines.append(summary("uptime_report() alone, by=period", timings[2:]))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, default=500)
    parser.add_argument("--days", type=int, default=90, help="days of history")
    parser.add_argument("--health-days", type=int, default=90, help="days of 5-minute samples to load (≤ --days)")
    parser.add_argument("--outages-per-week", type=float, default=3.0)
    parser.add_argument("--report-days", type=int, default=30)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    cluster = start_postgres(wheel_bin_dir())
    try:
        create_database(cluster.url(), "bench")
        url = cluster.url("bench")
        now = datetime.now(UTC).replace(microsecond=0)
        migrate(url, MigrationContext(90, now))
        began = time.perf_counter()
        built = build_history(url, args.cameras, args.days, args.outages_per_week, now, args.seed)
        print(f"history built in {time.perf_counter() - began:.1f} s: {built}")
        make_partitions(url, now, args.health_days)
        health_rows, health_s = load_health(url, now, args.health_days, args.seed, args.outages_per_week)
        print(f"camera_health: {health_rows:,} rows by binary COPY in {health_s:.0f} s"
              f" ({health_rows / health_s:,.0f} rows/s)")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
                      for t in ("device_events", "camera_health", "care_tasks", "maintenance_windows", "ingest_gaps")}
            secret = create_token(conn, role=Role.TECHNICIAN, areas=[], label="bench", now=now, expires_at=None)
        print("rows: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))

        print("\n".join(time_reports(url, secret, now, args)))
    finally:
        cluster.remove()


if __name__ == "__main__":
    main()
