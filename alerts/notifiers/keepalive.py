"""Provider requests over ``http.client``: one kept-alive connection per thread and origin.

A router's sender thread makes one provider request at a time, so a connection of its
own per origin needs no pool and no lock. urllib3's pools (and requests on top of them)
did the same work at twice the CPU: 830 against 410 µs per request on this project's
2-core machine, in a mass event a sixth of the router (docs/BENCHMARKS.md).

A connection is reused only while it is fresh: idle for less than ``IDLE_REUSE_S`` and
not readable (a server that closed it has sent its FIN; anything else unasked-for is as
bad). Otherwise it is closed and a new one opened *before* the request is written. A
request is never written twice: a failure while writing or reading it reaches the
caller, whose page falls back or is retried as a scheduled row.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urlsplit

_PORTS = {"http": 80, "https": 443}

# A kept-alive connection idle this long is not reused. Below the shortest keep-alive
# timeout of common servers (uvicorn's 5 s; nginx 75 s), so a request is not written as
# the server closes the connection; and a connection a NAT or firewall dropped without a
# word (which no readability check can see) does not cost a page its read timeout. In a
# mass event every connection is busy and reused; a lone SOS after a quiet spell opens one.
IDLE_REUSE_S = 4.0

_Origin = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class Answer:
    """A provider's answer: its status, body and headers (case-insensitive lookups)."""

    status: int
    body: bytes
    headers: Message


@dataclass(frozen=True, slots=True)
class _Kept:
    conn: http.client.HTTPConnection
    idle_since: float


class KeepAliveTransport:
    """Direct (unproxied) HTTP/1.1 requests, each thread with its own connection per origin.

    ``ca_bundle`` (a file, or a directory of hashed certificates, as requests takes it)
    verifies TLS peers: a site's own CA for an intercepting gateway, else certifi's. It is
    read at the first HTTPS request, so a wrong path fails that request (an ``OSError``),
    never the process that builds the transport.

    ``clock`` (monotonic seconds) times how long a connection has been idle.

    ``timeout`` bounds each connect and each read of the socket (as urllib3's did), not the
    request as a whole. Raises ``TimeoutError`` when one takes longer, ``OSError`` or
    ``http.client.HTTPException`` when the connection fails or the answer is not HTTP, and
    ``ValueError`` (``http.client.InvalidURL`` among them) for a URL or header refused
    before anything is sent.
    """

    def __init__(self, ca_bundle: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ca_bundle = ca_bundle
        self.clock = clock
        self._tls: ssl.SSLContext | None = None
        self._tls_lock = threading.Lock()
        self._local = threading.local()

    def request(self, method: str, url: str, *, body: bytes | None, headers: dict[str, str], timeout: float) -> Answer:
        parts = urlsplit(url)
        if parts.scheme not in _PORTS or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        origin = (parts.scheme, parts.hostname, parts.port or _PORTS[parts.scheme])
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = self._connection(origin, timeout)
        try:
            conn.request(method, target, body=body, headers=headers)
            response = conn.getresponse()
            answer = Answer(response.status, response.read(), response.headers)
        except BaseException:
            conn.close()  # half written or half read: no later request may follow on it
            raise
        if response.will_close:
            conn.close()
        else:
            self._kept()[origin] = _Kept(conn, self.clock())
        return answer

    def close(self) -> None:
        """Close this thread's connections (other threads' close when they are collected)."""
        kept = self._kept()
        while kept:
            kept.popitem()[1].conn.close()

    def _kept(self) -> dict[_Origin, _Kept]:
        kept: dict[_Origin, _Kept] | None = getattr(self._local, "kept", None)
        if kept is None:
            kept = self._local.kept = {}
        return kept

    def _connection(self, origin: _Origin, timeout: float) -> http.client.HTTPConnection:
        kept = self._kept().pop(origin, None)
        if kept is not None:
            sock = kept.conn.sock
            if sock is not None and self.clock() - kept.idle_since < IDLE_REUSE_S and not _readable(sock):
                sock.settimeout(timeout)
                return kept.conn
            kept.conn.close()
        scheme, host, port = origin
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls_context())
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _tls_context(self) -> ssl.SSLContext:
        with self._tls_lock:
            if self._tls is None:
                if os.path.isdir(self.ca_bundle):
                    self._tls = ssl.create_default_context(capath=self.ca_bundle)
                else:
                    self._tls = ssl.create_default_context(cafile=self.ca_bundle)
            return self._tls


def _readable(sock: socket.socket) -> bool:
    """Whether an idle kept-alive socket is readable: the server closed it (or sent
    something nobody asked for); either way it must not carry the next request."""
    poller = select.poll()  # not select(): a busy process's descriptors may pass 1024
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
