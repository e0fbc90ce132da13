"""Console login: a bearer token exchanged for an HttpOnly session cookie, and logout."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Cookie, Request, Response, status
from pydantic import BaseModel, Field

from api.deps import API_PREFIX, SESSION_COOKIE, ConnDep, Now, require_same_origin, unauthorized, write_audit
from shouhu.sessions import authenticate_session, end_session, open_session
from shouhu.tokens import Role, authenticate

router = APIRouter(prefix=f"{API_PREFIX}/session", tags=["session"])


class SessionCreate(BaseModel):
    token: str = Field(
        min_length=1, max_length=200, description="A token printed by `shouhu token create`; it is not stored."
    )


class SessionPublic(BaseModel):
    role: Role
    areas: list[str]
    """The areas the session sees (with their descendants); empty for the whole county."""
    expires_at: datetime
    """Twelve hours after login, or the token's own expiry if sooner."""


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={401: {"description": "The token is unknown, expired or revoked."}},
)
def create_session(body: SessionCreate, request: Request, response: Response, conn: ConnDep, now: Now) -> SessionPublic:
    """Log a console in: set the session cookie for a valid token."""
    token = authenticate(conn, body.token, now)
    if token is None:
        raise unauthorized("the token is unknown, expired or revoked")
    with conn.transaction():
        session = open_session(conn, token, now)
        write_audit(conn, token, now, "login", f"session:{session.id}", {"expires_at": session.expires_at.isoformat()})
    response.set_cookie(
        SESSION_COOKIE,
        session.secret,
        max_age=max(0, int((session.expires_at - now).total_seconds())),
        path="/",
        httponly=True,
        samesite="strict",
        # Behind a TLS proxy, uvicorn's --proxy-headers makes the scheme https here.
        secure=request.url.scheme == "https",
    )
    return SessionPublic(role=token.role, areas=list(token.areas), expires_at=session.expires_at)


@router.delete(
    "",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        401: {"description": "No valid session cookie."},
        403: {"description": "The request came from another site."},
    },
)
def delete_session(
    request: Request,
    conn: ConnDep,
    now: Now,
    cookie: Annotated[str | None, Cookie(alias=SESSION_COOKIE)] = None,
) -> Response:
    """Log a console out: end its session and clear the cookie."""
    session = None if cookie is None else authenticate_session(conn, cookie, now)
    if session is None:
        raise unauthorized("no session to end: the cookie is missing, ended or expired")
    require_same_origin(request)
    with conn.transaction():
        end_session(conn, session.id, now)
        write_audit(conn, session.token, now, "logout", f"session:{session.id}", {})
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https"
    )
    return response
