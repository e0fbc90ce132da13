"""Aliyun's request signature, V3 (``ACS3-HMAC-SHA256``), checked the way Aliyun's gateway does.

The official SDKs (``alibabacloud-tea-openapi`` 0.4) sign every request so: a canonical
request — method, path, the query sorted by name with each value percent-encoded
(RFC 3986, ``~`` left alone), the signed headers lower-cased and sorted as
``name:value`` lines, their names joined by ``;``, and the hex SHA-256 of the body —
is hashed with SHA-256; the string ``ACS3-HMAC-SHA256\\n<that hash in hex>`` is signed
with HMAC-SHA256 under the AccessKey secret; the header is
``Authorization: ACS3-HMAC-SHA256 Credential=<id>,SignedHeaders=<names>,Signature=<hex>``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

ALGORITHM = "ACS3-HMAC-SHA256"


@dataclass(frozen=True, slots=True)
class Authorization:
    """The parts of an ``Authorization`` header."""

    access_key_id: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(header: str) -> Authorization | None:
    """The header's parts, or None when it is not an ``ACS3-HMAC-SHA256`` authorization."""
    algorithm, _, rest = header.strip().partition(" ")
    if algorithm != ALGORITHM:
        return None
    parts: dict[str, str] = {}
    for part in rest.split(","):
        name, _, value = part.strip().partition("=")
        parts[name] = value
    if not parts.get("Credential") or not parts.get("Signature") or "SignedHeaders" not in parts:
        return None
    names = tuple(name for name in parts["SignedHeaders"].split(";") if name)
    return Authorization(parts["Credential"], names, parts["Signature"])


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """The query, sorted by name, each value percent-encoded with only ``~`` kept (as the SDK signs it)."""
    query = dict(pairs)  # a repeated name keeps its last value, as the SDK's map would
    return "&".join(f"{name}={quote(query[name], safe='~')}" for name in sorted(query))


def canonical_headers(headers: dict[str, list[str]], names: Iterable[str]) -> str:
    """``name:value`` lines of the signed headers; several values of one name sorted and joined by commas."""
    lines = []
    for name in sorted(names):
        values = sorted(value.strip() for value in headers.get(name, []))
        lines.append(f"{name}:{','.join(values)}\n")
    return "".join(lines)


def signature(
    secret: str,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: dict[str, list[str]],
    signed_headers: Iterable[str],
    body: bytes,
) -> str:
    """The hex signature of a request, for ``secret``."""
    names = sorted(signed_headers)
    canonical = "\n".join(
        (
            method.upper(),
            path or "/",
            canonical_query(query),
            canonical_headers(headers, names),
            ";".join(names),
            hashlib.sha256(body).hexdigest(),
        )
    )
    to_sign = f"{ALGORITHM}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    return hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
