"""Watch ids in the registry file (devices/registry_file.py) and the gateway's lookup over
that file (devices/watch_ids.py): validation, the mapping, re-reading on change."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from devices.registry_file import RegistryFileError, parse_registry, watch_wristbands
from devices.watch_ids import RegistryWatches
from simulators.demo_county_gen import WATCH_WRISTBANDS, watch_id_of

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
SMALL: dict[str, Any] = {
    "areas": [
        {"id": "county", "name": "守护县", "level": "county"},
        {"id": "t1", "name": "东关镇", "level": "township", "parent": "county"},
        {"id": "c1", "name": "东关村", "level": "community", "parent": "t1"},
        {"id": "g1", "name": "一网格", "level": "grid", "parent": "c1"},
    ],
    "residents": [
        {"id": "r1", "name": "王奶奶", "grid": "g1", "address": "东关村1组1号"},
        {"id": "r2", "name": "张爷爷", "grid": "g1", "address": "东关村2组2号"},
    ],
    "devices": [
        {"id": "wb-1", "kind": "wristband", "resident": "r1"},
        {"id": "wb-2", "kind": "wristband", "resident": "r2"},
        {"id": "cam-1", "kind": "camera", "area": "g1"},
    ],
}


def _registry(tmp_path: Path, **devices: dict[str, Any]) -> Path:
    data = yaml.safe_load(yaml.safe_dump(SMALL))
    for entry in data["devices"]:
        entry.update(devices.get(entry["id"].replace("-", "_"), {}))
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_the_demo_county_maps_its_watches_to_their_wristbands() -> None:
    watches = watch_wristbands(parse_registry(DEMO))
    assert watches == {watch_id_of(index): f"wb-{index:04d}" for index in WATCH_WRISTBANDS}
    assert watches["8600000061"] == "wb-0061"


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ({"cam_1": {"watch_id": "8612345678"}}, "devices[2] (cam-1): only a wristband may have a watch_id"),
        ({"wb_1": {"protocol": "watch"}}, "devices[0] (wb-1): a protocol needs the watch_id"),
        ({"wb_1": {"watch_id": "86123"}}, "devices[0] (wb-1) field 'watch_id'"),
        ({"wb_1": {"watch_id": "86123456x8"}}, "devices[0] (wb-1) field 'watch_id'"),
        ({"wb_1": {"watch_id": "8612345678", "protocol": "gt06"}}, "devices[0] (wb-1) field 'protocol'"),
        (
            {"wb_1": {"watch_id": 14111001332708}},
            "devices[0] (wb-1) field 'watch_id': watch id 14111001332708 must be quoted",
        ),
        (
            {"wb_1": {"watch_id": "8612345678"}, "wb_2": {"watch_id": "8612345678"}},
            "devices[1] (wb-2) field 'watch_id': '8612345678' is already 'wb-1''s",
        ),
    ],
)
def test_a_bad_watch_id_names_the_device_and_the_field(
    tmp_path: Path, devices: dict[str, dict[str, Any]], expected: str
) -> None:
    path = _registry(tmp_path, **devices)
    with pytest.raises(RegistryFileError) as caught:
        parse_registry(path)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems


def test_a_watch_id_keeps_its_leading_zeros(tmp_path: Path) -> None:
    path = _registry(tmp_path, wb_2={"watch_id": "014111001332708", "protocol": "watch"})
    assert watch_wristbands(parse_registry(path)) == {"014111001332708": "wb-2"}


def _touch_later(path: Path) -> None:
    """A modification time the lookup cannot mistake for the last one it read."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_the_lookup_rereads_a_changed_file_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = _registry(tmp_path, wb_1={"watch_id": "8612345678"})
    lookup = RegistryWatches(path)
    assert lookup("8612345678") == "wb-1"
    assert lookup("8699999999") is None
    _registry(tmp_path, wb_2={"watch_id": "8612345678"})  # the watch moved to another resident
    _touch_later(path)
    assert lookup("8612345678") == "wb-2"
    path.write_text("devices: [", encoding="utf-8")  # a typo: the watches stay mapped
    _touch_later(path)
    assert lookup("8612345678") == "wb-2"
    assert lookup.count == 1


def test_no_file_maps_no_watch_and_a_missing_or_bad_one_is_refused_at_start(tmp_path: Path) -> None:
    assert RegistryWatches(None)("8612345678") is None
    with pytest.raises(RegistryFileError, match="no such file"):
        RegistryWatches(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [", encoding="utf-8")
    with pytest.raises(RegistryFileError, match="not valid YAML"):
        RegistryWatches(bad)


def test_a_file_that_disappears_keeps_the_watches_mapped(tmp_path: Path) -> None:
    path = _registry(tmp_path, wb_1={"watch_id": "8612345678"})
    lookup = RegistryWatches(path)
    path.unlink()  # an editor's save in two steps, a volume remounted
    assert lookup("8612345678") == "wb-1"
    _registry(tmp_path, wb_1={"watch_id": "8612345679"})
    _touch_later(path)
    assert lookup("8612345678") is None
    assert lookup("8612345679") == "wb-1"
