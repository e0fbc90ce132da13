"""Staff accounts: who a credential speaks for, and how staff sign in as themselves.

Staff of the registry sign in to the consoles with their phone number and a one-time
code sent by SMS, or (operators) with a password. This module owns
``staff_passwords``, ``sign_in_codes`` and ``sign_in_attempts``; it reads ``staff``,
which the registry owns. Sending the code is the caller's (the API has the SMS
provider); here the code is made, stored hashed, checked in constant time, and the
rate limits and lock-out are decided.

Every rule takes the clock as an argument, so tests drive expiry and lock-out.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from psycopg.rows import tuple_row

CODE_DIGITS = 6
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 200

# What each staff role is called after a name: "董思远（网格员）".
ROLE_WORDS: dict[str, str] = {
    "grid_worker": "网格员",
    "technician": "技术员",
    "operator": "综治中心",
    "duty_officer": "值班员",
    "guardian": "监护人",
}
# The token role a staff member's session has: a duty officer works as an operator
# of their areas. An admin is a token role only, given to an operator or duty officer.
SESSION_ROLE_OF_STAFF: dict[str, str] = {
    "grid_worker": "grid_worker",
    "technician": "technician",
    "operator": "operator",
    "duty_officer": "operator",
}
# Who may sign in with a password: the operators' second way in.
PASSWORD_ROLES = frozenset({"operator", "duty_officer"})

_HASHER = PasswordHasher()


def person_label(name: str, role: str) -> str:
    """How a person is named on timelines, notices, the live feed and the API: ``董思远（网格员）``."""
    word = ROLE_WORDS.get(role)
    return f"{name}（{word}）" if word else name


class OwnerKind(StrEnum):
    """Whom a token or session belongs to."""

    STAFF = "staff"
    INTEGRATION = "integration"


@dataclass(frozen=True, slots=True)
class Owner:
    """The person or integration behind a credential; ``key`` is what timelines record."""

    kind: OwnerKind
    id: str
    name: str
    """As shown: ``董思远（网格员）`` for staff, the integration's name for an integration."""

    @property
    def key(self) -> str:
        return f"{self.kind.value}:{self.id}"


@dataclass(frozen=True, slots=True)
class SignInRules:
    """The limits on signing in (``SHOUHU_SIGN_IN_*``)."""

    code_ttl: timedelta = timedelta(minutes=5)
    window: timedelta = timedelta(minutes=15)
    codes_per_phone: int = 3
    codes_per_ip: int = 10
    max_failures: int = 5
    lockout: timedelta = timedelta(minutes=15)
    failures_per_ip: int = 20


@dataclass(frozen=True, slots=True)
class StaffMember:
    id: str
    name: str
    role: str
    phone: str

    @property
    def owner(self) -> Owner:
        return Owner(OwnerKind.STAFF, self.id, person_label(self.name, self.role))


class SignInRefused(Exception):
    """Why a code was not sent or a sign-in failed; ``reason`` is one of the constants below."""

    RATE_LIMITED = "rate_limited"
    LOCKED = "locked"
    WRONG = "wrong"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def require_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


def find_staff(conn: psycopg.Connection[Any], who: str) -> StaffMember | None:
    """An active staff member by id or phone number (E.164, as the registry stores it)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            "SELECT id, name, role, phone FROM staff WHERE active AND (id = %(who)s OR phone = %(who)s)"
            " ORDER BY (id = %(who)s) DESC LIMIT 1",
            {"who": who.strip()},
        )
        row = cur.fetchone()
    return None if row is None else StaffMember(*row)


def _hash_code(salt: bytes, code: str) -> bytes:
    return hmac.new(salt, code.encode("ascii"), hashlib.sha256).digest()


def _record(
    conn: psycopg.Connection[Any], now: datetime, phone: str, staff: str | None, ip: str, kind: str, ok: bool
) -> None:
    conn.execute(
        "INSERT INTO sign_in_attempts (at, phone, staff_id, ip, kind, ok) VALUES (%s, %s, %s, %s, %s, %s)",
        (now, phone, staff, ip, kind, ok),
    )


def _count(conn: psycopg.Connection[Any], where: str, params: dict[str, Any]) -> int:
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT count(*) FROM sign_in_attempts WHERE " + where, params)
        row = cur.fetchone()
    return int(row[0]) if row else 0


def locked_until(conn: psycopg.Connection[Any], staff_id: str, now: datetime, rules: SignInRules) -> datetime | None:
    """When a lock-out of ``staff_id`` ends, or ``None`` if they may try now.

    ``max_failures`` wrong codes or passwords within ``window`` (none since a good
    sign-in) lock the account for ``lockout`` from the last of them.
    """
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            SELECT at FROM sign_in_attempts
            WHERE staff_id = %(staff)s AND kind <> 'code_request' AND NOT ok AND at <= %(now)s
              AND at > %(since)s
              AND at > coalesce((SELECT max(at) FROM sign_in_attempts
                                 WHERE staff_id = %(staff)s AND ok AND kind <> 'code_request'), '-infinity')
            ORDER BY at
            """,
            {"staff": staff_id, "now": now, "since": now - rules.window - rules.lockout},
        )
        failures: list[datetime] = [row[0] for row in cur.fetchall()]
    n = rules.max_failures
    for first, last in zip(failures, failures[n - 1 :], strict=False):
        if last - first <= rules.window and now < last + rules.lockout:
            return last + rules.lockout
    return None


@dataclass(frozen=True, slots=True)
class IssuedCode:
    """A code to send: ``code`` goes into the SMS and is stored nowhere."""

    staff: StaffMember
    code: str
    expires_at: datetime


def issue_code(
    conn: psycopg.Connection[Any], phone: str, ip: str, now: datetime, rules: SignInRules
) -> IssuedCode | None:
    """Make a one-time code for the active staff member with this phone, or ``None`` if there is none.

    The caller tells every asker the same thing either way, so a phone number that is
    nobody's is not disclosed; the request counts against the limits all the same.
    An earlier unused code of the same person stops working: only the newest is valid.

    Raises:
        SignInRefused: too many codes for this phone or from this address within the
            window, or the account is locked out.
    """
    require_aware("now", now)
    since = now - rules.window
    with conn.transaction():
        # One asker at a time per phone, so two quick requests cannot both pass the count.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 16))", (f"sign-in:{phone}",))
        recent = {"phone": phone, "ip": ip, "since": since, "now": now}
        if _count(conn, "phone = %(phone)s AND kind = 'code_request' AND at > %(since)s", recent) >= (
            rules.codes_per_phone
        ):
            raise SignInRefused(SignInRefused.RATE_LIMITED, "too many codes for this phone: try again later")
        if _count(conn, "ip = %(ip)s AND kind = 'code_request' AND at > %(since)s", recent) >= rules.codes_per_ip:
            raise SignInRefused(SignInRefused.RATE_LIMITED, "too many codes from this address: try again later")
        staff = find_staff(conn, phone)
        if staff is not None and staff.phone != phone.strip():
            staff = None  # codes go by phone number only, never by staff id
        _record(conn, now, phone, None if staff is None else staff.id, ip, "code_request", staff is not None)
        if staff is None:
            return None
        if locked_until(conn, staff.id, now, rules) is not None:
            raise SignInRefused(SignInRefused.LOCKED, "too many wrong codes or passwords: try again later")
        code = "".join(secrets.choice("0123456789") for _ in range(CODE_DIGITS))
        salt = secrets.token_bytes(16)
        conn.execute("UPDATE sign_in_codes SET used_at = %s WHERE staff_id = %s AND used_at IS NULL", (now, staff.id))
        conn.execute(
            "INSERT INTO sign_in_codes (staff_id, code_salt, code_hash, created_at, expires_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            (staff.id, salt, _hash_code(salt, code), now, now + rules.code_ttl),
        )
    return IssuedCode(staff, code, now + rules.code_ttl)


def _guard(conn: psycopg.Connection[Any], who: str, ip: str, now: datetime, rules: SignInRules) -> StaffMember | None:
    """The staff member behind ``who``, after the per-address and lock-out checks."""
    params = {"ip": ip, "since": now - rules.window}
    if _count(conn, "ip = %(ip)s AND kind <> 'code_request' AND NOT ok AND at > %(since)s", params) >= (
        rules.failures_per_ip
    ):
        raise SignInRefused(SignInRefused.RATE_LIMITED, "too many failed sign-ins from this address: try again later")
    staff = find_staff(conn, who)
    if staff is not None and locked_until(conn, staff.id, now, rules) is not None:
        raise SignInRefused(SignInRefused.LOCKED, "too many wrong codes or passwords: try again later")
    return staff


def sign_in_with_code(
    conn: psycopg.Connection[Any], phone: str, code: str, ip: str, now: datetime, rules: SignInRules
) -> StaffMember:
    """The staff member whose newest unused, unexpired code this is; the code is used up.

    Raises:
        SignInRefused: a wrong, expired or used code (or a phone that is nobody's), a
            lock-out, or too many failures from this address.
    """
    require_aware("now", now)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 16))", (f"sign-in:{phone}",))
        staff = _guard(conn, phone, ip, now, rules)
        row = None
        if staff is not None and staff.phone == phone.strip():
            with conn.cursor(row_factory=tuple_row) as cur:
                cur.execute(
                    """
                    SELECT id, code_salt, code_hash FROM sign_in_codes
                    WHERE staff_id = %s AND used_at IS NULL AND expires_at > %s AND created_at <= %s
                    ORDER BY created_at DESC, id DESC LIMIT 1
                    """,
                    (staff.id, now, now),
                )
                row = cur.fetchone()
        # Always one HMAC and one constant-time comparison, found or not.
        salt, stored = (bytes(row[1]), bytes(row[2])) if row else (b"\0" * 16, b"\0" * 32)
        good = hmac.compare_digest(_hash_code(salt, code.strip()[:16]), stored) and row is not None
        _record(conn, now, phone, None if staff is None else staff.id, ip, "code", good)
        if not good or staff is None or row is None:
            refused = SignInRefused(SignInRefused.WRONG, "the code is wrong, expired or already used")
        else:
            conn.execute("UPDATE sign_in_codes SET used_at = %s WHERE id = %s", (now, row[0]))
            return staff
    raise refused


def set_password(conn: psycopg.Connection[Any], staff_id: str, password: str, now: datetime) -> StaffMember:
    """Store an argon2id hash of ``password`` for an active operator or duty officer.

    Raises:
        ValueError: an unknown or inactive staff member, a role that signs in by code
            only, or a password shorter than ``MIN_PASSWORD_LENGTH``.
    """
    require_aware("now", now)
    staff = find_staff(conn, staff_id)
    if staff is None:
        raise ValueError(f"no active staff member {staff_id!r}")
    if staff.role not in PASSWORD_ROLES:
        raise ValueError(f"a {staff.role} signs in with a code sent to their phone, not a password")
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise ValueError(f"the password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters")
    conn.execute(
        """
        INSERT INTO staff_passwords (staff_id, password_hash, set_at) VALUES (%s, %s, %s)
        ON CONFLICT (staff_id) DO UPDATE SET password_hash = EXCLUDED.password_hash, set_at = EXCLUDED.set_at
        """,
        (staff.id, _HASHER.hash(password), now),
    )
    return staff


@functools.cache
def _dummy_hash() -> str:
    """Verified against when a person has no password, so an unknown phone costs as long.

    Made on first use, not at import: every verb imports this module, and a hash costs
    tens of milliseconds by design.
    """
    return _HASHER.hash(secrets.token_urlsafe(16))


def sign_in_with_password(
    conn: psycopg.Connection[Any], who: str, password: str, ip: str, now: datetime, rules: SignInRules
) -> StaffMember:
    """The operator or duty officer (by phone or staff id) whose password this is.

    Raises:
        SignInRefused: a wrong password, nobody by that phone or id, a lock-out, or
            too many failures from this address.
    """
    require_aware("now", now)
    with conn.transaction():
        staff = _guard(conn, who, ip, now, rules)
        stored = None
        if staff is not None and staff.role in PASSWORD_ROLES:
            with conn.cursor(row_factory=tuple_row) as cur:
                cur.execute("SELECT password_hash FROM staff_passwords WHERE staff_id = %s", (staff.id,))
                found = cur.fetchone()
                stored = None if found is None else str(found[0])
        try:
            good = _HASHER.verify(stored or _dummy_hash(), password) and stored is not None
        except (VerificationError, InvalidHashError):
            good = False
        _record(conn, now, who.strip(), None if staff is None else staff.id, ip, "password", good)
        if good and staff is not None:
            return staff
    raise SignInRefused(SignInRefused.WRONG, "the phone number or password is wrong")


def prune_sign_in(
    conn: psycopg.Connection[Any], now: datetime, *, keep: timedelta = timedelta(days=7), limit: int | None = None
) -> int:
    """Delete codes and attempts (phone numbers, client addresses) older than ``keep``, at most
    ``limit`` of each; the audit log keeps the sign-ins. Run by ``hub/retention.py``."""
    require_aware("now", now)
    params = {"cutoff": now - keep, "limit": limit}
    deleted = conn.execute(
        "DELETE FROM sign_in_codes WHERE id IN"
        " (SELECT id FROM sign_in_codes WHERE expires_at < %(cutoff)s ORDER BY id LIMIT %(limit)s)",
        params,
    ).rowcount
    deleted += conn.execute(
        "DELETE FROM sign_in_attempts WHERE id IN"
        " (SELECT id FROM sign_in_attempts WHERE at < %(cutoff)s ORDER BY at LIMIT %(limit)s)",
        params,
    ).rowcount
    return max(deleted, 0)
