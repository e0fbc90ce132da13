"""The live feed's engine: reading the outbox, pruning it, and waking streams on NOTIFY.

Triggers (``shouhu/migrations/0012_events.sql``) write one ``live_events`` row per
change of an incident, a device's ``online`` or a care task, numbered in commit
order, and ``pg_notify`` the channel below. Each API process keeps one LISTEN
connection (:class:`LiveFeedListener`) and wakes its streams; a stream then reads
what is new through the ordinary pool. The outbox, not the notification, is the
truth: a stream that missed a wake-up reads the same rows at its next heartbeat.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import DictRow

from api.access import TASK_KINDS_OF_ROLE, AreaScope, visible_device_kinds, visible_incident_kinds
from shouhu.tokens import TokenIdentity, require_aware

logger = logging.getLogger(__name__)

LIVE_CHANNEL = "shouhu_live_events"
# How long the outbox keeps events, so a console that lost its connection (a laptop
# asleep, a dead mobile link) resumes without a gap. A day covers a night shift away;
# anything older is answered with `reset`: reload the lists instead.
RETENTION = timedelta(hours=24)
# How often the API prunes the outbox past RETENTION; pruning late only keeps more.
PRUNE_INTERVAL_S = 300.0
# The longest a stream stays silent: proxies and browsers drop idle connections, and
# each heartbeat also checks that the session or token is still valid.
HEARTBEAT_S = 15.0
# Events read per query; a console resuming after hours catches up in pages.
PAGE_SIZE = 500
# Waits between attempts to (re)open the LISTEN connection.
_LISTEN_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class Topic(StrEnum):
    """The ``event:`` names of the feed; ``reset`` asks the client to reload its lists."""

    INCIDENT = "incident"
    DEVICE = "device"
    TASK = "task"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class Audience:
    """What one token may see on the feed: its areas and, per topic, the kinds its role reads."""

    scope: list[str] | None
    incident_kinds: list[str]
    device_kinds: list[str]
    task_kinds: list[str]


def audience_of(token: TokenIdentity, scope: AreaScope) -> Audience:
    """The same rules as the REST lists: a technician sees cameras and repair orders only."""
    return Audience(
        scope=scope.as_param(),
        incident_kinds=sorted(visible_incident_kinds(token.role)),
        device_kinds=sorted(visible_device_kinds(token.role)),
        task_kinds=sorted(TASK_KINDS_OF_ROLE[token.role]),
    )


@dataclass(frozen=True, slots=True)
class LiveEvent:
    id: int
    topic: Topic
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Page:
    """Events after a cursor, and where the next read starts.

    ``cursor`` may lie past the last event: rows the audience may not see are
    skipped once, not scanned again by every read. ``reset`` says events after the
    asked-for id are gone (pruned, or the id was never issued by this database).
    """

    events: tuple[LiveEvent, ...]
    cursor: int
    more: bool
    reset: bool


# One statement, so the horizon, the newest id and the events share one snapshot.
_READ = """
    WITH state AS (
        SELECT h.pruned_through,
               (SELECT max(id) FROM live_events) AS newest,
               (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM live_events_id_seq) AS issued
        FROM live_events_horizon h
    )
    SELECT s.pruned_through, s.newest, s.issued, e.id, e.topic, e.payload
    FROM state s LEFT JOIN LATERAL (
        SELECT id, topic, payload FROM live_events
        WHERE id > %(after)s
          AND (%(scope)s::text[] IS NULL OR area_id = ANY(%(scope)s))
          AND (   (topic = 'incident' AND kind = ANY(%(incident_kinds)s))
               OR (topic = 'device' AND kind = ANY(%(device_kinds)s))
               OR (topic = 'task' AND kind = ANY(%(task_kinds)s)))
        ORDER BY id
        LIMIT %(limit)s
    ) e ON true
    ORDER BY e.id
"""


def read_after(
    conn: psycopg.Connection[DictRow], after: int, audience: Audience, *, limit: int = PAGE_SIZE
) -> Page:
    """The audience's events with ids above ``after``, oldest first, at most ``limit``.

    Ids are handed out in commit order (see the migration), so nothing can later
    appear below an id read here: the cursor only moves forward.
    """
    rows = conn.execute(
        _READ,
        {
            "after": after,
            "scope": audience.scope,
            "incident_kinds": audience.incident_kinds,
            "device_kinds": audience.device_kinds,
            "task_kinds": audience.task_kinds,
            "limit": limit,
        },
    ).fetchall()
    state = rows[0]
    head = max(state["newest"] or 0, state["pruned_through"])
    if after < state["pruned_through"] or after > state["issued"]:
        return Page((), cursor=head, more=False, reset=True)
    events = tuple(LiveEvent(row["id"], Topic(row["topic"]), row["payload"]) for row in rows if row["id"] is not None)
    more = len(events) == limit
    cursor = events[-1].id if more else max(after, head)
    return Page(events, cursor=cursor, more=more, reset=False)


def newest_id(conn: psycopg.Connection[DictRow]) -> int:
    """Where a stream with nothing to resume starts: after everything committed so far."""
    row = conn.execute(
        "SELECT greatest((SELECT max(id) FROM live_events), pruned_through) AS head FROM live_events_horizon"
    ).fetchone()
    assert row is not None
    head: int = row["head"]
    return head


def prune(conn: psycopg.Connection[DictRow], now: datetime, *, retention: timedelta = RETENTION) -> int:
    """Delete the events older than ``retention`` and move the horizon; returns how many went.

    Deletes a prefix of ids (everything up to the newest expired id), so the horizon
    is exact: every id at or below it is gone, every id above it is kept.
    """
    require_aware("now", now)
    row = conn.execute(
        """
        WITH gone AS (
            DELETE FROM live_events
            WHERE id <= (SELECT max(id) FROM live_events WHERE at < %s)
            RETURNING id
        ), moved AS (
            -- greatest() ignores the NULL of an empty prune.
            UPDATE live_events_horizon SET pruned_through = greatest(pruned_through, (SELECT max(id) FROM gone))
        )
        SELECT count(*) AS deleted FROM gone
        """,
        (now - retention,),
    ).fetchone()
    assert row is not None
    deleted: int = row["deleted"]
    return deleted


def sse_frame(topic: Topic, event_id: int, data: dict[str, Any]) -> str:
    """One Server-Sent Event. ``json.dumps`` escapes newlines, so ``data`` stays one line."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return f"id: {event_id}\nevent: {topic.value}\ndata: {body}\n\n"


class LiveFeedListener:
    """One LISTEN connection per API process that wakes every waiting stream.

    A stream takes :meth:`waiter` *before* it reads the outbox and waits on it
    after, so a notification that lands while it reads is not lost.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._event = asyncio.Event()
        self.listening = False

    def waiter(self) -> asyncio.Event:
        return self._event

    def wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with growing pauses while the database is away."""
        failures = 0
        while True:
            pause = _LISTEN_RETRY_S[min(failures, len(_LISTEN_RETRY_S) - 1)]
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name="shouhu-api-live"
                )
                async with conn:
                    await conn.execute(f"LISTEN {LIVE_CHANNEL}")
                    self.listening = True
                    failures = 0
                    # Whatever committed while nobody listened is read now, not at the next heartbeat.
                    self.wake()
                    async for _notify in conn.notifies():
                        self.wake()
            except psycopg.Error as exc:
                failures += 1
                logger.warning("live feed: LISTEN connection lost (%s); retrying in %.0f s", exc, pause)
            finally:
                self.listening = False
            await asyncio.sleep(pause)
