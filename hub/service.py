"""``shouhu hub``: two MQTT connections feed three bounded inboxes; two lanes store and ack.

- The alarm lane takes what the alarm connection delivers: SOS and falls one per
  transaction, the hub's own probes, and device status in small batches, always
  alarms first. An SOS never waits behind telemetry: not in the broker (its own
  session), not in the hub (its own inbox, thread and database connection).
- The bulk lane takes what the bulk connection delivers: telemetry, camera health
  and every unknown topic, in batches bounded by size and age, one transaction each.
- Every message is acknowledged only after the transaction that stores it (or its
  dead letter) has committed. After an alarm's commit the hub publishes a receipt to
  ``shouhu/v1/wristband/{id}/receipt``: a device re-sends the same alarm until it has one.

Whatever one message does costs that message alone (hub/ingest.py). A lane that can
no longer run ends ``run`` with ``LaneFailed`` — the process exits non-zero and its
supervisor restarts it — instead of lingering half-alive. Ready (``/readyz`` on
SHOUHU_METRICS_PORT) only while the start-up probe — a message the hub publishes to
itself — has come back through the broker, the alarm lane and its writer, both lanes
run, and the database answers.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg

from devices.contract import is_outbound
from hub import metrics
from hub.batch import SightingSink
from hub.ingest import AlarmReceipt, IngestConfig, Writer
from hub.liveness import LivenessDefaults, record_sightings
from hub.mqtt import (
    ALARM_SUBSCRIPTIONS,
    LEGACY_BULK_SUBSCRIPTIONS,
    HubConnection,
    Received,
    alarm_client_id,
    bulk_subscriptions,
    on_alarm_connection,
    probe_topic,
    receipt_topic,
    share_probe_topic,
)
from hub.upkeep import Upkeep
from shouhu.health_server import start_health_server
from shouhu.settings import Settings

log = logging.getLogger(__name__)

ALARM_INBOX_SIZE = 10_000
STATUS_INBOX_SIZE = 50_000
BULK_INBOX_SIZE = 5_000
BATCH_MAX = 500
STATUS_BATCH_MAX = 200
BATCH_AGE_S = 0.1
SHARE_PROBE_WAIT_S = 2.0
DATABASE_CHECK_S = 1.0
SHARE_PROBE_GROUP = "shouhu-probe"


class LaneFailed(RuntimeError):
    """A lane or a connection of the hub stopped working: the process must end."""


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
    status_inbox: queue.Queue[Received] = field(default_factory=lambda: queue.Queue(STATUS_INBOX_SIZE))
    bulk_inbox: queue.Queue[Received] = field(default_factory=lambda: queue.Queue(BULK_INBOX_SIZE))
    ready: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    shared: bool = False
    # Give the sessions up for good at stop (``shouhu hub --leave``): scaling down.
    leave: bool = False

    def __post_init__(self) -> None:
        config = IngestConfig(self.hub_id, self.ack_timeout_s, self.cancel_window_s)
        self.alarm_writer = Writer(self.database_url, config, lane="alarm", record_sightings=self.record_sightings)
        self.bulk_writer = Writer(self.database_url, config, lane="bulk", record_sightings=self.record_sightings)
        self.alarm_connection = HubConnection(
            self.mqtt_url,
            alarm_client_id(self.hub_id),
            self._deliver_alarm,
            (*ALARM_SUBSCRIPTIONS, probe_topic(self.hub_id)),
            receive_maximum=ALARM_INBOX_SIZE,
        )
        self.connection = HubConnection(
            self.mqtt_url,
            self.hub_id,
            self._deliver_bulk,
            (f"$share/{SHARE_PROBE_GROUP}/{share_probe_topic(self.hub_id)}",),
            receive_maximum=BULK_INBOX_SIZE,
        )
        self._probe_token = uuid.uuid4().hex
        self._share_token = uuid.uuid4().hex
        self._share_seen = threading.Event()
        # The lanes run until the drain after stop() is done, not until stop() itself.
        self._lanes_done = threading.Event()
        self._lanes: list[threading.Thread] = []
        self._failure: str | None = None
        self._database_ok = False
        self._database_checked = float("-inf")
        self._database_lock = threading.Lock()

    # -- the network threads hand messages over ----------------------------------

    def _deliver_alarm(self, message: Received) -> None:
        # A full inbox blocks the network thread: the back-pressure we want.
        if message.topic.endswith("/status"):
            self.status_inbox.put(message)
        else:
            self.alarm_inbox.put(message)

    def _deliver_bulk(self, message: Received) -> None:
        if on_alarm_connection(message.topic) or is_outbound(message.topic):
            # `shouhu/v1/#` matches these too. Alarms and status are the alarm
            # connection's (its own session holds its own copy); receipts are ours,
            # going out to devices. Neither is data for this lane.
            self.connection.ack(message)
            return
        self.bulk_inbox.put(message)

    # -- running -------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop()``; blocks. Raises ``LaneFailed`` if a lane or a
        connection stopped working (the caller exits non-zero)."""
        server = start_health_server(self.metrics_port, self.is_ready) if self.metrics_port is not None else None
        try:
            self.alarm_connection.start()
            self._start_lanes()
            self.connection.start()
            log.info(
                "hub %s connected with MQTT %s (alarms) and %s (bulk)",
                self.hub_id,
                _version(self.alarm_connection),
                _version(self.connection),
            )
            self.connection.unsubscribe(LEGACY_BULK_SUBSCRIPTIONS)
            self.shared = self._broker_shares()
            if not self.shared:
                # Going direct: drop a shared subscription an earlier run left in the
                # session, or the hub would get its share of telemetry twice.
                self.connection.unsubscribe(bulk_subscriptions(True))
            self.connection.subscribe_extra(bulk_subscriptions(self.shared))
            log.info("everything else under shouhu/v1/: %s subscription", "shared" if self.shared else "direct")
            # Ready only once both connections are subscribed: the probe goes out now.
            self.alarm_connection.publish(probe_topic(self.hub_id), self._probe_token.encode())
            while not self.stopping.wait(1.0):
                self._check_running()
                if not self.ready.is_set():
                    self.alarm_connection.publish(probe_topic(self.hub_id), self._probe_token.encode())
                metrics.QUEUE_DEPTH.labels("alarm").set(self.alarm_inbox.qsize())
                metrics.QUEUE_DEPTH.labels("status").set(self.status_inbox.qsize())
                metrics.QUEUE_DEPTH.labels("bulk").set(self.bulk_inbox.qsize())
                if self.on_tick is not None and self.connection.connected.is_set():
                    self._tick()
        finally:
            self.stopping.set()
            self._drain()
            self._lanes_done.set()
            for thread in self._lanes:
                thread.join(10)
            if self.leave and self._failure is None:
                self._leave()
            self.connection.stop()
            self.alarm_connection.stop()
            if self.leave and self._failure is None:
                self.connection.end_session()
                self.alarm_connection.end_session()
                log.info("hub %s left: its sessions and shares are given up", self.hub_id)
            self.alarm_writer.close()
            self.bulk_writer.close()
            if server is not None:
                server.shutdown()
        if self._failure is not None:
            raise LaneFailed(self._failure)

    def _start_lanes(self) -> None:
        self._lanes = [
            threading.Thread(target=self._lane, args=("alarm", self._alarm_lane), name="alarm-lane", daemon=True),
            threading.Thread(target=self._lane, args=("bulk", self._bulk_lane), name="bulk-lane", daemon=True),
        ]
        for thread in self._lanes:
            thread.start()

    def _lane(self, name: str, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:
            # Each message's trouble is caught where it is handled; reaching here means
            # the lane itself is broken. End the process rather than limp on.
            log.critical("the %s lane stopped: %r; the hub ends", name, exc, exc_info=True)
            self._fail(f"the {name} lane stopped: {exc!r}")

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        self.ready.clear()
        self.stopping.set()

    def _check_running(self) -> None:
        for connection in (self.alarm_connection, self.connection):
            if connection.failed.is_set():
                self._fail(f"the connection {connection.client_id} could not hand a message over")
        for thread in self._lanes:
            if not thread.is_alive():
                self._fail(f"the {thread.name} is not running")

    def is_ready(self) -> bool:
        """``/readyz``: the probe came back, both lanes run, the alarm connection is up
        and the database answers."""
        return (
            self.ready.is_set()
            and self._failure is None
            and all(thread.is_alive() for thread in self._lanes)
            and self.alarm_connection.connected.is_set()
            and self._database_answers()
        )

    def _database_answers(self) -> bool:
        with self._database_lock:
            if time.monotonic() - self._database_checked >= DATABASE_CHECK_S:
                self._database_checked = time.monotonic()
                try:
                    with psycopg.connect(self.database_url, connect_timeout=2) as conn:
                        conn.execute("SELECT 1")
                    self._database_ok = True
                except psycopg.Error:
                    self._database_ok = False
            return self._database_ok

    def _drain(self, timeout: float = 5.0) -> None:
        """A graceful stop: finish storing what is queued, for up to ``timeout``.

        The sessions and subscriptions stay: whatever is not stored in time is simply
        not acknowledged, and the broker keeps it — and all that arrives meanwhile —
        in this hub's sessions for its return.
        """
        deadline = time.monotonic() + timeout
        while self._queued() and time.monotonic() < deadline and self._failure is None:
            time.sleep(0.05)

    def _queued(self) -> int:
        return self.bulk_inbox.qsize() + self.alarm_inbox.qsize() + self.status_inbox.qsize()

    def _leave(self) -> None:
        """Scale-down: stop taking shares, store what already came, then stop."""
        self.connection.leave_extra()
        self._lanes_done.clear()
        self._start_lanes()
        deadline = time.monotonic() + 30
        while self._queued() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._lanes_done.set()
        for thread in self._lanes:
            thread.join(10)

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
            self.connection.publish(share_probe_topic(self.hub_id), self._share_token.encode())
            if self._share_seen.wait(0.5):
                return True
        return False

    # -- the alarm lane --------------------------------------------------------------

    def _alarm_lane(self) -> None:
        while not self._lanes_done.is_set():
            try:
                message = self.alarm_inbox.get(timeout=0.05)
            except queue.Empty:
                statuses = _take(self.status_inbox, STATUS_BATCH_MAX)
                if statuses:
                    self.alarm_writer.store_batch(statuses)
                    for status in statuses:
                        self.alarm_connection.ack(status)
                continue
            self._handle_alarm(message)

    def _handle_alarm(self, message: Received) -> None:
        if message.topic == probe_topic(self.hub_id):
            if message.payload.decode(errors="replace") == self._probe_token and not self.ready.is_set():
                self.ready.set()
                log.info("hub %s ready: the start-up probe came back", self.hub_id)
        else:
            receipt = self.alarm_writer.store(message)
            if receipt is not None:
                self._send_receipt(receipt)
        # PUBACK strictly after the commit above returned.
        self.alarm_connection.ack(message)

    def _send_receipt(self, receipt: AlarmReceipt) -> None:
        body = {"msg_id": receipt.msg_id, "incident": receipt.incident_code, "state": receipt.state}
        self.alarm_connection.publish(receipt_topic(receipt.device_id), json.dumps(body).encode())
        metrics.RECEIPTS.inc()

    # -- the bulk lane ---------------------------------------------------------------

    def _bulk_lane(self) -> None:
        while not self._lanes_done.is_set():
            batch = self._collect()
            if not batch:
                continue
            probes = [m for m in batch if m.topic == share_probe_topic(self.hub_id)]
            if probes:
                if any(m.payload.decode(errors="replace") == self._share_token for m in probes):
                    self._share_seen.set()
                batch = [m for m in batch if m.topic != share_probe_topic(self.hub_id)]
            if batch:
                self.bulk_writer.store_batch(batch)
            for message in (*batch, *probes):
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


def _take(inbox: queue.Queue[Received], limit: int) -> list[Received]:
    taken: list[Received] = []
    while len(taken) < limit:
        try:
            taken.append(inbox.get_nowait())
        except queue.Empty:
            break
    return taken


def _version(connection: HubConnection) -> str:
    return "5" if connection.protocol == 5 else "3.1.1"


def build_hub(
    settings: Settings,
    database_url: str,
    mqtt_url: str,
    *,
    metrics_port: int | None,
    hub_id: str | None = None,
    leave: bool = False,
) -> tuple[Hub, Upkeep]:
    """A hub wired to liveness (sightings in every transaction) and its upkeep ticks."""
    defaults = LivenessDefaults.from_settings(settings)
    hub_name = hub_id or settings.hub_id
    upkeep = Upkeep(
        database_url,
        hub_name,
        retention_days=settings.retention_days,
        dead_letter_days=settings.dead_letter_days,
        clock=lambda: datetime.now(UTC),
    )
    hub = Hub(
        database_url,
        mqtt_url,
        hub_name,
        settings.ack_timeout_s,
        metrics_port=metrics_port,
        cancel_window_s=settings.cancel_window_s,
        record_sightings=lambda conn, sightings: record_sightings(conn, sightings, defaults),
        on_tick=upkeep.tick,
        leave=leave,
    )
    return hub, upkeep
