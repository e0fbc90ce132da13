"""The county's report exports through the real routes on a real PostgreSQL: Chinese
headers and rows of each export, CSV with its byte order mark, Excel read back with
openpyxl, scope and roles (403 and 404 as the reports answer), formula text made
harmless, the audit row, and 50,000 incidents streamed with the served API's memory
staying flat."""

from __future__ import annotations

import csv
import io
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import httpx
import psutil
import psycopg
import pytest
from fastapi.testclient import TestClient
from openpyxl import load_workbook

from api import deps
from api.main import create_app
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.support.builders import add_incident, add_task
from tests.support.services import serve_app

NOW = datetime(2026, 11, 27, 4, 0, tzinfo=UTC)  # 12:00 in Asia/Shanghai
PERIOD = {"from": "2026-11-20", "to": "2026-11-28"}
INCIDENT_HEADERS = [
    "事件编号", "类型", "级别", "状态", "区域", "区域编号", "老人编号", "设备编号", "发生时间（Asia/Shanghai）",
    "接单时间（Asia/Shanghai）", "接单人", "响应用时（秒）", "办结时间（Asia/Shanghai）", "处置结果",
]


@pytest.fixture
def county(county_url: str) -> str:
    """The demo county with three incidents in the period (an SOS in 东关村第一网格, a camera
    in 东关村, an SOS in 西关) and one before it; a visit on each SOS, a repair order on
    the camera; the camera's transitions."""
    with psycopg.connect(county_url, autocommit=True) as conn:
        b1 = add_incident(conn, "B1", area="dongguan-01-g1", resident="r-0001", device="wb-0001",
                          opened_at=NOW - timedelta(hours=5), acknowledged_at=NOW - timedelta(hours=5, seconds=-42),
                          acknowledged_by_name="董思远（网格员）", resolved_at=NOW - timedelta(hours=4),
                          outcome="visited_fine")
        c1 = add_incident(conn, "C1", kind="camera_offline", severity="yellow", state="open", area="dongguan-01",
                          device="cam-001", opened_at=NOW - timedelta(hours=3))
        x1 = add_incident(conn, "X1", state="open", area="xiguan-01-g1", resident="r-0015",
                          opened_at=NOW - timedelta(hours=2))
        add_incident(conn, "OLD", area="dongguan-01-g1", resident="r-0001", opened_at=NOW - timedelta(days=26))
        visit = add_task(conn, b1, kind="visit", area="dongguan-01-g1", resident="r-0001", reason="follow_up",
                         opened_at=NOW - timedelta(hours=4), due_at=NOW + timedelta(hours=20),
                         deadline=NOW + timedelta(hours=20), closed_at=NOW - timedelta(hours=1),
                         outcome="resident_fine")
        conn.execute("UPDATE care_tasks SET note = '=HYPERLINK(\"http://x\")' WHERE id = %s", (visit,))
        add_task(conn, x1, kind="visit", area="xiguan-01-g1", resident="r-0015", reason="follow_up",
                 opened_at=NOW - timedelta(hours=1), due_at=NOW + timedelta(hours=23))
        add_task(conn, c1, kind="repair", area="dongguan-01", device="cam-001", opened_at=NOW - timedelta(hours=3),
                 due_at=NOW + timedelta(days=2))
        for device in ("cam-001", "cam-024"):
            conn.execute("INSERT INTO device_events (device_id, at, event) VALUES (%s, %s, 'online')",
                         (device, NOW - timedelta(hours=10)))
        conn.execute("INSERT INTO device_events (device_id, at, event, reason) VALUES"
                     " ('cam-001', %s, 'offline', 'no_heartbeat')", (NOW - timedelta(hours=3),))
    return county_url


@pytest.fixture
def client(county: str) -> Iterator[TestClient]:
    app = create_app(Settings(database_url=county))
    app.dependency_overrides[deps.get_now] = lambda: NOW
    with TestClient(app) as test_client:
        yield test_client


def bearer(url: str, role: Role, areas: list[str] | None = None) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        secret = create_token(conn, role=role, areas=areas or [], label="exports", now=NOW, expires_at=None)
    return {"Authorization": f"Bearer {secret}"}


def read_csv(body: bytes) -> list[list[str]]:
    assert body.startswith(b"\xef\xbb\xbf"), "no UTF-8 byte order mark: Excel would show the headers as mojibake"
    return list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))


def export(client: TestClient, headers: dict[str, str], what: str, **query: str) -> httpx.Response:
    response: httpx.Response = client.get(f"/api/v1/exports/{what}", params={**PERIOD, **query}, headers=headers)
    return response


def test_incidents_as_csv_with_chinese_headers_and_an_audit_row(client: TestClient, county: str) -> None:
    response = export(client, bearer(county, Role.OPERATOR), "incidents")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == (
        'attachment; filename="shouhu-incidents-2026-11-20-2026-11-27.csv"'
    )
    header, *rows = read_csv(response.content)
    assert header == INCIDENT_HEADERS
    assert [r[0] for r in rows] == ["B1", "C1", "X1"]  # oldest first; OLD is before the period
    b1 = dict(zip(header, rows[0], strict=True))
    assert b1["类型"] == "一键求助"
    assert b1["级别"] == "红"
    assert b1["状态"] == "已办结"
    assert b1["区域"] == "东关村第一网格"
    assert b1["老人编号"] == "r-0001"
    assert b1["发生时间（Asia/Shanghai）"] == "2026-11-27 07:00:00"
    assert b1["接单人"] == "董思远（网格员）"
    assert b1["响应用时（秒）"] == "42"
    assert b1["处置结果"] == "visited_fine"
    assert dict(zip(header, rows[1], strict=True))["类型"] == "摄像头离线"
    with psycopg.connect(county) as conn:
        audit = conn.execute("SELECT subject, detail FROM audit_log WHERE action = 'export'").fetchall()
    assert [(s, d["format"], d["area"]) for s, d in audit] == [("export:incidents", "csv", None)]


def test_incidents_as_excel_open_with_openpyxl(client: TestClient, county: str) -> None:
    response = export(client, bearer(county, Role.ADMIN), "incidents", format="xlsx", area="dongguan")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/vnd.openxmlformats")
    sheet = load_workbook(io.BytesIO(response.content), read_only=True)["事件"]
    rows = [list(row) for row in sheet.iter_rows(values_only=True)]
    assert rows[0] == INCIDENT_HEADERS
    assert [r[0] for r in rows[1:]] == ["B1", "C1"]  # ?area=dongguan: 西关's X1 is not in it
    assert rows[1][8] == datetime(2026, 11, 27, 7, 0, tzinfo=UTC).replace(tzinfo=None)  # a date cell, local time
    assert rows[1][11] == 42


def test_visits_and_repairs_with_their_outcomes_and_harmless_formulas(client: TestClient, county: str) -> None:
    operator = bearer(county, Role.OPERATOR)
    header, *visits = read_csv(export(client, operator, "visits").content)
    assert header[:6] == ["任务编号", "事件编号", "原因", "网格", "网格编号", "老人编号"]
    by_code = {row[1]: dict(zip(header, row, strict=True)) for row in visits}
    assert set(by_code) == {"B1", "X1"}
    assert by_code["B1"]["原因"] == "求助后回访"
    assert by_code["B1"]["按时完成"] == "是"
    assert by_code["B1"]["状态"] == "已销号"
    assert by_code["B1"]["备注"] == "'=HYPERLINK(\"http://x\")"  # text, never a formula
    assert by_code["X1"]["按时完成"] == ""
    assert by_code["X1"]["网格"] == "西关村第一网格" or by_code["X1"]["网格编号"] == "xiguan-01-g1"

    xlsx = export(client, operator, "visits", format="xlsx")
    sheet = load_workbook(io.BytesIO(xlsx.content))["探视"]
    notes = [row[-1] for row in sheet.iter_rows(min_row=2, values_only=True)]
    assert "'=HYPERLINK(\"http://x\")" in notes
    assert all(cell.data_type != "f" for row in sheet.iter_rows() for cell in row)

    header, *repairs = read_csv(export(client, operator, "repairs").content)
    assert len(repairs) == 1
    repair = dict(zip(header, repairs[0], strict=True))
    assert repair["摄像头编号"] == "cam-001"
    assert repair["故障原因"] == "no_heartbeat"
    assert repair["区域"] == "东关村"
    assert repair["状态"] == "待接单"


def test_uptime_export_matches_the_uptime_report(client: TestClient, county: str) -> None:
    tech = bearer(county, Role.TECHNICIAN, ["dongguan"])
    response = export(client, tech, "uptime", format="xlsx")
    assert response.status_code == 200, response.text
    rows = list(load_workbook(io.BytesIO(response.content))["在线率"].iter_rows(values_only=True))
    header = list(rows[0])
    assert header[:6] == ["类别", "编号", "名称或所在区域", "层级", "摄像头数", "在线率（%）"]
    cameras = {r[1]: dict(zip(header, r, strict=True)) for r in rows[1:] if r[0] == "摄像头"}
    areas = {r[1]: dict(zip(header, r, strict=True)) for r in rows[1:] if r[0] == "区域"}
    assert "cam-001" in cameras
    assert "cam-024" not in cameras  # 西关: outside the technician's areas
    assert areas["dongguan"]["层级"] == "乡镇"
    report = client.get("/api/v1/cameras/uptime", params={**PERIOD, "limit": 1000}, headers=tech).json()
    figures = next(c for c in report["buckets"][0]["cameras"] if c["device_id"] == "cam-001")
    assert cameras["cam-001"]["在线率（%）"] == round(figures["online_ratio"] * 100, 2)
    assert cameras["cam-001"]["离线时长（小时）"] == 3.0
    assert len(cameras) == report["camera_count"]


def test_scope_and_roles_answer_as_the_reports_do(client: TestClient, county: str) -> None:
    grid_worker = bearer(county, Role.GRID_WORKER, ["dongguan-01-g1"])
    _header, *rows = read_csv(export(client, grid_worker, "incidents").content)
    assert [r[0] for r in rows] == ["B1"]  # not 东关村's camera, not 西关's SOS
    assert [r[1] for r in read_csv(export(client, grid_worker, "visits").content)[1:]] == ["B1"]
    assert export(client, grid_worker, "incidents", area="xiguan-01-g1").status_code == 404
    assert export(client, grid_worker, "visits", area="no-such-area").status_code == 404
    assert export(client, grid_worker, "repairs").status_code == 403
    assert export(client, grid_worker, "uptime").status_code == 403

    technician = bearer(county, Role.TECHNICIAN, ["dongguan"])
    assert [r[0] for r in read_csv(export(client, technician, "incidents").content)[1:]] == ["C1"]
    assert export(client, technician, "visits").status_code == 403
    assert export(client, technician, "repairs", area="xiguan").status_code == 404

    platform = bearer(county, Role.PLATFORM)
    assert export(client, platform, "visits").status_code == 403
    assert export(client, platform, "uptime").status_code == 403
    operator = bearer(county, Role.OPERATOR)
    assert export(client, operator, "incidents", format="pdf").status_code == 422
    assert export(client, operator, "incidents", **{"from": "2026-11-30"}).status_code == 422
    assert client.get("/api/v1/exports/incidents").status_code == 401


def test_fifty_thousand_incidents_stream_in_bounded_memory(county: str) -> None:
    with psycopg.connect(county, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # no live-feed triggers for the bulk rows
        conn.execute(
            """
            INSERT INTO incidents (code, kind, severity, state, area_id, device_id, opened_at, acknowledged_at,
                                   acknowledged_by_name, resolved_at, outcome)
            SELECT 'L' || g, 'fall', 'red', 'resolved', 'dongguan-01-g2', 'wb-0002',
                   %(t)s + g * interval '1 second', %(t)s + g * interval '1 second' + interval '30 seconds',
                   '董思远（网格员）', %(t)s + g * interval '1 second' + interval '1 hour', 'false_alarm'
            FROM generate_series(1, 50000) g
            """,
            {"t": NOW - timedelta(days=6)},
        )
    app = create_app(Settings(database_url=county))
    app.dependency_overrides[deps.get_now] = lambda: NOW
    served = psutil.Process()
    headers = bearer(county, Role.ADMIN)
    with contextmanager(serve_app)(app) as base:
        url = f"{base}/api/v1/exports/incidents"
        # Warm up: imports, the pool, the first cursor — then measure a whole export.
        assert httpx.get(url, params={**PERIOD, "area": "xiguan"}, headers=headers).status_code == 200
        before = served.memory_info().rss
        peak = before
        streaming = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not streaming.wait(0.005):
                peak = max(peak, served.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        lines = 0
        size = 0
        chunks = 0
        try:
            with httpx.stream("GET", url, params=PERIOD, headers=headers, timeout=60) as response:
                assert response.status_code == 200
                for chunk in response.iter_bytes():
                    chunks += 1
                    size += len(chunk)
                    lines += chunk.count(b"\n")
        finally:
            streaming.set()
            sampler.join()
    assert lines == 1 + 50_000 + 3  # the headers, the bulk, B1, C1, X1
    assert size > 5_000_000
    assert chunks > 20, "the export arrived in one piece: it was built in memory, not streamed"
    growth_mb = (peak - before) / 2**20
    assert growth_mb < 20, f"the API's memory grew {growth_mb:.1f} MiB for a {size / 2**20:.1f} MiB export"


def test_the_overview_links_each_export_for_its_period(client: TestClient, county: str) -> None:
    secret = bearer(county, Role.OPERATOR)["Authorization"].removeprefix("Bearer ")
    assert client.post("/api/v1/session", json={"token": secret}).status_code == 201
    page = client.get("/console/overview", params={"from": "2026-11-20", "to": "2026-11-27"})
    assert page.status_code == 200
    links = re.findall(r'href="(/api/v1/exports/[^"]+)"', page.text)
    assert len(links) == 8
    first = links[0].replace("&amp;", "&")
    assert first == "/api/v1/exports/incidents?from=2026-11-20&to=2026-11-28&format=csv"
    # The session cookie is enough: a console user downloads with a click.
    assert [r[0] for r in read_csv(client.get(first).content)[1:]] == ["B1", "C1", "X1"]
    assert client.get(links[-1].replace("&amp;", "&")).status_code == 200
