"""Console login and logout: a bearer token, or a staff member's phone and one-time code (or
password), exchanged for an HttpOnly session cookie.

The code goes out by SMS through the configured provider (``SHOUHU_TWILIO_*``; in the
demo, the phone-network simulator prints it). Asking for a code answers alike whether
or not the number is a staff member's, so the route tells nobody who works here.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Cookie, HTTPException, Request, Response, status
from pydantic import BaseModel, Field, model_validator

from alerts.notifiers.base import SendOutcome
from alerts.notifiers.twilio import TwilioNotifier
from api.deps import (
    API_PREFIX,
    SESSION_COOKIE,
    ConnDep,
    Now,
    SettingsDep,
    require_same_origin,
    unauthorized,
    write_audit,
)
from shouhu.accounts import (
    OwnerKind,
    SignInRefused,
    SignInRules,
    StaffMember,
    issue_code,
    sign_in_with_code,
    sign_in_with_password,
)
from shouhu.sessions import NewSession, authenticate_session, end_session, open_session, open_staff_session
from shouhu.settings import Settings
from shouhu.tokens import Role, TokenIdentity, authenticate

log = logging.getLogger(__name__)

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
    name: str
    """Who is signed in, as timelines and notices name them: ``董思远（网格员）``, or the integration's name."""
    staff_id: str | None
    """The staff member signed in, or null for an integration's token."""


Phone = Annotated[
    str, Field(min_length=3, max_length=32, pattern=r"^\+?[0-9 ]+$", description="E.164, as in the registry.")
]


class CodeCreate(BaseModel):
    phone: Phone


class CodeSentPublic(BaseModel):
    sent: bool
    """Always true: the answer is the same whether or not the number is a staff member's."""
    expires_in_s: int
    """How long a code works (``SHOUHU_SIGN_IN_CODE_TTL_S``)."""


class SignInCreate(BaseModel):
    phone: str = Field(
        min_length=1, max_length=100, description="The phone number (E.164) or, with a password, the staff id."
    )
    code: str | None = Field(default=None, min_length=1, max_length=16, description="The code sent by SMS.")
    password: str | None = Field(default=None, min_length=1, max_length=200, description="Operators only.")

    @model_validator(mode="after")
    def _one_secret(self) -> SignInCreate:
        if (self.code is None) == (self.password is None):
            raise ValueError("give either 'code' or 'password'")
        return self


def sign_in_rules(settings: Settings) -> SignInRules:
    """The ``SHOUHU_SIGN_IN_*`` settings as the rules ``shouhu.accounts`` applies."""
    return SignInRules(
        code_ttl=timedelta(seconds=settings.sign_in_code_ttl_s),
        window=timedelta(seconds=settings.sign_in_window_s),
        codes_per_phone=settings.sign_in_codes_per_phone,
        codes_per_ip=settings.sign_in_codes_per_ip,
        max_failures=settings.sign_in_max_failures,
        lockout=timedelta(seconds=settings.sign_in_lockout_s),
    )


def client_address(request: Request) -> str:
    """The client's address (behind a proxy, uvicorn's --proxy-headers puts the forwarded one here)."""
    return request.client.host if request.client else "unknown"


def _refused(exc: SignInRefused, settings: Settings) -> HTTPException:
    wait = settings.sign_in_lockout_s if exc.reason == SignInRefused.LOCKED else settings.sign_in_window_s
    return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(exc), headers={"Retry-After": str(wait)})


def set_session_cookie(request: Request, response: Response, session: NewSession, now: datetime) -> None:
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


def _public(identity: TokenIdentity, session: NewSession) -> SessionPublic:
    return SessionPublic(
        role=identity.role,
        areas=list(identity.areas),
        expires_at=session.expires_at,
        name=identity.owner.name,
        staff_id=identity.owner.id if identity.owner.kind is OwnerKind.STAFF else None,
    )


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
    set_session_cookie(request, response, session, now)
    return _public(token, session)


@router.post(
    "/code",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        429: {"description": "Too many codes for this phone or from this address, or the account is locked out."},
        503: {"description": "No SMS provider is configured, or it refused the message."},
    },
)
def create_sign_in_code(
    body: CodeCreate, request: Request, conn: ConnDep, now: Now, settings: SettingsDep
) -> CodeSentPublic:
    """Text a one-time sign-in code to a staff member's phone (the same answer for any number)."""
    if not (settings.twilio_account_sid and settings.twilio_auth_token and settings.twilio_from):
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "no SMS provider is configured (SHOUHU_TWILIO_*): sign in with a password or a token",
        )
    phone = body.phone.replace(" ", "")
    rules = sign_in_rules(settings)
    try:
        issued = issue_code(conn, phone, client_address(request), now, rules)
    except SignInRefused as exc:
        raise _refused(exc, settings) from exc
    if issued is not None:
        minutes = math.ceil(rules.code_ttl.total_seconds() / 60)
        text = f"【守护】登录验证码 {issued.code}，{minutes}分钟内有效，请勿告诉他人。"
        # The code is committed before the provider is called: no transaction waits on the network.
        result = TwilioNotifier.from_settings(settings).send_text(issued.staff.phone, text)
        if result.outcome is not SendOutcome.SENT:
            log.warning("sign-in code for %s not sent: %s", issued.staff.id, result.error)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the code could not be sent: try again shortly")
    return CodeSentPublic(sent=True, expires_in_s=int(rules.code_ttl.total_seconds()))


def sign_in(conn: ConnDep, body: SignInCreate, address: str, now: datetime, settings: Settings) -> StaffMember:
    """The staff member the code or password signs in, or a 401 / 429."""
    rules = sign_in_rules(settings)
    try:
        if body.code is not None:
            return sign_in_with_code(conn, body.phone.replace(" ", ""), body.code, address, now, rules)
        assert body.password is not None
        return sign_in_with_password(conn, body.phone.replace(" ", ""), body.password, address, now, rules)
    except SignInRefused as exc:
        if exc.reason == SignInRefused.WRONG:
            raise unauthorized(str(exc), "Cookie") from exc
        raise _refused(exc, settings) from exc


@router.post(
    "/sign-in",
    status_code=status.HTTP_201_CREATED,
    responses={
        401: {"description": "The code is wrong, expired or used, or the password is wrong."},
        429: {"description": "Locked out after repeated wrong codes or passwords, or too many from this address."},
    },
)
def create_staff_session(
    body: SignInCreate, request: Request, response: Response, conn: ConnDep, now: Now, settings: SettingsDep
) -> SessionPublic:
    """Sign a staff member in with their phone and the code texted to it (or an operator's password)."""
    staff = sign_in(conn, body, client_address(request), now, settings)
    method = "code" if body.code is not None else "password"
    with conn.transaction():
        session = open_staff_session(conn, staff, method, now)
        identity = authenticate_session(conn, session.secret, now)
        if identity is None:  # a staff member without areas in the registry
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"staff member {staff.id} has no areas in the registry")
        write_audit(
            conn,
            identity.token,
            now,
            "login",
            f"session:{session.id}",
            {"expires_at": session.expires_at.isoformat(), "method": method},
        )
    set_session_cookie(request, response, session, now)
    return _public(identity.token, session)


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
