"""Provider requests over ``http.client``: one kept-alive connection per thread and origin.

A router's sender thread makes one provider request at a time, so a connection of its
own per origin needs no pool and no lock. urllib3's pools (and requests on top of them)
did the same work at twice the CPU: 830 against 410 µs per request on this project's
2-core machine, in a mass event a sixth of the router (docs/BENCHMARKS.md).

A connection is reused only if the server has not closed it meanwhile: a kept-alive
socket that has become readable (its FIN, or anything else unasked-for) is closed and a
new one opened *before* the request is written. A request is never written twice: a
failure while writing or reading it reaches the caller, whose page is retried as a
scheduled row.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urlsplit

_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Answer:
    """A provider's answer: its status, body and headers (case-insensitive lookups)."""

    status: int
    body: bytes
    headers: Message


class KeepAliveTransport:
    """Direct (unproxied) HTTP/1.1 requests, each thread with its own connection per origin.

    ``ca_bundle`` verifies TLS peers (a site's own CA for an intercepting gateway, else certifi's).
    Raises ``TimeoutError`` when connecting or a read takes longer than ``timeout``, and
    ``OSError`` or ``http.client.HTTPException`` when the connection fails or the answer is
    not HTTP.
    """

    def __init__(self, ca_bundle: str) -> None:
        self._tls = ssl.create_default_context(cafile=ca_bundle)
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
            self._forget(origin)
            raise
        if response.will_close:
            self._forget(origin)
        return answer

    def close(self) -> None:
        """Close this thread's connections (other threads' close with their threads' end)."""
        for origin in list(self._connections()):
            self._forget(origin)

    def _connections(self) -> dict[tuple[str, str, int], http.client.HTTPConnection]:
        conns: dict[tuple[str, str, int], http.client.HTTPConnection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _connection(self, origin: tuple[str, str, int], timeout: float) -> http.client.HTTPConnection:
        conns = self._connections()
        conn = conns.get(origin)
        if conn is not None and conn.sock is not None and _closed_by_peer(conn.sock):
            self._forget(origin)
            conn = None
        if conn is None:
            scheme, host, port = origin
            if scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conns[origin] = conn
        conn.timeout = timeout  # for a connection still to be opened
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _forget(self, origin: tuple[str, str, int]) -> None:
        conn = self._connections().pop(origin, None)
        if conn is not None:
            conn.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle kept-alive socket is readable: the server closed it (or sent
    something nobody asked for); either way it must not carry the next request."""
    poller = select.poll()  # not select(): a busy process's descriptors may pass 1024
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
