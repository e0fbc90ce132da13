"""The liveness window: device override > the registry's per-kind `heartbeats:` > SHOUHU_HEARTBEAT_*."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import yaml

from devices.kinds import DeviceKind
from devices.registry import load_registry
from devices.registry_file import parse_registry
from hub.liveness import LivenessDefaults, record_sightings
from hub.sightings import Sighting

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
AT = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


def deadline(url: str, device: str) -> timedelta:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT deadline FROM device_state WHERE device_id = %s", (device,)).fetchone()
    assert row is not None
    window: timedelta = row[0] - AT
    return window


def test_kind_window_from_the_registry_and_device_override(database_url: str, tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    data["heartbeats"] = {"camera": {"interval_s": 30, "misses": 2}}
    override = next(d for d in data["devices"] if d["kind"] == "camera" and d.get("heartbeat_interval_s"))
    plain = next(d for d in data["devices"] if d["kind"] == "camera" and not d.get("heartbeat_interval_s"))
    path = tmp_path / "county.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with psycopg.connect(database_url) as conn:
        report = load_registry(conn, parse_registry(path))
        record_sightings(
            conn,
            [
                Sighting(plain["id"], DeviceKind.CAMERA, AT, True),
                Sighting(override["id"], DeviceKind.CAMERA, AT, True),
                Sighting("wb-0001", DeviceKind.WRISTBAND, AT, True),
            ],
            LivenessDefaults(interval_s=60, misses=3),
        )
    assert report.changes["heartbeat_policies"].upserted == 1
    assert deadline(database_url, plain["id"]) == timedelta(seconds=60)  # the kind's 30 s x 2
    own = override["heartbeat_interval_s"] * override["heartbeat_misses"]
    assert deadline(database_url, override["id"]) == timedelta(seconds=own)  # its own values win
    assert deadline(database_url, "wb-0001") == timedelta(seconds=180)  # no kind entry: the env default


def test_a_kind_left_out_falls_back_to_the_default(database_url: str, tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    data["heartbeats"] = {"wristband": {"interval_s": 10, "misses": 1}}
    path = tmp_path / "county.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with psycopg.connect(database_url) as conn:
        load_registry(conn, parse_registry(path))
        removed = load_registry(conn, parse_registry(DEMO)).changes["heartbeat_policies"]
        left = conn.execute("SELECT count(*) FROM heartbeat_policies").fetchone()
    assert removed.deactivated == 1
    assert left == (0,)
