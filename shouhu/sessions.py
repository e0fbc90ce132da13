"""Console sessions: a bearer token, or a staff member's code or password, exchanged for a
cookie, stored as SHA-256, expiring.

A browser's EventSource cannot send an Authorization header, and a token kept in a
page's script is a token any injected script can read; an HttpOnly cookie is
neither. The session is a second secret bound to the token that opened it, so
everything that ends the token (revocation, expiry) ends its sessions too; a session
a staff member opened is bound to them, and ends when the registry deactivates them.

The clock is passed in everywhere, so tests drive expiry instead of sleeping.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from shouhu.accounts import SESSION_ROLE_OF_STAFF, Owner, OwnerKind, StaffMember, person_label
from shouhu.tokens import (
    STAFF_AREAS_SQL,
    TOKEN_IDENTITY_SQL,
    Role,
    TokenIdentity,
    hash_secret,
    plausible_secret,
    require_aware,
    token_identity,
)

SESSION_PREFIX = "shs_"  # a recognisable prefix, not a secret
# A working day and a bit: a console logs in at the start of a shift.
SESSION_LIFETIME = timedelta(hours=12)


@dataclass(frozen=True, slots=True)
class SessionIdentity:
    """A valid session and the token it speaks for."""

    id: int
    token: TokenIdentity
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class NewSession:
    """A session just opened; ``secret`` goes into the cookie and is stored nowhere."""

    id: int
    secret: str
    expires_at: datetime


def open_session(
    conn: psycopg.Connection[Any],
    token: TokenIdentity,
    now: datetime,
    *,
    lifetime: timedelta = SESSION_LIFETIME,
) -> NewSession:
    """Store a new session for ``token``, ending at ``now + lifetime`` or the token's expiry if sooner.

    Raises:
        ValueError: a naive ``now``, or a token that is unknown or no longer valid.
    """
    require_aware("now", now)
    if token.id is None:
        raise ValueError("a session is opened with a token or by a staff member's sign-in, not from another session")
    secret = SESSION_PREFIX + secrets.token_urlsafe(32)
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            INSERT INTO api_sessions (session_hash, token_id, created_at, expires_at)
            SELECT %(hash)s, t.id, %(now)s, least(%(until)s, t.expires_at)
            FROM api_tokens t
            WHERE t.id = %(token)s AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > %(now)s)
            RETURNING id, expires_at
            """,
            {"hash": hash_secret(secret), "token": token.id, "now": now, "until": now + lifetime},
        )
        row = cur.fetchone()
    if row is None:
        raise ValueError(f"token {token.id} is unknown, expired or revoked")
    return NewSession(id=row[0], secret=secret, expires_at=row[1])


def open_staff_session(
    conn: psycopg.Connection[Any],
    staff: StaffMember,
    method: str,
    now: datetime,
    *,
    lifetime: timedelta = SESSION_LIFETIME,
) -> NewSession:
    """Store a new session for a staff member who signed in by ``method`` (``code`` or ``password``).

    Raises:
        ValueError: a naive ``now``, or a staff member who is unknown or inactive.
    """
    require_aware("now", now)
    secret = SESSION_PREFIX + secrets.token_urlsafe(32)
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            INSERT INTO api_sessions (session_hash, staff_id, method, created_at, expires_at)
            SELECT %(hash)s, s.id, %(method)s, %(now)s, %(until)s FROM staff s WHERE s.id = %(staff)s AND s.active
            RETURNING id, expires_at
            """,
            {"hash": hash_secret(secret), "staff": staff.id, "method": method, "now": now, "until": now + lifetime},
        )
        row = cur.fetchone()
    if row is None:
        raise ValueError(f"staff member {staff.id} is unknown or inactive")
    return NewSession(id=row[0], secret=secret, expires_at=row[1])


def authenticate_session(conn: psycopg.Connection[Any], secret: str, now: datetime) -> SessionIdentity | None:
    """The session behind ``secret``, or ``None`` if it is unknown, ended, expired, or its token is not valid."""
    require_aware("now", now)
    if not plausible_secret(secret, SESSION_PREFIX):
        return None
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            f"""
            SELECT x.id, x.expires_at, {TOKEN_IDENTITY_SQL}
            FROM api_sessions x JOIN api_tokens t ON t.id = x.token_id LEFT JOIN staff s ON s.id = t.staff_id
            WHERE x.session_hash = %(hash)s
              AND x.ended_at IS NULL AND x.expires_at > %(now)s
              AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > %(now)s)
              AND (t.staff_id IS NULL OR s.active)
            """,
            {"hash": hash_secret(secret), "now": now},
        )
        row = cur.fetchone()
        if row is not None:
            token = token_identity(row[2:])
            return None if token is None else SessionIdentity(row[0], token, row[1])
        cur.execute(
            f"""
            SELECT x.id, x.expires_at, s.id, s.name, s.role, {STAFF_AREAS_SQL}
            FROM api_sessions x JOIN staff s ON s.id = x.staff_id
            WHERE x.session_hash = %(hash)s AND x.ended_at IS NULL AND x.expires_at > %(now)s AND s.active
            """,
            {"hash": hash_secret(secret), "now": now},
        )
        found = cur.fetchone()
    if found is None or found[5] is None:
        return None
    session_id, expires_at, staff_id, name, staff_role, areas = found
    owner = Owner(OwnerKind.STAFF, staff_id, person_label(name, staff_role))
    identity = TokenIdentity(id=None, role=Role(SESSION_ROLE_OF_STAFF[staff_role]), areas=tuple(areas), owner=owner)
    return SessionIdentity(session_id, identity, expires_at)


def end_session(conn: psycopg.Connection[Any], session_id: int, now: datetime) -> bool:
    """End a session from ``now`` on (logout); ``False`` if it had already ended."""
    require_aware("now", now)
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            "UPDATE api_sessions SET ended_at = %s WHERE id = %s AND ended_at IS NULL",
            (now, session_id),
        )
        return cur.rowcount == 1


def prune_sessions(
    conn: psycopg.Connection[Any], now: datetime, *, keep: timedelta = timedelta(days=7), limit: int | None = None
) -> int:
    """Delete sessions that expired or ended more than ``keep`` ago, at most ``limit``; returns how many.

    The audit log keeps the logins and logouts; a dead session row only costs space
    (and names who was signed in, when: SHOUHU_SESSION_DAYS, run by ``hub/retention.py``).
    """
    require_aware("now", now)
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            DELETE FROM api_sessions WHERE id IN (
                SELECT id FROM api_sessions WHERE least(expires_at, coalesce(ended_at, expires_at)) < %(cutoff)s
                ORDER BY id LIMIT %(limit)s)
            """,
            {"cutoff": now - keep, "limit": limit},
        )
        return cur.rowcount
