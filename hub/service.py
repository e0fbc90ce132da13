"""``shouhu hub``: the network thread feeds two bounded lanes; writer threads store and ack.

- The alarm lane (SOS, fall, the hub's own probes): one message per transaction, on
  its own thread and database connection, so an SOS never waits behind a batch.
- The bulk lane (telemetry, camera health, status): batches bounded by size and
  age, one transaction each, acknowledged after the commit.

Ready (``/readyz`` on SHOUHU_METRICS_PORT) only after the start-up probe — a message
the hub publishes to itself — has come back through the broker, the alarm lane and
its writer: proof the whole path works, not just the socket. At start the hub also
probes whether the broker shares subscriptions (Mosquitto does; amqtt does not) and
subscribes to telemetry and health through ``$share/shouhu/…`` only if it does.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from hub import metrics
from hub.batch import SightingSink
from hub.ingest import IngestConfig, Writer
from hub.liveness import LivenessDefaults, record_sightings
from hub.mqtt import HubConnection, Received, probe_topic, share_probe_topic
from hub.upkeep import Upkeep
from shouhu.health_server import start_health_server
from shouhu.settings import Settings

log = logging.getLogger(__name__)

ALARM_INBOX_SIZE = 10_000
BULK_INBOX_SIZE = 5_000
BATCH_MAX = 500
BATCH_AGE_S = 0.1
PROBE_INTERVAL_S = 2.0
SHARE_PROBE_WAIT_S = 2.0


@dataclass
class Hub:
    database_url: str
    mqtt_url: str
    hub_id: str
    ack_timeout_s: int
    metrics_port: int | None = None
    cancel_window_s: int = 30
    record_sightings: SightingSink | None = None
    # Called about once a second while the hub is connected: see hub/upkeep.py.
    on_tick: Callable[[], None] | None = None
    alarm_inbox: queue.Queue[Received] = field(default_factory=lambda: queue.Queue(ALARM_INBOX_SIZE))
    bulk_inbox: queue.Queue[Received] = field(default_factory=lambda: queue.Queue(BULK_INBOX_SIZE))
    ready: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    shared: bool = False

    def __post_init__(self) -> None:
        config = IngestConfig(self.hub_id, self.ack_timeout_s, self.cancel_window_s)
        self.alarm_writer = Writer(self.database_url, config, lane="alarm", record_sightings=self.record_sightings)
        self.bulk_writer = Writer(self.database_url, config, lane="bulk", record_sightings=self.record_sightings)
        self.connection = HubConnection(self.mqtt_url, self.hub_id, self.alarm_inbox, self.bulk_inbox)
        self._probe_token = uuid.uuid4().hex
        self._share_token = uuid.uuid4().hex
        self._share_seen = threading.Event()
        # The lanes run until the drain after stop() is done, not until stop() itself.
        self._lanes_done = threading.Event()

    def run(self) -> None:
        """Serve until ``stop()``; blocks."""
        server = start_health_server(self.metrics_port, self.ready.is_set) if self.metrics_port is not None else None
        self.connection.start()
        log.info("hub %s connected with MQTT %s", self.hub_id, "5" if self.connection.protocol == 5 else "3.1.1")
        threads = [
            threading.Thread(target=self._alarm_lane, name="alarm-lane", daemon=True),
            threading.Thread(target=self._bulk_lane, name="bulk-lane", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            self.shared = self._broker_shares()
            self.connection.subscribe_bulk(self.shared)
            log.info("telemetry and health: %s subscription", "shared" if self.shared else "direct")
            self.connection.publish_probe(self._probe_token)
            while not self.stopping.wait(1.0):
                if not self.ready.is_set():
                    self.connection.publish_probe(self._probe_token)
                metrics.QUEUE_DEPTH.labels("alarm").set(self.alarm_inbox.qsize())
                metrics.QUEUE_DEPTH.labels("bulk").set(self.bulk_inbox.qsize())
                if self.on_tick is not None and self.connection.connected.is_set():
                    self._tick()
        finally:
            self.stopping.set()
            self._drain()
            self._lanes_done.set()
            for thread in threads:
                thread.join(10)
            self.connection.stop()
            self.alarm_writer.close()
            self.bulk_writer.close()
            if server is not None:
                server.shutdown()

    def _drain(self, timeout: float = 5.0) -> None:
        """A graceful stop: take no new telemetry shares, finish storing what is queued.

        Whatever is not stored in time is simply not acknowledged: the broker keeps
        it in this hub's session for its return.
        """
        if self.connection.connected.is_set():
            self.connection.unsubscribe_bulk()
        deadline = time.monotonic() + timeout
        while (self.bulk_inbox.qsize() or self.alarm_inbox.qsize()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _tick(self) -> None:
        assert self.on_tick is not None
        try:
            self.on_tick()
        except Exception:  # the heartbeat must not take the hub down; it retries next second
            log.exception("hub tick failed")

    def _broker_shares(self) -> bool:
        """Whether the broker shares subscriptions: MQTT 5 says so in its CONNACK; on 3.1.1
        a ``$share/…`` probe published to ourselves must come back.

        The CONNACK answer matters when the session holds a backlog: a probe would
        queue behind it and time out.
        """
        if self.connection.shares_available is not None:
            return self.connection.shares_available
        deadline = time.monotonic() + SHARE_PROBE_WAIT_S
        while time.monotonic() < deadline and not self.stopping.is_set():
            self.connection.publish_probe(self._share_token, shared=True)
            if self._share_seen.wait(0.5):
                return True
        return False

    def _alarm_lane(self) -> None:
        while not self._lanes_done.is_set():
            try:
                message = self.alarm_inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._handle_alarm(message)

    def _handle_alarm(self, message: Received) -> None:
        if message.topic == probe_topic(self.hub_id):
            if message.payload.decode(errors="replace") == self._probe_token and not self.ready.is_set():
                self.ready.set()
                log.info("hub %s ready: the start-up probe came back", self.hub_id)
        elif message.topic == share_probe_topic(self.hub_id):
            if message.payload.decode(errors="replace") == self._share_token:
                self._share_seen.set()
        else:
            self.alarm_writer.store(message)
        # PUBACK strictly after the commit above returned.
        self.connection.ack(message)

    def _bulk_lane(self) -> None:
        while not self._lanes_done.is_set():
            batch = self._collect()
            if batch:
                self.bulk_writer.store_batch(batch)
                for message in batch:
                    self.connection.ack(message)

    def _collect(self) -> Sequence[Received]:
        """Up to BATCH_MAX messages, waiting at most BATCH_AGE_S after the first."""
        try:
            first = self.bulk_inbox.get(timeout=0.2)
        except queue.Empty:
            return ()
        batch = [first]
        deadline = time.monotonic() + BATCH_AGE_S
        while len(batch) < BATCH_MAX:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self.bulk_inbox.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def stop(self) -> None:
        self.stopping.set()


def build_hub(
    settings: Settings, database_url: str, mqtt_url: str, *, metrics_port: int | None, hub_id: str | None = None
) -> tuple[Hub, Upkeep]:
    """A hub wired to liveness (sightings in every transaction) and its upkeep ticks."""
    defaults = LivenessDefaults.from_settings(settings)
    hub_name = hub_id or settings.hub_id
    upkeep = Upkeep(database_url, hub_name, retention_days=settings.retention_days, clock=lambda: datetime.now(UTC))
    hub = Hub(
        database_url,
        mqtt_url,
        hub_name,
        settings.ack_timeout_s,
        metrics_port=metrics_port,
        cancel_window_s=settings.cancel_window_s,
        record_sightings=lambda conn, sightings: record_sightings(conn, sightings, defaults),
        on_tick=upkeep.tick,
    )
    return hub, upkeep
