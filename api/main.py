"""The HTTP API: health checks, Prometheus metrics and the REST routes under ``/api/v1``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from fastapi import Depends, FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import shouhu
from alerts import aliyun_receipts
from alerts.receipts import ReceiptQueueCollector, ReceiptWorker
from alerts.response import ResponseCollector
from api import live
from api.consoles import pages
from api.deps import ERROR_RESPONSES, PoolDep, get_now, pooled, reject_unknown_query, tuple_rows
from api.fleet_metrics import FleetCollector
from api.limits import RequestLimits
from api.routes import (
    acknowledgements,
    aliyun,
    areas,
    callbacks,
    commands,
    devices,
    events,
    exports,
    incidents,
    maintenance,
    reports,
    residents,
    sessions,
    supervision,
    tasks,
    tokens,
    traccar,
    uptime,
)
from shouhu.db import Conn, open_pool
from shouhu.migrations import MIGRATIONS
from shouhu.settings import Settings

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 2.0
DATABASE_UNREACHABLE = "database unreachable"

REQUESTS = Counter(
    "shouhu_api_requests", "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
REQUEST_SECONDS = Histogram(
    "shouhu_api_request_duration_seconds", "Time to answer an HTTP request, by route template.",
    ["method", "route"],
)


class _MetricsMiddleware:
    """Counts and times requests, labelled by route template (not raw path: ids would
    make a label per resident)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The router writes the matched route into the shared scope; included
            # routers keep their own path, which is why they carry the full prefix.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            REQUESTS.labels(method, route, str(status_code)).inc()
            REQUEST_SECONDS.labels(method, route).observe(time.perf_counter() - start)


def _field_name(loc: tuple[Any, ...]) -> str:
    where, *path = loc
    name = ".".join(str(part) for part in path) or str(where)
    return f"{where} field {name!r}" if where == "body" else f"{where} parameter {name!r}"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """One readable sentence naming each bad field, plus the structured errors."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    message = "; ".join(f"{_field_name(tuple(e['loc']))}: {e['msg']}" for e in errors)
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={
            "detail": f"invalid request: {message}",
            "errors": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors],
        },
    )


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("database unavailable: %s", exc)
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": "the database is unavailable; try again shortly"},
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's own answer, except that a 405 lists every method the path allows.

    Each method of a path is its own route, and Starlette's 405 names only the first
    route's; a client (and RFC 9110) needs them all.
    """
    assert isinstance(exc, StarletteHTTPException)
    if request.url.path.startswith("/console/") and exc.status_code != status.HTTP_405_METHOD_NOT_ALLOWED:
        return pages.error_page(request, exc.status_code)
    if exc.status_code != status.HTTP_405_METHOD_NOT_ALLOWED:
        return await http_exception_handler(request, exc)
    allowed: set[str] = set()
    for route in request.app.routes:
        match, _child = route.matches({**request.scope, "method": "\x00"})
        if match is Match.PARTIAL:
            allowed |= set(getattr(route, "methods", None) or ())
    return JSONResponse(
        status_code=exc.status_code,
        content={"detail": f"{request.method} is not allowed here; use {', '.join(sorted(allowed))}"},
        headers={"Allow": ", ".join(sorted(allowed))},
    )


async def _login_required(request: Request, exc: Exception) -> Response:
    return RedirectResponse("/console/login", status_code=status.HTTP_303_SEE_OTHER)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
        content={"detail": "internal server error"},
    )


def readiness_problem(pool: ConnectionPool) -> str | None:
    """Why the API cannot serve yet, or ``None`` when the database answers and is migrated."""
    applied: set[int] = set()
    try:
        with (
            pool.connection(timeout=READY_TIMEOUT_S) as conn,
            conn.cursor(row_factory=tuple_row) as cur,
        ):
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            row = cur.fetchone()
            if row is not None and row[0]:
                cur.execute("SELECT version FROM schema_migrations")
                applied = {version for (version,) in cur.fetchall()}
    except (psycopg.Error, PoolTimeout) as exc:
        logger.warning("readiness: database unreachable: %s", exc)
        return DATABASE_UNREACHABLE
    missing = sorted(m.version for m in MIGRATIONS if m.version not in applied)
    if missing:
        versions = ", ".join(str(v) for v in missing)
        return f"database schema not migrated: missing migrations {versions}; run `shouhu migrate`"
    return None


class ReadinessCollector(Collector):
    """``shouhu_ready`` (as ``/readyz``) and ``shouhu_database_up``, then what ``readers`` read
    from the database, at each scrape.

    The readers run only when the database answered: while it is away a scrape costs
    one readiness check (``READY_TIMEOUT_S``), not a pool timeout per reader, and stays
    well inside Prometheus's scrape timeout, so ``shouhu_database_up 0`` is seen.
    """

    def __init__(self, pool: ConnectionPool, readers: Sequence[Collector]) -> None:
        self._pool = pool
        self._readers = tuple(readers)

    def describe(self) -> Iterator[Metric]:
        # Nothing: several apps in one process (tests) may each register one.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        problem = readiness_problem(self._pool)
        ready = GaugeMetricFamily("shouhu_ready", "1 while the process is ready (its /readyz answers 200), else 0")
        ready.add_metric([], 1.0 if problem is None else 0.0)
        database = GaugeMetricFamily("shouhu_database_up", "1 while the API's database answers, else 0")
        database.add_metric([], 0.0 if problem == DATABASE_UNREACHABLE else 1.0)
        yield from (ready, database)
        if problem != DATABASE_UNREACHABLE:
            for reader in self._readers:
                yield from reader.collect()


def _prune_once(pool: ConnectionPool, now: datetime) -> None:
    with pooled(pool) as conn:
        deleted = live.prune(conn, now)
    if deleted:
        logger.info("pruned %d live events", deleted)


async def _upkeep(pool: ConnectionPool) -> None:
    """Keeps the live-feed outbox to its retention window.

    Every API process does it; the deletes are idempotent, so several at once only
    repeat each other's work. (Sessions and sign-in codes are pruned with the other
    personal data by the hubs' retention pass, ``hub/retention.py``.)
    """
    while True:
        try:
            await run_in_threadpool(_prune_once, pool, datetime.now(UTC))
        except (psycopg.Error, PoolTimeout) as exc:
            logger.warning("live feed: pruning failed, retrying later: %s", exc)
        await asyncio.sleep(live.PRUNE_INTERVAL_S)


@contextlib.contextmanager
def _plain(pool: ConnectionPool) -> Iterator[Conn]:
    """A pooled connection reading plain tuples, for the domain code's reads."""
    with pooled(pool) as conn, tuple_rows(conn) as plain:
        yield plain


def _receipt_worker(app: FastAPI, database_url: str, settings: Settings) -> ReceiptWorker:
    """The API process's receipt worker, started: Aliyun's pushes are handled here, in every
    API process, because the process that takes them must be up for them to arrive at all
    (docs/contract.md, "Aliyun receipts"). It runs on the routes' clock."""
    worker = ReceiptWorker(
        database_url,
        functools.partial(aliyun_receipts.handle, resolve_timeout_s=settings.resolve_timeout_s),
        app.dependency_overrides.get(get_now, get_now),
        name="api-receipts",
    )
    worker.start()
    return worker


def _guard(app: FastAPI, settings: Settings) -> None:
    """The middleware every request passes and the one error shape for every failure."""
    # Limits first, before routing and authentication; metrics outside them, so a 413
    # or a refused NUL is counted too.
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.max_body_bytes,
        # Traccar's too: a NUL in some tracker's text attribute must not cost its SOS (the
        # route stores no text of Traccar's, api/routes/traccar.py).
        forgiven_paths=callbacks.CALLBACK_PATHS | {traccar.TRACCAR_CALLBACK_PATH},
        forgiven_prefixes=(aliyun.ALIYUN_CALLBACK_PREFIX,),
    )
    aliyun.redact_access_log()
    app.add_middleware(_MetricsMiddleware)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(pages.LoginRequired, _login_required)
    app.add_exception_handler(psycopg.OperationalError, _database_unavailable)
    app.add_exception_handler(PoolTimeout, _database_unavailable)
    app.add_exception_handler(Exception, _internal_error)


def create_app(settings: Settings) -> FastAPI:
    """The API application, with its connection pool opened and closed by the lifespan.

    ``settings`` is the one way in for configuration: routes, consoles and callbacks
    read it through ``api.deps.SettingsDep``, never from the environment. Build it at
    the entry point (``shouhu api``, ``shouhu up``), with ``database_url`` already
    resolved (the embedded database's, when that is the one in use). Among what is
    read: ``public_url`` and ``twilio_auth_token`` (where Twilio reaches the callbacks
    and how their signatures are checked; with no token every callback is refused),
    ``resolve_timeout_s``, ``timezone`` (the consoles' and the uptime route's local
    days) and ``max_body_bytes`` (every request body, before authentication,
    ``api/limits.py``).
    """
    database_url = settings.database_url
    if not database_url:
        raise ValueError("create_app needs settings.database_url resolved: the entry point finds the embedded one")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Runtime state, read through api.deps.get_pool and get_live_feed.
        pool = app.state.pool = open_pool(database_url, name="api")
        # Read at each scrape for /metrics: readiness, then the response figures and the fleet.
        readers = [
            ResponseCollector(lambda: _plain(pool)),
            FleetCollector(lambda: _plain(pool)),
            ReceiptQueueCollector(lambda: _plain(pool), lambda: datetime.now(UTC)),
        ]
        figures = ReadinessCollector(pool, readers)
        REGISTRY.register(figures)
        listener = app.state.live_feed = live.LiveFeedListener(database_url)
        receipts = _receipt_worker(app, database_url, settings)
        background = [
            asyncio.create_task(listener.run(), name="live-feed-listener"),
            asyncio.create_task(_upkeep(pool), name="live-feed-upkeep"),
        ]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            REGISTRY.unregister(figures)
            await run_in_threadpool(receipts.stop)
            await run_in_threadpool(traccar.close_publisher, app)
            await run_in_threadpool(pool.close)

    app = FastAPI(
        title="Shouhu API",
        version=shouhu.__version__,
        description="守护: elder-care SOS escalation and camera uptime.",
        lifespan=lifespan,
    )
    _guard(app, settings)

    @app.get("/healthz", tags=["health"])
    def read_health() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        responses={503: {"description": "The database is unreachable or not migrated."}},
    )
    def read_readiness(pool: PoolDep) -> JSONResponse:
        """Ready when the database answers and every migration is applied."""
        problem = readiness_problem(pool)
        if problem is not None:
            return JSONResponse(
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE, content={"detail": problem}
            )
        return JSONResponse(content={"status": "ready"})

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    def read_metrics() -> Response:
        """Prometheus metrics from the default registry."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/favicon.ico", include_in_schema=False)
    def read_favicon() -> FileResponse:
        """The consoles' icon: browsers ask for /favicon.ico whatever the page links, so the same SVG."""
        return FileResponse(pages.STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    # The routers carry the full /api/v1/... paths themselves, so the matched route's
    # path is the whole template the metrics label with.
    modules = (
        areas, devices, residents, incidents, acknowledgements, tasks, maintenance, tokens, uptime, events, sessions,
        reports, supervision, commands, exports,
    )
    for module in modules:
        app.include_router(module.router, responses=ERROR_RESPONSES, dependencies=[Depends(reject_unknown_query)])
    app.include_router(callbacks.router)
    app.include_router(aliyun.router)
    app.include_router(traccar.router)
    app.include_router(pages.router)
    app.mount("/console/static", StaticFiles(directory=pages.STATIC_DIR), name="console-static")
    app.state.settings = settings  # read through api.deps.get_settings only
    return app
