"""The hub's liveness recorder (issue 19): a device heard again within the refresh
interval with nothing material changed is not written; anything material is, and so
is the first sighting after the interval. Against a real PostgreSQL, clock passed in
(every instant is a fixed datetime)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from devices.kinds import DeviceKind
from hub.liveness import LivenessDefaults, LivenessRecorder, beat, sweep
from hub.sightings import Sighting
from shouhu.db import Conn

T0 = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)
DEFAULTS = LivenessDefaults(interval_s=60, misses=3)  # a 180 s window: the refresh is 15 s


@pytest.fixture
def conn(county_url: str) -> Iterator[Conn]:
    with psycopg.connect(county_url, autocommit=True) as connection:
        yield connection


def seen(at: datetime, device_id: str = "wb-0001", **fields: Any) -> Sighting:
    return Sighting(device_id, DeviceKind.WRISTBAND, at, refreshes=fields.pop("refreshes", True), **fields)


def stored(conn: Conn, device_id: str = "wb-0001") -> tuple[Any, ...] | None:
    return conn.execute(
        "SELECT online, offline_reason, last_seen, battery, worn FROM device_state WHERE device_id = %s", (device_id,)
    ).fetchone()


def test_a_chatty_device_is_written_once_per_refresh_interval(conn: Conn) -> None:
    recorder = LivenessRecorder(DEFAULTS)
    recorder(conn, [seen(T0, battery=80)])
    assert stored(conn) == (True, None, T0, 80, None)
    for seconds in (1, 5, 14):
        recorder(conn, [seen(T0 + timedelta(seconds=seconds), battery=80)])
    assert stored(conn) == (True, None, T0, 80, None), "nothing material: not written"
    recorder(conn, [seen(T0 + timedelta(seconds=15), battery=80)])
    assert stored(conn) == (True, None, T0 + timedelta(seconds=15), 80, None), "the interval passed: written"


def test_anything_material_is_written_at_once(conn: Conn) -> None:
    recorder = LivenessRecorder(DEFAULTS)
    recorder(conn, [seen(T0, battery=80, worn=True)])
    recorder(conn, [seen(T0 + timedelta(seconds=1), battery=79, worn=True)])
    assert stored(conn) == (True, None, T0 + timedelta(seconds=1), 79, True)
    recorder(conn, [seen(T0 + timedelta(seconds=2), worn=False)])
    assert stored(conn) == (True, None, T0 + timedelta(seconds=2), 79, False)
    will = seen(T0 + timedelta(seconds=3), refreshes=False, reported_online=False, reported_reason="last_will")
    recorder(conn, [will])
    assert stored(conn)[:2] == (False, "last_will")  # type: ignore[index]
    # The Last Will is what the next message is compared with: back online at once.
    recorder(conn, [seen(T0 + timedelta(seconds=4), worn=False)])
    assert stored(conn) == (True, None, T0 + timedelta(seconds=4), 79, False)


def test_a_device_this_hub_never_wrote_is_read_and_written(conn: Conn) -> None:
    LivenessRecorder(DEFAULTS)(conn, [seen(T0, battery=80)])
    other_hub = LivenessRecorder(DEFAULTS)
    other_hub(conn, [seen(T0 + timedelta(seconds=2), battery=80)])
    assert stored(conn) == (True, None, T0 + timedelta(seconds=2), 80, None)
    restarted = LivenessRecorder(DEFAULTS)  # a hub starts with no memory
    restarted(conn, [seen(T0 + timedelta(seconds=3), battery=80)])
    assert stored(conn) == (True, None, T0 + timedelta(seconds=3), 80, None)


def test_a_skipped_sighting_never_lets_the_sweeper_call_a_live_device_silent(conn: Conn) -> None:
    """The stored deadline trails the newest message by less than the refresh interval,
    so a device that keeps talking is never past it."""
    recorder = LivenessRecorder(DEFAULTS)
    at = T0
    for _ in range(60):  # one message every 10 s for 10 minutes
        recorder(conn, [seen(at, battery=80)])
        at += timedelta(seconds=10)
        beat(conn, "recorder-test", at)
        report = sweep(conn, at, lock_key=0x7E57_0019)
        assert not report.transitions, f"marked offline at {at}"
    assert stored(conn)[0] is True  # type: ignore[index]
