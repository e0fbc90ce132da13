"""A small HTTP server for the hub, the router and the watch gateway: /metrics, /healthz and /readyz.

The API serves these through FastAPI; the workers have no web framework, so the
standard library's threading server carries them on SHOUHU_METRICS_PORT.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Gauge, generate_latest

READY_METRIC = "shouhu_ready"


class PortInUse(OSError):
    """The metrics port cannot be listened on; the message names the port and its setting."""


def readiness_registry(ready: Callable[[], bool]) -> CollectorRegistry:
    """A registry of one gauge, ``shouhu_ready``: 1 while ``ready()`` holds (``/readyz`` 200), else 0.

    Its own registry, not the default one: each server reports its own process, and
    tests run several in one process.
    """
    registry = CollectorRegistry(auto_describe=False)
    gauge = Gauge(READY_METRIC, "1 while the process is ready (its /readyz answers 200), else 0", registry=registry)
    gauge.set_function(lambda: 1.0 if ready() else 0.0)
    return registry


def start_health_server(
    port: int,
    ready: Callable[[], bool],
    host: str = "0.0.0.0",  # noqa: S104
    metrics: CollectorRegistry | None = None,
) -> ThreadingHTTPServer:
    """Serve metrics and health on ``port`` from a daemon thread; returns the server.

    ``metrics``: what ``/metrics`` exposes besides readiness (default: the process's
    registry; the hub passes one that adds its worker processes' samples).

    Raises:
        PortInUse: ``port`` is taken (or not this user's to take); the message says
            which port and that ``SHOUHU_METRICS_PORT`` moves it.
    """

    own = readiness_registry(ready)
    source = metrics if metrics is not None else REGISTRY

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, generate_latest(source) + generate_latest(own), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                self._reply(200, b"ok\n", "text/plain")
            elif self.path == "/readyz":
                ok = ready()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            why = f"metrics port {port} is already in use on {host} (another process listens there: stop it"
        else:
            why = f"cannot listen on metrics port {port} on {host}: {exc.strerror or exc} ("
        error = PortInUse(f"{why}, or choose another port with SHOUHU_METRICS_PORT)")
        error.errno = exc.errno
        raise error from exc
    threading.Thread(target=server.serve_forever, name=f"health-{port}", daemon=True).start()
    return server
