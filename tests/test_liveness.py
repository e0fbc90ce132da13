"""Liveness against a real PostgreSQL with the demo county: deadlines, the sweeper,
Last Wills, camera reports, the leader lock, ingest outages, and scale."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from devices.kinds import DeviceKind
from hub.liveness import (
    SWEEP_CHUNK_SQL,
    DeviceState,
    IngestGap,
    Liveness,
    LivenessDefaults,
    SweepReport,
    Transition,
    UnknownDeviceError,
    apply_sightings,
    beat,
    device_counts,
    record_sightings,
    sweep,
)
from hub.sightings import Sighting
from shouhu.db import Conn
from shouhu.settings import Settings

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
DEFAULTS = LivenessDefaults(interval_s=60, misses=3)
WINDOW = timedelta(seconds=180)
LOCK = 0x7E57_0001  # not the production key: the suite may share a cluster


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


@pytest.fixture
def conn(county_url: str) -> Iterator[Conn]:
    with psycopg.connect(county_url) as connection:
        yield connection


def seen(device_id: str, at: datetime, **fields: Any) -> Sighting:
    """A refreshing message (telemetry, health, live `online` status) unless told otherwise."""
    kind = DeviceKind.CAMERA if device_id.startswith("cam-") else DeviceKind.WRISTBAND
    return Sighting(device_id=device_id, kind=kind, received_at=at, refreshes=fields.pop("refreshes", True), **fields)


def will(device_id: str, at: datetime) -> Sighting:
    """A live `offline` status: the device's Last Will."""
    return seen(device_id, at, refreshes=False, reported_online=False, reported_reason="last_will")


def retained(device_id: str, at: datetime, online: bool | None = None) -> Sighting:
    """A retained delivery: old news from the broker's store."""
    return seen(device_id, at, refreshes=False, reported_online=online)


def record(conn: Conn, *sightings: Sighting, defaults: LivenessDefaults = DEFAULTS) -> list[Transition]:
    with conn.transaction():
        return record_sightings(conn, sightings, defaults)


def alive(conn: Conn, at: datetime, hub_id: str = "hub-a") -> IngestGap | None:
    with conn.transaction():
        return beat(conn, hub_id, at)


def keep_alive(conn: Conn, until: datetime, hub_id: str = "hub-a") -> None:
    """Ingest healthy all along: beats every 5 s from the newest heartbeat up to ``until``."""
    row = conn.execute("SELECT max(alive_at) FROM ingest_heartbeats").fetchone()
    conn.commit()
    at = until if row is None or row[0] is None else row[0]
    while at < until:
        at = min(at + s(5), until)
        assert alive(conn, at, hub_id) is None
    alive(conn, until, hub_id)


def sweep_at(conn: Conn, at: datetime, **kwargs: Any) -> SweepReport:
    """The normal case: ingest has been up, then the sweeper runs."""
    keep_alive(conn, at)
    return sweep(conn, at, lock_key=LOCK, **kwargs)


def state(conn: Conn, device_id: str) -> tuple[Any, ...] | None:
    row = conn.execute(
        "SELECT online, offline_reason, last_seen, deadline FROM device_state WHERE device_id = %s", (device_id,)
    ).fetchone()
    conn.commit()
    return row


def events(conn: Conn, device_id: str) -> list[tuple[Any, ...]]:
    rows = conn.execute(
        "SELECT event, reason, at FROM device_events WHERE device_id = %s ORDER BY id", (device_id,)
    ).fetchall()
    conn.commit()
    return rows


def offline(device_id: str, at: datetime, reason: str, kind: DeviceKind = DeviceKind.WRISTBAND) -> Transition:
    return Transition(device_id, kind, at, False, reason)


def online(device_id: str, at: datetime, kind: DeviceKind = DeviceKind.WRISTBAND) -> Transition:
    return Transition(device_id, kind, at, True, None)


# --- deadlines ---------------------------------------------------------------------


def test_deadline_uses_env_defaults_and_device_overrides(conn: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOUHU_HEARTBEAT_INTERVAL_S", "20")
    monkeypatch.setenv("SHOUHU_HEARTBEAT_MISSES", "2")
    defaults = LivenessDefaults.from_settings(Settings())
    assert defaults == LivenessDefaults(20, 2)
    conn.execute("UPDATE devices SET heartbeat_interval_s = 5, heartbeat_misses = 4 WHERE id = 'wb-0002'")
    conn.commit()

    transitions = record(
        conn, seen("wb-0001", T0), seen("wb-0002", T0), seen("cam-002", T0, battery=None), defaults=defaults
    )

    assert state(conn, "wb-0001") == (True, None, T0, T0 + s(20 * 2))  # env defaults
    assert state(conn, "wb-0002") == (True, None, T0, T0 + s(5 * 4))  # its own row
    assert state(conn, "cam-002") == (True, None, T0, T0 + s(60 * 3))  # the demo county's override
    # A first sighting is a transition, with its event.
    assert transitions == [
        online("cam-002", T0, DeviceKind.CAMERA),
        online("wb-0001", T0),
        online("wb-0002", T0),
    ]
    assert events(conn, "wb-0001") == [("online", None, T0)]


def test_defaults_refuse_a_window_that_never_expires() -> None:
    with pytest.raises(ValueError, match="misses"):
        LivenessDefaults(60, 0)


def test_later_message_moves_the_deadline_and_keeps_data(conn: Conn) -> None:
    record(conn, seen("wb-0001", T0, battery=80, worn=True, lat=30.1, lon=120.2))
    transitions = record(conn, seen("wb-0001", T0 + s(60), battery=79.6))

    assert transitions == []  # still online: not a transition
    assert state(conn, "wb-0001") == (True, None, T0 + s(60), T0 + s(240))
    row = conn.execute("SELECT battery, worn, lat, lon FROM device_state WHERE device_id = 'wb-0001'").fetchone()
    assert row == (80, True, 30.1, 120.2)  # 79.6 rounds; fields not given are kept
    assert events(conn, "wb-0001") == [("online", None, T0)]


# --- the sweeper -------------------------------------------------------------------


def test_silence_past_the_deadline_goes_offline_once_then_a_message_revives(conn: Conn) -> None:
    record(conn, seen("wb-0001", T0))

    early = sweep_at(conn, T0 + WINDOW - s(1))
    assert early.leader
    assert early.transitions == ()
    assert state(conn, "wb-0001") == (True, None, T0, T0 + WINDOW)

    late = sweep_at(conn, T0 + WINDOW + s(1))
    # Dated at the deadline, when the device fell silent, not when the sweeper noticed.
    assert late.transitions == (offline("wb-0001", T0 + WINDOW, "no_heartbeat"),)
    assert state(conn, "wb-0001") == (False, "no_heartbeat", T0, T0 + WINDOW)

    again = sweep_at(conn, T0 + WINDOW + s(30))
    assert again.leader
    assert again.transitions == ()

    back = record(conn, seen("wb-0001", T0 + s(300)))
    assert back == [online("wb-0001", T0 + s(300))]
    assert state(conn, "wb-0001") == (True, None, T0 + s(300), T0 + s(300) + WINDOW)
    assert [(e, r) for e, r, _ in events(conn, "wb-0001")] == [
        ("online", None),
        ("offline", "no_heartbeat"),
        ("online", None),
    ]


def test_sweep_refuses_to_run_inside_a_transaction(conn: Conn) -> None:
    conn.execute("SELECT 1")
    with pytest.raises(ValueError, match="outside a transaction"):
        sweep(conn, T0, lock_key=LOCK)


# --- what does not refresh ---------------------------------------------------------


def test_retained_delivery_never_refreshes_nor_changes_state(conn: Conn) -> None:
    record(conn, seen("wb-0001", T0, battery=80))

    # Retained deliveries arrive after the fact: neither `online` nor unspecified refreshes.
    assert record(conn, retained("wb-0001", T0 + s(170), online=True), retained("wb-0001", T0 + s(175))) == []
    assert state(conn, "wb-0001") == (True, None, T0, T0 + WINDOW)

    # Nor does one create state for a device never heard from.
    assert record(conn, retained("wb-0002", T0, online=True)) == []
    assert state(conn, "wb-0002") is None

    # And a retained delivery later in the batch does not hide the real message before it.
    record(conn, seen("wb-0003", T0 + s(10)), retained("wb-0003", T0 + s(11)))
    assert state(conn, "wb-0003") == (True, None, T0 + s(10), T0 + s(10) + WINDOW)

    report = sweep_at(conn, T0 + WINDOW + s(1))
    assert offline("wb-0001", T0 + WINDOW, "no_heartbeat") in report.transitions
    assert record(conn, retained("wb-0001", T0 + s(400), online=True)) == []
    assert state(conn, "wb-0001") == (False, "no_heartbeat", T0, T0 + WINDOW)


# --- Last Will ---------------------------------------------------------------------


def test_last_will_marks_offline_without_refreshing(conn: Conn) -> None:
    record(conn, seen("wb-0001", T0))
    transitions = record(conn, will("wb-0001", T0 + s(10)))

    assert transitions == [offline("wb-0001", T0 + s(10), "last_will")]
    assert state(conn, "wb-0001") == (False, "last_will", T0, T0 + WINDOW)  # last_seen untouched
    assert [(e, r) for e, r, _ in events(conn, "wb-0001")] == [("online", None), ("offline", "last_will")]


def test_a_message_received_after_the_will_wins(conn: Conn) -> None:
    # In one batch, either order.
    assert record(conn, will("wb-0001", T0), seen("wb-0001", T0 + s(1))) == [online("wb-0001", T0 + s(1))]
    assert record(conn, seen("wb-0002", T0 + s(1)), will("wb-0002", T0)) == [online("wb-0002", T0 + s(1))]
    assert state(conn, "wb-0002") == (True, None, T0 + s(1), T0 + s(1) + WINDOW)

    # Across batches committed out of order (two hubs): the newer message is already
    # stored when the older will is handled.
    record(conn, seen("wb-0003", T0 + s(30)))
    assert record(conn, will("wb-0003", T0 + s(25))) == []
    assert state(conn, "wb-0003") == (True, None, T0 + s(30), T0 + s(30) + WINDOW)

    # And the will does win over what was received before it; a later message revives.
    record(conn, seen("wb-0004", T0))
    assert record(conn, seen("wb-0004", T0 + s(5)), will("wb-0004", T0 + s(6))) == [
        offline("wb-0004", T0 + s(6), "last_will")
    ]
    assert record(conn, seen("wb-0004", T0 + s(7))) == [online("wb-0004", T0 + s(7))]


def test_an_older_message_handled_late_changes_nothing(conn: Conn) -> None:
    # Two hubs commit out of order: the newer message is stored first.
    record(conn, seen("wb-0001", T0 + s(30), battery=70))
    assert record(conn, seen("wb-0001", T0 + s(25), battery=20)) == []
    assert state(conn, "wb-0001") == (True, None, T0 + s(30), T0 + s(30) + WINDOW)
    assert conn.execute("SELECT battery FROM device_state WHERE device_id = 'wb-0001'").fetchone() == (70,)


def test_an_older_message_handled_late_does_not_undo_a_will(conn: Conn) -> None:
    record(conn, seen("wb-0001", T0), will("wb-0001", T0 + s(20)))
    assert record(conn, seen("wb-0001", T0 + s(15), battery=40)) == []
    online_now, reason, last_seen, _ = state(conn, "wb-0001") or ()
    assert (online_now, reason, last_seen) == (False, "last_will", T0 + s(15))


# --- camera health -----------------------------------------------------------------


def test_camera_reporting_itself_offline(conn: Conn) -> None:
    record(conn, seen("cam-001", T0, reported_online=True))
    report = seen("cam-001", T0 + s(60), reported_online=False, reported_reason="video_lost")

    assert record(conn, report) == [offline("cam-001", T0 + s(60), "reported:video_lost", DeviceKind.CAMERA)]
    # The report is a message: the camera's reporter is alive, so it refreshes.
    assert state(conn, "cam-001") == (False, "reported:video_lost", T0 + s(60), T0 + s(60) + WINDOW)
    # Already offline: the sweeper has nothing to say about it.
    assert sweep_at(conn, T0 + s(60) + WINDOW + s(1)).transitions == ()
    assert state(conn, "cam-001") == (False, "reported:video_lost", T0 + s(60), T0 + s(60) + WINDOW)

    back = record(conn, seen("cam-001", T0 + s(600), reported_online=True))
    assert back == [online("cam-001", T0 + s(600), DeviceKind.CAMERA)]


def test_first_sighting_may_be_offline(conn: Conn) -> None:
    first = record(conn, seen("cam-003", T0, reported_online=False))
    assert first == [offline("cam-003", T0, "reported", DeviceKind.CAMERA)]
    assert conn.execute("SELECT detail->>'from' FROM device_events WHERE device_id = 'cam-003'").fetchone() == (
        "unknown",
    )


# --- registry and batches ----------------------------------------------------------


def test_unregistered_device_is_refused_not_dropped(conn: Conn) -> None:
    with pytest.raises(UnknownDeviceError, match="wb-9999"):
        record(conn, seen("wb-0001", T0), seen("wb-9999", T0))
    assert state(conn, "wb-0001") is None  # the caller's transaction rolled back whole


def test_batch_takes_the_latest_per_device_in_few_statements(conn: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    devices = [f"wb-{n:04d}" for n in range(1, 201)]
    sightings = [seen(d, T0 + s(rng.randrange(0, 3600)), battery=rng.randrange(0, 101)) for d in devices]
    sightings += [
        seen(rng.choice(devices), T0 + s(rng.randrange(0, 3600)), battery=rng.randrange(0, 101)) for _ in range(300)
    ]
    rng.shuffle(sightings)
    assert len(sightings) == 500
    expected: dict[str, Sighting] = {}
    for sighting in sightings:  # the latest by received_at; on a tie, the later one in the batch
        if sighting.device_id not in expected or sighting.received_at >= expected[sighting.device_id].received_at:
            expected[sighting.device_id] = sighting

    statements: list[str] = []
    execute = conn.execute

    def counting(query: Any, params: Any = None, **kwargs: Any) -> Any:
        statements.append(str(query))
        return execute(query, params, **kwargs)

    monkeypatch.setattr(conn, "execute", counting)
    transitions = record(conn, *sightings)
    monkeypatch.undo()

    assert 0 < len(statements) <= 5  # set-based: not one statement per sighting
    assert len(transitions) == 200
    rows = conn.execute(
        "SELECT device_id, last_seen, deadline, battery, online FROM device_state WHERE device_id = ANY(%s)",
        (devices,),
    ).fetchall()
    got = {d: (last_seen, deadline, battery, on) for d, last_seen, deadline, battery, on in rows}
    assert got == {d: (x.received_at, x.received_at + WINDOW, x.battery, True) for d, x in expected.items()}
    assert conn.execute("SELECT count(*) FROM device_events").fetchone() == (200,)


def test_equal_receipt_times_go_to_the_later_sighting() -> None:
    current = DeviceState(online=True, last_seen=T0, deadline=T0 + WINDOW, state_at=T0)
    tie = apply_sightings(current, [seen("wb-0001", T0 + s(1)), will("wb-0001", T0 + s(1))], WINDOW)
    assert (tie.online, tie.offline_reason) == (False, "last_will")
    tie = apply_sightings(current, [will("wb-0001", T0 + s(1)), seen("wb-0001", T0 + s(1))], WINDOW)
    assert (tie.online, tie.offline_reason) == (True, None)


# --- the leader lock ---------------------------------------------------------------


def test_only_the_lock_holder_sweeps(conn: Conn, county_url: str) -> None:
    record(conn, seen("wb-0001", T0))
    later = T0 + WINDOW + s(5)
    alive(conn, later)
    with psycopg.connect(county_url) as leader:
        with leader.transaction():
            leader.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK,))
            follower = sweep(conn, later, lock_key=LOCK)
            assert follower == SweepReport(leader=False)
            assert state(conn, "wb-0001") == (True, None, T0, T0 + WINDOW)
        # The leader's transaction ended: the lock is free again.
        taken = sweep(conn, later, lock_key=LOCK)
    assert taken.leader
    assert taken.transitions == (offline("wb-0001", T0 + WINDOW, "no_heartbeat"),)


# --- ingest outages ----------------------------------------------------------------


def _gaps(conn: Conn) -> list[tuple[Any, ...]]:
    rows = conn.execute("SELECT started_at, ended_at, applied_at IS NOT NULL FROM ingest_gaps ORDER BY id").fetchall()
    conn.commit()
    return rows


def test_ingest_outage_pauses_deadlines(conn: Conn) -> None:
    for second in range(0, 31):  # ingest healthy, beating every second
        alive(conn, T0 + s(second))
    last_beat = T0 + s(30)
    record(conn, seen("wb-0001", T0))  # deadline T0+180: falls inside the outage
    record(conn, seen("wb-0002", T0 - s(300)))  # deadline T0-120: already past before it
    assert _gaps(conn) == []

    # Ten minutes with no heartbeat from any hub. The sweeper keeps running.
    during = sweep(conn, T0 + s(300), lock_key=LOCK)
    assert during.leader
    assert not during.ingest_alive
    assert during.transitions == ()
    assert state(conn, "wb-0001") == (True, None, T0, T0 + WINDOW)
    assert state(conn, "wb-0002") == (True, None, T0 - s(300), T0 - s(120))
    assert _gaps(conn) == [(last_beat, None, False)]  # the start is remembered in the database

    resumed = last_beat + s(600)
    assert alive(conn, resumed) == IngestGap(last_beat, resumed)
    after = sweep(conn, resumed + s(1), lock_key=LOCK)

    assert after.gaps_applied == (IngestGap(last_beat, resumed),)
    assert after.deadlines_pushed == 1
    # Silent only because of our outage: not offline, its deadline pushed by the gap.
    assert state(conn, "wb-0001") == (True, None, T0, T0 + WINDOW + s(600))
    # Past its deadline before the outage: offline.
    assert after.transitions == (offline("wb-0002", T0 - s(120), "no_heartbeat"),)
    assert _gaps(conn) == [(last_beat, resumed, True)]

    # The push is applied once, and the pushed deadline is still a deadline.
    assert after.chunks == 1
    assert sweep_at(conn, T0 + WINDOW + s(599)).transitions == ()
    assert sweep_at(conn, T0 + WINDOW + s(601)).transitions == (
        offline("wb-0001", T0 + WINDOW + s(600), "no_heartbeat"),
    )


def test_outage_with_no_sweeper_running_is_still_paused(conn: Conn) -> None:
    # The usual outage: the hub process (and the sweeper inside it) is down. Nobody
    # sweeps during it; the heartbeat table alone remembers when ingest stopped.
    alive(conn, T0)
    record(conn, seen("wb-0001", T0 - s(60)))  # deadline T0+120
    restart = T0 + s(3600)
    assert alive(conn, restart, hub_id="hub-b") == IngestGap(T0, restart)

    report = sweep(conn, restart + s(1), lock_key=LOCK)

    assert report.transitions == ()
    assert state(conn, "wb-0001") == (True, None, T0 - s(60), T0 + s(120) + s(3600))


def test_a_message_inside_the_gap_pauses_only_the_silence_after_it(conn: Conn) -> None:
    # A hub stored a message but could not beat (say its heartbeat stalled): the device
    # is owed only the part of the gap after its message.
    alive(conn, T0)
    record(conn, seen("wb-0001", T0 + s(20)))  # deadline T0+200
    assert alive(conn, T0 + s(100)) == IngestGap(T0, T0 + s(100))
    report = sweep(conn, T0 + s(100), lock_key=LOCK)
    assert report.deadlines_pushed == 1
    assert state(conn, "wb-0001") == (True, None, T0 + s(20), T0 + s(200) + s(80))


def test_one_live_hub_keeps_ingest_alive(conn: Conn) -> None:
    record(conn, seen("wb-0001", T0))
    for second in range(0, 400, 5):
        alive(conn, T0 + s(second), hub_id="hub-b")
        if second < 30:  # then hub-a dies
            alive(conn, T0 + s(second), hub_id="hub-a")

    report = sweep(conn, T0 + s(396), lock_key=LOCK)

    assert report.ingest_alive
    assert report.transitions == (offline("wb-0001", T0 + WINDOW, "no_heartbeat"),)
    assert _gaps(conn) == []


def test_no_heartbeat_ever_means_nothing_is_judged(conn: Conn) -> None:
    record(conn, seen("wb-0001", T0))
    report = sweep(conn, T0 + s(3600), lock_key=LOCK)
    assert report == SweepReport(leader=True, ingest_alive=False)
    assert state(conn, "wb-0001") == (True, None, T0, T0 + WINDOW)


def test_sweep_judges_only_time_ingest_covered(conn: Conn) -> None:
    # The last heartbeat is 5 s old (within the grace): a deadline after it is not
    # judged yet — ingest may already be down, we do not know.
    record(conn, seen("wb-0001", T0))
    alive(conn, T0 + WINDOW - s(2))
    report = sweep(conn, T0 + WINDOW + s(3), lock_key=LOCK)
    assert report.ingest_alive
    assert report.transitions == ()
    assert sweep_at(conn, T0 + WINDOW + s(3)).marked_offline == 1


def test_two_hubs_ending_one_outage_record_one_gap(conn: Conn, county_url: str) -> None:
    alive(conn, T0)
    results: list[IngestGap | None] = []
    # Both hubs see the same stale heartbeats; the second waits on the first's gap row.
    second = threading.Thread(target=lambda: results.append(alive(conn, T0 + s(100.5), hub_id="hub-c")))
    with psycopg.connect(county_url) as other:
        with other.transaction():
            first = beat(other, "hub-b", T0 + s(100))
            second.start()
            second.join(1.0)
            assert second.is_alive()
        second.join(10)
    assert first == IngestGap(T0, T0 + s(100))
    assert results == [None]
    assert _gaps(conn) == [(T0, T0 + s(100), False)]


# --- scale -------------------------------------------------------------------------


def _load(conn: Conn, total: int, expired: int) -> None:
    """``total`` online cameras, the first ``expired`` past their deadline at T0."""
    conn.execute(
        "INSERT INTO devices (id, kind, area_id) SELECT 'load-' || g, 'camera', 'dongguan-01-g1'"
        " FROM generate_series(1, %s) g",
        (total,),
    )
    conn.execute(
        """
        INSERT INTO device_state (device_id, online, last_seen, deadline, state_at)
        SELECT 'load-' || g, true, t, t + interval '180 seconds', t
        FROM generate_series(1, %(total)s) g,
             LATERAL (SELECT CASE WHEN g <= %(expired)s THEN %(t0)s - interval '181 seconds' - g * interval '1 ms'
                                  ELSE %(t0)s + (g %% 3600) * interval '1 second' END AS t) AS at
        """,
        {"total": total, "expired": expired, "t0": T0},
    )
    conn.execute("ANALYZE device_state")
    conn.commit()


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def test_sweep_uses_the_deadline_index_on_100k_rows(conn: Conn) -> None:
    _load(conn, 100_000, 5_000)
    row = conn.execute("EXPLAIN (FORMAT JSON) " + SWEEP_CHUNK_SQL, {"cutoff": T0, "limit": 5_000, "now": T0}).fetchone()
    conn.rollback()
    assert row is not None
    nodes = list(_plan_nodes(row[0][0]["Plan"]))
    # The planner may read the index ordered or as a bitmap (then sort what it found);
    # either way the expired rows come from the deadline index, and nothing reads the
    # whole table — neither to find them nor to update them by id.
    assert any(
        n["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
        and n.get("Index Name") == "device_state_deadline_idx"
        for n in nodes
    ), nodes
    assert [n for n in nodes if n["Node Type"] == "Seq Scan"] == []

    report = sweep_at(conn, T0)

    assert report.marked_offline == 5_000
    assert report.chunks == 2  # one full chunk, then one that found the rest (none)
    assert {t.reason for t in report.transitions} == {"no_heartbeat"}
    counts = conn.execute("SELECT online, count(*) FROM device_state GROUP BY 1 ORDER BY 1").fetchall()
    assert counts == [(False, 5_000), (True, 95_000)]
    assert conn.execute("SELECT count(*) FROM device_events WHERE reason = 'no_heartbeat'").fetchone() == (5_000,)


def test_sweep_works_in_bounded_chunks(conn: Conn) -> None:
    _load(conn, 10_000, 2_500)
    report = sweep_at(conn, T0, chunk_size=1_000)
    assert report.chunks == 3  # 1,000 + 1,000 + 500: a short chunk ends the sweep
    assert report.marked_offline == 2_500
    assert [t.at for t in report.transitions] == sorted(t.at for t in report.transitions)


# --- the gauge ---------------------------------------------------------------------


def test_device_counts_by_kind_and_state(conn: Conn) -> None:
    before = device_counts(conn)
    assert before[DeviceKind.WRISTBAND, Liveness.UNKNOWN] == 240
    assert before[DeviceKind.CAMERA, Liveness.UNKNOWN] == 67
    assert before[DeviceKind.WRISTBAND, Liveness.ONLINE] == 0

    record(conn, seen("wb-0001", T0), seen("wb-0002", T0), seen("cam-001", T0, reported_online=False))
    conn.execute("INSERT INTO device_state (device_id) VALUES ('wb-0003')")  # online NULL: unknown
    conn.execute("UPDATE devices SET active = false WHERE id = 'wb-0240'")
    conn.commit()

    after = device_counts(conn)
    assert after == {
        (DeviceKind.WRISTBAND, Liveness.ONLINE): 2,
        (DeviceKind.WRISTBAND, Liveness.OFFLINE): 0,
        (DeviceKind.WRISTBAND, Liveness.UNKNOWN): 237,
        (DeviceKind.CAMERA, Liveness.ONLINE): 0,
        (DeviceKind.CAMERA, Liveness.OFFLINE): 1,
        (DeviceKind.CAMERA, Liveness.UNKNOWN): 66,
    }
