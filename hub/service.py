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

import functools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer

import psycopg

from devices.contract import is_outbound
from hub import metrics
from hub.batch import SightingSink
from hub.ingest import CONNECT_TIMEOUT_S, STORE_ALONE, AlarmReceipt, DatabaseUnavailable, IngestConfig, Writer
from hub.liveness import LivenessDefaults, LivenessRecorder
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
from hub.retention import Periods
from hub.spool import Reconciled, Spool, SpoolEntry
from hub.upkeep import Upkeep
from hub.workers import WorkerPool, WorkerSpec, alarms_idle_event, bulk_client_id, collect_batch, yield_to_alarms
from shouhu.health_server import start_health_server
from shouhu.settings import DEFAULT_CANCEL_WINDOW_S, Settings

log = logging.getLogger(__name__)

ALARM_INBOX_SIZE = 10_000
STATUS_INBOX_SIZE = 50_000
BULK_INBOX_SIZE = 5_000
BATCH_MAX = 500
# Bulk lanes, each with its own database connection, taking batches from the one bulk
# inbox (PUBACKs may then go out of order, as MQTT allows): while one waits for
# PostgreSQL the other parses. Two drain a backlog half again as fast as one, and
# alarms stay first because a batch waits for the alarm lane to be idle (below);
# without that wait, two lanes put an SOS at 5,500 msg/s behind a second of telemetry
# (docs/BENCHMARKS.md, issue 19).
BULK_LANES = 2
# A bulk batch waits at most this long for the alarm lane (a lane stuck in an outage
# must not stop telemetry for good).
ALARM_YIELD_MAX_S = 1.0
# How long a thread may hold the interpreter before another that waits gets it (Python's
# default is 5 ms). The alarm lane waits for it after each of its statements; with the
# network threads and the bulk lane busy, 5 ms a statement is most of an SOS's budget.
# Set for the whole process by the command that runs the hub (launch/wiring.py).
GIL_SWITCH_S = 0.0005
STATUS_BATCH_MAX = 200
# Alarms already waiting when the lane takes one are committed with it, up to this many:
# a mass event costs tens of commits, not a thousand; a lone SOS waits for nothing.
ALARM_GROUP_MAX = 50
BATCH_AGE_S = 0.1
SHARE_PROBE_WAIT_S = 2.0
DATABASE_CHECK_S = 1.0
# An alarm the database has not taken within this goes to the spool and is paged from
# there: the first page must go out within 10 s of the press (DESIGN.md).
SPOOL_AFTER_S = 2.5
# While the database is down: how often the alarm lane tries to reconcile, and how
# often a hub refreshes its roster snapshot while the database is up.
RECOVER_EVERY_S = 1.0
SNAPSHOT_EVERY_S = 60.0
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
    cancel_window_s: int = DEFAULT_CANCEL_WINDOW_S
    record_sightings: SightingSink | None = None
    # Ticked about once a second while the hub is connected (hub/upkeep.py); the hub
    # owns it and closes it when run() ends.
    upkeep: Upkeep | None = None
    alarm_inbox: queue.Queue[Received] = field(default_factory=lambda: queue.Queue(ALARM_INBOX_SIZE))
    status_inbox: queue.Queue[Received] = field(default_factory=lambda: queue.Queue(STATUS_INBOX_SIZE))
    bulk_inbox: queue.Queue[Received] = field(default_factory=lambda: queue.Queue(BULK_INBOX_SIZE))
    ready: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    shared: bool = False
    # Give the sessions up for good at stop (``shouhu hub --leave``): scaling down.
    leave: bool = False
    # Pages an SOS while the database is down (hub/spool.py); None: wait for the database.
    spool: Spool | None = None
    # Share telemetry among hubs when the broker can (SHOUHU_HUB_SHARED); False: direct.
    share_subscriptions: bool = True
    # Processes taking telemetry, this one included (``shouhu hub --workers N``): N − 1
    # bulk worker processes join the shared subscription (hub/workers.py).
    workers: int = 1
    # The liveness window the workers' own recorders use (None: they record none).
    worker_liveness: LivenessDefaults | None = None

    def __post_init__(self) -> None:
        config = IngestConfig(self.hub_id, self.ack_timeout_s, self.cancel_window_s)
        self.alarm_writer = Writer(self.database_url, config, lane="alarm", record_sightings=self.record_sightings)
        self.bulk_writers = [
            Writer(self.database_url, config, lane="bulk", record_sightings=self.record_sightings)
            for _ in range(BULK_LANES)
        ]
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
        # Clear while an alarm waits or is being stored: the bulk lanes (the workers' too)
        # hold their next batch.
        self._alarms_idle = alarms_idle_event(self.workers)
        self._alarms_idle.set()
        self._pool = (
            WorkerPool(self._worker_specs(), self._alarms_idle, inherited=[self.spool] if self.spool else [])
            if self.workers > 1
            else None
        )
        self._pool_started = False
        self._lanes: list[threading.Thread] = []
        self._failure: str | None = None
        self._database_ok = False
        self._database_checked = float("-inf")
        self._database_lock = threading.Lock()
        # The alarm lane's messages waiting for the database, unacknowledged: alarms the
        # spool holds (by spool entry), and the rest (status, dead letters) in order.
        self._held: dict[str, list[Received]] = {}
        self._deferred: list[Received] = []
        self._database_down = False
        self._last_recovery = float("-inf")
        self._last_snapshot = float("-inf")

    # -- the network threads hand messages over ----------------------------------

    def _deliver_alarm(self, message: Received) -> None:
        # A full inbox blocks the network thread: the back-pressure we want.
        if message.topic.endswith("/status"):
            self.status_inbox.put(message)
        else:
            # Cleared before the put: cleared after, it could follow the lane's "done"
            # for this very alarm and hold every bulk batch back until the next one.
            self._alarms_idle.clear()
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
        # Before any thread of the hub starts: the workers are forked (hub/workers.py).
        self._spawn_workers()
        server = self._serve_health()
        try:
            if self.spool is not None:
                # Entries a crash left unpaged are paged now; pending ones are
                # reconciled by the alarm lane before it stores anything new.
                self.spool.page_unpaged()
                self._database_down = bool(self.spool.pending())
            self.alarm_connection.start()
            self._start_lanes()
            # The same broker: a broker that refused MQTT 5 to the first connection
            # would refuse it again (amqtt stays silent, costing the 5 s wait twice).
            self.connection.start(protocols=(self.alarm_connection.protocol,))
            log.info(
                "hub %s connected with MQTT %s (alarms) and %s (bulk)",
                self.hub_id,
                _version(self.alarm_connection),
                _version(self.connection),
            )
            self._subscribe_bulk()
            self._settle_workers()
            # Ready only once both connections are subscribed: the probe goes out now.
            self.alarm_connection.publish(probe_topic(self.hub_id), self._probe_token.encode())
            while not self.stopping.wait(1.0):
                self._check_running()
                if not self.ready.is_set():
                    self.alarm_connection.publish(probe_topic(self.hub_id), self._probe_token.encode())
                metrics.QUEUE_DEPTH.labels("alarm").set(self.alarm_inbox.qsize())
                metrics.QUEUE_DEPTH.labels("status").set(self.status_inbox.qsize())
                metrics.QUEUE_DEPTH.labels("bulk").set(self.bulk_inbox.qsize())
                if self.upkeep is not None and self.connection.connected.is_set():
                    self._tick(self.upkeep)
                self._refresh_snapshot()
        finally:
            self.stopping.set()
            if self._pool is not None and self._pool_started:
                self._pool.request_stop(leave=self.leave and self._failure is None)
            self._drain()
            self._lanes_done.set()
            for thread in self._lanes:
                thread.join(10)
            if self._pool is not None and self._pool_started:
                self._pool.join()
            if self.leave and self._failure is None:
                self._leave()
            self.connection.stop()
            self.alarm_connection.stop()
            if self.leave and self._failure is None:
                self.connection.end_session()
                self.alarm_connection.end_session()
                log.info("hub %s left: its sessions and shares are given up", self.hub_id)
            self._close()
            if server is not None:
                server.shutdown()
        if self._failure is not None:
            raise LaneFailed(self._failure)

    def _subscribe_bulk(self) -> None:
        """Everything else under ``shouhu/v1/``: shared if the broker can, else direct."""
        self.connection.unsubscribe(LEGACY_BULK_SUBSCRIPTIONS)
        self.shared = self.share_subscriptions and self._broker_shares()
        if not self.shared:
            # Going direct: drop a shared subscription an earlier run left in the
            # session, or the hub would get its share of telemetry twice.
            self.connection.unsubscribe(bulk_subscriptions(True))
        self.connection.subscribe_extra(bulk_subscriptions(self.shared))
        log.info("everything else under shouhu/v1/: %s subscription", "shared" if self.shared else "direct")

    def _serve_health(self) -> ThreadingHTTPServer | None:
        if self.metrics_port is None:
            return None
        # With workers, /metrics sums their counters into the hub's own.
        merged = self._pool.collector if self._pool is not None else None
        return start_health_server(self.metrics_port, self.is_ready, metrics=merged)

    def _worker_specs(self) -> list[WorkerSpec]:
        return [
            WorkerSpec(
                number=number,
                database_url=self.database_url,
                mqtt_url=self.mqtt_url,
                client_id=bulk_client_id(self.hub_id, number),
                config=self.alarm_writer.config,
                liveness=self.worker_liveness,
                bulk_lanes=BULK_LANES,
                batch_max=BATCH_MAX,
                batch_age_s=BATCH_AGE_S,
                inbox_size=BULK_INBOX_SIZE,
                alarm_yield_max_s=ALARM_YIELD_MAX_S,
                switch_interval_s=GIL_SWITCH_S,
            )
            for number in range(2, self.workers + 1)
        ]

    def _spawn_workers(self) -> None:
        """Now, not once the share is confirmed: a worker's session may already hold its
        share of a backlog."""
        if self._pool is not None and self.share_subscriptions:
            self._pool.start()
            self._pool_started = True

    def _settle_workers(self) -> None:
        """Without shared subscriptions the workers go, giving up their sessions (a share
        an earlier run left there would otherwise park telemetry for them)."""
        if self._pool is None or self.shared:
            return
        log.error(
            "--workers %d needs a broker that shares subscriptions (and SHOUHU_HUB_SHARED on): the hub runs as one"
            " process",
            self.workers,
        )
        if self._pool_started:
            self._pool.request_stop(leave=True)
            self._pool.join()
            self._pool_started = False

    def _close(self) -> None:
        """Close what the hub opened or was given to own: the writers, the spool, the upkeep."""
        self.alarm_writer.close()
        for writer in self.bulk_writers:
            writer.close()
        if self.spool is not None:
            self.spool.close()
        if self.upkeep is not None:
            self.upkeep.close()

    def _start_lanes(self) -> None:
        self._lanes = [
            threading.Thread(target=self._lane, args=("alarm", self._alarm_lane), name="alarm-lane", daemon=True),
            *(
                threading.Thread(
                    target=self._lane,
                    args=(f"bulk {number}", functools.partial(self._bulk_lane, writer)),
                    name=f"bulk-lane-{number}",
                    daemon=True,
                )
                for number, writer in enumerate(self.bulk_writers, start=1)
            ),
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
        if self._pool_started and self._pool is not None and (failure := self._pool.failure()) is not None:
            self._fail(failure)

    def is_ready(self) -> bool:
        """``/readyz``: the probe came back, both lanes run, both connections are up with
        every subscription answered and none refused, and the database answers."""
        return (
            self.ready.is_set()
            and self._failure is None
            and not self._refused_subscriptions()
            and all(thread.is_alive() for thread in self._lanes)
            and self.alarm_connection.subscribed()
            and self.connection.subscribed()
            and (not self._pool_started or self._pool is None or self._pool.ready())
            and self._database_answers()
        )

    def _refused_subscriptions(self) -> dict[str, str]:
        return {**self.alarm_connection.refused, **self.connection.refused}

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

    def _tick(self, upkeep: Upkeep) -> None:
        try:
            upkeep.tick()
        except psycopg.OperationalError as exc:  # an outage: one line a second, not a traceback
            log.warning("hub tick skipped: database unavailable (%s)", str(exc).splitlines()[0])
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
            if self._database_down and time.monotonic() - self._last_recovery >= RECOVER_EVERY_S:
                self._recover()
            try:
                message = self.alarm_inbox.get(timeout=0.05)
            except queue.Empty:
                statuses = _take(self.status_inbox, STATUS_BATCH_MAX)
                if statuses:
                    self._store_statuses(statuses)
                continue
            self._alarms_idle.clear()
            try:
                waiting = _take(self.alarm_inbox, ALARM_GROUP_MAX - 1)
                if waiting:
                    self._handle_alarms([message, *waiting])
                else:
                    self._handle_alarm(message)
            finally:
                if self.alarm_inbox.empty():
                    self._alarms_idle.set()

    def _handle_alarms(self, messages: list[Received]) -> None:
        """Several alarms at once (a mass event): one transaction, then receipts and acks."""
        alarms = [m for m in messages if m.topic != probe_topic(self.hub_id)]
        for probe in (m for m in messages if m.topic == probe_topic(self.hub_id)):
            self._handle_alarm(probe)
        if self._database_down or len(alarms) < 2:
            for alarm in alarms:
                self._handle_alarm(alarm)
            return
        try:
            results = self.alarm_writer.store_group(alarms, outage_limit_s=SPOOL_AFTER_S if self.spool else None)
        except DatabaseUnavailable:
            log.error("the database did not take %d alarms in %.1fs: paging from the spool", len(alarms), SPOOL_AFTER_S)
            self._database_down = True
            for alarm in alarms:
                self._spool_or_defer(alarm)
            return
        for alarm, result in zip(alarms, results, strict=True):
            if result is STORE_ALONE:
                self._handle_alarm(alarm)  # its own transaction, retries and dead letter
                continue
            if result is not None:
                self._send_receipt(result)
            # PUBACK strictly after the group's commit returned.
            self.alarm_connection.ack(alarm)

    def _handle_alarm(self, message: Received) -> None:
        if message.topic == probe_topic(self.hub_id):
            if message.payload.decode(errors="replace") == self._probe_token and not self.ready.is_set():
                refused = self._refused_subscriptions()
                if refused:
                    # The probe's SUBSCRIBE went before its PUBLISH: every SUBACK is in.
                    log.error("hub %s not ready: the broker refused %s", self.hub_id, refused)
                else:
                    self.ready.set()
                    log.info("hub %s ready: the start-up probe came back", self.hub_id)
            self.alarm_connection.ack(message)
            return
        if self._database_down:
            # Alarms go to the spool until it is reconciled: stored in press order,
            # and never a second first page (hub/spool.py).
            self._spool_or_defer(message)
            return
        try:
            receipt = self.alarm_writer.store(message, outage_limit_s=SPOOL_AFTER_S if self.spool else None)
        except DatabaseUnavailable:
            log.error("the database did not take an alarm within %.1fs: paging from the spool", SPOOL_AFTER_S)
            self._database_down = True
            self._spool_or_defer(message)
            return
        if receipt is not None:
            self._send_receipt(receipt)
        # PUBACK strictly after the commit above returned.
        self.alarm_connection.ack(message)

    def _spool_or_defer(self, message: Received) -> None:
        """While the database is down: an SOS or fall is fsynced to the spool and paged
        from it; anything else waits, unacknowledged, for the database."""
        assert self.spool is not None
        try:
            spooled = self.spool.record(message)
        except ValueError:  # not a wristband's alarm: nothing to page
            self._deferred.append(message)
            return
        if spooled.new:
            self.spool.page_in_background(spooled.entry)
        # Acknowledged only once reconciled into the database; the receipt now, because
        # the press is durable in the spool and the device may stop re-sending.
        self._held.setdefault(spooled.entry.id, []).append(message)
        self._send_receipt(
            AlarmReceipt(spooled.entry.device_id, spooled.entry.msg_id, spooled.entry.code, "spooled")
        )

    def _store_statuses(self, statuses: list[Received]) -> None:
        if self._database_down:
            self._deferred.extend(statuses)
            return
        try:
            self.alarm_writer.store_batch(statuses, outage_limit_s=SPOOL_AFTER_S if self.spool else None)
        except DatabaseUnavailable:
            self._database_down = True
            self._deferred.extend(statuses)
            return
        for status in statuses:
            self.alarm_connection.ack(status)

    def _recover(self) -> None:
        """The database answers again: reconcile the spool, then store what waited."""
        self._last_recovery = time.monotonic()
        assert self.spool is not None
        try:
            with psycopg.connect(self.database_url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=False) as conn:
                outcomes = self.spool.reconcile(
                    conn, self.alarm_writer.config, record_sightings=self.alarm_writer.record_sightings
                )
                receipts = [self._reconciled_receipt(conn, outcome) for outcome in outcomes]
                conn.rollback()
        except psycopg.OperationalError as exc:
            log.info("database still unavailable (%s); the spool holds %d alarm(s)", exc, len(self.spool.pending()))
            return
        for outcome, receipt in zip(outcomes, receipts, strict=True):
            for message in self._held.pop(outcome.entry.id, []):
                self.alarm_connection.ack(message)
            if receipt is not None:
                self._send_receipt(receipt)
        if self.spool.pending():
            return  # an entry still being paged: the next round takes it
        # Copies of reconciled alarms (a device re-sending) are redeliveries now.
        held, self._held = self._held, {}
        deferred, self._deferred = self._deferred, []
        self._database_down = False
        for message in [m for messages in held.values() for m in messages] + deferred:
            self._handle_alarm_or_status(message)
        log.warning("the database is back: the spool is reconciled, %d waiting message(s) stored", len(deferred))

    def _handle_alarm_or_status(self, message: Received) -> None:
        if message.topic.endswith("/status"):
            self._store_statuses([message])
        else:
            self._handle_alarm(message)

    def _reconciled_receipt(
        self, conn: psycopg.Connection[tuple[object, ...]], outcome: Reconciled
    ) -> AlarmReceipt | None:
        entry: SpoolEntry = outcome.entry
        if outcome.incident_id is None:
            return AlarmReceipt(entry.device_id, entry.msg_id, None, None)
        row = conn.execute("SELECT code, state FROM incidents WHERE id = %s", (outcome.incident_id,)).fetchone()
        return AlarmReceipt(entry.device_id, entry.msg_id, str(row[0]) if row else None, str(row[1]) if row else None)

    def _refresh_snapshot(self) -> None:
        """Every minute while the database answers: who to page if it stops answering."""
        if self.spool is None or self._database_down:
            return
        if time.monotonic() - self._last_snapshot < SNAPSHOT_EVERY_S:
            return
        self._last_snapshot = time.monotonic()
        try:
            with psycopg.connect(self.database_url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                self.spool.refresh(conn, datetime.now(UTC))
        except psycopg.Error:
            log.exception("the roster snapshot was not refreshed; the previous one stays in use")

    def _send_receipt(self, receipt: AlarmReceipt) -> None:
        body = {"msg_id": receipt.msg_id, "incident": receipt.incident_code, "state": receipt.state}
        self.alarm_connection.publish(receipt_topic(receipt.device_id), json.dumps(body).encode())
        metrics.RECEIPTS.inc()

    # -- the bulk lane ---------------------------------------------------------------

    def _bulk_lane(self, writer: Writer) -> None:
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
                # Alarms first: a batch waits for the alarm lane to be done, so that the
                # bulk lanes do not keep the interpreter and the database from it.
                yield_to_alarms(self._alarms_idle, ALARM_YIELD_MAX_S)
                writer.store_batch(batch)
            self.connection.ack_all((*batch, *probes))

    def _collect(self) -> Sequence[Received]:
        """Up to BATCH_MAX messages, waiting at most BATCH_AGE_S after the first."""
        return collect_batch(self.bulk_inbox, BATCH_MAX, BATCH_AGE_S)

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
    spool: bool = True,
    workers: int = 1,
) -> tuple[Hub, Upkeep]:
    """A hub wired to liveness (sightings in every transaction), its upkeep ticks and,
    unless ``spool`` is False, its alarm spool in SHOUHU_SPOOL_DIR.

    The hub owns the upkeep (``hub.upkeep``): it ticks it and closes it when ``run()``
    ends. It is returned beside the hub for callers that watch it; they must not close it.
    """
    defaults = LivenessDefaults.from_settings(settings)
    hub_name = hub_id or settings.hub_id
    upkeep = Upkeep(
        database_url,
        hub_name,
        retention_days=settings.retention_days,
        periods=Periods.from_settings(settings),
        clock=lambda: datetime.now(UTC),
    )
    hub = Hub(
        database_url,
        mqtt_url,
        hub_name,
        settings.ack_timeout_s,
        metrics_port=metrics_port,
        cancel_window_s=settings.cancel_window_s,
        record_sightings=LivenessRecorder(defaults),
        upkeep=upkeep,
        leave=leave,
        share_subscriptions=settings.hub_shared,
        workers=workers,
        worker_liveness=defaults,
        spool=Spool.from_settings(settings.model_copy(update={"hub_id": hub_name})) if spool else None,
    )
    return hub, upkeep
