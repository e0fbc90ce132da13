"""`GET /api/v1/events`: the live feed as Server-Sent Events, resumable with Last-Event-ID.

A stream holds no database connection while it waits: it waits on the process's
LISTEN connection (``api.live.LiveFeedListener``) or its heartbeat, then borrows a
pooled connection in a worker thread for one short read. Route dependencies that
yield a connection are not used here, because FastAPI keeps them until the response
ends, which for a stream is hours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated

import psycopg
from anyio import to_thread
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from psycopg_pool import ConnectionPool, PoolTimeout

from api.deps import (
    API_PREFIX,
    LiveFeedDep,
    Now,
    PoolDep,
    bearer_scheme,
    get_area_scope,
    get_now,
    identify,
    pooled,
)
from api.live import (
    HEARTBEAT_S,
    Audience,
    LiveFeedListener,
    Page,
    Topic,
    audience_of,
    newest_id,
    read_after,
    sse_frame,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix=f"{API_PREFIX}/events", tags=["events"])

# How long a browser's EventSource waits before it reconnects (the SSE `retry:` field).
RETRY_MS = 3000
# A Last-Event-ID that is not one of ours: no position to resume from, so reset.
_UNKNOWN_POSITION = -1


def get_heartbeat_s() -> float:
    """Seconds between heartbeats, each re-checking the stream's credential; tests override it."""
    return HEARTBEAT_S


def _viewer(pool: ConnectionPool, request: Request, bearer: str | None, now: datetime) -> Audience:
    """Who is asking and what they may see; raises HTTPException 401 once they may not."""
    with pooled(pool) as conn:
        token = identify(conn, request, bearer, now)
        return audience_of(token, get_area_scope(conn, token))


def _start(pool: ConnectionPool) -> int:
    with pooled(pool) as conn:
        return newest_id(conn)


def _read(pool: ConnectionPool, after: int, audience: Audience) -> Page:
    with pooled(pool) as conn:
        return read_after(conn, after, audience)


def _resume_position(header: str | None, query: int | None) -> int | None:
    """The id to resume after; the header wins, because a browser updates it on every reconnect
    while the URL keeps the id it was first opened with."""
    if header is None:
        return query
    try:
        position = int(header.strip())
    except ValueError:
        return _UNKNOWN_POSITION
    return position if position >= 0 else _UNKNOWN_POSITION


async def _stream(
    *,
    listener: LiveFeedListener,
    pool: ConnectionPool,
    request: Request,
    bearer: str | None,
    clock: Callable[[], datetime],
    audience: Audience,
    cursor: int,
    heartbeat_s: float,
) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    checked = time.monotonic()
    try:
        while True:
            # Taken before the read: a NOTIFY during the read then wakes the wait below.
            wake = listener.waiter()
            page = await to_thread.run_sync(_read, pool, cursor, audience)
            if page.reset:
                yield sse_frame(
                    Topic.RESET,
                    page.cursor,
                    {"reason": "the events after your Last-Event-ID are no longer kept: reload your lists"},
                )
            for event in page.events:
                yield sse_frame(event.topic, event.id, event.data)
            cursor = page.cursor
            if page.more:
                continue
            remaining = heartbeat_s - (time.monotonic() - checked)
            if remaining > 0:
                try:
                    await asyncio.wait_for(wake.wait(), remaining)
                    continue
                except TimeoutError:
                    pass
            # Each heartbeat checks the credential again: a logout, a revoked token or an
            # expired session ends the stream, and the reconnect is refused with 401.
            try:
                audience = await to_thread.run_sync(_viewer, pool, request, bearer, clock())
            except HTTPException:
                return
            checked = time.monotonic()
            yield ": heartbeat\n\n"
    except (psycopg.OperationalError, PoolTimeout) as exc:
        # The client reconnects with its Last-Event-ID and misses nothing.
        logger.warning("live feed: stream ended, database unavailable: %s", exc)


@router.get(
    "",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Events `incident`, `device`, `task` (and `reset`: reload your lists), "
            "each with `id:` for Last-Event-ID; a comment line every 15 s.",
        },
        401: {"description": "No valid bearer token or session cookie."},
    },
)
async def read_events(
    request: Request,
    now: Now,
    pool: PoolDep,
    listener: LiveFeedDep,
    heartbeat_s: Annotated[float, Depends(get_heartbeat_s)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    last_event_id: Annotated[
        int | None,
        Query(ge=0, description="Resume after this event id, for clients that cannot send Last-Event-ID."),
    ] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Stream changes of the incidents, devices and care tasks the token may see."""
    secret = None if bearer is None else bearer.credentials
    audience = await to_thread.run_sync(_viewer, pool, request, secret, now)
    position = _resume_position(last_event_id_header, last_event_id)
    cursor = await to_thread.run_sync(_start, pool) if position is None else position
    clock: Callable[[], datetime] = request.app.dependency_overrides.get(get_now, get_now)
    return StreamingResponse(
        _stream(
            listener=listener,
            pool=pool,
            request=request,
            bearer=secret,
            clock=clock,
            audience=audience,
            cursor=cursor,
            heartbeat_s=heartbeat_s,
        ),
        media_type="text/event-stream",
        # no-cache: never served from a cache; X-Accel-Buffering: nginx passes each event at once.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

