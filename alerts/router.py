"""``shouhu router``: runs escalation steps as they fall due, then sends their attempts.

Two kinds of durable work, both rows claimed with ``FOR UPDATE SKIP LOCKED`` so any
number of routers share them without a coordinator:

1. a due ``escalation_actions`` row: resolve the step's recipients *now* (rosters
   in SHOUHU_TIMEZONE), write one ``notification_attempts`` row per recipient and
   channel, schedule the next step, all in one transaction; a stale fencing token
   or a closed incident retires the action instead (``alerts/escalation.py``);
2. a ``pending`` attempt: lease it (a committed claim), call the provider with no
   lock or transaction held, then record the provider's id (``alerts/attempts.py``).
   A router that dies mid-call leaves its leases, which the next sender takes over
   and re-sends under the same keys: at most the attempts in flight are sent twice,
   none a third time, and no step is skipped. Each channel has its own senders.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import psycopg

from alerts import escalation
from alerts.dispatch import PRESS_TO_FIRST_REQUEST, Dispatcher
from alerts.notifiers.base import Notifier
from alerts.notifiers.platform import PlatformNotifier
from alerts.providers import PhoneProviders
from alerts.timeline import ESCALATION_CHANNEL, wake_routers
from devices.kinds import Channel
from shouhu.db import Conn

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

__all__ = ["PRESS_TO_FIRST_REQUEST", "Router", "RouterConfig"]

SWEEP_INTERVAL_S = 5.0
# Due actions run per transaction. One transaction for many steps saves most of
# their round trips (bench/escalation.py, docs/BENCHMARKS.md). Small, because a batch
# holds its incidents' row locks until it commits, and an acknowledgement, or the hub
# joining a press to an open incident, waits for that lock: a few tens of
# milliseconds, not seconds.
STEP_BATCH = 25
# Threads sending attempts per phone channel in `shouhu router` (the webhook gets half,
# the console one, each channel one more for first pages only): provider calls are
# I/O-bound, so a few threads multiply what one process sends (bench/escalation.py).
DEFAULT_SENDERS = 4


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    router_id: str
    zone: ZoneInfo


class Router:
    """One router worker. ``run_once`` does all due work; ``run`` loops until stopped."""

    def __init__(
        self,
        database_url: str,
        config: RouterConfig,
        phone: PhoneProviders,
        *,
        console: Notifier | None = None,
        platform: PlatformNotifier | None = None,
        clock: Clock = utc_now,
        exercise: bool = False,
    ) -> None:
        """``phone``: the providers' notifiers for voice and SMS and the default choice;
        ``console``: the consoles' (``ConsoleNotifier``), None for no console pages."""
        self.database_url = database_url
        self.config = config
        self.clock = clock
        self.dispatcher = Dispatcher(
            phone,
            platform,
            worker_id=config.router_id,
            clock=clock,
            console=console,
            zone=config.zone,
            exercise=exercise,
        )
        self.stopping = threading.Event()
        # One connection per thread: the loop and each sender thread hold their own.
        self._local = threading.local()
        self._connections: list[Conn] = []
        self._connections_lock = threading.Lock()
        self._wakeups: list[threading.Event] = []
        self._last_sweep = float("-inf")
        self._pager = escalation.Pager(
            config.router_id,
            config.zone,
            self.dispatcher.channels(),
            self.dispatcher.platform is not None,
            self.dispatcher.recorded_channels(),
        )

    # -- connections -----------------------------------------------------------

    def _connection(self) -> Conn:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            # Autocommit: every transaction is an explicit ``conn.transaction()``, and a
            # sender's success is settled by one statement without a BEGIN and a COMMIT.
            conn = psycopg.connect(
                self.database_url, autocommit=True, application_name=f"shouhu-router-{self.config.router_id}"
            )
            self._local.conn = conn
            with self._connections_lock:
                self._connections = [c for c in self._connections if not c.closed]
                self._connections.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # -- escalation steps (alerts/escalation.py decides and writes them) -----------

    def run_due_steps(self, limit: int = 100) -> int:
        """Run escalation actions due now, in batches of one transaction each, at most ``limit``.

        Returns how many. The limit keeps sends flowing between batches of steps.
        """
        done = 0
        while not self.stopping.is_set() and done < limit:
            conn = self._connection()
            with conn.transaction():
                now = self.clock()
                actions = escalation.claim_due(conn, now, min(STEP_BATCH, limit - done))
                if not actions:
                    return done
                escalation.run_due(conn, actions, now, self._pager)
                wake_routers(conn, "attempts")
            # Sender threads in this process start on the new attempts at once.
            self._wake()
            done += len(actions)
        return done

    # -- sending ---------------------------------------------------------------

    def send_pending(self) -> int:
        """Send every due attempt of every channel, one after another, in this thread. Returns how many.

        What tests and ``run_once`` use; ``run(senders=…)`` gives each channel its own threads.
        """
        sent = 0
        while not self.stopping.is_set():
            conn = self._connection()
            claimed = self.dispatcher.send_due(conn)
            if not claimed:
                return sent
            sent += claimed
        return sent

    # -- the invariant -------------------------------------------------------

    def sweep(self) -> list[int]:
        """Every open red incident has a pending action: repair any that has none (:func:`alerts.escalation.sweep`)."""
        conn = self._connection()
        with conn.transaction():
            return escalation.sweep(conn, self.clock(), self.config.router_id)

    # -- loop ------------------------------------------------------------------

    def run_once(self) -> None:
        """Sweep (every few seconds), run due steps, send pending attempts; until nothing is due."""
        if time.monotonic() - self._last_sweep >= SWEEP_INTERVAL_S:
            self._last_sweep = time.monotonic()
            self.sweep()
        while self.run_due_steps() + self.send_pending():
            pass

    def run(self, poll_s: float = 0.25, *, senders: int = 0) -> None:
        """Loop until ``stop()``: wake on NOTIFY from the hub, or every ``poll_s``.

        With ``senders`` > 0 each channel gets its own bounded pool of sender threads
        (``senders`` each for voice and SMS, fewer for the webhook and the console, plus
        one per channel that only sends incidents' first pages), while this loop runs
        the steps: a provider's latency, or a hung provider, then holds only its own
        channel's threads, never another channel's pages or the next steps.
        """
        threads = [
            threading.Thread(
                target=self._send_loop, args=(channel, poll_s, first_only), name=f"sender-{channel}-{n}", daemon=True
            )
            for channel, size in self._pool_sizes(senders).items()
            for n, first_only in enumerate([True] + [False] * size)
        ]
        for thread in threads:
            thread.start()
        listener: Conn | None = None
        while not self.stopping.is_set():
            try:
                if listener is None or listener.closed:
                    listener = psycopg.connect(self.database_url, autocommit=True)
                    listener.execute(f"LISTEN {ESCALATION_CHANNEL}")
                if senders:
                    self._steps_only()
                else:
                    self.run_once()
                select.select([listener.fileno()], [], [], poll_s)
                for _ in listener.notifies(timeout=0, stop_after=100):
                    pass
            except psycopg.OperationalError as exc:
                log.warning("database unavailable (%s); retrying", exc)
                self._drop_connection()
                if listener is not None:
                    listener.close()
                listener = None
                self.stopping.wait(1.0)
        self._wake()
        # A sender in a provider call ends within its hard timeout; do not wait longer
        # than that for all of them together (they are daemon threads).
        deadline = time.monotonic() + 12
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        if listener is not None:
            listener.close()
        self.close()

    def _pool_sizes(self, senders: int) -> dict[Channel, int]:
        if senders <= 0:
            return {}
        sizes = {
            Channel.VOICE: senders,
            Channel.SMS: senders,
            Channel.WEBHOOK: max(senders // 2, 1),
            Channel.CONSOLE: 1,
        }
        return {channel: size for channel, size in sizes.items() if channel in self.dispatcher.channels()}

    def _wake(self) -> None:
        with self._connections_lock:
            for event in self._wakeups:
                event.set()

    def _steps_only(self) -> None:
        if time.monotonic() - self._last_sweep >= SWEEP_INTERVAL_S:
            self._last_sweep = time.monotonic()
            self.sweep()
        while self.run_due_steps():
            self._wake()
        self._wake()  # attempts may also come from acknowledgements, retries, callbacks

    def _send_loop(self, channel: Channel, poll_s: float, first_only: bool) -> None:
        wakeup = threading.Event()
        with self._connections_lock:
            self._wakeups.append(wakeup)
        while not self.stopping.is_set():
            try:
                while not self.stopping.is_set() and self.dispatcher.send_due(
                    self._connection(), channel, first_pages_only=first_only
                ):
                    pass
            except psycopg.OperationalError as exc:
                log.warning("database unavailable while sending (%s); retrying", exc)
                self._drop_connection()
                self.stopping.wait(1.0)
                continue
            except Exception:
                log.exception("sender %s failed; going on", threading.current_thread().name)
                self._drop_connection()
                self.stopping.wait(poll_s)
                continue
            wakeup.wait(poll_s)
            wakeup.clear()

    def stop(self) -> None:
        self.stopping.set()
