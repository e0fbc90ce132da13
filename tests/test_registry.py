"""``shouhu registry load``: validation, one transaction, idempotence, deactivation, report."""

from __future__ import annotations

from datetime import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from devices.registry import load_registry, shift_slots
from devices.registry_file import RegistryFileError, parse_registry

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"

SMALL: dict[str, Any] = {
    "areas": [
        {"id": "county", "name": "守护县", "level": "county"},
        {"id": "t1", "name": "东关镇", "level": "township", "parent": "county"},
        {"id": "c1", "name": "东关村", "level": "community", "parent": "t1"},
        {"id": "g1", "name": "一网格", "level": "grid", "parent": "c1"},
        {"id": "g2", "name": "二网格", "level": "grid", "parent": "c1"},
    ],
    "staff": [
        {"id": "gw1", "name": "李网格", "role": "grid_worker", "phone": "+12015550101", "areas": ["g1"]},
        {"id": "do1", "name": "赵值班", "role": "duty_officer", "phone": "+12015550102", "areas": ["t1"]},
    ],
    "rosters": [
        {"staff": "gw1", "area": "g1", "start": "08:00", "end": "20:00"},
        {"staff": "do1", "area": "t1", "start": "20:00", "end": "08:00"},
    ],
    "residents": [
        {
            "id": "r1",
            "name": "王奶奶",
            "grid": "g1",
            "address": "东关村1组1号",
            "guardians": [{"id": "r1-g1", "name": "王大", "phone": "+12015550103", "priority": 1}],
        },
        {"id": "r2", "name": "张爷爷", "grid": "g2", "address": "东关村2组2号"},
    ],
    "devices": [
        {"id": "wb-1", "kind": "wristband", "resident": "r1"},
        {"id": "wb-2", "kind": "wristband", "resident": "r2"},
        {"id": "cam-1", "kind": "camera", "area": "g1"},
    ],
    "policies": [
        {"id": "sos", "kind": "sos", "steps": [{"target": "grid_worker", "channels": ["voice", "sms"]}]},
    ],
}


def _write(tmp_path: Path, data: dict[str, Any], name: str = "registry.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _dump(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    tables = [
        "areas",
        "residents",
        "guardians",
        "staff",
        "staff_areas",
        "duty_shifts",
        "devices",
        "escalation_policies",
        "incidents",
    ]
    return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}


def test_demo_county_loads_and_second_load_changes_nothing(database_url: str) -> None:
    registry = parse_registry(DEMO)
    with psycopg.connect(database_url) as conn:
        first = load_registry(conn, registry)
        before = _dump(conn)
        second = load_registry(conn, registry)
        after = _dump(conn)
    assert first.changed
    assert first.counts["residents"] >= 200
    assert not second.changed
    assert before == after


def test_demo_county_reports_night_gaps_covered_by_fallback(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        report = load_registry(conn, parse_registry(DEMO))
    assert report.coverage_gaps, "the demo leaves some grids uncovered at night"
    assert all(g.uncovered_after_fallback == 0 for g in report.coverage_gaps)
    assert report.residents_without_guardian == ()


def test_report_names_resident_without_guardian_and_uncovered_grid(database_url: str, tmp_path: Path) -> None:
    with psycopg.connect(database_url) as conn:
        report = load_registry(conn, parse_registry(_write(tmp_path, SMALL)))
    assert report.residents_without_guardian == ("r2",)
    gaps = {g.grid_id: g for g in report.coverage_gaps}
    assert gaps["g1"].uncovered_hours_per_week == 12 * 7
    assert gaps["g1"].uncovered_after_fallback == 0  # the township officer covers the night
    assert gaps["g2"].uncovered_hours_per_week == 24 * 7
    assert gaps["g2"].uncovered_after_fallback == 12 * 7  # nobody by day


def test_missing_entries_are_deactivated_not_deleted(database_url: str, tmp_path: Path) -> None:
    reduced = {**SMALL}
    reduced["residents"] = [SMALL["residents"][0]]
    reduced["devices"] = [SMALL["devices"][0], SMALL["devices"][2]]
    with psycopg.connect(database_url) as conn:
        load_registry(conn, parse_registry(_write(tmp_path, SMALL)))
        conn.execute(
            "INSERT INTO incidents (code, kind, severity, resident_id, device_id, opened_at)"
            " VALUES ('K1', 'sos', 'red', 'r2', 'wb-2', now())"
        )
        conn.commit()
        incident_before = conn.execute("SELECT * FROM incidents").fetchall()
        report = load_registry(conn, parse_registry(_write(tmp_path, reduced, "b.yaml")))
        residents: dict[str, bool] = dict(conn.execute("SELECT id, active FROM residents").fetchall())
        devices: dict[str, bool] = dict(conn.execute("SELECT id, active FROM devices").fetchall())
        incident_after = conn.execute("SELECT * FROM incidents").fetchall()
    assert residents == {"r1": True, "r2": False}
    assert devices == {"wb-1": True, "wb-2": False, "cam-1": True}
    assert report.changes["residents"].deactivated == 1
    assert incident_before == incident_after


def test_reloading_reactivates(database_url: str, tmp_path: Path) -> None:
    reduced = {**SMALL, "devices": SMALL["devices"][:1]}
    with psycopg.connect(database_url) as conn:
        load_registry(conn, parse_registry(_write(tmp_path, reduced)))
        load_registry(conn, parse_registry(_write(tmp_path, SMALL, "full.yaml")))
        active = conn.execute("SELECT count(*) FROM devices WHERE active").fetchone()
    assert active == (3,)


def test_edit_updates_in_place(database_url: str, tmp_path: Path) -> None:
    edited = yaml.safe_load(yaml.safe_dump(SMALL))
    edited["residents"][0]["address"] = "东关村9组9号"
    with psycopg.connect(database_url) as conn:
        load_registry(conn, parse_registry(_write(tmp_path, SMALL)))
        report = load_registry(conn, parse_registry(_write(tmp_path, edited, "e.yaml")))
        address = conn.execute("SELECT address FROM residents WHERE id = 'r1'").fetchone()
    assert address == ("东关村9组9号",)
    assert report.changes["residents"].upserted == 1
    assert report.changes["guardians"].upserted == 0


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["residents"][0]["guardians"][0].update(phone="13800138000"),
            "residents[0] (r1).guardians[0] (r1-g1) field 'phone'",
        ),
        (lambda d: d["residents"][1].update(grid="nowhere"), "residents[1] (r2) field 'grid': unknown area 'nowhere'"),
        (lambda d: d["devices"].append({"id": "wb-9", "kind": "wristband"}), "devices[3] (wb-9)"),
        (
            lambda d: d["areas"][3].update(parent="g2"),
            "areas[3] (g1) field 'parent': a grid cannot sit under grid 'g2'",
        ),
        (lambda d: d["rosters"][0].update(start="25:00"), "rosters[0] field 'start'"),
        (lambda d: d["staff"][0].update(role="mayor"), "staff[0] (gw1) field 'role'"),
        (
            lambda d: d["devices"].append({"id": "wb-1", "kind": "wristband", "resident": "r2"}),
            "devices[3] id 'wb-1': duplicate id",
        ),
        (
            lambda d: d["rosters"].append({"staff": "gw1", "area": "g2", "start": "08:00", "end": "09:00"}),
            "rosters[2] field 'area': 'gw1' is not assigned to 'g2'",
        ),
        (
            lambda d: d["policies"].append(
                {"id": "sos2", "kind": "sos", "steps": [{"target": "guardians", "channels": ["sms"]}]}
            ),
            "a second sos policy for the default scope",
        ),
        (
            lambda d: d.update(quiet_hours=[{"area": "nowhere", "start": "21:00", "end": "07:00"}]),
            "quiet_hours[0] field 'area': unknown area 'nowhere'",
        ),
        (
            lambda d: d.update(quiet_hours=[{"area": "g1", "start": "21:00", "end": "21:00"}]),
            "quiet_hours[0]: start and end are the same time",
        ),
        # Control characters in free text (issue 13): each refusal names the row and the field.
        (
            lambda d: d["residents"][0].update(name="王\x0b奶奶"),
            "residents[0] (r1) field 'name': control character '\\x0b' is not allowed",
        ),
        (
            lambda d: d["residents"][1].update(address="东关村\x072组2号"),
            "residents[1] (r2) field 'address': control character '\\x07' is not allowed",
        ),
        (
            lambda d: d["residents"][1].update(address="东关村\x0b2组2号"),
            "residents[1] (r2) field 'address': control character '\\x0b' is not allowed",
        ),
        (
            lambda d: d["residents"][0].update(name="王\n奶奶"),
            "residents[0] (r1) field 'name': control character '\\n'",
        ),
        (
            lambda d: d["residents"][0]["guardians"][0].update(name="王\x00大"),
            "residents[0] (r1).guardians[0] (r1-g1) field 'name': control character '\\x00'",
        ),
        (
            lambda d: d["residents"][0]["guardians"][0].update(relation="儿\x1b子"),
            "residents[0] (r1).guardians[0] (r1-g1) field 'relation': control character '\\x1b'",
        ),
        (lambda d: d["staff"][0].update(name="李\x9b网格"), "staff[0] (gw1) field 'name': control character '\\x9b'"),
        (lambda d: d["areas"][3].update(name="一\t网格"), "areas[3] (g1) field 'name': control character '\\t'"),
        (
            lambda d: d["residents"][0].update(medical_notes="高血压\n\x07糖尿病"),
            "residents[0] (r1) field 'medical_notes': control character '\\x07'",
        ),
        (
            lambda d: d["devices"][0].update(model="X\x7f1"),
            "devices[0] (wb-1) field 'model': control character '\\x7f'",
        ),
        # A visit frequency (issue 15) is monthly or weekly, nothing else.
        (
            lambda d: d["residents"][1].update(visits="daily"),
            "residents[1] (r2) field 'visits': Input should be 'monthly' or 'weekly'",
        ),
        (lambda d: d["residents"][0].update(visits=4), "residents[0] (r1) field 'visits'"),
    ],
)
def test_bad_file_names_entry_and_field_and_loads_nothing(
    database_url: str, tmp_path: Path, mutate: Any, expected: str
) -> None:
    data = yaml.safe_load(yaml.safe_dump(SMALL))
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(RegistryFileError) as caught:
        parse_registry(path)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM areas").fetchone() == (0,)


def test_visit_frequencies_load_change_and_clear(database_url: str, tmp_path: Path) -> None:
    edited = yaml.safe_load(yaml.safe_dump(SMALL))
    edited["residents"][0]["visits"] = "weekly"
    edited["residents"][1]["visits"] = "monthly"
    query = "SELECT id, visit_frequency FROM residents ORDER BY id"
    with psycopg.connect(database_url) as conn:
        load_registry(conn, parse_registry(_write(tmp_path, edited)))
        assert conn.execute(query).fetchall() == [("r1", "weekly"), ("r2", "monthly")]
        report = load_registry(conn, parse_registry(_write(tmp_path, SMALL, "plain.yaml")))
        assert conn.execute(query).fetchall() == [("r1", None), ("r2", None)]
    assert report.changes["residents"].upserted == 2


def test_not_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"areas: [\n\xff\xfe")
    with pytest.raises(RegistryFileError, match="not valid YAML"):
        parse_registry(path)


def test_a_failure_mid_load_leaves_nothing(database_url: str, tmp_path: Path) -> None:
    registry = parse_registry(_write(tmp_path, SMALL))
    with psycopg.connect(database_url) as conn:
        # A trigger that fails on the devices upsert, after areas and residents ran.
        conn.execute("CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'boom'; END$$")
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON devices FOR EACH ROW EXECUTE FUNCTION boom()")
        conn.commit()
        with pytest.raises(psycopg.errors.RaiseException):
            load_registry(conn, registry)
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM areas").fetchone() == (0,)


def test_shift_slots_wrap_midnight_and_week() -> None:
    night = shift_slots([7], time(20, 0), time(8, 0))  # Sunday 20:00 → Monday 08:00
    assert len(night) == 24
    assert 0 in night  # Monday 00:00 slot
    assert 7 * 48 - 1 in night  # Sunday 23:30 slot
    day = shift_slots([1, 2, 3, 4, 5, 6, 7], time(0, 0), time(0, 0))
    assert len(day) == 7 * 48  # a shift ending at its start time is 24 h


def test_line_breaks_in_an_address_fold_into_one_space_and_notes_keep_their_lines(tmp_path: Path) -> None:
    """An address pasted over two lines is still one address: said and texted on one line."""
    data = yaml.safe_load(yaml.safe_dump(SMALL))
    data["residents"][0].update(address="东关村1组1号\r\n  3单元\t501", medical_notes="高血压\n糖尿病\t10年")
    registry = parse_registry(_write(tmp_path, data))
    assert registry.residents[0].address == "东关村1组1号 3单元 501"
    assert registry.residents[0].medical_notes == "高血压\n糖尿病\t10年"
