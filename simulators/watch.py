"""A simulated 4G watch: speaks the watches' TCP text protocol to `shouhu gateway watch`
(docs/contract.md, "Watch protocol") as a real one does.

It builds its own frames (``[3G*ID*LEN*CONTENT]``) rather than importing the gateway's
codec, so a test that drives the gateway with it checks the gateway against the protocol,
not against itself.

- ``press_alarm``: an ``AL`` alarm with the SOS (or fall) flag, re-sent — the same bytes, so the
  same ``msg_id`` — until the gateway answers ``AL``, reconnecting when the connection
  drops, as a watch does while the server has not stored its alarm.
- ``run_fleet``: watches each holding a connection and sending ``LK`` heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field
from datetime import datetime, tzinfo

WATCH_ID = re.compile(r"[0-9]{10,15}")
MAKER = "3G"
# The status word's flags (docs/contract.md): SOS bit 16, fall bit 21.
SOS_STATUS = 1 << 16
FALL_STATUS = 1 << 21
# The demo county's centre (simulators/demo_county_gen.py).
HOME = (38.70, 111.60)
MAX_ANSWER_BYTES = 4096


def frame(watch_id: str, content: str, maker: str = MAKER) -> bytes:
    """One frame as a watch sends it: text content, its length in four hex digits."""
    body = content.encode("ascii")
    return f"[{maker}*{watch_id}*{len(body):04X}*".encode("ascii") + body + b"]"


def alarm_content(
    now: datetime, status: int, *, battery: int = 80, steps: int = 0, home: tuple[float, float] = HOME
) -> str:
    """``AL`` with a valid fix: ``date,time,A,lat,N,lon,E,speed,course,altitude,satellites,
    gsm,battery,steps,rolls,status`` and one cell tower, at the watch's local time."""
    lat, lon = home
    return (
        f"AL,{now:%d%m%y},{now:%H%M%S},A,{abs(lat):.6f},{'N' if lat >= 0 else 'S'},"
        f"{abs(lon):.6f},{'E' if lon >= 0 else 'W'},0.00,0.0,0.0,6,100,{battery},{steps},0,"
        f"{status:08X},1,255,460,0,9340,3663,35"
    )


def heartbeat_content(*, steps: int = 0, battery: int = 80) -> str:
    return f"LK,{steps},0,{battery}"


class _Answers:
    """The server's answers on one connection, as command words (``LK``, ``AL`` …)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = b""

    async def next(self) -> str:
        """The next answer's command word. Raises ``ConnectionError`` when the server closes."""
        while True:
            start = self.buffer.find(b"[")
            end = self.buffer.find(b"]", start + 1) if start >= 0 else -1
            if end >= 0:
                answer, self.buffer = self.buffer[start + 1 : end], self.buffer[end + 1 :]
                parts = answer.split(b"*")
                # [MF*ID*LEN*CONTENT] or, with an index, [MF*ID*INDEX*LEN*CONTENT].
                content = parts[-1] if len(parts) >= 4 else b""
                return content.split(b",", 1)[0].decode("ascii", errors="replace")
            if len(self.buffer) > MAX_ANSWER_BYTES:
                self.buffer = b""  # not answers: drop and read on
            data = await self.reader.read(MAX_ANSWER_BYTES)
            if not data:
                raise ConnectionError("the gateway closed the connection")
            self.buffer += data

    async def until(self, command: str) -> None:
        while await self.next() != command:
            pass


@dataclass(frozen=True, slots=True)
class PressResult:
    watch_id: str
    answered: bool
    sends: int  # how many times the alarm went out (1: answered at the first)
    connections: int


async def press_alarm(
    host: str,
    port: int,
    watch_id: str,
    *,
    zone: tzinfo,
    fall: bool = False,
    resend_s: float = 10.0,
    timeout_s: float = 30.0,
    now: datetime | None = None,
) -> PressResult:
    """Send an SOS (or a fall) alarm and re-send it until the gateway answers ``AL``,
    for at most ``timeout_s``."""
    if not WATCH_ID.fullmatch(watch_id):
        raise ValueError(f"watch id {watch_id!r} is not 10-15 digits")
    loop = asyncio.get_running_loop()
    # Built once: every re-send carries the same bytes, hence the same msg_id.
    alarm = frame(watch_id, alarm_content(now or datetime.now(zone), FALL_STATUS if fall else SOS_STATUS))
    deadline = loop.time() + timeout_s
    sends = connections = 0
    while (left := deadline - loop.time()) > 0:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), left)
        except (OSError, TimeoutError):
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))  # the gateway is restarting
            continue
        connections += 1
        answers = _Answers(reader)
        try:
            while (left := deadline - loop.time()) > 0:
                writer.write(alarm)
                await writer.drain()
                sends += 1
                try:
                    await asyncio.wait_for(answers.until("AL"), min(resend_s, left))
                except TimeoutError:
                    continue  # no answer yet: the alarm was not stored, send it again
                return PressResult(watch_id, True, sends, connections)
        except (ConnectionError, OSError):
            pass  # reconnect and send it again
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
    return PressResult(watch_id, False, sends, connections)


@dataclass
class FleetCounts:
    connected: int = 0
    heartbeats: int = 0
    answered: int = 0
    errors: list[str] = field(default_factory=list)


def fleet_ids(first_id: str, count: int) -> list[str]:
    """``count`` consecutive watch ids from ``first_id`` (its width kept)."""
    if not WATCH_ID.fullmatch(first_id):
        raise ValueError(f"watch id {first_id!r} is not 10-15 digits")
    ids = [f"{int(first_id) + offset:0{len(first_id)}d}" for offset in range(count)]
    if not WATCH_ID.fullmatch(ids[-1]):
        raise ValueError(f"{count} watches from {first_id} run past 15 digits")
    return ids


async def _fleet_watch(
    host: str, port: int, watch_id: str, heartbeats: int, interval_s: float, counts: FleetCounts, answer_s: float
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    counts.connected += 1
    answers = _Answers(reader)
    try:
        sent = 0
        while heartbeats == 0 or sent < heartbeats:
            if sent:
                await asyncio.sleep(interval_s)  # the watch's own reporting interval
            writer.write(frame(watch_id, heartbeat_content(steps=sent)))
            await writer.drain()
            sent += 1
            counts.heartbeats += 1
            await asyncio.wait_for(answers.until("LK"), answer_s)
            counts.answered += 1
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def run_fleet(
    host: str,
    port: int,
    ids: list[str],
    *,
    heartbeats: int = 0,
    interval_s: float = 60.0,
    answer_s: float = 30.0,
    counts: FleetCounts | None = None,
) -> FleetCounts:
    """Each watch connects and sends ``heartbeats`` heartbeats (0: until cancelled),
    ``interval_s`` apart, each awaiting its ``LK`` answer for at most ``answer_s``.
    ``counts`` (returned) is kept current, so a caller that cancels still has them."""
    counts = counts if counts is not None else FleetCounts()

    async def one(watch_id: str) -> None:
        try:
            await _fleet_watch(host, port, watch_id, heartbeats, interval_s, counts, answer_s)
        except (OSError, TimeoutError) as exc:
            counts.errors.append(f"{watch_id}: {exc!r}")

    await asyncio.gather(*(one(watch_id) for watch_id in ids))
    return counts
