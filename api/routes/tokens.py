"""API tokens for admins: make, list and revoke them; read the audit log.

The secret of a new token is shown once, in the reply that makes it; only its
SHA-256 is stored. An admin bound to areas makes tokens within those areas only. The
audit log spans the county, so only an admin with no area binding reads it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field

from api.access import TOKEN_ADMINS
from api.deps import (
    API_PREFIX,
    ConnDep,
    CurrentToken,
    Now,
    Page,
    Rfc3339,
    Scope,
    not_found,
    tuple_rows,
    write_audit,
)
from shouhu.tokens import Role, TokenIdentity, create_token, hash_secret, revoke_token

router = APIRouter(prefix=API_PREFIX, tags=["admin"])

MAX_TOKEN_DAYS = 3650


class TokenCreate(BaseModel):
    role: Role
    areas: list[str] = Field(
        default_factory=list, description="Bind to these areas and their descendants; empty: the whole county."
    )
    staff: str | None = Field(
        default=None,
        max_length=100,
        description="The staff member (id or phone) it belongs to; it sees their areas in the registry (no areas).",
    )
    integration: str | None = Field(
        default=None,
        max_length=200,
        description="The named integration it belongs to; without staff or integration, the label names it.",
    )
    label: str = Field(default="", max_length=200, description="Who or what it is for: shown on timelines.")
    expires_in_days: int = Field(default=365, ge=1, le=MAX_TOKEN_DAYS)

    model_config = {
        "json_schema_extra": {
            "examples": [{"role": "grid_worker", "areas": ["dongguan-01-g1"], "label": "董思远", "expires_in_days": 90}]
        }
    }


class TokenPublic(BaseModel):
    id: int
    role: Role
    areas: list[str]
    label: str
    staff_id: str | None
    """The staff member it belongs to, or null for an integration's token."""
    integration: str | None
    """The integration it belongs to, or null for a staff member's token."""
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    active: bool
    """Neither expired nor revoked."""


class TokenCreatedPublic(TokenPublic):
    secret: str
    """The bearer token. Shown this once: only its hash is kept."""


class TokensPublic(BaseModel):
    data: list[TokenPublic]
    count: int


class AuditEntryPublic(BaseModel):
    id: int
    at: datetime
    token_id: int | None
    role: str
    actor: str | None
    """Who acted: ``staff:<id>``, ``integration:<name>``, ``guardian:<id>``, ``registry``."""
    actor_name: str | None
    """The same, by name: ``董思远（网格员）``."""
    action: str
    """read_resident, acknowledge, resolve, task_start, task_close, token_create, …"""
    subject: str
    """What was acted on: ``resident:r-0001``, ``incident:42``, ``token:7``, …"""
    detail: dict[str, Any]


class AuditLogPublic(BaseModel):
    data: list[AuditEntryPublic]
    count: int


def _require_admin(token: TokenIdentity, *, county_wide: bool = False) -> None:
    if token.role not in TOKEN_ADMINS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot manage tokens")
    if county_wide and token.areas:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only an admin token for the whole county reads the audit log")


_SELECT_API_KEYS = """
    SELECT id, role, areas, label, staff_id, integration, created_at, expires_at, revoked_at,
           (revoked_at IS NULL AND (expires_at IS NULL OR expires_at > %(now)s)) AS active
    FROM api_tokens
"""


def _token_public(row: dict[str, Any]) -> TokenPublic:
    return TokenPublic(**{name: row[name] for name in TokenPublic.model_fields})


def _within(scope: Scope, areas: list[str]) -> bool:
    """Whether a token bound to ``areas`` (empty: everything) stays inside ``scope``."""
    if scope.area_ids is None:
        return True
    return bool(areas) and all(scope.allows(area) for area in areas)


@router.post("/tokens", status_code=status.HTTP_201_CREATED)
def create_api_token(
    conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, body: TokenCreate
) -> TokenCreatedPublic:
    """Make a token; its secret is in this reply only."""
    _require_admin(token)
    if not _within(scope, body.areas):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "body field 'areas': an admin bound to areas makes tokens within them only"
        )
    with conn.transaction():
        with tuple_rows(conn) as plain:
            try:
                secret = create_token(
                    plain,
                    role=body.role,
                    areas=body.areas,
                    label=body.label,
                    now=now,
                    expires_at=now + timedelta(days=body.expires_in_days),
                    staff=body.staff,
                    integration=body.integration,
                )
            except ValueError as exc:
                field = "staff" if body.staff is not None and "area" not in str(exc) else "areas"
                raise HTTPException(422, f"body field {field!r}: {exc}") from exc
        row = conn.execute(_SELECT_API_KEYS + " WHERE token_hash = %(hash)s", {"hash": hash_secret(secret), "now": now})
        created = row.fetchone()
        assert created is not None
        write_audit(
            conn,
            token,
            now,
            "token_create",
            f"token:{created['id']}",
            {
                "role": created["role"],
                "areas": body.areas,
                "label": body.label,
                "staff_id": created["staff_id"],
                "integration": created["integration"],
            },
        )
    return TokenCreatedPublic(**_token_public(created).model_dump(), secret=secret)


@router.get("/tokens")
def read_api_tokens(
    *,
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
    page: Page,
    now: Now,
    role: Annotated[Role | None, Query()] = None,
    active: Annotated[
        bool | None, Query(description="true: only usable tokens; false: only expired or revoked.")
    ] = None,
) -> TokensPublic:
    """Tokens (never their secrets), newest first; an admin bound to areas sees tokens within them."""
    _require_admin(token)
    rows = conn.execute(
        _SELECT_API_KEYS + " WHERE (%(role)s::text IS NULL OR role = %(role)s) ORDER BY id DESC",
        {"now": now, "role": role.value if role else None},
    ).fetchall()
    visible = [r for r in rows if _within(scope, list(r["areas"])) and (active is None or r["active"] is active)]
    return TokensPublic(
        data=[_token_public(r) for r in visible[page.offset : page.offset + page.limit]], count=len(visible)
    )


@router.delete("/tokens/{token_id}")
def revoke_api_token(conn: ConnDep, token: CurrentToken, scope: Scope, now: Now, token_id: int) -> TokenPublic:
    """Revoke a token from now on; its console sessions end with it."""
    _require_admin(token)
    row = conn.execute(_SELECT_API_KEYS + " WHERE id = %(id)s", {"id": token_id, "now": now}).fetchone()
    if row is None or not _within(scope, list(row["areas"])):
        raise not_found("token", str(token_id))
    if row["revoked_at"] is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"token {token_id} is already revoked")
    with conn.transaction():
        with tuple_rows(conn) as plain:
            revoke_token(plain, token_id, now)
        write_audit(conn, token, now, "token_revoke", f"token:{token_id}", {})
    revoked = conn.execute(_SELECT_API_KEYS + " WHERE id = %(id)s", {"id": token_id, "now": now}).fetchone()
    assert revoked is not None
    return _token_public(revoked)


@router.get("/audit")
def read_audit_log(
    *,
    conn: ConnDep,
    token: CurrentToken,
    page: Page,
    action: Annotated[str | None, Query(description="e.g. read_resident, acknowledge, token_create")] = None,
    subject: Annotated[str | None, Query(description="e.g. resident:r-0001 or incident:42")] = None,
    token_id: Annotated[int | None, Query(description="Only what this token did.")] = None,
    since: Annotated[Rfc3339 | None, Query(alias="from")] = None,
    until: Annotated[Rfc3339 | None, Query(alias="to")] = None,
) -> AuditLogPublic:
    """Who read which resident and who took or closed what, newest first (admins for the whole county)."""
    _require_admin(token, county_wide=True)
    if since is not None and until is not None and since >= until:
        raise HTTPException(422, "query parameter 'from' must be before 'to'")
    where = """
        WHERE (%(action)s::text IS NULL OR action = %(action)s)
          AND (%(subject)s::text IS NULL OR subject = %(subject)s)
          AND (%(token_id)s::bigint IS NULL OR token_id = %(token_id)s)
          AND (%(since)s::timestamptz IS NULL OR at >= %(since)s)
          AND (%(until)s::timestamptz IS NULL OR at < %(until)s)
    """
    params = {
        "action": action,
        "subject": subject,
        "token_id": token_id,
        "since": since,
        "until": until,
        "limit": page.limit,
        "offset": page.offset,
    }
    rows = conn.execute(
        "SELECT id, at, token_id, role, actor, actor_name, action, subject, detail FROM audit_log"
        + where
        + " ORDER BY at DESC, id DESC LIMIT %(limit)s OFFSET %(offset)s",
        params,
    ).fetchall()
    count = conn.execute("SELECT count(*) AS n FROM audit_log" + where, params).fetchone()
    return AuditLogPublic(data=[AuditEntryPublic(**r) for r in rows], count=count["n"] if count else 0)
