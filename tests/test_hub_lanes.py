"""A lane that can no longer run ends the hub instead of lingering half-alive (issue 12):
`Hub.run` raises `LaneFailed` (`shouhu hub` exits 70 for its supervisor), readiness
drops, and the message it held was never acknowledged, so a restarted hub pages it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from hub.service import Hub, LaneFailed
from hub.sightings import Sighting
from simulators.wristband import alarm_payload, publish_raw
from tests.services import Mosquitto
from tests.test_hub import incidents, start_hub, wait_until


class LaneBreaker(BaseException):
    """Not an ``Exception``: what per-message isolation does not (and must not) swallow."""


def breaking_sink(_conn: psycopg.Connection[Any], _sightings: Sequence[Sighting]) -> None:
    raise LaneBreaker("the lane itself is broken")


def test_a_broken_alarm_lane_ends_the_hub_and_its_sos_is_paged_after_the_restart(
    county_url: str, mosquitto: Mosquitto
) -> None:
    hub_id = f"hub-{uuid.uuid4().hex[:6]}"
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
    assert broken.is_ready()
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
