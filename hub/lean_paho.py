"""paho's client with a receive path fit for a hub draining thousands of messages a second.

paho reads a packet with three or more system calls (the fixed header a byte at a
time, then the rest) after a ``select`` of its own, decodes an MQTT 5 property set
into objects for every PUBLISH, builds an ``MQTTMessage`` and matches its topic
against per-topic callbacks, and sends each PUBACK as its own packet with a wake-up
of the network thread. Profiled in ``shouhu hub`` draining a backlog
(docs/BENCHMARKS.md), those took over half of the network thread's time — about as
much CPU as everything the bulk lane does to store the message.

``LeanClient`` keeps paho for everything else (connecting, TLS, sessions,
subscriptions, keepalive, reconnects) and changes only this:

- its socket is a ``BufferedSocket``: one ``recv`` fills a buffer that serves many
  packets, and ``pending()`` tells paho's loop that buffered bytes are ready (the
  hook paho already has for TLS), so it neither blocks in ``select`` nor loses them;
- ``loop_read`` takes every complete packet the buffer holds, up to READ_BURST,
  instead of one per ``select``;
- a QoS 0 or 1 PUBLISH goes straight to ``on_publish_received(topic, payload, qos,
  retain, mid)``: no property objects (the hub reads none), no ``MQTTMessage``, no
  topic matching (the hub registers no per-topic callbacks). QoS 2, an empty topic
  (a topic alias) or a client without the callback take paho's own path;
- ``ack_many`` queues the PUBACKs of a whole batch as one write.

It leans on paho's internals (``_create_socket``, ``_handle_publish``,
``_packet_queue``, ``_in_packet``), so paho is pinned below 3 (pyproject.toml) and
tests/test_lean_paho.py checks, against a real broker, every path the hub uses.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket

# What one recv asks for: a few hundred telemetry messages.
READ_SIZE = 256 * 1024
# Packets taken per loop turn at most: then paho's select (which lets go of the GIL)
# and its writes run, so PUBACKs and pings go out, and the alarm lane is not kept
# waiting for the interpreter behind a long run of telemetry (measured: 2,000 here
# put an SOS's commit behind hundreds of milliseconds of telemetry at 5,500 msg/s).
READ_BURST = 64
PUBACK = 0x40
_PUBACK_FRAME = struct.Struct("!BBH")

PublishReceiver = Callable[[bytes | bytearray, bytes | bytearray, int, bool, int], None]


class BufferedSocket:
    """A connected socket read in large pieces; everything else is the socket's own."""

    __slots__ = ("_buffer", "_position", "_socket")

    def __init__(self, sock: Any) -> None:
        self._socket = sock
        self._buffer = b""
        self._position = 0

    def recv(self, size: int) -> bytes:
        if self._position >= len(self._buffer):
            # Raises what the socket raises (BlockingIOError, ssl.SSLWantReadError):
            # paho handles those exactly as before.
            data: bytes = self._socket.recv(READ_SIZE)
            if len(data) <= size:
                return data  # b"" (closed) included
            self._buffer = data
            self._position = 0
        start = self._position
        self._position = min(start + size, len(self._buffer))
        return self._buffer[start : self._position]

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._buffer) - self._position

    def pending(self) -> int:
        # paho's loop asks this of TLS sockets; a positive answer skips the wait in select.
        inner = getattr(self._socket, "pending", None)
        return self.buffered() + (int(inner()) if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


class LeanClient(mqtt.Client):
    """paho's ``Client`` with the receive path described in the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_publish_received: PublishReceiver | None = None

    def _create_socket(self) -> Any:
        if self._transport == "websockets":  # paho's websocket wrapper buffers on its own
            return super()._create_socket()
        return BufferedSocket(super()._create_socket())

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        taken = 1
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and taken < READ_BURST:
            sock = self._sock
            if not isinstance(sock, BufferedSocket) or not sock.buffered():
                break
            rc = super().loop_read(1)
            taken += 1
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        receiver = self.on_publish_received
        header: int = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if receiver is None or qos == 2:
            return super()._handle_publish()
        packet: bytes | bytearray = self._in_packet["packet"]
        topic_end = 2 + ((packet[0] << 8) | packet[1]) if len(packet) >= 2 else 0
        if topic_end <= 2 or topic_end > len(packet):
            # An empty topic (an alias) or a broken packet: paho's own decoder decides.
            return super()._handle_publish()
        position = topic_end
        mid = 0
        if qos:
            if position + 2 > len(packet):
                raise MalformedPacket("PUBLISH too short for its packet identifier")
            mid = (packet[position] << 8) | packet[position + 1]
            position += 2
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            length, shift = 0, 0
            while True:
                if position >= len(packet) or shift > 21:
                    raise MalformedPacket("PUBLISH with a broken property length")
                byte = packet[position]
                position += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            position += length
            if position > len(packet):
                raise MalformedPacket("PUBLISH properties longer than the packet")
        receiver(packet[2:topic_end], packet[position:], qos, bool(header & 0x01), mid)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def ack_many(self, mids: Iterable[int]) -> None:
        """PUBACK every QoS 1 message id in ``mids`` with one queued write."""
        frames = b"".join(_PUBACK_FRAME.pack(PUBACK, 2, mid) for mid in mids)
        if frames:
            self._packet_queue(PUBACK, frames, 0, 1)
