"""The response figures: taken within 60 s and 180 s, median time to take, unreached.

Pure tests of alerts/response.py, then the REST report and /metrics over a real
PostgreSQL, the phone-network simulator and a router, on a clock the test moves.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from alerts.response import (
    TARGET_WITHIN_60S,
    TARGET_WITHIN_180S,
    Area,
    RedAlarm,
    by_group,
    figures,
    group_of,
    read_areas,
)
from devices.kinds import AreaLevel
from shouhu.tokens import Role, create_token
from tests.support.callbacks import Stack
from tests.support.escalation import DAY, press, q

NOW = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


def alarm(
    ident: int,
    opened_s_ago: float,
    ack_s: float | None = None,
    *,
    area: str = "g1",
    cancelled: bool = False,
    unreached: bool = False,
) -> RedAlarm:
    opened = NOW - timedelta(seconds=opened_s_ago)
    answered = None if ack_s is None else opened + timedelta(seconds=ack_s)
    return RedAlarm(ident, area, opened, answered, cancelled, unreached)


def test_taken_in_time_late_and_not_yet_decided() -> None:
    alarms = [
        alarm(1, 3600, 30),
        alarm(2, 3600, 100),
        alarm(3, 3600, 400, unreached=True),
        alarm(4, 90),  # unanswered for 90 s: late for 60 s, not yet for 180 s
        alarm(5, 10),  # pressed 10 s ago: neither yet
        alarm(6, 3600, cancelled=True),  # stood down by the wristband: needed nobody
    ]
    got = figures(alarms, NOW)
    assert (got.incidents, got.cancelled, got.answered, got.unreached) == (5, 1, 3, 1)
    assert got.median_ack_s == 100
    # Over the same answered times as the median (30, 100, 400), as percentile_cont would.
    assert got.p90_ack_s == pytest.approx(340)
    assert (got.within_60s.within, got.within_60s.decided) == (1, 4)
    assert got.within_60s.share == 0.25
    assert got.within_60s.meets_target is False
    assert (got.within_180s.within, got.within_180s.decided) == (2, 3)
    assert got.within_180s.share == pytest.approx(2 / 3)


def test_the_targets_are_the_telecare_standard_and_met_at_exactly_the_target() -> None:
    assert (TARGET_WITHIN_60S, TARGET_WITHIN_180S) == (0.975, 0.99)
    # 39 of 40 within 60 s is exactly 97.5 %: met.
    alarms = [alarm(i, 3600, 10) for i in range(39)] + [alarm(99, 3600, 120)]
    got = figures(alarms, NOW)
    assert got.within_60s.share == 0.975
    assert got.within_60s.meets_target is True
    assert got.within_180s.meets_target is True


def test_nothing_to_count_gives_no_shares_rather_than_zero() -> None:
    got = figures([], NOW)
    assert got.incidents == 0
    assert got.median_ack_s is None
    assert got.p90_ack_s is None
    assert got.within_60s.share is None
    assert got.within_60s.meets_target is None


AREAS = {
    "c": Area("c", None, AreaLevel.COUNTY, "县"),
    "t1": Area("t1", "c", AreaLevel.TOWNSHIP, "东关镇"),
    "t2": Area("t2", "c", AreaLevel.TOWNSHIP, "西关镇"),
    "v1": Area("v1", "t1", AreaLevel.COMMUNITY, "村"),
    "g1": Area("g1", "v1", AreaLevel.GRID, "网格1"),
    "m1": Area("m1", "g1", AreaLevel.MICRO_GRID, "微网格"),
    "g2": Area("g2", "t2", AreaLevel.GRID, "网格2"),
}


def test_an_area_is_counted_in_its_township_and_the_county_stays_itself() -> None:
    assert group_of(AREAS, "m1", AreaLevel.TOWNSHIP) == "t1"
    assert group_of(AREAS, "m1", AreaLevel.GRID) == "g1"
    assert group_of(AREAS, "g2", AreaLevel.TOWNSHIP) == "t2"
    assert group_of(AREAS, "c", AreaLevel.TOWNSHIP) == "c"  # an unregistered band's incident
    assert group_of(AREAS, None, AreaLevel.TOWNSHIP) is None
    alarms = [alarm(1, 99, 5, area="g1"), alarm(2, 99, 70, area="g2"), alarm(3, 99, 9, area="m1")]
    groups = by_group(alarms, AREAS, AreaLevel.TOWNSHIP, NOW)
    assert list(groups) == ["t1", "t2"]
    assert groups["t1"].within_60s.within == 2
    assert groups["t2"].within_60s.within == 0


# --- over the database ------------------------------------------------------------------


def _bands_in_two_townships(url: str) -> tuple[str, str, str, str, str]:
    """Two wristbands in one township and one in another; and the two townships."""
    with psycopg.connect(url) as conn:
        areas = read_areas(conn)
        rows = conn.execute(
            "SELECT d.id, r.grid_id FROM devices d JOIN residents r ON r.id = d.resident_id"
            " WHERE d.kind = 'wristband' AND d.active ORDER BY d.id"
        ).fetchall()
    by_township: dict[str, list[str]] = {}
    for device, grid in rows:
        by_township.setdefault(group_of(areas, grid, AreaLevel.TOWNSHIP) or "", []).append(device)
    (t1, first), (t2, second) = sorted(by_township.items())[:2]
    return first[0], first[1], second[0], t1, t2


def _operator(stack: Stack, role: Role = Role.OPERATOR) -> dict[str, str]:
    with psycopg.connect(stack.db) as conn:
        secret = create_token(conn, role=role, areas=[], label="综治值班", now=stack.clock(), expires_at=None)
    return {"Authorization": f"Bearer {secret}"}


def test_the_report_and_metrics_give_the_same_figures_by_township(stack: Stack) -> None:
    band_a, band_c, band_b, township_1, township_2 = _bands_in_two_townships(stack.db)
    operator = _operator(stack)
    first = press(stack.db, band_a, DAY, msg_id="r1")
    second = press(stack.db, band_b, DAY, msg_id="r2")
    third = press(stack.db, band_c, DAY, msg_id="r3")
    stack.router.run_once()
    stack.clock.advance(30)
    assert httpx.post(f"{stack.api}/api/v1/incidents/{first}/ack", headers=operator).status_code == 200
    stack.clock.advance(120)
    assert httpx.post(f"{stack.api}/api/v1/incidents/{second}/ack", headers=operator).status_code == 200
    # The third runs its whole chain untaken: unreached.
    for _ in range(8):
        stack.router.run_once()
        if q(stack.db, "SELECT 1 FROM incident_events WHERE incident_id = %s AND event = 'unreached'", third):
            break
        stack.clock.advance(121)
    else:
        raise AssertionError("the third incident never became unreached")

    span = {"from": (DAY - timedelta(hours=1)).isoformat(), "to": (DAY + timedelta(hours=1)).isoformat()}
    answer = httpx.get(f"{stack.api}/api/v1/reports/response", params=span, headers=operator)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["targets"] == {"within_60s": 0.975, "within_180s": 0.99}
    total = report["total"]
    assert (total["incidents"], total["answered"], total["unreached"]) == (3, 2, 1)
    assert total["median_ack_s"] == pytest.approx(90)
    assert (total["within_60s"]["within"], total["within_60s"]["decided"]) == (1, 3)
    assert (total["within_180s"]["within"], total["within_180s"]["decided"]) == (2, 3)
    assert total["within_60s"]["meets_target"] is False
    areas = {a["area_id"]: a for a in report["areas"]}
    assert set(areas) == {township_1, township_2}
    assert (areas[township_1]["incidents"], areas[township_1]["unreached"]) == (2, 1)
    assert areas[township_2]["within_180s"]["within"] == 1
    assert areas[township_2]["within_60s"]["within"] == 0

    # The same area filter narrows it to one township.
    one = httpx.get(
        f"{stack.api}/api/v1/reports/response", params={**span, "area": township_2}, headers=operator
    ).json()
    assert one["total"]["incidents"] == 1
    assert [a["area_id"] for a in one["areas"]] == [township_2]

    samples = {
        (s.name, s.labels.get("township"), s.labels.get("le")): s.value
        for family in text_string_to_metric_families(httpx.get(f"{stack.api}/metrics").text)
        for s in family.samples
    }
    assert samples[("shouhu_ack_seconds_bucket", township_1, "60")] == 1
    assert samples[("shouhu_ack_seconds_bucket", township_1, "180")] == 1
    assert samples[("shouhu_ack_seconds_bucket", township_2, "60")] == 0
    assert samples[("shouhu_ack_seconds_bucket", township_2, "180")] == 1
    assert samples[("shouhu_ack_seconds_count", township_1, None)] == 1
    assert samples[("shouhu_ack_seconds_sum", township_2, None)] == pytest.approx(150)
    assert samples[("shouhu_red_incidents_total", township_1, None)] == 2
    assert samples[("shouhu_incidents_unreached_total", township_1, None)] == 1
    assert samples[("shouhu_incidents_unreached_total", township_2, None)] == 0


def test_the_report_is_for_the_governance_centre_and_names_a_bad_field(stack: Stack) -> None:
    grid_worker = _operator(stack, Role.GRID_WORKER)
    refused = httpx.get(f"{stack.api}/api/v1/reports/response", headers=grid_worker)
    assert refused.status_code == 403
    assert "grid_worker" in refused.json()["detail"]
    operator = _operator(stack)
    bad = httpx.get(f"{stack.api}/api/v1/reports/response", params={"from": "yesterday"}, headers=operator)
    assert bad.status_code == 422
    assert "'from'" in bad.json()["detail"]
    unknown = httpx.get(f"{stack.api}/api/v1/reports/response", params={"area": "atlantis"}, headers=operator)
    assert unknown.status_code == 404
    empty = httpx.get(f"{stack.api}/api/v1/reports/response", headers=operator).json()
    assert empty["total"]["incidents"] == 0
    assert empty["total"]["within_60s"]["share"] is None
