"""Wiring the watch gateway (gateway/) into `shouhu gateway watch` and `shouhu up`."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from contextlib import ExitStack
from pathlib import Path

from prometheus_client import REGISTRY

from devices.watch_ids import RegistryWatches
from gateway.watch_server import WatchCountsCollector, WatchServer, WatchServerConfig
from launch.output import fail
from launch.wiring import listen
from shouhu.settings import Settings

log = logging.getLogger(__name__)

WATCH_PORT_SETTING = "SHOUHU_WATCH_PORT"


def listen_for_watches(settings: Settings) -> socket.socket:
    """The watch port, bound now: taken, it fails in one line naming SHOUHU_WATCH_PORT."""
    return listen(settings.watch_host, settings.watch_port, WATCH_PORT_SETTING)


def watch_lookup(settings: Settings, registry: Path | None = None) -> RegistryWatches:
    """Watch id → wristband from ``registry`` or SHOUHU_REGISTRY_FILE; a bad file exits 2."""
    from devices.registry_file import RegistryFileError

    path = registry or (Path(settings.registry_file) if settings.registry_file else None)
    try:
        return RegistryWatches(path)
    except RegistryFileError as exc:
        fail(f"SHOUHU_REGISTRY_FILE {exc.path}: " + "; ".join(exc.problems), 2)


def make_watch_gateway(
    settings: Settings, broker_url: str, sock: socket.socket, lookup: RegistryWatches
) -> WatchServer:
    host, port = sock.getsockname()[:2]
    config = WatchServerConfig(
        mqtt_url=broker_url,
        client_id=settings.watch_gateway_id,
        # The watches keep local time without an offset: the county's zone.
        watch_tz=settings.zone,
        host=host,
        port=port,
    )
    if lookup.path is None:
        log.warning("no SHOUHU_REGISTRY_FILE: no watch is registered; their SOS and falls page as unregistered")
    server = WatchServer(config, lookup, sock=sock)
    # In /metrics: the gateway's own (SHOUHU_METRICS_PORT), or the API's under `shouhu up`.
    REGISTRY.register(WatchCountsCollector(server))
    return server


def run_watch_gateway(server: WatchServer) -> None:
    """Serve until ``server.stop()`` (a signal, or ``shouhu up`` stopping)."""
    asyncio.run(server.run())


def start_watch_gateway(
    settings: Settings, broker_url: str, sock: socket.socket, registry: Path | None, stack: ExitStack
) -> threading.Thread:
    """The watch gateway on a thread of ``shouhu up``, ready (receipts subscribed) before
    this returns, stopped with ``stack``."""
    import typer

    watches = watch_lookup(settings, registry)
    server = make_watch_gateway(settings, broker_url, sock, watches)
    thread = threading.Thread(target=run_watch_gateway, args=(server,), name="watch-gateway", daemon=True)
    thread.start()
    stack.callback(server.stop)
    if not server.ready.wait(30):
        fail(f"the watch gateway did not become ready: no receipts subscription on {broker_url}")
    typer.echo(f"watch gateway: {settings.watch_host}:{settings.watch_port} ({watches.count} watches registered)")
    return thread
