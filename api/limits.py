"""Request limits, enforced before any route, dependency or authentication runs.

- A body larger than ``SHOUHU_MAX_BODY_BYTES`` (1 MiB by default) is refused with 413: at once by
  its ``Content-Length``, or after that many bytes of a body that does not declare its
  length (chunked). Nothing past the limit is read, so a client without a token cannot
  make the API hold 64 MiB bodies in memory, and ``/healthz`` stays fast meanwhile.
- Text PostgreSQL cannot store — a NUL byte, or in JSON a lone surrogate — in the path,
  a query parameter, or a JSON or form body is refused with 422 naming where it is,
  instead of failing in the database with a 500 (an acknowledgement carrying one was
  lost that way).
- One exemption, explicit: the provider callbacks (``forgiven_paths``, the Twilio routes
  of ``api/routes/callbacks.py``). Twilio cannot correct and resend a reply, so a 422
  there would lose the acknowledgement an SMS carries. Their form bodies pass through
  unchecked; the route checks the signature over the fields as Twilio signed them, then
  drops what cannot be stored with :func:`storable_text`. Their path, query and body
  size are checked as everywhere. Traccar's forwards (``api/routes/traccar.py``) are
  forgiven alike: that route stores none of their text. So are Aliyun's pushes
  (``forgiven_prefixes``, ``api/routes/aliyun.py``, whose paths carry a token): the
  route drops what cannot be stored from each item before it queues it.

Both live in one ASGI middleware because both need the body before the application
sees it: the body (at most the limit) is read here, checked, and handed on unchanged.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_JSON_TYPES = ("application/json", "application/merge-patch+json")
_FORM_TYPE = "application/x-www-form-urlencoded"


def _bad_char(text: str) -> str | None:
    """What PostgreSQL text cannot hold in ``text``, described; ``None`` when nothing."""
    if "\x00" in text:
        return "a NUL byte (\\u0000, %00) is not allowed"
    if any("\ud800" <= char <= "\udfff" for char in text):
        return "a lone surrogate (an unpaired \\ud800-\\udfff escape) is not allowed"
    return None


def storable_text(text: str) -> str:
    """``text`` without what PostgreSQL text cannot hold (NUL bytes, lone surrogates).

    For the callbacks exempt from the 422 below, once their signature is checked.
    """
    return "".join(char for char in text if char != "\x00" and not "\ud800" <= char <= "\udfff")


def _json_problem(value: Any, path: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """The first (field, problem) of a parsed JSON value, keys included."""
    if isinstance(value, str):
        problem = _bad_char(value)
        return None if problem is None else (".".join(path) or "(the body)", problem)
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _bad_char(key)
            if problem is not None:
                return (".".join((*path, key.replace("\x00", "\\u0000"))), "its name: " + problem)
            found = _json_problem(item, (*path, key))
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _json_problem(item, (*path, str(index)))
            if found is not None:
                return found
    return None


def _pairs_problem(text: str) -> tuple[str, str] | None:
    for key, value in parse_qsl(text, keep_blank_values=True):
        problem = _bad_char(key)
        if problem is not None:
            return key.replace("\x00", "%00"), "its name: " + problem
        problem = _bad_char(value)
        if problem is not None:
            return key, problem
    return None


def _body_problem(headers: Headers, body: bytes) -> tuple[str, str] | None:
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in _JSON_TYPES or media_type.endswith("+json"):
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None  # not JSON: the route's own validation says so
        return _json_problem(parsed)
    if media_type == _FORM_TYPE:
        return _pairs_problem(body.decode("utf-8", "replace"))
    return None


def _invalid(where: str, name: str | None, problem: str) -> JSONResponse:
    label = f"{where} {'field' if where == 'body' else 'parameter'} {name!r}" if name else where
    loc = [where, name] if name else [where]
    return JSONResponse(
        status_code=422,
        content={
            "detail": f"invalid request: {label}: {problem}",
            "errors": [{"loc": loc, "msg": problem, "type": "invalid_text"}],
        },
    )


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        status_code=413,
        content={"detail": f"request body too large: the limit is {limit} bytes (SHOUHU_MAX_BODY_BYTES)"},
        headers={"Connection": "close"},
    )


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class RequestLimits:
    """The body limit and the text checks, as an ASGI middleware (outermost but metrics).

    ``forgiven_paths``: paths whose body text is not checked here, because their route
    cleans it (the provider callbacks; see the module's docstring); ``forgiven_prefixes``
    the same for every path that starts with one of them.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        forgiven_paths: frozenset[str] = frozenset(),
        forgiven_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.forgiven_paths = forgiven_paths
        self.forgiven_prefixes = forgiven_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _bad_char(scope["path"]) is not None:
            await _invalid("path", None, "a NUL byte (%00) is not allowed")(scope, receive, send)
            return
        query = _pairs_problem(scope["query_string"].decode("latin-1"))
        if query is not None:
            await _invalid("query", *query)(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length > self.max_body_bytes:
                await _too_large(self.max_body_bytes)(scope, receive, send)
                return
        elif "transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        try:
            body = await self._read_body(receive)
        except _TooLarge:
            await _too_large(self.max_body_bytes)(scope, receive, send)
            return
        except _Disconnected:
            return
        path = scope["path"]
        forgiven = path in self.forgiven_paths or path.startswith(self.forgiven_prefixes)
        problem = None if forgiven else _body_problem(headers, body)
        if problem is not None:
            await _invalid("body", *problem)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that first gives the body already read, then the real one (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
