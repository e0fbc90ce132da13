"""Provider receipts: a queue in PostgreSQL between the route that takes a push and the work it causes.

A provider that pushes receipts (Aliyun: call results, keypresses, SMS reports and
replies) must be answered within a few hundred milliseconds or it pushes again,
and drops the receipt after a few tries. So the receiving route only validates and
:func:`store` s each item, and answers; a :class:`ReceiptWorker` in every API
process does the work, one receipt per transaction:

- **claim**: the oldest due receipt, ``FOR UPDATE SKIP LOCKED`` — several workers
  (threads, API processes) never take the same one, and never wait for each other.
  A call's result (``final``) waits until the call's other receipts (its keypress)
  are done, whatever order they were pushed in.
- **handle** it in a savepoint, with the handler given (``alerts/aliyun_receipts.py``);
  it locks the incident after the receipt row — the receipt is a due row claimed
  skip-locked, never waited for, so it closes no cycle in the lock order.
- **finish**: ``handled_at`` and the outcome; or, when the handler raised, the error
  and a backoff (``BACKOFF_S``), the receipt left in the queue; after ``MAX_TRIES``
  it is marked ``poison`` and logged, and the others go on.

A retry of the same push is a no-op: each receipt has a key the provider's retry
repeats (``UNIQUE (provider, kind, key)``). This module is the only writer of
``provider_receipts``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import psycopg
from prometheus_client.core import GaugeMetricFamily, Metric
from psycopg.types.json import Jsonb

from shouhu.db import Conn
from shouhu.db_collector import DatabaseCollector

log = logging.getLogger(__name__)

__all__ = [
    "BACKOFF_S",
    "MAX_TRIES",
    "RECEIPTS_CHANNEL",
    "NewReceipt",
    "Receipt",
    "ReceiptOutcome",
    "ReceiptQueueCollector",
    "ReceiptWorker",
    "audit_refused",
    "dead_letter",
    "store",
]

# The route NOTIFYs here in the transaction that stores receipts; the workers LISTEN.
RECEIPTS_CHANNEL = "shouhu_receipts"
# A receipt whose handling failed is tried again after these waits; the last try's
# failure marks it poison.
BACKOFF_S = (1.0, 5.0, 30.0, 120.0)
MAX_TRIES = len(BACKOFF_S) + 1
# How long an idle worker sleeps when no NOTIFY wakes it (receipts in backoff come due).
POLL_S = 1.0
# Pauses before reconnecting while the database is away.
RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# Handled receipts are kept this long, then deleted (checked at most once an hour).
KEEP_HANDLED_DAYS = 30
PRUNE_INTERVAL_S = 3600.0


class ReceiptOutcome(StrEnum):
    """What became of a receipt (``provider_receipts.outcome``)."""

    SETTLED = "settled"  # the attempt's outcome (delivered, busy, not reached…)
    RECORDED = "recorded"  # on the timeline only (ringing, a status after the outcome)
    DUPLICATE = "duplicate"  # the same status seen before
    TAKEN = "taken"  # a keypress 1 or an SMS reply took the incident (or found it taken)
    DECLINED = "declined"  # a keypress 2 or an SMS reply "code 2"
    KEY_IGNORED = "key_ignored"  # a key other than 1 or 2: on the timeline only
    NOT_UNDERSTOOD = "not_understood"  # a reply to a page with neither 1 nor 2
    REFUSED = "refused"  # forged or misdirected: nothing changed, audited
    POISON = "poison"  # handling failed MAX_TRIES times: logged, left for a person
    MALFORMED = "malformed"  # the item did not validate: dead-lettered by the route


@dataclass(frozen=True, slots=True)
class NewReceipt:
    """One validated item of a push, to store."""

    kind: str
    key: str
    body: dict[str, Any]
    ref: str = ""
    final: bool = False


@dataclass(frozen=True, slots=True)
class Receipt:
    """A stored receipt, claimed for handling."""

    id: int
    provider: str
    kind: str
    body: dict[str, Any]
    tries: int


def store(conn: Conn, provider: str, receipts: Sequence[NewReceipt], now: datetime) -> int:
    """Queue ``receipts`` in the caller's transaction and wake the workers; how many were new.

    One already stored (the provider's retry of a push) is left as it is.
    """
    new = 0
    for receipt in receipts:
        row = conn.execute(
            """
            INSERT INTO provider_receipts (provider, kind, key, body, ref, final, received_at, not_before)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (provider, kind, key) DO NOTHING RETURNING id
            """,
            (provider, receipt.kind, receipt.key, Jsonb(receipt.body), receipt.ref, receipt.final, now, now),
        ).fetchone()
        new += row is not None
    if new:
        conn.execute("SELECT pg_notify(%s, '')", (RECEIPTS_CHANNEL,))
    return new


def dead_letter(conn: Conn, provider: str, kind: str, item: Any, error: str, now: datetime) -> bool:
    """Keep an item that did not validate, handled as ``malformed`` with why; False if kept before."""
    raw = json.dumps(item, ensure_ascii=False, sort_keys=True)
    key = "malformed:" + hashlib.sha256(raw.encode()).hexdigest()
    body = item if isinstance(item, dict) else {"item": item}
    row = conn.execute(
        """
        INSERT INTO provider_receipts (provider, kind, key, body, received_at, not_before, error, handled_at, outcome)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (provider, kind, key) DO NOTHING RETURNING id
        """,
        (provider, kind, key, Jsonb(body), now, now, error, now, ReceiptOutcome.MALFORMED),
    ).fetchone()
    if row is not None:
        log.error("%s %s receipt %s dead-lettered: %s", provider, kind, row[0], error)
    return row is not None


def audit_refused(conn: Conn, now: datetime, provider: str, subject: str, reason: str, detail: dict[str, Any]) -> None:
    """An audit row for a push refused as forged or misdirected (wrong token, unknown out_id…)."""
    conn.execute(
        "INSERT INTO audit_log (at, token_id, role, action, subject, detail, actor, actor_name)"
        " VALUES (%s, NULL, 'provider', 'receipt_refused', %s, %s, %s, %s)",
        (now, subject, Jsonb({"provider": provider, "reason": reason} | detail), provider, provider),
    )


# --- the worker -----------------------------------------------------------------------

_CLAIM = """
SELECT r.id, r.provider, r.kind, r.body, r.tries FROM provider_receipts r
WHERE r.handled_at IS NULL AND r.not_before <= %(now)s
  AND NOT (r.final AND EXISTS (
      SELECT 1 FROM provider_receipts o
      WHERE o.handled_at IS NULL AND NOT o.final AND o.provider = r.provider AND o.ref = r.ref))
ORDER BY r.id LIMIT 1
FOR UPDATE SKIP LOCKED
"""

Handler = Callable[[Conn, Receipt, datetime], ReceiptOutcome]
Clock = Callable[[], datetime]


class ReceiptWorker:
    """Handles queued receipts: ``run_once`` until none is due; ``start`` runs it in a thread, woken by NOTIFY."""

    def __init__(
        self, database_url: str, handler: Handler, clock: Clock, *, name: str = "receipts", poll_s: float = POLL_S
    ) -> None:
        self.database_url = database_url
        self.handler = handler
        self.clock = clock
        self.name = name
        self.poll_s = poll_s
        self.stopping = threading.Event()
        self._conn: Conn | None = None
        self._thread: threading.Thread | None = None
        self._last_prune = float("-inf")
        # Written to by stop(): the wait for a NOTIFY ends at once.
        self._wake_read, self._wake_write = socket.socketpair()

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, autocommit=True, application_name=f"shouhu-{self.name}")
        return self._conn

    def run_once(self) -> int:
        """Handle every receipt due now, one transaction each; returns how many were handled or failed."""
        done = 0
        while not self.stopping.is_set() and self._handle_next(self._connection()):
            done += 1
        return done

    def _handle_next(self, conn: Conn) -> bool:
        now = self.clock()
        with conn.transaction():
            row = conn.execute(_CLAIM, {"now": now}).fetchone()
            if row is None:
                return False
            receipt = Receipt(int(row[0]), str(row[1]), str(row[2]), dict(row[3]), int(row[4]))
            try:
                with conn.transaction():
                    outcome = self.handler(conn, receipt, now)
            except Exception as exc:
                if conn.broken:
                    raise  # the connection is gone: the receipt stays queued as it was
                self._failed(conn, receipt, exc, now)
                return True
            conn.execute(
                "UPDATE provider_receipts SET handled_at = %s, outcome = %s, tries = tries + 1, error = NULL"
                " WHERE id = %s",
                (now, outcome, receipt.id),
            )
        return True

    def _failed(self, conn: Conn, receipt: Receipt, exc: Exception, now: datetime) -> None:
        tries = receipt.tries + 1
        error = f"{type(exc).__name__}: {exc}"[:2000]
        if tries >= MAX_TRIES:
            log.error(
                "%s %s receipt %s failed %s times, marked poison: %s",
                receipt.provider,
                receipt.kind,
                receipt.id,
                tries,
                error,
            )
            conn.execute(
                "UPDATE provider_receipts SET tries = %s, error = %s, handled_at = %s, outcome = %s WHERE id = %s",
                (tries, error, now, ReceiptOutcome.POISON, receipt.id),
            )
            return
        delay = BACKOFF_S[tries - 1]
        log.warning(
            "%s %s receipt %s failed (try %s of %s), again in %.0f s: %s",
            receipt.provider,
            receipt.kind,
            receipt.id,
            tries,
            MAX_TRIES,
            delay,
            error,
        )
        conn.execute(
            "UPDATE provider_receipts SET tries = %s, error = %s, not_before = %s WHERE id = %s",
            (tries, error, now + timedelta(seconds=delay), receipt.id),
        )

    def prune(self) -> int:
        """Delete receipts handled more than ``KEEP_HANDLED_DAYS`` ago; how many."""
        cutoff = self.clock() - timedelta(days=KEEP_HANDLED_DAYS)
        cursor = self._connection().execute("DELETE FROM provider_receipts WHERE handled_at < %s", (cutoff,))
        return cursor.rowcount

    # -- the thread ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"shouhu-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self._wake_write.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()
        self._wake_read.close()
        self._wake_write.close()

    def _run(self) -> None:
        """Loop until stopped: handle what is due, then wait for a NOTIFY or ``poll_s``.

        While the database is away (or not migrated yet) it tries again after growing
        pauses, saying so once per outage.
        """
        listener: Conn | None = None
        failures = 0
        while not self.stopping.is_set():
            try:
                if listener is None or listener.closed:
                    listener = psycopg.connect(self.database_url, autocommit=True)
                    listener.execute(f"LISTEN {RECEIPTS_CHANNEL}")
                self.run_once()
                if self._last_prune + PRUNE_INTERVAL_S <= time.monotonic():
                    self._last_prune = time.monotonic()
                    self.prune()
                if failures:
                    log.info("receipts: the database is back; handling receipts again")
                failures = 0
                select.select([listener.fileno(), self._wake_read.fileno()], [], [], self.poll_s)
                for _ in listener.notifies(timeout=0, stop_after=100):
                    pass
            except psycopg.Error as exc:
                if not failures:
                    log.warning("receipts: the database is unavailable or not migrated (%s); retrying", exc)
                pause = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                for conn in (listener, self._conn):
                    if conn is not None:
                        conn.close()
                listener = self._conn = None
                self.stopping.wait(pause)
            except Exception:
                log.exception("receipts: the worker failed; going on")
                self.stopping.wait(1.0)
        if listener is not None:
            listener.close()


# Providers that push receipts: each gets its figures, zero included, so an alert on
# them has a series to watch before the first push.
PUSHING_PROVIDERS = ("aliyun",)


class ReceiptQueueCollector(DatabaseCollector):
    """The receipt queue at each scrape of the API's ``/metrics``: receipts waiting, the
    oldest one's age, and those given up as poison — a keypress that waits is an SOS
    whose taker is not recorded."""

    figures = "provider receipt figures"

    def __init__(self, connect: Callable[[], AbstractContextManager[Conn]], clock: Callable[[], datetime]) -> None:
        super().__init__(connect)
        self._clock = clock

    def read(self, conn: Conn) -> Iterator[Metric]:
        rows = conn.execute(
            "SELECT provider, count(*) FILTER (WHERE handled_at IS NULL),"
            " min(received_at) FILTER (WHERE handled_at IS NULL),"
            " count(*) FILTER (WHERE outcome = 'poison')"
            " FROM provider_receipts GROUP BY provider"
        ).fetchall()
        found = {str(provider): (int(waiting), oldest, int(poison)) for provider, waiting, oldest, poison in rows}
        now = self._clock()
        waiting = GaugeMetricFamily(
            "shouhu_provider_receipts_waiting", "Provider receipts queued and not yet handled", labels=["provider"]
        )
        oldest = GaugeMetricFamily(
            "shouhu_provider_receipts_oldest_waiting_seconds",
            "Age of the oldest provider receipt not yet handled (0 when none waits)",
            labels=["provider"],
        )
        poison = GaugeMetricFamily(
            "shouhu_provider_receipts_poison",
            "Provider receipts given up after their tries (kept until pruned, 30 days)",
            labels=["provider"],
        )
        for provider in sorted(set(PUSHING_PROVIDERS) | set(found)):
            count, first, bad = found.get(provider, (0, None, 0))
            waiting.add_metric([provider], count)
            oldest.add_metric([provider], max((now - first).total_seconds(), 0.0) if first is not None else 0.0)
            poison.add_metric([provider], bad)
        yield from (waiting, oldest, poison)
