"""Watches and watch gateways under test: a watch's raw TCP connection, frames written
from the protocol's rules, the gateway in-process (``serving``) or as a
`shouhu gateway watch` process over the demo county's watch ids (``gateway_process``)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from gateway.watch_frames import FrameRejected, WatchFrame, WatchFrameDecoder, escape
from gateway.watch_server import WatchServer, WatchServerConfig
from shouhu.embedded.postgres import free_port
from tests.support.services import Mosquitto, ShouhuProcess, shouhu_env

WATCH = "8600000061"
BAND = "wb-0061"
CHINA = timezone(timedelta(hours=8))
SOS_BODY = "041226,101500,A,30.274085,N,120.155070,E,0.5,90.0,12.0,7,80,64,1520,0,00010000,1,255,460,0,9340,3663,35"
# The watch's own time in SOS_BODY (DDMMYY, HHMMSS, China time): its msg_id's time.
SOS_AT = datetime(2026, 12, 4, 10, 15, tzinfo=CHINA)


def frame(content: str, watch: str = WATCH) -> bytes:
    body = content.encode()
    return f"[3G*{watch}*{len(body):04X}*".encode() + escape(body) + b"]"


class Watch:
    """A watch's TCP connection: send frames, read the server's answers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.decoder = WatchFrameDecoder()
        self.answers: list[WatchFrame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> bytes:
        """The next answer's bytes (blocks until one arrives; the socket times out at 30 s)."""
        while not self.answers:
            data = self.sock.recv(4096)
            assert data, "the gateway closed the connection"
            for item in self.decoder.feed(data):
                assert not isinstance(item, FrameRejected), item
                self.answers.append(item)
        return self.answers.pop(0).raw

    def closed_by_server(self) -> bool:
        return self.sock.recv(4096) == b""

    def close(self) -> None:
        self.sock.close()


@contextmanager
def serving(broker: Mosquitto, sock: socket.socket | None = None, **config: Any) -> Iterator[WatchServer]:
    """A watch gateway on a free port (or ``sock``, listening), ready (subscribed to
    receipts) before this yields."""
    settings = WatchServerConfig(
        mqtt_url=broker.url,
        watch_tz=CHINA,
        host="127.0.0.1",
        port=0,
        **{"max_rejections": 5, "client_id": f"test-watch-gateway-{uuid.uuid4().hex[:8]}", **config},
    )
    server = WatchServer(settings, {WATCH: BAND}.get, sock=sock)
    thread = server.run_in_thread()
    try:
        yield server
    finally:
        server.stop()
        thread.join(15)
    assert not thread.is_alive()


DEMO_COUNTY = Path(__file__).resolve().parents[2] / "simulators" / "demo_county.yaml"


def gateway_process(broker: Mosquitto, gateway_id: str, watch_port: int) -> ShouhuProcess:
    """`shouhu gateway watch` over the demo county's watch ids, ready once /readyz says so."""
    metrics = free_port()
    return ShouhuProcess(
        ["gateway", "watch"],
        shouhu_env(
            SHOUHU_MQTT_URL=broker.url,
            SHOUHU_WATCH_PORT=str(watch_port),
            SHOUHU_WATCH_GATEWAY_ID=gateway_id,
            SHOUHU_METRICS_PORT=str(metrics),
            SHOUHU_REGISTRY_FILE=str(DEMO_COUNTY),
        ),
        ready_url=f"http://127.0.0.1:{metrics}/readyz",
    )
