"""The hub owns its upkeep: it ticks it while connected and closes it when it stops."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import psycopg

from hub.service import build_hub
from shouhu.settings import Settings
from tests.support.services import Mosquitto


def upkeep_backends(url: str) -> int:
    """The server's backends serving an upkeep connection in this database."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'shouhu-hub-upkeep'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def poll(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def test_stopping_the_hub_closes_its_upkeep(county_url: str, mosquitto: Mosquitto) -> None:
    hub, upkeep = build_hub(
        Settings(_env_file=None),  # type: ignore[call-arg]
        county_url,
        mosquitto.url,
        metrics_port=None,
        hub_id=f"test-hub-{uuid.uuid4().hex[:8]}",
        spool=False,
    )
    assert hub.upkeep is upkeep
    thread = threading.Thread(target=hub.run, daemon=True)
    thread.start()
    try:
        assert hub.ready.wait(15), "hub did not become ready"
        # The first tick opens the upkeep's own connection: the server lists it.
        poll(lambda: upkeep.connected and upkeep_backends(county_url) == 1, "the upkeep's connection")
    finally:
        hub.stop()
        thread.join(15)
    assert not thread.is_alive(), "the hub did not stop"
    assert not upkeep.connected, "the hub stopped but its upkeep still holds a connection"
    poll(lambda: upkeep_backends(county_url) == 0, "the server to end the upkeep's backend")
