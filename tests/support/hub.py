"""The hub under test: started in-process on a thread, or as a `shouhu hub` process, and
read back through the database."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from hub.service import Hub, build_hub
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from tests.support.services import Mosquitto, ShouhuProcess, shouhu_env


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """``check()``'s first truthy value, polled until ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def scrape(metrics_url: str, pattern: str) -> float:
    """One sample from a process's ``/metrics`` (``pattern``: a regex of the name and labels), 0 if absent."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def count(url: str, table: str) -> int:
    return int(query(url, f"SELECT count(*) FROM {table}")[0][0])


def incidents(url: str) -> list[tuple[Any, ...]]:
    return query(
        url, "SELECT id, kind, state, resident_id, urgency, payload_unreadable, area_id FROM incidents ORDER BY id"
    )


def sos_topic(device_id: str, channel: str = "sos") -> str:
    return f"shouhu/v1/wristband/{device_id}/{channel}"


def start_hub(url: str, mqtt_url: str, hub_id: str | None = None) -> tuple[Hub, threading.Thread]:
    """A hub running on a thread of this process, ready (subscribed) before this returns."""
    hub, _upkeep = build_hub(
        Settings(_env_file=None),  # type: ignore[call-arg]
        url,
        mqtt_url,
        metrics_port=None,
        hub_id=hub_id or f"test-hub-{uuid.uuid4().hex[:8]}",
    )
    thread = threading.Thread(target=hub.run, daemon=True)
    thread.start()
    assert hub.ready.wait(15), "hub did not become ready"
    return hub, thread


@pytest.fixture
def hub(county_url: str, broker: Mosquitto) -> Iterator[Hub]:
    """An in-process hub over the demo county, on this test's own broker."""
    worker, thread = start_hub(county_url, broker.url)
    yield worker
    worker.stop()
    thread.join(10)


def hub_process(url: str, mqtt_url: str, hub_id: str) -> ShouhuProcess:
    """`shouhu hub` as a process (not yet started), ready once its /readyz answers."""
    port = free_port()
    return ShouhuProcess(
        ["hub"],
        shouhu_env(
            SHOUHU_DATABASE_URL=url, SHOUHU_MQTT_URL=mqtt_url, SHOUHU_HUB_ID=hub_id, SHOUHU_METRICS_PORT=str(port)
        ),
        ready_url=f"http://127.0.0.1:{port}/readyz",
    )
