"""Faults against the real broker and database: the hub SIGKILLed mid-stream, PostgreSQL
restarted mid-stream, the broker stopped (SIGTERM) and killed (SIGKILL), one of two hubs
killed. Each test has its own broker, so no other test's sessions hold shares."""

from __future__ import annotations

import re
import subprocess
import urllib.request
import uuid

import pytest

from shouhu.embedded.postgres import LocalPostgres, free_port
from tests.support.broker import Fleet, run_shipped_broker, shipped_broker
from tests.support.hub import count, hub_process, query, wait_until
from tests.support.services import (
    Mosquitto,
    ShouhuProcess,
    http_status,
    scratch_dir,
    shouhu_env,
)


def sos_incidents(url: str) -> int:
    return int(query(url, "SELECT count(*) FROM incidents")[0][0])


def test_hub_sigkilled_mid_stream_stores_everything_exactly_once(county_url: str, broker: Mosquitto) -> None:
    hub_id = f"hub-{uuid.uuid4().hex[:6]}"
    first = hub_process(county_url, broker.url, hub_id).start()
    fleet = Fleet(broker.port)
    try:
        for block in range(10):
            fleet.telemetry(300, offset=block * 300)
            fleet.sos(f"wb-{block + 1:04d}")
        wait_until(lambda: count(county_url, "telemetry") >= 600, timeout=30, what="the stream under way")
        first.kill(9)
        fleet.wait_published()
        second = hub_process(county_url, broker.url, hub_id).start()
        try:
            wait_until(
                lambda: count(county_url, "telemetry") == 3000 and sos_incidents(county_url) == 10,
                timeout=60,
                what="every message after the restart",
            )
        finally:
            second.stop()
    finally:
        fleet.close()
    assert count(county_url, "message_ledger") == 3010
    assert query(county_url, "SELECT count(DISTINCT (device_id, msg_id)) FROM telemetry") == [(3000,)]
    assert query(county_url, "SELECT count(*) FROM escalation_actions WHERE step = 0") == [(10,)]


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "with-a-worker"])
def test_postgres_restarted_mid_stream_the_hub_waits_and_loses_nothing(
    own_postgres: tuple[LocalPostgres, str], broker: Mosquitto, workers: int
) -> None:
    """`pg_ctl stop -m immediate` under a stream; with `--workers 2` the worker's lanes
    wait the outage out too, and the tree neither exits nor loses or doubles a message."""
    cluster, url = own_postgres
    hub = hub_process(url, broker.url, f"hub-{uuid.uuid4().hex[:6]}")
    hub.args = ["hub", "--workers", str(workers)]
    hub.start()
    fleet = Fleet(broker.port)
    try:
        fleet.telemetry(1000)
        wait_until(lambda: count(url, "telemetry") >= 200, timeout=30, what="the stream under way")
        cluster.stop("immediate")  # a crash of the database
        fleet.telemetry(1000, offset=1000)
        fleet.sos("wb-0077")
        fleet.wait_published()
        cluster.start()
        wait_until(
            lambda: count(url, "telemetry") == 2000 and sos_incidents(url) == 1,
            timeout=60,
            what="everything after the database came back",
        )
        assert "database unavailable" in hub.output()
        assert hub.process is not None
        assert hub.process.poll() is None, "an outage is waited out, not a reason to exit"
    finally:
        fleet.close()
        hub.stop()
    assert count(url, "message_ledger") == 2001
    assert query(url, "SELECT count(DISTINCT msg_id) FROM telemetry") == [(2000,)]


def test_broker_stopped_with_sigterm_and_restarted(county_url: str, broker: Mosquitto) -> None:
    """Mosquitto writes its persistence file when it stops on SIGTERM: the hub's session and
    every QoS 1 message queued in it survive the restart, and the hub resumes.

    Measured on Debian's Mosquitto 2.0.11: a *shared* subscription is not restored from
    the persistence file — until the hub reconnects and subscribes again, telemetry
    published on shared topics is dropped (messages already queued are kept). Direct
    subscriptions, the SOS ones, are restored. That is one more reason SOS never
    travels through a shared subscription.
    """
    hub_id = f"hub-{uuid.uuid4().hex[:6]}"
    first = hub_process(county_url, broker.url, hub_id).start()
    first.kill(9)  # its session (direct and shared subscriptions) stays on the broker
    fleet = Fleet(broker.port)
    fleet.telemetry(300)
    fleet.sos("wb-0033")
    fleet.wait_published()
    fleet.close()
    broker.stop(15)
    broker.start()  # same port, same persistence directory
    second = hub_process(county_url, broker.url, hub_id).start()
    try:
        wait_until(
            lambda: count(county_url, "telemetry") == 300 and sos_incidents(county_url) == 1,
            timeout=30,
            what="what was queued before the restart",
        )
        fleet = Fleet(broker.port)
        fleet.telemetry(300, offset=300)
        fleet.wait_published()
        wait_until(lambda: count(county_url, "telemetry") == 600, timeout=30, what="what came after")
        fleet.close()
    finally:
        second.stop()
    assert count(county_url, "message_ledger") == 601


def test_broker_sigkilled_with_the_shipped_configuration(county_url: str) -> None:
    """With the shipped configuration Mosquitto saves its state every `autosave_interval`
    seconds: a SIGKILL loses at most what arrived since the last save. Sessions saved
    before the kill survive; the hub reconnects with its session and resumes."""
    # Mosquitto run as root drops to its own user: the directory must be reachable.
    tmp_path = scratch_dir("shouhu-shipped-")
    port = free_port()
    conf = shipped_broker(tmp_path, port)
    autosave = int(re.search(r"^autosave_interval\s+(\d+)", conf.read_text(), re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert autosave <= 60

    def start() -> subprocess.Popen[bytes]:
        return run_shipped_broker(conf, port)

    broker_process = start()
    fake = Mosquitto(directory=tmp_path, port=port)  # for its URL only
    hub_id = f"hub-{uuid.uuid4().hex[:6]}"
    metrics_port = free_port()
    hub = ShouhuProcess(
        ["hub"],
        shouhu_env(
            SHOUHU_DATABASE_URL=county_url,
            SHOUHU_MQTT_URL=fake.url,
            SHOUHU_HUB_ID=hub_id,
            SHOUHU_METRICS_PORT=str(metrics_port),
        ),
        ready_url=f"http://127.0.0.1:{metrics_port}/readyz",
    ).start()
    try:
        store = tmp_path / "data" / "mosquitto.db"
        wait_until(store.exists, timeout=autosave + 5, what="the first autosave (the hub's session on disk)")
        fleet = Fleet(port)
        fleet.telemetry(200)
        fleet.wait_published()
        wait_until(lambda: count(county_url, "telemetry") == 200, timeout=30, what="the first 200 rows")
        fleet.close()
        broker_process.kill()  # SIGKILL: no final save
        broker_process.wait(10)
        broker_process = start()
        fleet = Fleet(port)
        # The SOS subscription is direct, restored from the last save: the SOS is queued
        # for the hub until it reconnects.
        fleet.sos("wb-0021")
        wait_until(lambda: sos_incidents(county_url) == 1, timeout=30, what="the SOS after the broker was killed")
        # Shared subscriptions come back when the hub subscribes again on reconnect.
        fleet.telemetry(200, offset=200)
        fleet.wait_published()
        wait_until(lambda: count(county_url, "telemetry") == 400, timeout=30, what="telemetry after the restart")
        fleet.close()
        assert http_status(f"http://127.0.0.1:{metrics_port}/readyz") == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            metrics = response.read().decode()
        assert "shouhu_hub_sessions_lost_total 0.0" in metrics  # the session was on disk
    finally:
        hub.stop()
        broker_process.kill()


def test_one_of_two_hubs_killed_every_sos_is_still_paged(county_url: str, broker: Mosquitto) -> None:
    first = hub_process(county_url, broker.url, f"hub-a-{uuid.uuid4().hex[:4]}").start()
    second = hub_process(county_url, broker.url, f"hub-b-{uuid.uuid4().hex[:4]}").start()
    fleet = Fleet(broker.port)
    try:
        first.kill(9)
        for index in range(5):
            fleet.sos(f"wb-{index + 150:04d}")
        wait_until(
            lambda: sos_incidents(county_url) == 5,
            timeout=15,
            what="five incidents from the surviving hub, with the other still dead",
        )
    finally:
        fleet.close()
        second.stop()
    assert first.process is not None
    assert first.process.poll() is not None  # it never came back during the test


def stored_telemetry(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url) as response:
        text = response.read().decode()
    found = re.search(r'^shouhu_hub_messages_stored_total\{channel="telemetry"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_two_hubs_each_store_a_distinct_share_of_telemetry(county_url: str, broker: Mosquitto) -> None:
    hubs = [hub_process(county_url, broker.url, f"hub-{name}-{uuid.uuid4().hex[:4]}").start() for name in "ab"]
    fleet = Fleet(broker.port)
    try:
        fleet.telemetry(2000)
        fleet.wait_published()
        wait_until(lambda: count(county_url, "telemetry") == 2000, timeout=60, what="2000 rows")
        shares = [stored_telemetry(str(h.ready_url).replace("/readyz", "/metrics")) for h in hubs]
    finally:
        fleet.close()
        for hub in hubs:
            hub.stop()
    assert all(share > 0 for share in shares), shares  # both took part
    assert sum(shares) == 2000  # and no message was stored by both
    assert count(county_url, "message_ledger") == 2000
