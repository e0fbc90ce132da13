"""Console page loads on the demo county: the goal is < 300 ms a page.

Starts its own PostgreSQL 18, migrates, loads the demo county, opens a visit, a
repair order and a few SOS incidents, serves the API and consoles with uvicorn, and
then for each console page measures (1) the server's answer over HTTP with the session
cookie, ``--requests`` times, and (2) the full load in Debian's Chromium driven by
Playwright — navigation start to the ``load`` event (HTML, CSS, script; the live feed
connects after) — ``--loads`` times. The reference is ``GET /healthz`` through the same
server and client.

    .venv/bin/python -m bench.consoles
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from playwright.sync_api import sync_playwright

from alerts.care_sweep import sweep
from api.main import create_app
from bench.stats import load_average, migrated_database, percentile
from devices.registry import load_registry
from devices.registry_file import parse_registry
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.care_support import RULES, heard, last_will
from tests.escalation_support import press
from tests.services import serve_app
from tests.test_consoles import CHROMIUM, CHROMIUM_ARGS

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
GOAL_MS = 300.0


def ms_line(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return f"{name}: n={len(ms)} p50={percentile(ms, 0.5):.1f} ms p99={percentile(ms, 0.99):.1f} ms"


def seed(url: str, now: datetime) -> str:
    """The demo county with five SOS incidents, a visit and a repair order; an operator's token."""
    with psycopg.connect(url, autocommit=True) as conn:
        load_registry(conn, parse_registry(DEMO))
        for n in range(1, 6):
            press(url, f"wb-{n:04d}", now - timedelta(minutes=n), msg_id=f"bench-{n}")
        last_will(conn, "wb-0010", now - timedelta(hours=2))
        heard(conn, "cam-002", now - timedelta(hours=1), reported_online=False, reported_reason="power")
        sweep(conn, now, RULES, lock_key=0x7E57_BE0C)
        return create_token(conn, role=Role.OPERATOR, areas=[], label="bench", now=now, expires_at=None)


def server_times(base: str, secret: str, pages: list[str], requests: int) -> float:
    """Each page's answer over HTTP with the session cookie; returns the worst p99 in ms."""
    worst = 0.0
    with httpx.Client(base_url=base, timeout=30) as client:
        client.post("/api/v1/session", json={"token": secret}).raise_for_status()
        for path in ["/healthz", *pages]:
            seconds = []
            for _ in range(requests):
                start = time.perf_counter()
                client.get(path).raise_for_status()
                seconds.append(time.perf_counter() - start)
            if path == "/healthz":
                print(ms_line("reference: GET /healthz", seconds))
                continue
            worst = max(worst, percentile([s * 1000 for s in seconds], 0.99))
            print(ms_line(f"server: GET {path}", seconds))
    return worst


def browser_times(base: str, secret: str, pages: list[str], loads: int) -> float:
    """Each page in Chromium, navigation start to the load event; returns the worst p99 in ms."""
    worst = 0.0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 412, "height": 915})
        page.goto(f"{base}/console/login")
        page.get_by_label("访问令牌").fill(secret)
        page.get_by_role("button", name="登录").click()
        page.wait_for_url(lambda target: "/console/login" not in target)
        for path in pages:
            seconds = []
            for _ in range(loads):
                page.goto(f"{base}{path}", wait_until="load")
                timing = page.evaluate(
                    "() => { const n = performance.getEntriesByType('navigation')[0];"
                    " return n.loadEventEnd - n.startTime; }"
                )
                seconds.append(float(timing) / 1000)
            worst = max(worst, percentile([s * 1000 for s in seconds], 0.99))
            print(ms_line(f"browser: {path} (navigation start → load)", seconds))
        browser.close()
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--loads", type=int, default=20)
    args = parser.parse_args()
    print(f"load average at the start: {load_average()}")
    now = datetime.now(UTC)
    with migrated_database(now) as url:
        secret = seed(url, now)
        pages = ["/console/overview", "/console/grid", "/console/tech", "/console/incidents/1"]
        for base in serve_app(create_app(Settings(database_url=url))):
            served = server_times(base, secret, pages, args.requests)
            worst = max(served, browser_times(base, secret, pages, args.loads))
        verdict = "met" if worst < GOAL_MS else "NOT met"
        print(f"goal < {GOAL_MS:.0f} ms a page: {verdict} (worst p99 {worst:.1f} ms)")
        print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
