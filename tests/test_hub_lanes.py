"""A lane that can no longer run ends the hub instead of lingering half-alive (issue 12):
`Hub.run` raises `LaneFailed` (`shouhu hub` exits 70 for its supervisor), readiness
drops, and the message it held was never acknowledged, so a restarted hub pages it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from prometheus_client import REGISTRY

from hub.service import Hub, LaneFailed
from hub.sightings import Sighting
from simulators.wristband import alarm_payload, publish_raw
from tests.support.hub import incidents, query, start_hub, wait_until
from tests.support.services import Mosquitto


class LaneBreaker(BaseException):
    """Not an ``Exception``: what per-message isolation does not (and must not) swallow."""


class BreakingSink:
    """Breaks the lane once armed. Before, it records nothing: the session's broker is
    shared by every test of this worker, and a status another test left retained may
    reach the hub before its start-up probe does (it broke the lane before ready once)."""

    def __init__(self) -> None:
        self.armed = threading.Event()

    def __call__(self, _conn: psycopg.Connection[Any], _sightings: Sequence[Sighting]) -> None:
        if self.armed.is_set():
            raise LaneBreaker("the lane itself is broken")


def test_a_broken_alarm_lane_ends_the_hub_and_its_sos_is_paged_after_the_restart(
    county_url: str, mosquitto: Mosquitto
) -> None:
    hub_id = f"hub-{uuid.uuid4().hex[:6]}"
    breaking_sink = BreakingSink()
    broken = Hub(county_url, mosquitto.url, hub_id, 120, record_sightings=breaking_sink)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            broken.run()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert broken.ready.wait(15)
    # Ready also needs every SUBACK of both connections: the bulk one may lag the probe.
    wait_until(broken.is_ready, what="the hub ready (both connections subscribed)")
    breaking_sink.armed.set()
    publish_raw(mosquitto.url, "shouhu/v1/wristband/wb-0071/sos", alarm_payload("sos"))
    thread.join(20)
    assert not thread.is_alive(), "the hub kept running with a dead lane"
    assert len(failures) == 1
    assert isinstance(failures[0], LaneFailed)
    assert "alarm lane stopped" in str(failures[0])
    assert not broken.is_ready()
    assert incidents(county_url) == []  # rolled back, and never acknowledged
    healthy, healthy_thread = start_hub(county_url, mosquitto.url, hub_id)
    try:
        wait_until(lambda: incidents(county_url), timeout=15, what="the redelivered SOS paged by the restarted hub")
    finally:
        healthy.stop()
        healthy_thread.join(15)


def test_a_mass_event_commits_alarms_in_groups_and_one_failing_alarm_costs_only_itself(
    county_url: str, mosquitto: Mosquitto
) -> None:
    """Thirty presses queue up while a lock holds the first commit; then they commit in
    groups (a savepoint each). One that the database refuses (a trigger, for one
    wristband) is stored alone afterwards, and after its retries dead-lettered with the
    operators' fallback incident; the others are each their resident's one incident
    with one first step."""
    with psycopg.connect(county_url) as conn:
        conn.execute(
            """
            CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.device_id = 'wb-0105' AND NEW.kind = 'sos' THEN
                    RAISE EXCEPTION 'a fault only this wristband trips';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_one BEFORE INSERT ON incidents FOR EACH ROW EXECUTE FUNCTION refuse_one();
            """
        )
    groups_before = REGISTRY.get_sample_value("shouhu_hub_alarm_group_size_count") or 0.0
    hub, thread = start_hub(county_url, mosquitto.url)
    try:
        blocker = psycopg.connect(county_url)
        blocker.execute("LOCK TABLE incidents IN SHARE ROW EXCLUSIVE MODE")  # hold the first commit
        devices = [f"wb-{n:04d}" for n in range(101, 131)]
        for device in devices:
            publish_raw(mosquitto.url, f"shouhu/v1/wristband/{device}/sos", alarm_payload("sos"))
        # (the broker keeps at most 20 in flight to one client: 19 can wait in the inbox)
        wait_until(lambda: hub.alarm_inbox.qsize() >= 10, what="the presses queued behind the held commit")
        blocker.rollback()
        blocker.close()
        wait_until(lambda: len(incidents(county_url)) == 30, timeout=30, what="thirty incidents")
    finally:
        hub.stop()
        thread.join(15)
    kinds = query(county_url, "SELECT device_id, kind FROM incidents ORDER BY device_id")
    assert [d for d, _k in kinds] == devices
    assert dict(kinds)["wb-0105"] == "sos_unregistered"  # the fallback: operators paged anyway
    assert {k for d, k in kinds if d != "wb-0105"} == {"sos"}
    assert query(county_url, "SELECT count(*) FROM escalation_actions") == [(30,)]
    assert query(county_url, "SELECT reason FROM dead_letters") == [("store_failed",)]
    groups = (REGISTRY.get_sample_value("shouhu_hub_alarm_group_size_count") or 0.0) - groups_before
    assert groups >= 1, "the queued presses were not committed together"
