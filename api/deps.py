"""Request dependencies: the settings, a pooled connection, the clock, the bearer token or session cookie,
the area scope.

Each request's connection runs in autocommit: every statement stands alone unless a
route opens ``conn.transaction()``, so a route fixes its own transaction boundaries
and has committed before it answers (a resident read and its audit row commit
together, inside the route, never after the response is sent).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, cast
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import psycopg
from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg.rows import DictRow, TupleRow, tuple_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from pydantic import AwareDatetime, BaseModel, BeforeValidator

from alerts.acknowledge import Actor
from api.access import AreaScope
from api.live import LiveFeedListener
from shouhu.accounts import OwnerKind
from shouhu.sessions import authenticate_session
from shouhu.settings import Settings
from shouhu.tokens import TokenIdentity, authenticate

API_PREFIX = "/api/v1"


class ErrorPublic(BaseModel):
    """Every error answer: one sentence that names the field, object or rule at fault."""

    detail: str
    errors: list[dict[str, Any]] | None = None
    """Request validation only: each bad field's location, message and type."""


def _error(description: str, example: str) -> dict[str, Any]:
    return {
        "model": ErrorPublic,
        "description": description,
        "content": {"application/json": {"example": {"detail": example}}},
    }


# The answers any route under the bearer token may give besides its own success.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("The body is not valid JSON.", "There was an error parsing the body"),
    401: _error("No bearer token or session, or it is unknown, expired or revoked.", "a bearer token is required"),
    403: _error("The token's role may not do this.", "a technician token cannot act on this incident"),
    404: _error("Unknown, or outside the token's areas: the two answer alike.", "incident '42' not found"),
    409: _error("The object's state does not allow it.", "incident 42 was already taken by 董思远"),
    422: _error("A field or parameter is invalid; the message names it.", "invalid request: query parameter 'limit'"),
    503: _error("The database is unavailable; try again shortly.", "the database is unavailable; try again shortly"),
}
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Past any list a county has, and inside PostgreSQL's bigint: a larger offset was a 500
# (found by tests/test_openapi_fuzz.py), now a 422 naming the field.
MAX_OFFSET = 1_000_000_000

# How long a request waits for a pooled connection before answering 503.
CONNECTION_TIMEOUT_S = 5.0

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _rfc3339_only(value: Any) -> Any:
    # pydantic would also take "0.5" or 1700000000 as Unix seconds; the contract says
    # RFC 3339 with an offset, and a number where a time belongs is a client's mistake.
    if not isinstance(value, datetime) and not (isinstance(value, str) and _RFC3339.match(value)):
        raise ValueError("must be an RFC 3339 time with an offset, e.g. 2026-11-24T10:00:00+08:00")
    return value


Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339_only)]
"""A timezone-aware time written as RFC 3339, in a query or a body."""

SESSION_COOKIE = "shouhu_session"
# Methods that change something: a cookie-authenticated one must pass the CSRF check.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="A token printed by `shouhu token create --role ROLE [--area AREA]`.",
)


def get_settings(request: Request) -> Settings:
    """The settings ``create_app`` was given: the API's one way in to its configuration."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_zone(settings: SettingsDep) -> ZoneInfo:
    """``SHOUHU_TIMEZONE``: where local days begin, for the consoles and the uptime route alike."""
    return settings.zone


Zone = Annotated[ZoneInfo, Depends(get_zone)]


def get_pool(request: Request) -> ConnectionPool:
    """The API's connection pool, opened by the lifespan."""
    pool: ConnectionPool = request.app.state.pool
    return pool


PoolDep = Annotated[ConnectionPool, Depends(get_pool)]


def get_live_feed(request: Request) -> LiveFeedListener:
    """The live feed's one LISTEN connection, opened by the lifespan."""
    listener: LiveFeedListener = request.app.state.live_feed
    return listener


LiveFeedDep = Annotated[LiveFeedListener, Depends(get_live_feed)]


@contextmanager
def pooled(pool: ConnectionPool) -> Iterator[psycopg.Connection[DictRow]]:
    """A pooled connection in autocommit, for as long as the ``with`` block."""
    with pool.connection(timeout=CONNECTION_TIMEOUT_S) as conn:
        conn.autocommit = True
        # shouhu.db.open_pool gives its connections dict rows.
        yield cast("psycopg.Connection[DictRow]", conn)


def get_connection(pool: PoolDep) -> Iterator[psycopg.Connection[DictRow]]:
    """A pooled connection for the request, in autocommit, returned when it ends."""
    with pooled(pool) as conn:
        yield conn


def get_now() -> datetime:
    """The request's clock; tests override this dependency to drive time."""
    return datetime.now(UTC)


ConnDep = Annotated[psycopg.Connection[DictRow], Depends(get_connection)]
Now = Annotated[datetime, Depends(get_now)]


def same_origin(request: Request) -> bool:
    """Whether the request's Origin (or, failing that, Referer) names the host it was sent to.

    Compared by host and port only: behind a TLS-terminating proxy the scheme the
    API sees is not the one the browser used.
    """
    source = request.headers.get("origin") or request.headers.get("referer")
    host = request.headers.get("host")
    if not source or source == "null" or not host:
        return False
    return urlsplit(source).netloc.lower() == host.lower()


def require_same_origin(request: Request) -> None:
    """Refuse a cookie-authenticated unsafe request from another site (CSRF).

    A browser attaches the cookie to a form posted from any site; SameSite=Strict
    already stops that in current browsers, and this check stops it everywhere.

    Raises:
        HTTPException: 403 when the method is unsafe and the origin does not match.
    """
    if request.method in UNSAFE_METHODS and not same_origin(request):
        host = request.headers.get("host", "this host")
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"a {request.method} authenticated by the session cookie must come from this site: "
            f"send an Origin (or Referer) header naming {host}, or use a bearer token",
        )


def unauthorized(detail: str, challenge: str = "Bearer") -> HTTPException:
    """A 401 with the ``WWW-Authenticate`` challenge HTTP requires of it."""
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge})


def identify(
    conn: psycopg.Connection[Any], request: Request, bearer: str | None, now: datetime
) -> TokenIdentity:
    """The token behind the request's bearer header or, without one, its session cookie.

    The bearer wins: a script that sends one means it, whatever cookie the browser adds.

    Raises:
        HTTPException: 401 when neither is present or valid; 403 for a cookie-only
            unsafe request from another site.
    """
    if bearer is not None:
        identity = authenticate(conn, bearer, now)
        if identity is None:
            raise unauthorized("the bearer token is unknown, expired or revoked", 'Bearer error="invalid_token"')
        return identity
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie is None:
        # The consoles know to log in; the message speaks to API clients, and stays as it was.
        raise unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    session = authenticate_session(conn, cookie, now)
    if session is None:
        raise unauthorized("the session has ended or expired, or its token was revoked: log in again")
    require_same_origin(request)
    return session.token


def get_current_token(
    request: Request,
    conn: ConnDep,
    now: Now,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> TokenIdentity:
    """The identity of the request's bearer token or session cookie; 401 when missing or not valid."""
    return identify(conn, request, None if credentials is None else credentials.credentials, now)


CurrentToken = Annotated[TokenIdentity, Depends(get_current_token)]


def area_subtree(conn: psycopg.Connection[DictRow], roots: list[str]) -> frozenset[str]:
    """The given areas and all their descendants, active or not."""
    rows = conn.execute(
        """
        WITH RECURSIVE subtree AS (
            SELECT id FROM areas WHERE id = ANY(%s)
            UNION
            SELECT a.id FROM areas a JOIN subtree s ON a.parent_id = s.id
        )
        SELECT id FROM subtree
        """,
        (roots,),
    ).fetchall()
    return frozenset(row["id"] for row in rows)


def area_filter(conn: psycopg.Connection[DictRow], scope: AreaScope, area: str | None) -> list[str] | None:
    """The areas an ``?area=`` filter means (the area and its descendants), or None for no filter.

    Raises:
        HTTPException: 404 when the area does not exist or lies outside the token's scope.
    """
    if area is None:
        return None
    exists = conn.execute("SELECT 1 FROM areas WHERE id = %s", (area,)).fetchone()
    if exists is None or not scope.allows(area):
        raise not_found("area", area)
    return sorted(area_subtree(conn, [area]))


def get_area_scope(conn: ConnDep, token: CurrentToken) -> AreaScope:
    """A token with areas sees them and their descendants; one without sees everything."""
    if not token.areas:
        return AreaScope(None)
    return AreaScope(area_subtree(conn, list(token.areas)))


Scope = Annotated[AreaScope, Depends(get_area_scope)]


def not_found(what: str, ident: str) -> HTTPException:
    """The one answer for unknown and out-of-scope objects, so neither is disclosed."""
    return HTTPException(status.HTTP_404_NOT_FOUND, f"{what} {ident!r} not found")


@dataclass(frozen=True, slots=True)
class Pagination:
    limit: int
    offset: int


def get_pagination(
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Most items to return.")] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")] = 0,
) -> Pagination:
    return Pagination(limit=limit, offset=offset)


Page = Annotated[Pagination, Depends(get_pagination)]


@contextmanager
def tuple_rows(conn: psycopg.Connection[DictRow]) -> Iterator[psycopg.Connection[TupleRow]]:
    """The same connection reading plain tuples, for the domain code in ``alerts/``.

    The API's pool hands out dict rows; the escalation code, shared with the hub and
    router, indexes tuples. The row factory is restored before the connection goes
    back to the pool.
    """
    previous = conn.row_factory
    conn.row_factory = tuple_row  # type: ignore[assignment]
    try:
        yield cast("psycopg.Connection[TupleRow]", conn)
    finally:
        conn.row_factory = previous


def token_actor(conn: psycopg.Connection[DictRow], token: TokenIdentity) -> Actor:
    """Whoever the token or session speaks for, as the one who acts on timelines and in notices.

    A staff member is the same actor whether they answer by phone or in a console
    (``staff:<id>``, named ``董思远（网格员）``); an integration is ``integration:<name>``.
    """
    owner = token.owner
    if owner.kind is OwnerKind.STAFF:
        row = conn.execute("SELECT name, phone, role FROM staff WHERE id = %s", (owner.id,)).fetchone()
        if row is not None:
            return Actor("staff", owner.id, row["name"], row["phone"], row["role"])
    return Actor(owner.kind.value, owner.id, owner.name, None, token.role.value)


def write_audit(
    conn: psycopg.Connection[DictRow],
    token: TokenIdentity,
    now: datetime,
    action: str,
    subject: str,
    detail: dict[str, Any],
) -> None:
    """One audit-log row naming who acted, in the caller's transaction."""
    conn.execute(
        "INSERT INTO audit_log (at, token_id, role, action, subject, detail, actor, actor_name)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (now, token.id, token.role.value, action, subject, Jsonb(detail), token.owner.key, token.owner.name),
    )


def _query_names(dependant: Any) -> set[str]:
    """The query parameters of a route, its dependencies' included (Page's limit and offset)."""
    names = {str(param.alias) for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def reject_unknown_query(request: Request) -> None:
    """422 for a query parameter the route does not take.

    A mistyped filter (``?stat=open``) would otherwise be ignored and the answer would
    look filtered when it is not — an operator could miss an open incident.
    """
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = _query_names(dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise HTTPException(
            422,
            f"invalid request: query parameter {unknown[0]!r} is not one this route takes"
            + (f" (it takes {', '.join(sorted(known))})" if known else " (it takes none)"),
        )
