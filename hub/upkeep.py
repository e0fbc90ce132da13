"""A hub's periodic work, about once a second while it is connected: the ingest
heartbeat, the liveness sweep (one leader among the hubs), the device gauges, and
— hourly, one hub at a time — the time partitions made ahead and dropped past
retention, and the message ledger, dead letters and personal data past their periods
pruned (``hub/retention.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import psycopg

from hub import liveness, metrics, retention
from shouhu import timeseries
from shouhu.db import Conn
from shouhu.migrations import storage_mode

log = logging.getLogger(__name__)


GAUGE_INTERVAL_S = 10.0
PARTITION_INTERVAL_S = 3600.0
PARTITION_LOCK_KEY = 0x5348_4F55_4855_0004
RETENTION_INTERVAL = timedelta(hours=1)
DEAD_LETTER_DAYS = 14
# The periods of a hub built without settings (tests): every default.
DEFAULT_PERIODS = retention.Periods(DEAD_LETTER_DAYS)


class Upkeep:
    """Owns its own autocommit connection: the sweep commits chunk by chunk."""

    def __init__(
        self,
        database_url: str,
        hub_id: str,
        *,
        retention_days: int,
        clock: Callable[[], datetime],
        periods: retention.Periods = DEFAULT_PERIODS,
    ) -> None:
        self.database_url = database_url
        self.hub_id = hub_id
        self.retention_days = retention_days
        self.periods = periods  # how long each kind of personal data is kept
        self.clock = clock
        self._conn: Conn | None = None
        self._last_gauges = float("-inf")
        self._last_partitions = float("-inf")
        # On the injected clock, so tests drive the hourly pass; None: prune at the first tick.
        self._next_prune: datetime | None = None

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, autocommit=True, application_name="shouhu-hub-upkeep")
        return self._conn

    def tick(self) -> None:
        """One round; a database error drops the connection and the next tick retries."""
        try:
            self._tick()
        except psycopg.OperationalError:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            raise

    def _tick(self) -> None:
        conn = self._connection()
        now = self.clock()
        with conn.transaction():
            gap = liveness.beat(conn, self.hub_id, now)
        if gap is not None:
            log.warning("ingest was down from %s to %s: deadlines pause by that much", gap.started_at, gap.ended_at)
        report = liveness.sweep(conn, now, lock_key=liveness.SWEEP_LOCK_KEY)
        for transition in report.transitions:
            metrics.LIVENESS_TRANSITIONS.labels(transition.kind.value, transition.reason or "online").inc()
        if time.monotonic() - self._last_gauges >= GAUGE_INTERVAL_S:
            self._last_gauges = time.monotonic()
            for (kind, state), value in liveness.device_counts(conn).items():
                metrics.DEVICES.labels(kind.value, state.value).set(value)
        if time.monotonic() - self._last_partitions >= PARTITION_INTERVAL_S:
            self._last_partitions = time.monotonic()
            self._partitions(conn, now)
        if self._next_prune is None or now >= self._next_prune:
            self._prune(conn, now)

    def _partitions(self, conn: Conn, now: datetime) -> None:
        with conn.transaction():
            if storage_mode(conn) is not timeseries.StorageMode.NATIVE:
                return  # TimescaleDB makes chunks and runs retention itself
            locked = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PARTITION_LOCK_KEY,)).fetchone()
            if locked and locked[0]:
                made = timeseries.maintain_partitions(conn, now, self.retention_days)
                if made.created or made.dropped:
                    log.info("partitions: %d made, %d dropped", len(made.created), len(made.dropped))

    def _prune(self, conn: Conn, now: datetime) -> None:
        try:
            pruned = retention.prune(conn, now, **dataclasses.asdict(self.periods))
        except psycopg.OperationalError:
            raise
        except psycopg.Error:
            # Retention can wait an hour; the heartbeat and the sweep cannot.
            log.exception("pruning past retention failed; next try in %s", RETENTION_INTERVAL)
            self._next_prune = now + RETENTION_INTERVAL
            return
        if pruned is None:  # another hub prunes this hour
            self._next_prune = now + RETENTION_INTERVAL
            return
        counts = pruned.by_table()
        for table, rows in counts.items():
            metrics.PRUNED.labels(table).inc(rows)
        if any(counts.values()):
            log.info("pruned: %s", ", ".join(f"{rows} {table}" for table, rows in counts.items() if rows))
        # A pass that ran out of time goes on at the next tick, until it is done.
        self._next_prune = now if pruned.more else now + RETENTION_INTERVAL

    @property
    def connected(self) -> bool:
        """Whether the upkeep holds an open database connection now."""
        return self._conn is not None and not self._conn.closed

    def close(self) -> None:
        """Close the connection; a later tick would open a new one."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Upkeep:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
