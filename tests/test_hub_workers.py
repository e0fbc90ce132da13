"""`shouhu hub --workers N` (issue 19): bulk worker processes on the hub's shared
subscription, one process tree that lives and dies as one. Real `shouhu hub`
processes, a real Mosquitto and PostgreSQL; the stops are real signals sent to the
hub and to its worker."""

from __future__ import annotations

import signal
import uuid

import psutil
import pytest

from shouhu.embedded.broker import ensure_local_broker
from shouhu.embedded.postgres import free_port
from simulators.wristband import publish_raw
from tests.support.broker import Fleet, telemetry
from tests.support.hub import count, query, scrape, wait_until
from tests.support.services import Mosquitto, ShouhuProcess, shouhu_env

EXIT_HUB_FAILED = 70


def hub_tree(url: str, mqtt_url: str, hub_id: str, workers: int = 2, **settings: str) -> ShouhuProcess:
    port = free_port()
    env = shouhu_env(
        SHOUHU_DATABASE_URL=url,
        SHOUHU_MQTT_URL=mqtt_url,
        SHOUHU_HUB_ID=hub_id,
        SHOUHU_METRICS_PORT=str(port),
        **settings,
    )
    return ShouhuProcess(["hub", "--workers", str(workers)], env, ready_url=f"http://127.0.0.1:{port}/readyz")


def workers_of(hub: ShouhuProcess) -> list[psutil.Process]:
    """The hub's bulk worker processes: its children, forked (a multiprocessing resource
    tracker, were there one, left out)."""
    assert hub.process is not None
    children = psutil.Process(hub.process.pid).children()
    return [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]


def metric(hub: ShouhuProcess, pattern: str) -> float:
    assert hub.ready_url is not None
    return scrape(hub.ready_url.replace("/readyz", "/metrics"), pattern)


def stored_once(url: str) -> tuple[int, int]:
    rows = query(url, "SELECT count(*), count(DISTINCT msg_id) FROM telemetry")
    return int(rows[0][0]), int(rows[0][1])


def restart_and_count(url: str, broker: Mosquitto, hub_id: str, published: int) -> None:
    """The tree started again: every message published is stored, each exactly once."""
    again = hub_tree(url, broker.url, hub_id).start(timeout=60)
    try:
        wait_until(lambda: count(url, "telemetry") >= published, timeout=90, what=f"{published:,} rows after a restart")
    finally:
        again.stop()
    assert stored_once(url) == (published, published)


def mid_drain(url: str, broker: Mosquitto) -> tuple[str, ShouhuProcess, Fleet, psutil.Process]:
    """A tree with a worker, draining 6,000 messages, 500 of them stored: (hub id, hub,
    publisher, worker). The caller closes the publisher and stops the hub."""
    hub_id = f"hub-{uuid.uuid4().hex[:6]}"
    hub = hub_tree(url, broker.url, hub_id).start(timeout=60)
    fleet = publish(broker, 6000)
    try:
        wait_until(lambda: count(url, "telemetry") >= 500, timeout=60, what="the drain under way")
        (worker,) = workers_of(hub)
    except BaseException:
        fleet.close()
        hub.kill(9)
        raise
    return hub_id, hub, fleet, worker


def publish(broker: Mosquitto, messages: int, offset: int = 0) -> Fleet:
    fleet = Fleet(broker.port)
    fleet.telemetry(messages, offset)
    return fleet


def test_a_worker_takes_a_share_and_the_hubs_metrics_count_both(county_url: str, broker: Mosquitto) -> None:
    hub = hub_tree(county_url, broker.url, f"hub-{uuid.uuid4().hex[:6]}").start(timeout=60)
    try:
        (worker,) = workers_of(hub)
        fleet = publish(broker, 4000)
        fleet.wait_published()
        fleet.close()
        wait_until(lambda: count(county_url, "telemetry") == 4000, timeout=60, what="4,000 rows")
        stored = 'shouhu_hub_messages_stored_total\\{channel="telemetry"\\}'
        wait_until(lambda: metric(hub, stored) == 4000, timeout=10, what="the merged counter at 4,000")
        by_worker = metric(hub, 'shouhu_hub_worker_messages_stored_total\\{worker="2"\\}')
        assert 0 < by_worker < 4000, "the broker dealt the worker a share, and the hub kept one"
        assert metric(hub, "shouhu_hub_workers_ready") == 1
        hub.stop()
        assert hub.process is not None
        assert hub.process.returncode == 0
        assert not worker.is_running(), "a stopping hub takes its worker with it"
    finally:
        hub.kill(9)
    assert stored_once(county_url) == (4000, 4000)


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_a_worker_that_ends_ends_the_tree_and_a_restart_loses_nothing(
    county_url: str, broker: Mosquitto, signal_number: int
) -> None:
    """Killed or stopped alone, a worker takes the hub down (exit 70) for the supervisor
    to restart; what the worker had not acknowledged waits in its session."""
    hub_id, hub, fleet, worker = mid_drain(county_url, broker)
    try:
        worker.send_signal(signal_number)
        assert hub.process is not None
        assert hub.process.wait(30) == EXIT_HUB_FAILED
        assert "bulk worker 2 ended" in hub.output()
        fleet.telemetry(1000, 6000)  # published while the tree is down
        fleet.wait_published()
    finally:
        fleet.close()
        hub.kill(9)
    restart_and_count(county_url, broker, hub_id, 7000)


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_a_hub_killed_or_stopped_leaves_no_worker_behind_and_loses_nothing(
    county_url: str, broker: Mosquitto, signal_number: int
) -> None:
    hub_id, hub, fleet, worker = mid_drain(county_url, broker)
    try:
        assert hub.process is not None
        hub.process.send_signal(signal_number)
        # An orphan notices its parent is gone within a second and stops by itself.
        worker.wait(20)
        assert hub.process.wait(20) == (0 if signal_number == signal.SIGTERM else -signal.SIGKILL)
        fleet.telemetry(1000, 6000)
        fleet.wait_published()
    finally:
        fleet.close()
        hub.kill(9)
    restart_and_count(county_url, broker, hub_id, 7000)


def test_on_a_broker_without_shared_subscriptions_the_workers_go_and_the_hub_runs_alone(county_url: str) -> None:
    """The embedded broker (amqtt) has no shared subscriptions: the workers, already
    forked, are stopped with their sessions given up, and the hub takes everything."""
    port = free_port()
    broker = ensure_local_broker(port)
    assert broker is not None
    url = f"mqtt://127.0.0.1:{port}"
    hub = hub_tree(county_url, url, f"hub-{uuid.uuid4().hex[:6]}").start(timeout=90)
    try:
        wait_until(lambda: workers_of(hub) == [], timeout=30, what="the workers gone")
        assert "needs a broker that shares subscriptions" in hub.output()
        assert "bulk worker 2 left" in hub.output()
        for n in range(20):  # one at a time: amqtt loses bursts (docs/BENCHMARKS.md)
            publish_raw(url, f"shouhu/v1/wristband/wb-{n + 1:04d}/telemetry", telemetry())
        wait_until(lambda: count(county_url, "telemetry") == 20, timeout=30, what="20 rows from the lone hub")
    finally:
        hub.stop()
        broker.terminate()
        broker.wait(10)
    assert hub.process is not None
    assert hub.process.returncode == 0


def test_without_a_shared_subscription_the_hub_runs_alone_and_says_so(county_url: str, broker: Mosquitto) -> None:
    hub = hub_tree(county_url, broker.url, f"hub-{uuid.uuid4().hex[:6]}", SHOUHU_HUB_SHARED="false").start(timeout=60)
    try:
        assert workers_of(hub) == []
        assert "needs a broker that shares subscriptions" in hub.output()
        fleet = publish(broker, 300)
        fleet.wait_published()
        fleet.close()
        wait_until(lambda: count(county_url, "telemetry") == 300, timeout=30, what="300 rows from the lone hub")
    finally:
        hub.stop()
    assert stored_once(county_url) == (300, 300)


def test_a_tree_that_leaves_parks_nothing_in_its_workers_sessions(county_url: str, broker: Mosquitto) -> None:
    """Scale-down of a tree: with `--leave` the worker gives its share and session up
    too, so everything published afterwards reaches the hub that stays."""
    staying = hub_tree(county_url, broker.url, f"hub-a-{uuid.uuid4().hex[:4]}", workers=1).start(timeout=60)
    leaving = hub_tree(county_url, broker.url, f"hub-b-{uuid.uuid4().hex[:4]}")
    leaving.args = [*leaving.args, "--leave"]
    leaving.start(timeout=60)
    (worker,) = workers_of(leaving)
    leaving.stop()
    assert leaving.process is not None
    assert leaving.process.returncode == 0, leaving.output()
    assert not worker.is_running()
    assert "bulk worker 2 left: its session and share are given up" in leaving.output()
    fleet = publish(broker, 2000)
    try:
        fleet.wait_published()
        wait_until(lambda: count(county_url, "telemetry") == 2000, timeout=60, what="all of it by the hub that stayed")
    finally:
        fleet.close()
        staying.stop()
