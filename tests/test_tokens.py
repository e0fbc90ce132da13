"""API bearer tokens against a real database: hashed at rest, expiring, revocable, area-bound."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from shouhu.accounts import Owner, OwnerKind
from shouhu.tokens import (
    TOKEN_PREFIX,
    Role,
    TokenIdentity,
    authenticate,
    create_token,
    revoke_token,
)
from tests.support.builders import SmallCounty, add_small_county

NOW = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def county(conn: psycopg.Connection[Any]) -> SmallCounty:
    return add_small_county(conn)


def _one(cursor: psycopg.Cursor[Any]) -> Any:
    row = cursor.fetchone()
    assert row is not None
    return row


def _token_rows(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT * FROM api_tokens").fetchall()


def test_secret_is_returned_and_only_its_hash_is_stored(
    conn: psycopg.Connection[Any], county: SmallCounty
) -> None:
    secret = create_token(
        conn, role=Role.GRID_WORKER, areas=[county.grid_a], label="Li Wei", now=NOW,
        expires_at=None,
    )
    assert secret.startswith(TOKEN_PREFIX)
    assert len(secret) >= len(TOKEN_PREFIX) + 43  # 32 random bytes, url-safe base64
    row = _one(conn.execute(
        "SELECT token_hash, role, areas, label, created_at, expires_at, revoked_at FROM api_tokens"
    ))
    assert bytes(row[0]) == hashlib.sha256(secret.encode()).digest()
    assert row[1:] == ("grid_worker", [county.grid_a], "Li Wei", NOW, None, None)
    whole_row = _one(conn.execute("SELECT t::text FROM api_tokens t"))[0]
    assert secret not in whole_row
    assert secret.removeprefix(TOKEN_PREFIX) not in whole_row


def test_each_token_is_different(conn: psycopg.Connection[Any]) -> None:
    secrets = {
        create_token(conn, role=Role.ADMIN, areas=[], label="", now=NOW, expires_at=None)
        for _ in range(5)
    }
    assert len(secrets) == 5
    assert len(_token_rows(conn)) == 5


def test_authenticate_returns_the_identity(
    conn: psycopg.Connection[Any], county: SmallCounty
) -> None:
    secret = create_token(
        conn, role="technician", areas=[county.grid_b, county.grid_a, county.grid_b],
        label="", now=NOW, expires_at=None,
    )
    identity = authenticate(conn, secret, NOW)
    token_id = _one(conn.execute("SELECT id FROM api_tokens"))[0]
    # Made with no owner, the token is its label's integration (or "<role> token").
    owner = Owner(OwnerKind.INTEGRATION, "technician token", "technician token")
    assert identity == TokenIdentity(
        id=token_id, role=Role.TECHNICIAN, areas=(county.grid_b, county.grid_a), owner=owner
    )
    assert isinstance(identity.role, Role)


def test_unknown_and_malformed_secrets_are_refused(conn: psycopg.Connection[Any]) -> None:
    secret = create_token(conn, role=Role.ADMIN, areas=[], label="", now=NOW, expires_at=None)
    assert authenticate(conn, secret, NOW) is not None
    for bad in (
        "",
        secret + "x",
        secret[:-1],
        secret.removeprefix(TOKEN_PREFIX),
        TOKEN_PREFIX + "A" * 43,
        TOKEN_PREFIX + "A" * 500,
    ):
        assert authenticate(conn, bad, NOW) is None, bad


def test_a_token_expires_at_its_expiry(conn: psycopg.Connection[Any]) -> None:
    expires = NOW + timedelta(hours=1)
    secret = create_token(conn, role=Role.OPERATOR, areas=[], label="", now=NOW, expires_at=expires)
    assert authenticate(conn, secret, NOW) is not None
    assert authenticate(conn, secret, expires - timedelta(seconds=1)) is not None
    assert authenticate(conn, secret, expires) is None
    assert authenticate(conn, secret, expires + timedelta(days=400)) is None


def test_a_token_without_expiry_keeps_working(conn: psycopg.Connection[Any]) -> None:
    secret = create_token(conn, role=Role.PLATFORM, areas=[], label="", now=NOW, expires_at=None)
    assert authenticate(conn, secret, NOW + timedelta(days=3650)) is not None


def test_a_revoked_token_is_refused(conn: psycopg.Connection[Any]) -> None:
    secret = create_token(conn, role=Role.ADMIN, areas=[], label="", now=NOW, expires_at=None)
    other = create_token(conn, role=Role.ADMIN, areas=[], label="", now=NOW, expires_at=None)
    identity = authenticate(conn, secret, NOW)
    assert identity is not None
    assert identity.id is not None
    revoked_at = NOW + timedelta(minutes=5)
    assert revoke_token(conn, identity.id, revoked_at) is True
    assert authenticate(conn, secret, revoked_at) is None
    assert authenticate(conn, other, revoked_at) is not None, "only the one token is revoked"
    stored = _one(conn.execute("SELECT revoked_at FROM api_tokens WHERE id = %s", (identity.id,)))
    assert stored[0] == revoked_at
    # Revoking again keeps the first time; an unknown id revokes nothing.
    assert revoke_token(conn, identity.id, revoked_at + timedelta(hours=1)) is False
    assert _one(conn.execute(
        "SELECT revoked_at FROM api_tokens WHERE id = %s", (identity.id,)
    ))[0] == revoked_at
    assert revoke_token(conn, 999_999, NOW) is False


def test_an_unknown_area_is_refused_by_name(
    conn: psycopg.Connection[Any], county: SmallCounty
) -> None:
    with pytest.raises(ValueError, match="'nowhere'"):
        create_token(
            conn, role=Role.GRID_WORKER, areas=[county.grid_a, "nowhere"], label="", now=NOW,
            expires_at=None,
        )
    assert _token_rows(conn) == []


def test_a_deactivated_area_is_refused_by_name(
    conn: psycopg.Connection[Any], county: SmallCounty
) -> None:
    conn.execute("UPDATE areas SET active = false WHERE id = %s", (county.grid_b,))
    with pytest.raises(ValueError, match=rf"'{county.grid_b}' is deactivated"):
        create_token(
            conn, role=Role.GRID_WORKER, areas=[county.grid_b], label="", now=NOW,
            expires_at=None,
        )
    assert _token_rows(conn) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "janitor"}, "janitor"),
        ({"now": NOW.replace(tzinfo=None)}, "timezone-aware"),
        ({"expires_at": NOW}, "after now"),
        ({"expires_at": (NOW + timedelta(days=1)).replace(tzinfo=None)}, "timezone-aware"),
    ],
)
def test_bad_arguments_are_refused(
    conn: psycopg.Connection[Any], kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {
        "role": Role.ADMIN, "areas": [], "label": "", "now": NOW, "expires_at": None,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        create_token(conn, **arguments)
    assert _token_rows(conn) == []


def test_works_on_dict_row_connections_and_inside_a_callers_transaction(
    database_url: str, county: SmallCounty
) -> None:
    # The API's pool hands out dict-row connections; the CLI a plain one it commits.
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        conn.execute("SELECT 1")  # the caller's transaction is open
        secret = create_token(
            conn, role=Role.ADMIN, areas=[county.county], label="", now=NOW, expires_at=None
        )
        identity = authenticate(conn, secret, NOW)
        assert identity is not None
        assert identity.areas == (county.county,)
        conn.rollback()
    with psycopg.connect(database_url) as conn:
        assert authenticate(conn, secret, NOW) is None, "the caller's rollback undoes it"
        kept = create_token(conn, role=Role.ADMIN, areas=[], label="", now=NOW, expires_at=None)
        conn.commit()
    with psycopg.connect(database_url) as conn:
        assert authenticate(conn, kept, NOW) is not None
