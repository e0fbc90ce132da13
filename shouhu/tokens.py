"""API bearer tokens: made by ``shouhu token create``, stored as SHA-256, expiring, revocable.

The secret is 256 random bits, so a fast unsalted hash is enough: nothing can be
guessed from it, and a lookup by hash is one index probe. The secret itself is shown
once, when it is made, and never stored.

The clock is passed in everywhere, so tests drive expiry instead of sleeping.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from shouhu.accounts import PASSWORD_ROLES, SESSION_ROLE_OF_STAFF, Owner, OwnerKind, find_staff, person_label

TOKEN_PREFIX = "shh_"  # noqa: S105 (a recognisable prefix, not a secret)
# token_urlsafe(32) is 43 characters; anything much longer is not one of ours, and
# refusing it early keeps a hostile header from costing a hash and a query.
_MAX_SECRET_LENGTH = 128


class Role(StrEnum):
    """What a token may do; stored in ``api_tokens.role``."""

    ADMIN = "admin"
    OPERATOR = "operator"  # 综治中心
    GRID_WORKER = "grid_worker"  # 网格员
    TECHNICIAN = "technician"  # 雪亮工程 camera repair
    PLATFORM = "platform"  # the emergency call platform


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """Who a valid bearer token or console session speaks for. No areas means the whole county.

    ``id`` is the token's; a session a staff member opened with a code or password
    has none. ``owner`` is the person or integration that acts.
    """

    id: int | None
    role: Role
    areas: tuple[str, ...]
    owner: Owner


# A staff member's credentials see the areas the registry gives them now; one given
# the county itself (an area without a parent) sees everything. No areas at all: no
# access (NULL), never the whole county by accident.
STAFF_AREAS_SQL = """
    (SELECT CASE WHEN bool_or(a.parent_id IS NULL) THEN '{}'::text[]
                 ELSE array_agg(sa.area_id ORDER BY sa.area_id) END
     FROM staff_areas sa JOIN areas a ON a.id = sa.area_id WHERE sa.staff_id = s.id)
"""
# Joined to ``api_tokens t`` (and ``staff s`` on t.staff_id): the token's identity columns.
TOKEN_IDENTITY_SQL = f"""
    t.id, t.role,
    CASE WHEN t.staff_id IS NULL THEN t.areas ELSE {STAFF_AREAS_SQL} END AS areas,
    t.staff_id, coalesce(t.integration, ''), s.name, s.role AS staff_role
"""


def token_identity(row: tuple[Any, ...]) -> TokenIdentity | None:
    """The identity from ``TOKEN_IDENTITY_SQL``'s columns; ``None`` for staff without areas."""
    token_id, role, areas, staff_id, integration, staff_name, staff_role = row
    if areas is None:
        return None
    if staff_id is not None:
        owner = Owner(OwnerKind.STAFF, staff_id, person_label(staff_name, staff_role))
    else:
        owner = Owner(OwnerKind.INTEGRATION, integration, integration)
    return TokenIdentity(id=token_id, role=Role(role), areas=tuple(areas), owner=owner)


def staff_token_role(staff_role: str, wanted: Role | str | None) -> Role:
    """The role of a staff member's token: their own, or admin for an operator or duty officer.

    Raises:
        ValueError: any other role.
    """
    own = Role(SESSION_ROLE_OF_STAFF[staff_role])
    if wanted is None or Role(wanted) is own:
        return own
    if Role(wanted) is Role.ADMIN and staff_role in PASSWORD_ROLES:
        return Role.ADMIN
    raise ValueError(f"a {staff_role}'s token has role {own.value} (or admin for operators and duty officers)")


def hash_secret(secret: str) -> bytes:
    """The SHA-256 digest stored in ``api_tokens.token_hash``."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def plausible_secret(secret: str, prefix: str) -> bool:
    """Whether ``secret`` could be one of ours, checked before it costs a hash and a query."""
    return secret.startswith(prefix) and len(secret) <= _MAX_SECRET_LENGTH


def require_aware(name: str, value: datetime) -> None:
    """Refuse a naive time: compared with stored timestamptz it would shift by the server's zone."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


def create_token(
    conn: psycopg.Connection[Any],
    *,
    role: Role | str,
    areas: Sequence[str],
    label: str,
    now: datetime,
    expires_at: datetime | None,
    staff: str | None = None,
    integration: str | None = None,
) -> str:
    """Store a new token and return its secret, which is not kept anywhere.

    Args:
        conn: any psycopg connection; the insert runs in its own transaction (or a
            savepoint of the caller's).
        role: the token's role.
        areas: area ids the token is bound to, each with its descendants; empty for
            the whole county.
        label: who or what the token is for.
        now: the current time (timezone-aware).
        expires_at: when the token stops working; ``None`` for never.
        staff: the staff member (id or phone) it belongs to: it sees their areas in
            the registry, and ``areas`` must be empty; ``role`` must be theirs (or admin
            for an operator or duty officer).
        integration: the named integration it belongs to (the emergency platform, a
            script). With neither, the token belongs to the integration its ``label``
            names (or ``"<role> token"``).

    Raises:
        ValueError: an unknown role, an area that does not exist or is deactivated,
            a naive time, an expiry not after ``now``, both or an unknown owner.
    """
    parsed_role = Role(role)
    staff_id: str | None = None
    if staff is not None and integration is not None:
        raise ValueError("a token belongs to a staff member or to an integration, not both")
    if staff is not None:
        member = find_staff(conn, staff)
        if member is None:
            raise ValueError(f"no active staff member {staff!r}")
        if areas:
            raise ValueError("a staff member's token sees their areas in the registry: give no areas")
        parsed_role = staff_token_role(member.role, parsed_role)
        staff_id = member.id
        label = label or member.name
    elif integration is not None:
        integration = integration.strip()
        if not integration:
            raise ValueError("the integration needs a name")
    else:
        integration = label.strip() or f"{parsed_role.value} token"
    require_aware("now", now)
    if expires_at is not None:
        require_aware("expires_at", expires_at)
        if expires_at <= now:
            raise ValueError("expires_at must be after now")
    wanted = list(dict.fromkeys(areas))
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT id, active FROM areas WHERE id = ANY(%s)", (wanted,))
        active: dict[str, bool] = dict(cur.fetchall())
        for area_id in wanted:
            if area_id not in active:
                raise ValueError(f"area {area_id!r} does not exist")
            if not active[area_id]:
                raise ValueError(f"area {area_id!r} is deactivated")
        cur.execute(
            """
            INSERT INTO api_tokens (token_hash, role, areas, label, created_at, expires_at, staff_id, integration)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
            """,
            (hash_secret(secret), parsed_role.value, wanted, label, now, expires_at, staff_id, integration),
        )
    return secret


def authenticate(conn: psycopg.Connection[Any], secret: str, now: datetime) -> TokenIdentity | None:
    """The identity behind ``secret``, or ``None`` if it is unknown, expired or revoked."""
    require_aware("now", now)
    if not plausible_secret(secret, TOKEN_PREFIX):
        return None
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            f"""
            SELECT {TOKEN_IDENTITY_SQL}
            FROM api_tokens t LEFT JOIN staff s ON s.id = t.staff_id
            WHERE t.token_hash = %s
              AND t.revoked_at IS NULL
              AND (t.expires_at IS NULL OR t.expires_at > %s)
              AND (t.staff_id IS NULL OR s.active)
            """,
            (hash_secret(secret), now),
        )
        row = cur.fetchone()
    return None if row is None else token_identity(row)


def revoke_token(conn: psycopg.Connection[Any], token_id: int, now: datetime) -> bool:
    """Revoke a token from ``now`` on; ``False`` if it is unknown or already revoked."""
    require_aware("now", now)
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            "UPDATE api_tokens SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
            (now, token_id),
        )
        return cur.rowcount == 1
