"""What the living demo showed wrong between emergencies, fixed: a visit opened after
30 s said "1 hour", a repair order texted an internal code (``reported:power``), and a
band left off the wrist whose battery then ran out got a second visit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import psycopg
import pytest

from alerts.care import close_task, start_task
from alerts.care_sweep import sweep
from devices.kinds import TaskOutcome
from devices.reasons import how_long_text, offline_reason_text
from shouhu.db import Conn
from tests.support.care import LOCK, RULES, T0, WORKER, heard, last_will, s


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


def test_a_band_left_off_the_wrist_that_then_dies_is_one_visit_not_two(conn: Conn) -> None:
    rules = replace(RULES, not_worn_hold=s(30), visit_offline_hold=s(30))
    heard(conn, "wb-0005", T0, worn=False)
    assert len(sweep(conn, T0 + s(31), rules, lock_key=LOCK).opened) == 1  # not worn: a visit
    last_will(conn, "wb-0005", T0 + s(60))  # its battery runs out in the drawer
    assert sweep(conn, T0 + s(200), rules, lock_key=LOCK).opened == []
    visits = conn.execute("SELECT reason, state FROM care_tasks WHERE device_id = 'wb-0005'").fetchall()
    assert visits == [("not_worn", "open")]
    # Closed by the grid worker while the band is still dead: the offline hold starts
    # again from the close, and then it is a visit of its own.
    [(task_id,)] = conn.execute("SELECT id FROM care_tasks WHERE device_id = 'wb-0005'").fetchall()
    with conn.transaction():
        close_task(conn, task_id, TaskOutcome.RESIDENT_AWAY, "不在家", WORKER, T0 + s(300))
    assert sweep(conn, T0 + s(310), rules, lock_key=LOCK).opened == []
    assert len(sweep(conn, T0 + s(331), rules, lock_key=LOCK).opened) == 1
    reasons = conn.execute("SELECT reason FROM care_tasks WHERE device_id = 'wb-0005' ORDER BY id").fetchall()
    assert reasons == [("not_worn",), ("last_will",)]


def test_a_band_back_online_but_off_the_wrist_while_its_offline_visit_is_under_way(conn: Conn) -> None:
    rules = replace(RULES, not_worn_hold=s(30), visit_offline_hold=s(30))
    heard(conn, "wb-0006", T0 - s(3600), worn=False)
    last_will(conn, "wb-0006", T0)
    [task_id] = sweep(conn, T0 + s(31), rules, lock_key=LOCK).opened
    with conn.transaction():
        start_task(conn, task_id, WORKER, T0 + s(40))  # the grid worker is on the way
    heard(conn, "wb-0006", T0 + s(50), worn=False)  # back online, still off the wrist
    assert sweep(conn, T0 + s(100), rules, lock_key=LOCK).opened == []
