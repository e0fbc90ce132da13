"""The committed demo county: generated, valid, and shaped to exercise the escalation."""

from __future__ import annotations

import re
from collections import Counter
from datetime import time
from pathlib import Path

import phonenumbers
import pytest
import yaml

from devices.kinds import AreaLevel, DeviceKind, StaffRole, VisitFrequency, Weekday
from devices.registry_file import RegistryFile, RosterEntry, parse_registry
from simulators.demo_county_gen import OUTPUT, build_demo_county, render_demo_county

DEMO = Path(__file__).resolve().parents[1] / "simulators" / "demo_county.yaml"
FICTIONAL = re.compile(r"^\+1([2-9]\d{2})55501(\d{2})$")
NIGHT = time(2, 0)


@pytest.fixture(scope="module")
def registry() -> RegistryFile:
    return parse_registry(DEMO)


def _covers(roster: RosterEntry, day: Weekday, at: time) -> bool:
    """Whether the shift covers ``at`` on ``day``; an overnight shift spills into the next day."""
    days = set(roster.days)
    if roster.start < roster.end:
        return day in days and roster.start <= at < roster.end
    previous = list(Weekday)[(day.iso - 2) % 7]
    return (day in days and at >= roster.start) or (previous in days and at < roster.end)


def _always_covers(rosters: list[RosterEntry], at: time) -> bool:
    return all(any(_covers(r, day, at) for r in rosters) for day in Weekday)


def _never_covers(rosters: list[RosterEntry], at: time) -> bool:
    return not any(_covers(r, day, at) for r in rosters for day in Weekday)


def test_generator_writes_the_committed_file() -> None:
    assert OUTPUT == DEMO
    text = DEMO.read_text(encoding="utf-8")
    assert text == render_demo_county(), "stale: run python -m simulators.demo_county_gen"
    assert yaml.safe_load(text) == build_demo_county()


def test_generator_is_deterministic() -> None:
    assert build_demo_county() == build_demo_county()


def test_header_says_generated_and_synthetic() -> None:
    head = DEMO.read_text(encoding="utf-8").splitlines()[:5]
    assert all(line.startswith("#") for line in head[:2])
    assert any("demo_county_gen" in line for line in head)
    assert any("synthetic" in line.lower() for line in head)


def test_clock_times_are_quoted() -> None:
    text = DEMO.read_text(encoding="utf-8")
    assert re.search(r"^\s+(start|end): \d", text, re.MULTILINE) is None
    assert re.search(r'^\s+start: "\d\d:\d\d"$', text, re.MULTILINE) is not None


def test_area_tree(registry: RegistryFile) -> None:
    levels = Counter(a.level for a in registry.areas)
    assert levels[AreaLevel.COUNTY] == 1
    assert levels[AreaLevel.TOWNSHIP] == 3
    assert levels[AreaLevel.COMMUNITY] >= 10
    assert levels[AreaLevel.GRID] >= 30
    assert levels[AreaLevel.MICRO_GRID] >= 1
    county = next(a for a in registry.areas if a.level is AreaLevel.COUNTY)
    assert county.id == "county"


def test_residents(registry: RegistryFile) -> None:
    residents = registry.residents
    assert len(residents) >= 200
    assert sum(r.lives_alone for r in residents) >= 0.75 * len(residents)
    assert any(not r.lives_alone for r in residents)
    assert any(r.medical_notes for r in residents)
    assert any(not r.medical_notes for r in residents)
    for r in residents:
        assert 1 <= len(r.guardians) <= 3, r.id
        assert [g.priority for g in r.guardians] == list(range(1, len(r.guardians) + 1)), r.id
        assert all(g.relation for g in r.guardians), r.id
        assert r.address.startswith("守护县"), r.id
        assert r.lat is not None, r.id
        assert r.lon is not None, r.id
        assert abs(r.lat - 38.7) < 0.2, r.id
        assert abs(r.lon - 111.6) < 0.2, r.id
    grids = {a.id for a in registry.areas if a.level is AreaLevel.GRID}
    assert grids <= {r.grid for r in residents}, "every grid has residents"


def test_some_residents_have_recurring_visits(registry: RegistryFile) -> None:
    frequencies = Counter(r.visits for r in registry.residents)
    assert frequencies[VisitFrequency.WEEKLY] >= 5
    assert frequencies[VisitFrequency.MONTHLY] > frequencies[VisitFrequency.WEEKLY]
    assert frequencies[None] > len(registry.residents) / 2, "most residents are visited only when something happens"


def test_staff_and_rosters(registry: RegistryFile) -> None:
    roles = Counter(s.role for s in registry.staff)
    rostered = {r.staff for r in registry.rosters}
    workers = [s for s in registry.staff if s.role is StaffRole.GRID_WORKER]
    assert len(workers) >= 30
    assert all(w.id in rostered for w in workers)
    assert roles[StaffRole.TECHNICIAN] >= 5
    assert roles[StaffRole.OPERATOR] >= 3
    operator_ids = {s.id for s in registry.staff if s.role is StaffRole.OPERATOR}
    operator_rosters = [r for r in registry.rosters if r.staff in operator_ids]
    for at in (time(0, 0), time(2, 0), time(8, 0), time(14, 0), time(20, 0), time(23, 59)):
        assert _always_covers(operator_rosters, at), at


def test_duty_officer_per_township_and_community(registry: RegistryFile) -> None:
    officers = {s.id: s for s in registry.staff if s.role is StaffRole.DUTY_OFFICER}
    for area in registry.areas:
        if area.level not in (AreaLevel.TOWNSHIP, AreaLevel.COMMUNITY):
            continue
        assert any(area.id in s.areas for s in officers.values()), area.id
        rosters = [r for r in registry.rosters if r.staff in officers and r.area == area.id]
        assert rosters, area.id
        if area.level is AreaLevel.TOWNSHIP:
            assert _always_covers(rosters, NIGHT), area.id
            assert _always_covers(rosters, time(12, 0)), area.id


def test_every_grid_has_a_day_worker(registry: RegistryFile) -> None:
    workers = {s.id for s in registry.staff if s.role is StaffRole.GRID_WORKER}
    for area in registry.areas:
        if area.level is AreaLevel.GRID:
            rosters = [r for r in registry.rosters if r.staff in workers and r.area == area.id]
            assert _always_covers(rosters, time(10, 0)), area.id


def test_night_fallback_is_exercised(registry: RegistryFile) -> None:
    """Some grids have nobody at 02:00, so the page must walk up to the township."""
    areas = {a.id: a for a in registry.areas}
    roles = {s.id: s.role for s in registry.staff}

    def rosters(area_id: str, role: StaffRole) -> list[RosterEntry]:
        return [r for r in registry.rosters if r.area == area_id and roles[r.staff] is role]

    uncovered = []
    covered = []
    for grid in (a for a in registry.areas if a.level is AreaLevel.GRID):
        community = areas[grid.parent or ""]
        township = areas[community.parent or ""]
        assert township.level is AreaLevel.TOWNSHIP
        if _never_covers(rosters(grid.id, StaffRole.GRID_WORKER), NIGHT):
            assert _never_covers(rosters(community.id, StaffRole.DUTY_OFFICER), NIGHT)
            if _always_covers(rosters(township.id, StaffRole.DUTY_OFFICER), NIGHT):
                uncovered.append(grid.id)
        elif _always_covers(rosters(grid.id, StaffRole.GRID_WORKER), NIGHT):
            covered.append(grid.id)
    assert uncovered, "no grid falls back to its township duty officer at 02:00"
    assert covered, "no grid has a night grid worker"


def test_devices(registry: RegistryFile) -> None:
    wristbands = [d for d in registry.devices if d.kind is DeviceKind.WRISTBAND]
    cameras = [d for d in registry.devices if d.kind is DeviceKind.CAMERA]
    assert sorted(d.resident or "" for d in wristbands) == sorted(r.id for r in registry.residents)
    assert all(re.fullmatch(r"wb-\d{4}", d.id) for d in wristbands)
    assert len(cameras) >= 60
    assert all(re.fullmatch(r"cam-\d{3}", d.id) for d in cameras)
    assert any(d.heartbeat_interval_s == 60 and d.heartbeat_misses == 3 for d in cameras)


def test_policies(registry: RegistryFile) -> None:
    defaults = {p.kind: p for p in registry.policies if p.area is None}
    assert set(defaults) >= {"sos", "fall"}
    for policy in defaults.values():
        assert [s.target for s in policy.steps] == [
            "grid_worker", "guardians", "emergency_platform", "operators",
        ]
    townships = {a.id for a in registry.areas if a.level is AreaLevel.TOWNSHIP}
    overrides = [p for p in registry.policies if p.area in townships]
    assert overrides
    assert overrides[0].steps[0].wait_s == 90


def test_phones_are_fictional_valid_and_unique(registry: RegistryFile) -> None:
    phones = [s.phone for s in registry.staff]
    phones += [r.phone for r in registry.residents if r.phone is not None]
    phones += [g.phone for r in registry.residents for g in r.guardians]
    duplicates = [p for p, n in Counter(phones).items() if n > 1]
    assert not duplicates
    area_codes = set()
    for phone in phones:
        match = FICTIONAL.fullmatch(phone)
        assert match is not None, phone
        assert phonenumbers.is_valid_number(phonenumbers.parse(phone, None)), phone
        area_codes.add(match.group(1))
    assert len(area_codes) >= 5, "spread over several area codes"
