"""``shouhu hub``: the network thread feeds a bounded inbox; this thread stores and acks.

Ready (``/readyz`` on SHOUHU_METRICS_PORT) only after the start-up probe — a
message the hub publishes to itself — has come back through the broker, the inbox
and the writer: proof the whole path works, not just the socket.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from dataclasses import dataclass, field

from hub import metrics
from hub.ingest import IngestConfig, Writer
from hub.mqtt import HubConnection, Received, probe_topic
from shouhu.health_server import start_health_server

log = logging.getLogger(__name__)

INBOX_SIZE = 1000
PROBE_INTERVAL_S = 2.0


@dataclass
class Hub:
    database_url: str
    mqtt_url: str
    hub_id: str
    ack_timeout_s: int
    metrics_port: int | None = None
    cancel_window_s: int = 30
    inbox: queue.Queue[Received] = field(default_factory=lambda: queue.Queue(INBOX_SIZE))
    ready: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.writer = Writer(self.database_url, IngestConfig(self.hub_id, self.ack_timeout_s, self.cancel_window_s))
        self.connection = HubConnection(self.mqtt_url, self.hub_id, self.inbox)
        self._probe_token = uuid.uuid4().hex

    def run(self) -> None:
        """Serve until ``stop()``; blocks."""
        server = start_health_server(self.metrics_port, self.ready.is_set) if self.metrics_port is not None else None
        self.connection.start()
        log.info(
            "hub %s connected with MQTT %s",
            self.hub_id,
            "5" if self.connection.protocol == 5 else "3.1.1",
        )
        self.connection.publish_probe(self._probe_token)
        try:
            while not self.stopping.is_set():
                try:
                    # Re-probe quickly until ready: the first probe can race the SUBACK.
                    message = self.inbox.get(timeout=PROBE_INTERVAL_S if self.ready.is_set() else 0.2)
                except queue.Empty:
                    if not self.ready.is_set():
                        self.connection.publish_probe(self._probe_token)
                    continue
                metrics.QUEUE_DEPTH.set(self.inbox.qsize())
                self._handle(message)
        finally:
            self.connection.stop()
            self.writer.close()
            if server is not None:
                server.shutdown()

    def _handle(self, message: Received) -> None:
        if message.topic == probe_topic(self.hub_id):
            if message.payload.decode(errors="replace") == self._probe_token and not self.ready.is_set():
                self.ready.set()
                log.info("hub %s ready: the start-up probe came back", self.hub_id)
            self.connection.ack(message)
            return
        self.writer.store(message)
        # PUBACK strictly after the commit above returned.
        self.connection.ack(message)

    def stop(self) -> None:
        self.stopping.set()
