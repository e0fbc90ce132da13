"""The simulated fleets' deterministic cores and their rate bound, without a broker:
time is a clock the test moves, and every message is read back through the hub's own
contract parser."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from devices.contract import DeviceMessage, StatusMessage, parse_message
from simulators.camera_fleet import CameraFleet, CameraPace, Outage
from simulators.fleet import Publish, RateBound, RateReport, Registry, read_registry, run_fleet, stretch
from simulators.wristband_fleet import Habit, WristbandFleet, WristbandPace

DEMO_COUNTY = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
ZONE = ZoneInfo("Asia/Shanghai")
# 09:00 in Asia/Shanghai: the clock is always passed in, never the host's.
T0 = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return read_registry(DEMO_COUNTY)


def cameras(registry: Registry, seed: int = 1, pace: CameraPace | None = None) -> CameraFleet:
    return CameraFleet(
        registry.cameras, seed=seed, start=T0, zone=ZONE, boot_id="boot", pace=pace or CameraPace(interval_s=10)
    )


def bands(registry: Registry, seed: int = 1, start: datetime = T0) -> WristbandFleet:
    return WristbandFleet(
        registry.wristbands, seed=seed, start=start, zone=ZONE, boot_id="boot", pace=WristbandPace(interval_s=10)
    )


def drive(fleet: CameraFleet | WristbandFleet, seconds: int, start: datetime = T0) -> list[tuple[datetime, Publish]]:
    """Ask the fleet once a second for ``seconds``: every message, with when it was due."""
    sent: list[tuple[datetime, Publish]] = []
    for second in range(seconds + 1):
        now = start + timedelta(seconds=second)
        sent.extend((now, message) for message in fleet.due(now))
    return sent


def test_the_registry_file_gives_every_active_camera_and_wristband(registry: Registry) -> None:
    assert len(registry.cameras) == 67
    assert len(registry.wristbands) == 240
    assert all(b.lat is not None and b.lon is not None for b in registry.wristbands)
    assert {c.interval_s for c in registry.cameras} == {None, 60.0}


def test_the_same_seed_gives_the_same_messages_and_another_seed_others(registry: Registry) -> None:
    first = drive(cameras(registry, seed=7), 600)
    again = drive(cameras(registry, seed=7), 600)
    other = drive(cameras(registry, seed=8), 600)
    assert first == again
    assert first != other
    assert drive(bands(registry, seed=7), 300) == drive(bands(registry, seed=7), 300)
    assert drive(bands(registry, seed=7), 300) != drive(bands(registry, seed=8), 300)


def test_a_device_does_not_change_when_others_join_the_registry(registry: Registry) -> None:
    alone = Registry(registry.cameras[:1], ())
    mine = registry.cameras[0].id
    whole = [(at, m) for at, m in drive(cameras(registry), 600) if m.device_id == mine]
    assert drive(cameras(alone), 600) == whole


def test_every_message_is_valid_under_the_contract(registry: Registry) -> None:
    for _at, message in [*drive(cameras(registry), 900), *drive(bands(registry), 300)]:
        parsed = parse_message(message.topic, message.payload)
        assert isinstance(parsed, (DeviceMessage, StatusMessage)), (message, parsed)
        if message.channel == "status":
            assert message.retain
            assert message.qos == 1
        else:
            assert not message.retain
            assert message.qos in (0, 1)
            assert message.body()["ts"].endswith("+08:00")


def test_msg_ids_are_unique_per_device_and_carry_the_boot(registry: Registry) -> None:
    seen: dict[str, set[str]] = defaultdict(set)
    for _at, message in [*drive(cameras(registry), 900), *drive(bands(registry), 300)]:
        if message.channel == "status":
            continue
        msg_id = message.body()["msg_id"]
        assert msg_id.startswith("boot-")
        assert msg_id not in seen[message.topic]
        seen[message.topic].add(msg_id)


def test_cameras_report_every_interval_go_out_for_each_reason_flap_and_are_repaired(registry: Registry) -> None:
    fleet = cameras(registry, pace=CameraPace(interval_s=10, mtbf_s=600, repair_s=(30, 120)))
    sent = drive(fleet, 1800)
    by_camera: dict[str, list[tuple[datetime, Publish]]] = defaultdict(list)
    for at, message in sent:
        by_camera[message.device_id].append((at, message))
    assert set(by_camera) == {c.id for c in registry.cameras}
    # Everyone is heard within the first interval, status first.
    for history in by_camera.values():
        assert history[0][0] <= T0 + timedelta(seconds=10)
        assert history[0][1].channel == "status"
        assert history[0][1].payload == b"online"
    reasons = Counter(m.body().get("reason") for _at, m in sent if m.channel == "health" and not m.body()["online"])
    assert set(reasons) == {o.value for o in Outage}
    own = {c.id: timedelta(seconds=c.interval_s or 10) for c in registry.cameras}
    for camera, history in by_camera.items():
        for (at, message), (later, following) in itertools.pairwise(history):
            if message.channel != "health":
                continue
            body = message.body()
            if body["online"] or body["reason"] in ("video_lost", "storage"):
                # Up, or down but alive: the next report comes one interval on.
                assert later - at == own[camera] or following.channel == "status"
            else:
                # No power, no network: silence until the repair, which reconnects first.
                assert following.channel == "status"
                assert following.payload == b"online"
    repaired = sum(1 for _at, m in sent if m.channel == "status") - len(registry.cameras)
    assert repaired > 0
    # A flaky camera goes out and comes back several times.
    went_out: Counter[str] = Counter()
    for camera, history in by_camera.items():
        health = [m.body()["online"] for _at, m in history if m.channel == "health"]
        went_out[camera] = sum(1 for was, now in itertools.pairwise(health) if was and not now)
    flaky = {c.spec.id for c in fleet.cameras if c.flaky}
    assert flaky
    assert min(went_out[c] for c in flaky) >= 3
    steady = set(went_out) - flaky
    assert sum(went_out[c] for c in flaky) / len(flaky) > 2 * sum(went_out[c] for c in steady) / len(steady)


def test_some_cameras_are_already_out_when_the_fleet_starts(registry: Registry) -> None:
    fleet = cameras(registry)
    first = drive(fleet, 10)
    down = {m.device_id for _at, m in first if m.channel == "health" and not m.body()["online"]}
    assert 2 <= len(down) <= 20
    assert down <= set(fleet.offline())
    assert "offline" in fleet.summary()


def test_wristbands_wear_charge_lie_in_a_drawer_and_die(registry: Registry) -> None:
    fleet = bands(registry)
    habits = fleet.habits()
    sent = drive(fleet, 1200)
    telemetry: dict[str, list[dict[str, object]]] = defaultdict(list)
    statuses: dict[str, list[bytes]] = defaultdict(list)
    for _at, message in sent:
        if message.channel == "telemetry":
            telemetry[message.device_id].append(message.body())
        else:
            statuses[message.device_id].append(message.payload)
    drawer = [d for d, h in habits.items() if h is Habit.DRAWER]
    failing = [d for d, h in habits.items() if h is Habit.FAILING]
    assert drawer
    assert failing
    for device in drawer:
        assert all(b["worn"] is False and "heart_rate" not in b for b in telemetry[device])
    for device in failing:
        # Its battery drops a point a report; at 0 % its last report, then its Last Will.
        assert telemetry[device][-1]["battery"] == 0
        assert statuses[device] == [b"online", b"offline"]
    wearing = [d for d, h in habits.items() if h is Habit.WEARS]
    for device in wearing:
        worn = [b for b in telemetry[device] if b["worn"]]
        assert worn
        assert all(40 <= int(str(b["heart_rate"])) <= 160 and "spo2" in b for b in worn)
        assert len(telemetry[device]) >= 119
    low = [d for d in wearing if int(str(telemetry[d][0]["battery"])) <= 20]
    assert low, "the demo shows low batteries from the start"


def test_a_band_low_enough_goes_on_the_charger_and_back_on_the_wrist(registry: Registry) -> None:
    fleet = WristbandFleet(
        registry.wristbands[:40],
        seed=3,
        start=T0,
        zone=ZONE,
        boot_id="boot",
        pace=WristbandPace(interval_s=60, drain_pct_per_h=60, charge_pct_per_h=300),
    )
    worn_by_band: dict[str, list[bool]] = defaultdict(list)
    for second in range(0, 4 * 3600, 60):
        for message in fleet.due(T0 + timedelta(seconds=second)):
            if message.channel == "telemetry":
                worn_by_band[message.device_id].append(bool(message.body()["worn"]))
    wears = [d for d, h in fleet.habits().items() if h is Habit.WEARS]
    changes = [sum(a != b for a, b in itertools.pairwise(w)) for d, w in worn_by_band.items() if d in wears]
    assert max(changes) >= 2, "off to charge and back on"


def test_steps_start_again_at_local_midnight(registry: Registry) -> None:
    # 19:00 to 01:00 in Asia/Shanghai.
    start = datetime(2026, 11, 24, 11, 0, tzinfo=UTC)
    fleet = WristbandFleet(
        registry.wristbands[:20], seed=1, start=start, zone=ZONE, boot_id="boot", pace=WristbandPace(interval_s=60)
    )
    steps: list[tuple[datetime, int]] = []
    for minute in range(6 * 60):
        now = start + timedelta(minutes=minute)
        steps.extend(
            (datetime.fromisoformat(m.body()["ts"]), int(m.body()["steps"]))
            for m in fleet.due(now)
            if m.channel == "telemetry"
        )
    midnight = datetime(2026, 11, 25, 0, 0, tzinfo=ZONE)
    before = [s for at, s in steps if at < midnight]
    after = [s for at, s in steps if at >= midnight]
    assert max(before) > 0
    assert max(after) == 0  # a new day, and asleep


def test_the_rate_bound_holds_in_every_second_and_is_reported(registry: Registry) -> None:
    fleet = bands(registry)  # 240 bands every 10 s: 24 messages/s wanted, with statuses on top
    clock = FakeClock(T0, stop_after=timedelta(seconds=120))
    sent: list[datetime] = []
    reports: list[RateReport] = []
    published = run_fleet(
        fleet,
        lambda _m: sent.append(clock.now),
        clock=clock,
        wait=clock.wait,
        bound=RateBound(10),
        report=reports.append,
        report_every=timedelta(seconds=30),
    )
    assert published == len(sent) > 0
    per_second = Counter(int((at - T0).total_seconds()) for at in sent)
    assert max(per_second.values()) <= 10 * 1.1 + 1
    assert len(sent) >= 10 * 110  # and it does keep up to the bound
    assert reports
    assert all(r.per_second <= 10 * 1.1 + 1 for r in reports)
    assert "at most 10/s" in reports[0].line()
    assert "worn" in reports[0].line()


def test_intervals_stretch_to_keep_the_steady_rate_within_the_bound() -> None:
    assert stretch([10.0] * 240, 50) == 1.0
    assert stretch([10.0] * 240, 12) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="rate"):
        RateBound(0)


class FakeClock:
    """A clock that moves only when the fleet waits; it says stop after ``stop_after``."""

    def __init__(self, start: datetime, stop_after: timedelta) -> None:
        self.now = start
        self.end = start + stop_after

    def __call__(self) -> datetime:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += timedelta(seconds=seconds)
        return self.now >= self.end


def test_worn_bands_fall_now_and_then_and_the_same_seed_falls_alike(registry: Registry) -> None:
    def with_falls(seed: int) -> WristbandFleet:
        return WristbandFleet(
            registry.wristbands,
            seed=seed,
            start=T0,
            zone=ZONE,
            boot_id="boot",
            pace=WristbandPace(interval_s=10, falls_per_hour=600),
        )

    fleet = with_falls(1)
    sent = drive(fleet, 300)
    falls = [m for _at, m in sent if m.channel == "fall"]
    assert 10 <= len(falls) == fleet.falls
    habits = fleet.habits()
    assert all(habits[m.device_id] is not Habit.DRAWER for m in falls)
    for fall in falls:
        parsed = parse_message(fall.topic, fall.payload)
        assert isinstance(parsed, DeviceMessage)
        assert fall.qos == 1
        assert not fall.retain
    assert f"{len(falls)} falls" in fleet.summary()
    assert drive(with_falls(1), 300) == sent
    assert not [m for _at, m in drive(bands(registry), 300) if m.channel == "fall"]
