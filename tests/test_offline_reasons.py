"""What people are told about a device that is down: the reason in words, and how long
it has been, as it is — with the demo's short holds a visit opened after 30 s must
not say "1 hour" (it did), and a repair order must not text an internal code
(``reported:power``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import psycopg
import pytest

from alerts.care_sweep import sweep
from devices.reasons import how_long_text, offline_reason_text
from shouhu.db import Conn
from tests.support.care import LOCK, RULES, T0, heard, s


@pytest.mark.parametrize(
    ("reason", "zh", "en"),
    [
        ("reported:power", "断电", "power failure"),
        ("reported:video_lost", "视频丢失", "video lost"),
        ("reported:network", "网络中断", "network down"),
        ("reported:storage", "存储故障", "storage failure"),
        ("reported:lens_fogged", "lens_fogged", "lens_fogged"),
        ("reported", "设备自报离线", "reported offline"),
        ("no_heartbeat", "心跳超时", "no heartbeat"),
        ("last_will", "连接断开", "connection lost"),
        (None, "", ""),
    ],
)
def test_an_offline_reason_in_words(reason: str | None, zh: str, en: str) -> None:
    assert offline_reason_text(reason) == zh
    assert offline_reason_text(reason, english=True) == en


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0秒"), (30, "30秒"), (59, "59秒"), (60, "1分钟"), (3599, "59分钟"), (7300, "2小时")]
)
def test_how_long_as_an_sms_says_it(seconds: int, text: str) -> None:
    assert how_long_text(timedelta(seconds=seconds)) == text


@pytest.fixture
def conn(county_url: str) -> Iterator[Conn]:
    with psycopg.connect(county_url, autocommit=True) as connection:
        yield connection


def told(conn: Conn, device_id: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.body FROM notification_attempts a JOIN incidents i ON i.id = a.incident_id"
        " WHERE i.device_id = %s AND a.purpose = 'notice'",
        (device_id,),
    ).fetchall()
    return [r[0] for r in rows]


def test_a_short_hold_visit_says_how_long_and_a_repair_order_why(conn: Conn) -> None:
    rules = replace(RULES, not_worn_hold=s(30), camera_offline_hold=s(20))
    heard(conn, "wb-0003", T0, worn=False)
    heard(conn, "cam-002", T0, reported_online=False, reported_reason="power")
    report = sweep(conn, T0 + s(31), rules, lock_key=LOCK)
    assert len(report.opened) == 2
    visit = told(conn, "wb-0003")
    assert visit
    assert all("已31秒未佩戴" in body for body in visit), visit
    repair = told(conn, "cam-002")
    assert repair
    assert all("离线原因：断电" in body and "reported" not in body for body in repair), repair
