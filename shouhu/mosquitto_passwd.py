"""Mosquitto's password file format, written without ``mosquitto_passwd``.

Mosquitto 2.0 stores ``user:$7$<iterations>$<salt>$<hash>``: PBKDF2-HMAC-SHA512 over
the password with a 12-byte salt, 64 bytes of output, both base64 (standard alphabet,
padded), 101 iterations as ``mosquitto_passwd`` 2.0 writes them. The broker reads any
iteration count from the line; the count is its, per connect, so it stays small.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

SALT_BYTES = 12
HASH_BYTES = 64
ITERATIONS = 101


def password_line(user: str, password: str, salt: bytes, iterations: int = ITERATIONS) -> str:
    """One line of a Mosquitto 2.0 password file (without its newline)."""
    if ":" in user or "\n" in user:
        raise ValueError(f"user name {user!r} cannot be in a password file (':' or a line break)")
    if len(salt) != SALT_BYTES:
        raise ValueError(f"the salt must be {SALT_BYTES} bytes")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def line_matches(line: str, user: str, password: str) -> bool:
    """Whether ``line`` (as ``mosquitto_passwd`` writes it) accepts ``user`` with ``password``."""
    name, _, stored = line.strip().partition(":")
    parts = stored.split("$")
    if name != user or len(parts) != 5 or parts[1] != "7":
        return False
    salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(expected))
    return hmac.compare_digest(digest, expected)
