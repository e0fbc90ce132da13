"""`shouhu up --demo` is a living county: within a minute its simulated cameras and
wristbands fill the technician's board — 在线率 by area, offline cameras with their
reasons, open repair orders, the trend — and the grid console shows a not-worn visit.
Seen in Debian's Chromium, as a technician and a grid worker would see it.

With ``SHOUHU_SCREENSHOTS=<dir>`` the run saves the board's screenshot there (the
README's technician-board.png comes from here).
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from playwright.sync_api import Browser, ViewportSize, expect

from shouhu.embedded.postgres import free_port
from shouhu.tokens import Role, create_token
from tests.support.browser import assert_accessible_basics, log_in, snap
from tests.support.hub import wait_until
from tests.support.services import SHOUHU_BIN, Mosquitto, http_status, scratch_dir, shouhu_env

# The demo's holds are 20 s (cameras) and 30 s (not worn); its devices report every 10 s.
WITHIN_A_MINUTE_MS = 60_000


@pytest.fixture
def demo(database_url: str, broker: Mosquitto) -> Iterator[str]:
    """`shouhu up --demo` on a fresh database and a broker of this test's own; its API's base URL."""
    port = free_port()
    workdir = scratch_dir("shouhu-demo-live-")
    process = subprocess.Popen(
        [SHOUHU_BIN, "up", "--demo", "--port", str(port)],
        env=shouhu_env(SHOUHU_DATABASE_URL=database_url, SHOUHU_MQTT_URL=broker.url, SHOUHU_HUB_ID=f"live-{port}"),
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert process.stdout is not None
    threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True).start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: process.poll() is not None or http_status(f"{base}/readyz") == 200, 90, "shouhu up --demo ready"
        )
        assert process.poll() is None, "".join(lines)
        # wb-0061 … wb-0070 have watch ids: they are simulated 4G watches, not MQTT wristbands.
        wait_until(lambda: any(line.startswith("wristbands: 230 from") for line in lines), 30, "both fleets running")
        wait_until(lambda: any(line.startswith("watches: 10 from the registry") for line in lines), 30, "watches")
        yield base
    finally:
        process.send_signal(2)
        process.wait(20)
    assert any("cameras: 67 from demo_county.yaml" in line and "at most 50/s" in line for line in lines)
    assert any(re.match(r"cameras: published \d+ messages", line) for line in lines), "".join(lines)


def test_the_simulated_county_fills_the_technician_board_and_the_grid_console(
    browser: Browser, demo: str, database_url: str
) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(database_url, autocommit=True) as conn:
        tech = create_token(conn, role=Role.TECHNICIAN, areas=[], label="田霞", now=now, expires_at=None)
        # The README's grid: with seed 1 a band there lies in a drawer.
        grid = create_token(
            conn, role=Role.GRID_WORKER, areas=["dongguan-01-g1"], label="董思远", now=now, expires_at=None
        )
    page = log_in(browser, demo, tech, ViewportSize(width=1024, height=768))  # the control room's screen
    assert page.url.endswith("/console/tech")
    assert_accessible_basics(page)
    # The board keeps itself current from the live feed: no reload.
    orders = page.locator("#orders .order-list li")
    expect(orders.first).to_be_visible(timeout=WITHIN_A_MINUTE_MS)
    rows = page.locator("#cams-h + table tbody tr")
    ratios = [rows.nth(i).locator("td").nth(1).inner_text() for i in range(rows.count())]
    assert len(ratios) >= 40
    assert all(re.fullmatch(r"\d+\.\d%", r) for r in ratios), ratios
    assert any(r != "100.0%" for r in ratios)
    offline = page.locator("#offline-table tbody tr")
    assert offline.count() > 0
    reasons = {offline.nth(i).locator("td").nth(2).inner_text() for i in range(offline.count())}
    assert reasons <= {"视频丢失", "断电", "网络中断", "存储故障", "心跳超时", "连接断开"}, reasons
    assert reasons
    assert page.locator("svg.chart circle").count() >= 1  # today's point of the trend
    snap(page, "technician-board")
    page.close()  # and its live feed: the demo's API waits for open streams when it stops
    page = log_in(browser, demo, grid)
    assert page.url.endswith("/console/grid")
    expect(page.locator("#incident-list")).to_contain_text("手环未佩戴", timeout=WITHIN_A_MINUTE_MS)
    # The demo's watches reached the hub through the watch gateway: their heartbeats are
    # telemetry of their wristbands, under the gateway's msg_ids.
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT device_id) FROM message_ledger WHERE msg_id LIKE 'watch-%'"
            " AND device_id BETWEEN 'wb-0061' AND 'wb-0070'"
        ).fetchone()
    assert row == (10,)
    # This console stays open, its live feed with it: Ctrl-C must stop the demo all the same.
