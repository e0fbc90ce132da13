"""The watch gateway: an asyncio TCP server speaking the 4G watch protocol to the watches
and contract v1 to the broker (docs/contract.md, "Watch protocol").

Each connection has its own ``WatchFrameDecoder``; each frame is mapped by
``map_frame`` and its messages published at QoS 1 on one paho connection (a stable client
id and a persistent session, so receipts wait in the broker while it reconnects). ``LK``
is answered at once. An ``AL`` is answered only once the hub's receipt for every alarm in
it has arrived (``shouhu/v1/wristband/+/receipt``): a watch whose alarm was not stored
gets no answer and sends it again — the same frame, so the same ``msg_id``.

Commands (``devices/commands.py``): the server subscribes to every wristband's
``…/command`` topic and writes the command's frames (``CR``, ``SOS1..3``, ``UPLOAD``) to
that wristband's watch when it is connected — the connection its latest frame came on —
then publishes the outcome on ``…/command_result``: delivered, or why not.

Bad input never stops the server: each rejection, ignored frame and dead letter is
counted and logged with its bytes (an SOS or fall of a watch the registry does not know
still pages, as ``sos_unregistered``), and a connection that sends too much of it, or goes
silent for too long, is closed; the others are served on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from devices.commands import (
    COMMAND_CHANNEL,
    COMMANDS,
    CommandName,
    CommandResult,
    NotDelivered,
    WatchCommand,
    result_topic,
)
from devices.contract import (
    MAX_GATEWAY_RAW_BYTES,
    TOPIC_PREFIX,
    GatewayDeadLetter,
    RejectReason,
    gateway_dead_letter_topic,
)
from devices.kinds import DeviceKind
from gateway.watch_frames import (
    MAX_FRAME_BYTES,
    FrameRejected,
    WatchFrame,
    WatchFrameDecoder,
    command_locate,
    command_sos_number,
    command_upload_interval,
)
from gateway.watch_messages import (
    Answer,
    AnswerWhen,
    DeadLetter,
    DeadLetterReason,
    Ignored,
    Mapped,
    WristbandLookup,
    map_frame,
)
from shouhu.mqtt_address import BrokerAddress

log = logging.getLogger(__name__)

DEFAULT_PORT = 5093
RECEIPTS = f"{TOPIC_PREFIX}/{DeviceKind.WRISTBAND}/+/receipt"
READ_BYTES = 4096


@dataclass(frozen=True, slots=True)
class WatchServerConfig:
    mqtt_url: str
    client_id: str  # stable: the broker keeps this session's receipts while we reconnect
    watch_tz: tzinfo  # the zone the watches' clocks keep
    host: str = "0.0.0.0"  # noqa: S104 (watches connect from anywhere)
    port: int = DEFAULT_PORT  # 0: any free port (tests)
    max_frame_bytes: int = MAX_FRAME_BYTES
    # A watch sends a heartbeat every few minutes; silent this long, it is gone.
    idle_timeout_s: float = 900.0
    # How long an AL waits for the hub's receipts before giving up (the watch re-sends).
    receipt_timeout_s: float = 60.0
    # Rejected frames (garbage runs included) one connection may send before it is closed.
    max_rejections: int = 100
    # Unknown watch ids one connection may page for. A watch is one id; a peer that
    # invents ids would open one sos_unregistered incident per id for the operators.
    max_unregistered_ids: int = 1
    # A peer that does not read its answers this long is dropped.
    write_timeout_s: float = 10.0
    # Dead letters one connection may send on to the hub; further ones are only counted
    # and logged, so a peer sending garbage cannot flood the dead-letter table.
    max_dead_letters: int = 20


@dataclass(frozen=True, slots=True)
class WatchLink:
    """Where a wristband's watch is connected: the commands' frames go there, in its own
    maker prefix, id and index."""

    writer: asyncio.StreamWriter
    maker: str
    watch_id: str
    index: str | None


def command_frames(command: WatchCommand, link: WatchLink) -> list[bytes]:
    """The frames of ``command`` for that watch; ``ValueError`` for a command they cannot carry."""
    if command.command is CommandName.LOCATE:
        return [command_locate(link.maker, link.watch_id, link.index)]
    if command.command is CommandName.SET_SOS_NUMBERS:
        if not command.phones:
            raise ValueError("set_sos_numbers without a phone")
        return [
            command_sos_number(link.maker, link.watch_id, slot, phone, link.index)
            for slot, phone in enumerate(command.phones, start=1)
        ]
    if command.seconds is None:
        raise ValueError("set_upload_interval without seconds")
    return [command_upload_interval(link.maker, link.watch_id, command.seconds, link.index)]


class WatchServer:
    """Run with ``await run()`` (or ``run_in_thread``); ``stop()`` from any thread."""

    def __init__(
        self,
        config: WatchServerConfig,
        lookup: WristbandLookup,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: a socket already listening (the CLI binds it first, so a port in use
        fails before anything starts); else ``config.host``/``config.port`` are bound."""
        self.config = config
        self.sock = sock
        self.lookup = lookup
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.ready = threading.Event()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = False  # a stop() before run() got its loop (a SIGTERM at start)
        self._stopping: asyncio.Event | None = None
        self._subscribed: asyncio.Event | None = None
        # msg_id → the futures of the ALs waiting for its receipt (one per copy received).
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._connections: set[asyncio.Task[None]] = set()
        # wristband id → the connection its watch last sent a frame on (commands go there).
        self._links: dict[str, WatchLink] = {}
        self._commands: set[asyncio.Task[None]] = set()
        self._client = self._mqtt_client()

    # ---------------------------------------------------------------------------- MQTT

    def _mqtt_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        address = BrokerAddress.parse(self.config.mqtt_url)
        address.configure(client)
        client.reconnect_delay_set(1, 5)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        # On every connect: a broker that lost the session lost the subscription too.
        client.subscribe([(RECEIPTS, 1), (COMMANDS, 1)])

    def _on_subscribe(self, *_args: Any) -> None:
        if self._loop is not None and self._subscribed is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed while we stopped
                self._loop.call_soon_threadsafe(self._subscribed.set)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        """On paho's thread: a command goes to the event loop whole, a receipt by its msg_id."""
        parts = message.topic.split("/")
        if len(parts) == 5 and parts[4] == COMMAND_CHANNEL:
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed while we stopped
                    self._loop.call_soon_threadsafe(self._command, parts[3], bytes(message.payload))
            return
        try:
            receipt = json.loads(message.payload)
        except ValueError:
            return
        msg_id = receipt.get("msg_id") if isinstance(receipt, dict) else None
        if isinstance(msg_id, str) and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed while we stopped
                self._loop.call_soon_threadsafe(self._receipted, msg_id)

    def _receipted(self, msg_id: str) -> None:
        for future in self._waiting.pop(msg_id, []):
            if not future.done():
                future.set_result(None)

    def _command(self, wristband_id: str, payload: bytes) -> None:
        """On the event loop: write a command's frames to the watch, if it is connected."""
        try:
            command = WatchCommand.model_validate_json(payload)
        except ValidationError as exc:
            self.counts["command:unreadable"] += 1
            log.warning("command for %s unreadable (%s): %r", wristband_id, exc.errors()[:1], payload[:200])
            return  # no command_id to answer: the API's wait ends as no_gateway
        if command.expires_at is not None and command.expires_at <= self.clock():
            # Its sender was told no_gateway already (the broker kept it while we were away).
            self._command_done(wristband_id, command.command_id, NotDelivered.EXPIRED)
            return
        link = self._links.get(wristband_id)
        if link is None:
            self._command_done(wristband_id, command.command_id, NotDelivered.NOT_CONNECTED)
            return
        try:
            frames = command_frames(command, link)
        except ValueError as exc:
            log.warning("command %s for %s cannot be framed: %s", command.command_id, wristband_id, exc)
            self._command_done(wristband_id, command.command_id, NotDelivered.UNREADABLE)
            return
        task = asyncio.create_task(self._send_command(wristband_id, command.command_id, link, frames))
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _send_command(self, wristband_id: str, command_id: str, link: WatchLink, frames: list[bytes]) -> None:
        try:
            for frame in frames:
                await self._write(link.writer, frame)
        except (ConnectionError, TimeoutError) as exc:
            log.info("command %s for %s not written: %r", command_id, wristband_id, exc)
            self._command_done(wristband_id, command_id, NotDelivered.WRITE_FAILED)
            return
        self._command_done(wristband_id, command_id, None)

    def _command_done(self, wristband_id: str, command_id: str, reason: NotDelivered | None) -> None:
        self.counts[f"command:{reason or 'delivered'}"] += 1
        result = CommandResult(command_id=command_id, delivered=reason is None, reason=reason)
        self._client.publish(result_topic(wristband_id), result.model_dump_json(), qos=1)

    def publish_dead_letter(self, letter: GatewayDeadLetter) -> None:
        topic = gateway_dead_letter_topic(self.config.client_id)
        self._client.publish(topic, letter.model_dump_json(), qos=1)
        self.counts[f"dead_letter_sent:{letter.reason}"] += 1

    def _publish(self, mapped: Mapped) -> None:
        for publication in mapped.publications:
            # Queued by paho while the broker is away (QoS 1), sent on reconnect.
            self._client.publish(str(publication.topic), publication.payload, qos=1)
            self.counts[f"published:{publication.topic.channel}"] += 1

    # ----------------------------------------------------------------------- the server

    async def run(self) -> None:
        """Serve until ``stop()``."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        self._subscribed = asyncio.Event()
        if self.sock is not None:
            server = await asyncio.start_server(self._serve_connection, sock=self.sock)
        else:
            server = await asyncio.start_server(self._serve_connection, self.config.host, self.config.port)
        address = BrokerAddress.parse(self.config.mqtt_url)
        self._client.connect_async(address.host, address.port)
        self._client.loop_start()
        try:
            self.port = server.sockets[0].getsockname()[1]
            # Ready once the receipts subscription stands: an AL before it could miss its receipt.
            subscribed = asyncio.create_task(self._subscribed.wait())
            stopping = asyncio.create_task(self._stopping.wait())
            await asyncio.wait({subscribed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            subscribed.cancel()
            if not self._stopping.is_set():
                self.ready.set()
                log.info("watch gateway listening on %s:%s", self.config.host, self.port)
            await stopping
        finally:
            server.close()
            for task in [*self._connections, *self._commands]:
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await server.wait_closed()
            self._client.disconnect()
            self._client.loop_stop()

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def stop(self) -> None:
        """Stop serving; safe from any thread (and from a signal handler)."""
        self._stop_requested = True
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed: a second signal
                self._loop.call_soon_threadsafe(self._stopping.set)

    def run_in_thread(self, timeout: float = 15.0) -> threading.Thread:
        """Run on a thread of its own event loop; returns once ready."""
        thread = threading.Thread(target=asyncio.run, args=(self.run(),), name="watch-gateway", daemon=True)
        thread.start()
        if not self.ready.wait(timeout):
            raise TimeoutError(f"watch gateway not ready within {timeout} s")
        return thread

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        answers: set[asyncio.Task[None]] = set()
        self.counts["connections"] += 1
        try:
            await self._read_frames(reader, writer, answers, peer)
        except TimeoutError:
            # Only a write times out here (reads are waited for in _read_frames): a peer
            # that does not read its answers holds buffers, not the other watches.
            self.counts["closed:slow_reader"] += 1
            log.info("watch connection %s closed: answers unread for %s s", peer, self.config.write_timeout_s)
        except ConnectionError as exc:
            log.info("watch connection %s closed: %r", peer, exc)
        finally:
            for answer in answers:
                answer.cancel()
            for band in [band for band, link in self._links.items() if link.writer is writer]:
                del self._links[band]
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), self.config.write_timeout_s)
            self._connections.discard(task)

    async def _read_frames(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        answers: set[asyncio.Task[None]],
        peer: Any,
    ) -> None:
        decoder = WatchFrameDecoder(self.config.max_frame_bytes)
        rejections = 0
        letters = _DeadLetters(self, str(peer))
        unregistered: set[str] = set()
        while True:
            try:
                data = await asyncio.wait_for(reader.read(READ_BYTES), self.config.idle_timeout_s)
            except TimeoutError:
                self.counts["closed:idle"] += 1
                return
            if not data:
                return
            for item in decoder.feed(data):
                if isinstance(item, FrameRejected):
                    rejections += 1
                    self.counts[f"rejected:{item.reason}"] += 1
                    log.warning("watch %s: %s (%s): %r", peer, item.reason, item.detail, item.raw[:200])
                    letters.send(RejectReason.BAD_FRAME, f"{item.reason}: {item.detail}", "", item.raw)
                    continue
                self._note_link(item, writer)
                result = map_frame(item, self.lookup, self.clock(), self.config.watch_tz)
                if isinstance(result, Ignored):
                    self.counts[f"ignored:{result.reason}"] += 1
                    log.info("watch %s: %s ignored (%s)", item.device_id, item.command[:20], result.detail)
                elif isinstance(result, DeadLetter):
                    self.counts[f"dead_letter:{result.reason}"] += 1
                    log.warning(
                        "watch %s: dead letter %s (%s): %r", peer, result.reason, result.detail, result.raw[:500]
                    )
                    letters.send(GATEWAY_REASON[result.reason], result.detail, result.watch_id, result.raw)
                else:
                    if result.unregistered:
                        if item.device_id not in unregistered and len(unregistered) >= self.config.max_unregistered_ids:
                            self.counts["dead_letter:unregistered_flood"] += 1
                            log.warning(
                                "watch %s: an alarm of a further unknown watch %s, not paged: %r",
                                peer,
                                item.device_id,
                                item.raw[:500],
                            )
                            continue
                        unregistered.add(item.device_id)
                        # Paged all the same (sos_unregistered): the registry should know this watch.
                        self.counts["unregistered_alarm"] += 1
                        log.warning(
                            "watch %s is not in the registry: its alarm pages as %s (%r)",
                            item.device_id,
                            result.wristband_id,
                            item.raw[:500],
                        )
                    self._publish(result)
                    if result.answer is not None:
                        await self._answer(result.answer, writer, answers)
            if rejections > self.config.max_rejections:
                self.counts["closed:bad_input"] += 1
                log.warning("watch %s: closed after %d rejected frames", peer, rejections)
                return

    def _note_link(self, frame: WatchFrame, writer: asyncio.StreamWriter) -> None:
        """The latest connection a registered watch spoke on is where its commands go."""
        band = self.lookup(frame.device_id)
        if band is not None:
            self._links[band] = WatchLink(writer, frame.maker, frame.device_id, frame.index)

    async def _answer(self, answer: Answer, writer: asyncio.StreamWriter, answers: set[asyncio.Task[None]]) -> None:
        if answer.when is AnswerWhen.NOW:
            await self._write(writer, answer.frame)
            return
        # Registered before the next read, and the messages were published just now: a
        # receipt cannot come back before its waiter exists (both run on this loop).
        assert self._loop is not None
        futures = [self._loop.create_future() for _ in answer.receipt_msg_ids]
        for msg_id, future in zip(answer.receipt_msg_ids, futures, strict=True):
            self._waiting.setdefault(msg_id, []).append(future)
        task = asyncio.create_task(self._answer_after_receipts(answer, futures, writer))
        answers.add(task)
        task.add_done_callback(answers.discard)

    async def _answer_after_receipts(
        self, answer: Answer, futures: list[asyncio.Future[None]], writer: asyncio.StreamWriter
    ) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*futures), self.config.receipt_timeout_s)
        except TimeoutError:
            self.counts["unanswered:no_receipt"] += 1
            log.warning(
                "no receipt for %s in %s s: the watch re-sends", answer.receipt_msg_ids, self.config.receipt_timeout_s
            )
            return
        finally:
            for msg_id, future in zip(answer.receipt_msg_ids, futures, strict=True):
                waiting = self._waiting.get(msg_id)
                if waiting is not None and future in waiting:
                    waiting.remove(future)
                    if not waiting:
                        del self._waiting[msg_id]
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self._write(writer, answer.frame)
            self.counts["answered:after_receipt"] += 1

    async def _write(self, writer: asyncio.StreamWriter, frame: bytes) -> None:
        writer.write(frame)
        await asyncio.wait_for(writer.drain(), self.config.write_timeout_s)


GATEWAY_REASON = {
    DeadLetterReason.UNKNOWN_WATCH: RejectReason.UNKNOWN_WATCH,
    DeadLetterReason.UNREADABLE: RejectReason.UNREADABLE_FRAME,
}


class _DeadLetters:
    """One connection's dead letters, sent on to the hub (its ``dead_letters`` table)
    with the watch's own bytes, at most ``max_dead_letters`` of them."""

    def __init__(self, server: WatchServer, peer: str) -> None:
        self.server = server
        self.peer = peer[:100]
        self.sent = 0

    def send(self, reason: RejectReason, detail: str, device: str, raw: bytes) -> None:
        if self.sent >= self.server.config.max_dead_letters:
            self.server.counts["dead_letter_not_sent:connection_limit"] += 1
            return
        self.sent += 1
        if len(raw) > MAX_GATEWAY_RAW_BYTES:
            detail = f"{detail} (the first {MAX_GATEWAY_RAW_BYTES} of {len(raw)} bytes kept)"
            raw = raw[:MAX_GATEWAY_RAW_BYTES]
        letter = GatewayDeadLetter(
            reason=reason,
            detail=detail[:500],
            device=device[:64],
            peer=self.peer,
            raw_base64=base64.b64encode(raw).decode("ascii"),
        )
        self.server.publish_dead_letter(letter)


class WatchCountsCollector(Collector):
    """``shouhu_watch_gateway_events_total{event=…}``: the server's counts (connections,
    published messages by channel, answers, rejections, ignored frames, dead letters,
    ``unregistered_alarm``, closures), read at each scrape."""

    def __init__(self, server: WatchServer) -> None:
        self._server = server

    def describe(self) -> Iterator[Metric]:
        return iter(())  # nothing: no clash check against another gateway in the process

    def collect(self) -> Iterator[Metric]:
        # dict.copy is one C call: the event loop cannot change the counts halfway through it.
        counts = dict.copy(self._server.counts)
        family = CounterMetricFamily(
            "shouhu_watch_gateway_events", "What the watch gateway saw and did, by event", labels=["event"]
        )
        for event, value in sorted(counts.items()):
            family.add_metric([event], value)
        yield family
