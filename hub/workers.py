"""``shouhu hub --workers N``: bulk worker processes beside the hub, on its shared subscription.

One Python process cannot both take a backlog off the wire and store it at the
client's ceiling on two cores (docs/BENCHMARKS.md, issue 19): paho's reading and the
lanes' parsing share one interpreter lock. With ``--workers N`` the hub starts N − 1
child processes, each one more member of the hub's ``$share/shouhu/shouhu/v1/#``
group with its own bulk connection (client id ``<hub id>-bulk<k>``, a persistent
session like the hub's), its own bulk lanes and database connections. The broker
deals telemetry out among the hub and its workers; alarms stay on the hub's own
alarm connection, and the workers hold their batches while the hub's alarm lane
holds an alarm (one cross-process event), as the hub's own bulk lanes do.

The tree lives and dies as one:

- a worker that ends while the hub runs (crash, SIGKILL, SIGTERM sent to it alone)
  ends the hub with ``LaneFailed`` (exit 70), and the supervisor restarts the tree;
  what that worker had not acknowledged waits in its session for its return;
- a stopping hub asks its workers to stop: each stores what it holds, acknowledges
  it and disconnects, keeping its session (``--leave``: giving it up);
- a hub killed outright leaves orphans for at most a second: a worker whose parent
  is gone stops by itself, gracefully.

Counters and histograms of the workers reach the hub's ``/metrics`` summed with the
hub's own (each worker sends its samples every second), so a dashboard sees one hub.
Workers need a broker that shares subscriptions; without one the hub says so and
runs alone.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkProcess
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from devices.contract import is_outbound
from hub import metrics
from hub.ingest import IngestConfig, Writer
from hub.liveness import LivenessDefaults, LivenessRecorder
from hub.mqtt import HubConnection, Received, bulk_subscriptions, on_alarm_connection

log = logging.getLogger(__name__)

# How often a worker sends its metrics and looks whether its parent is still there.
REPORT_EVERY_S = 1.0
# A stop stores what a worker holds for up to this long (the hub's own drain is 5 s).
DRAIN_S = 5.0
# The hub waits this long for a stopping worker before killing it (its drain, its
# DISCONNECT, and its lanes' current batch).
STOP_WAIT_S = 15.0
# How long a worker may take to connect and subscribe before the hub gives up on it.
START_WAIT_S = 60.0
# Exit status of a worker whose lane or connection broke (as the hub's: EX_SOFTWARE).
EXIT_FAILED = 70

# Forked, not spawned: at the start of ``Hub.run`` the hub has no thread, socket or
# database connection yet, and a forked worker is taking its share in a tenth of the
# time a fresh interpreter needs to import the hub (half a second and more) — time a
# backlog drain waits for. What the hub did open (its spool's directory lock) the
# worker closes first thing, so an orphan never holds it.
FORK = multiprocessing.get_context("fork")

# (sample name, sorted labels) → value, for the families a worker reports.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Closable(Protocol):
    def close(self) -> None: ...


class EventLike(Protocol):
    """``threading.Event`` or its cross-process twin: what the lanes need of it."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def bulk_client_id(hub_id: str, number: int) -> str:
    """The client id of a hub's ``number``-th bulk connection (the hub's own is number 1)."""
    return f"{hub_id}-bulk{number}"


def alarms_idle_event(workers: int) -> EventLike:
    """The "alarm lane idle" flag: shared with the workers when there are any."""
    return FORK.Event() if workers > 1 else threading.Event()


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process needs to know."""

    number: int
    database_url: str
    mqtt_url: str
    client_id: str
    config: IngestConfig
    liveness: LivenessDefaults | None
    bulk_lanes: int
    batch_max: int
    batch_age_s: float
    inbox_size: int
    alarm_yield_max_s: float
    switch_interval_s: float


@dataclass
class _Signals:
    """The events a worker and its hub share."""

    alarms_idle: ProcessEvent | EventLike
    ready: ProcessEvent = field(default_factory=FORK.Event)
    stop: ProcessEvent = field(default_factory=FORK.Event)
    leave: ProcessEvent = field(default_factory=FORK.Event)


@dataclass
class _Running:
    spec: WorkerSpec
    signals: _Signals
    process: ForkProcess
    metrics: Connection


class WorkerPool:
    """The hub's side: starts the workers, watches them, merges their metrics, stops them."""

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        alarms_idle: EventLike,
        inherited: Sequence[Closable] = (),
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.specs = list(specs)
        self.alarms_idle = alarms_idle
        # What the hub holds open that a forked worker must let go of.
        self.inherited = list(inherited)
        self._running: list[_Running] = []
        self._samples: dict[int, Samples] = {}
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._closed = threading.Event()
        self._leaving = False
        # What the hub's /metrics serves: ``registry`` with the workers' samples added.
        self.collector = _MergedMetrics(self, registry)

    def start(self) -> None:
        for spec in self.specs:
            signals = _Signals(self.alarms_idle)
            ours, theirs = FORK.Pipe(duplex=False)
            process = FORK.Process(
                target=worker_main,
                args=(spec, signals.alarms_idle, signals.ready, signals.stop, signals.leave, theirs, self.inherited),
                name=f"shouhu-hub-bulk{spec.number}",
                daemon=False,
            )
            process.start()
            theirs.close()
            self._running.append(_Running(spec, signals, process, ours))
            log.info("bulk worker %d started (pid %s, client id %s)", spec.number, process.pid, spec.client_id)
        self._reader = threading.Thread(target=self._read_metrics, name="worker-metrics", daemon=True)
        self._reader.start()

    def ready(self) -> bool:
        """Every worker alive, connected and subscribed."""
        return self.ready_count() == len(self.specs)

    def ready_count(self) -> int:
        return sum(1 for r in self._running if r.process.is_alive() and r.signals.ready.is_set())

    def failure(self) -> str | None:
        """Why the tree must end: a worker that is gone (crashed, killed, or stopped alone)."""
        for running in self._running:
            if not running.process.is_alive():
                return f"bulk worker {running.spec.number} ended (exit code {running.process.exitcode})"
        return None

    def request_stop(self, *, leave: bool) -> None:
        """Ask every worker to store what it holds and go (``leave``: giving its session up)."""
        for running in self._running:
            if leave:
                running.signals.leave.set()
            running.signals.stop.set()
        self._leaving = leave

    def join(self) -> None:
        """Wait for the workers asked to stop; kill one that does not go in time."""
        deadline = time.monotonic() + STOP_WAIT_S + (30.0 if self._leaving else 0.0)
        for running in self._running:
            running.process.join(max(0.0, deadline - time.monotonic()))
            if running.process.is_alive():
                log.error("bulk worker %d did not stop in time: killed", running.spec.number)
                running.process.kill()
                running.process.join(5)
        # The reader closes the pipes, and only it: two threads closing one pipe could
        # close whatever file the process opened next under the same number.
        self._closed.set()
        if self._reader is not None:
            self._reader.join(5)

    def _read_metrics(self) -> None:
        try:
            self._read_until_closed()
        finally:
            for running in self._running:
                running.metrics.close()

    def _read_until_closed(self) -> None:
        while not self._closed.is_set():
            connections = [r.metrics for r in self._running if not r.metrics.closed]
            ready = multiprocessing.connection.wait(connections, timeout=0.5)
            for connection in ready:
                assert isinstance(connection, Connection)
                try:
                    number, samples = connection.recv()
                except (EOFError, OSError):  # the worker is gone; failure() says so
                    connection.close()
                    continue
                self.record(number, samples)

    def record(self, number: int, samples: Samples) -> None:
        """Worker ``number``'s latest samples (totals since it started)."""
        with self._lock:
            self._samples[number] = samples

    def per_worker(self) -> dict[int, Samples]:
        with self._lock:
            return dict(self._samples)

    def worker_samples(self) -> Samples:
        """Every worker's latest samples, summed."""
        total: Samples = {}
        with self._lock:
            for samples in self._samples.values():
                for key, value in samples.items():
                    total[key] = total.get(key, 0.0) + value
        return total


class _MergedMetrics(CollectorRegistry):
    """The default registry's ``shouhu_`` families with the workers' samples added in."""

    def __init__(self, pool: WorkerPool, registry: CollectorRegistry) -> None:
        super().__init__(auto_describe=False)
        self.pool = pool
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        extra = self.pool.worker_samples()
        for family in self.registry.collect():
            if not family.name.startswith("shouhu_") or not extra:
                yield family
                continue
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen.add(key)
                merged.samples.append(sample._replace(value=sample.value + extra.get(key, 0.0)))
            for (name, labels), value in extra.items():
                if (name, labels) not in seen and _belongs(name, family):
                    merged.add_sample(name, dict(labels), value)
            yield merged
        yield from self._per_worker()

    def _per_worker(self) -> Iterable[Metric]:
        """Whether each worker takes its share, and is up: the sums above cannot tell."""
        stored = CounterMetricFamily(
            "shouhu_hub_worker_messages_stored",
            "Messages stored and acknowledged by each bulk worker",
            labels=["worker"],
        )
        for number, samples in sorted(self.pool.per_worker().items()):
            total = sum(v for (name, _), v in samples.items() if name == "shouhu_hub_messages_stored_total")
            stored.add_metric([str(number)], total)
        up = GaugeMetricFamily("shouhu_hub_workers_ready", "Bulk worker processes alive and subscribed")
        up.add_metric([], float(self.pool.ready_count()))
        yield stored
        yield up


def _belongs(sample_name: str, family: Metric) -> bool:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return any(sample_name == family.name + suffix for suffix in suffixes.get(family.type, ()))


def snapshot() -> Samples:
    """This process's ``shouhu_`` counters, histograms and gauges (``_created`` left out:
    a time, not an amount)."""
    samples: Samples = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("shouhu_"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# -- the worker process ----------------------------------------------------------------


def worker_main(
    spec: WorkerSpec,
    alarms_idle: EventLike,
    ready: ProcessEvent,
    stop: ProcessEvent,
    leave: ProcessEvent,
    metrics_out: Connection,
    inherited: Sequence[Closable] = (),
) -> None:
    """A worker process's body: serve until the hub says stop, the hub is gone, or a
    signal; exit 70 if a lane or the connection broke."""
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stopping.set()

    # The hub's own handlers came with the fork: ours first.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for held in inherited:
        held.close()
    prefix = logging.Formatter(f"%(asctime)s %(name)s[bulk{spec.number}] %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(prefix)
    sys.setswitchinterval(spec.switch_interval_s)
    parent = os.getppid()
    worker = BulkWorker(spec, alarms_idle)
    failure = worker.run(ready, stopping, lambda: stop.is_set() or os.getppid() != parent, leave, metrics_out)
    if failure is not None:
        log.critical("bulk worker %d failed: %s; exiting", spec.number, failure)
        sys.stderr.flush()
        os._exit(EXIT_FAILED)


class BulkWorker:
    """One bulk connection and its lanes, in a process of its own."""

    def __init__(self, spec: WorkerSpec, alarms_idle: EventLike) -> None:
        self.spec = spec
        self.alarms_idle = alarms_idle
        self.inbox: queue.Queue[Received] = queue.Queue(spec.inbox_size)
        recorder = LivenessRecorder(spec.liveness) if spec.liveness is not None else None
        self.writers = [
            Writer(spec.database_url, spec.config, lane="bulk", record_sightings=recorder)
            for _ in range(spec.bulk_lanes)
        ]
        self.connection = HubConnection(
            spec.mqtt_url, spec.client_id, self._deliver, (), receive_maximum=spec.inbox_size
        )
        self._lanes_done = threading.Event()
        self._lanes: list[threading.Thread] = []
        self._failure: str | None = None
        self._reported = float("-inf")
        # What the fork copied from the hub's registry is the hub's to report, not ours.
        self._baseline = snapshot()

    def _deliver(self, message: Received) -> None:
        if on_alarm_connection(message.topic) or is_outbound(message.topic):
            self.connection.ack(message)  # the hub's alarm session has its own copy
            return
        self.inbox.put(message)

    def run(
        self,
        ready: ProcessEvent,
        stopping: threading.Event,
        told_to_stop: Callable[[], bool],
        leave: ProcessEvent,
        metrics_out: Connection,
    ) -> str | None:
        """Serve until ``stopping`` or ``told_to_stop()``; returns why it failed, or None."""
        self.connection.start()
        self.connection.subscribe_extra(bulk_subscriptions(True))
        self._lanes = [
            threading.Thread(target=self._lane, args=(writer,), name=f"bulk-lane-{n}", daemon=True)
            for n, writer in enumerate(self.writers, start=1)
        ]
        for thread in self._lanes:
            thread.start()
        try:
            while not stopping.wait(REPORT_EVERY_S / 4):
                if told_to_stop():
                    break
                if self.connection.failed.is_set():
                    self._failure = f"the connection {self.spec.client_id} could not hand a message over"
                dead = [t.name for t in self._lanes if not t.is_alive()]
                if dead and self._failure is None:
                    self._failure = f"{', '.join(dead)} stopped"
                if self._failure is not None:
                    break
                # Ready while connected with the share subscribed: a broker restart
                # makes the hub not ready until this worker has subscribed again.
                if self.connection.subscribed() and not self.connection.refused:
                    ready.set()
                else:
                    ready.clear()
                self._report(metrics_out)
        finally:
            ready.clear()
            # A stop that hangs (a network thread blocked on a full inbox, say) must not
            # leave an orphan behind for good: what it held is redelivered anyway.
            watchdog = threading.Timer(STOP_WAIT_S + (30.0 if leave.is_set() else 0.0), os._exit, (EXIT_FAILED,))
            watchdog.daemon = True
            watchdog.start()
            if self._failure is None:
                self._stop(leave.is_set())
            self._report(metrics_out, force=True)
            for writer in self.writers:
                writer.close()
        return self._failure

    def _report(self, metrics_out: Connection, *, force: bool = False) -> None:
        now = time.monotonic()
        if now - self._reported < REPORT_EVERY_S and not force:
            return
        self._reported = now
        # A hub that is gone cannot read it: the parent check stops this worker.
        with contextlib.suppress(OSError):
            current = snapshot()
            own = {key: value - self._baseline.get(key, 0.0) for key, value in current.items()}
            metrics_out.send((self.spec.number, own))

    def _stop(self, leave: bool) -> None:
        if leave:
            self.connection.leave_extra()
        deadline = time.monotonic() + (30.0 if leave else DRAIN_S)
        while self.inbox.qsize() and time.monotonic() < deadline and self._failure is None:
            time.sleep(0.05)
        self._lanes_done.set()
        for thread in self._lanes:
            thread.join(10)
        self.connection.stop()
        if leave:
            self.connection.end_session()
            log.info("bulk worker %d left: its session and share are given up", self.spec.number)

    def _lane(self, writer: Writer) -> None:
        try:
            while not self._lanes_done.is_set():
                batch = collect_batch(self.inbox, self.spec.batch_max, self.spec.batch_age_s)
                if not batch:
                    continue
                yield_to_alarms(self.alarms_idle, self.spec.alarm_yield_max_s)
                writer.store_batch(batch)
                self.connection.ack_all(batch)
        except BaseException as exc:
            log.critical("a bulk lane of worker %d stopped: %r", self.spec.number, exc, exc_info=True)
            self._failure = f"a bulk lane stopped: {exc!r}"


def yield_to_alarms(alarms_idle: EventLike, limit_s: float) -> None:
    """Hold a bulk batch while the hub's alarm lane has an alarm in hand, for at most ``limit_s``."""
    if not alarms_idle.is_set():
        metrics.BULK_YIELDS.inc()
        alarms_idle.wait(limit_s)


def collect_batch(inbox: queue.Queue[Received], batch_max: int, age_s: float) -> list[Received]:
    """Up to ``batch_max`` messages, waiting at most ``age_s`` after the first."""
    try:
        first = inbox.get(timeout=0.2)
    except queue.Empty:
        return []
    batch = [first]
    deadline = time.monotonic() + age_s
    while len(batch) < batch_max:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            batch.append(inbox.get(timeout=remaining))
        except queue.Empty:
            break
    return batch
