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
    """Who a valid bearer token speaks for. No areas means the whole county."""

    id: int
    role: Role
    areas: tuple[str, ...]


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

    Raises:
        ValueError: an unknown role, an area that does not exist or is deactivated,
            a naive time, or an expiry not after ``now``.
    """
    parsed_role = Role(role)
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
            INSERT INTO api_tokens (token_hash, role, areas, label, created_at, expires_at)
            VALUES (%s, %s, %s, %s, %s, %s)
            """,
            (hash_secret(secret), parsed_role.value, wanted, label, now, expires_at),
        )
    return secret


def authenticate(conn: psycopg.Connection[Any], secret: str, now: datetime) -> TokenIdentity | None:
    """The identity behind ``secret``, or ``None`` if it is unknown, expired or revoked."""
    require_aware("now", now)
    if not plausible_secret(secret, TOKEN_PREFIX):
        return None
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            SELECT id, role, areas FROM api_tokens
            WHERE token_hash = %s
              AND revoked_at IS NULL
              AND (expires_at IS NULL OR expires_at > %s)
            """,
            (hash_secret(secret), now),
        )
        row = cur.fetchone()
    if row is None:
        return None
    token_id, role, areas = row
    return TokenIdentity(id=token_id, role=Role(role), areas=tuple(areas))


def revoke_token(conn: psycopg.Connection[Any], token_id: int, now: datetime) -> bool:
    """Revoke a token from ``now`` on; ``False`` if it is unknown or already revoked."""
    require_aware("now", now)
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            "UPDATE api_tokens SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
            (now, token_id),
        )
        return cur.rowcount == 1
