"""Framing of the 4G watch text protocol (the "3G/SG/CS" protocol): ``[MF*ID*LEN*CONTENT]``.

- ``MF``: the maker prefix, two letters or digits (``3G``, ``SG``, ``CS``, ``ZJ`` …).
- ``ID``: the watch's id, 10–15 digits.
- ``LEN``: four hex digits (either case), the length of ``CONTENT`` after unescaping.
  Some makers put a 4-hex index field between ``ID`` and ``LEN``
  (``[ZJ*014111001350304*0035*0097*UD,…]``: index ``0035``, length ``0x97``).
- ``CONTENT``: a command word and its comma-separated fields; binary content (voice clips)
  escapes five bytes as ``}`` followed by a byte 0x01–0x05: ``}`` ``[`` ``]`` ``,`` ``*``.
  So a raw ``[`` always starts a frame and a raw ``]`` always ends one.

``WatchFrameDecoder`` is incremental and never raises: each ``feed`` returns the frames it
completed and a ``FrameRejected`` (with its exact bytes) for everything else — garbage
between frames, a frame cut short by the next ``[``, a bad header, a wrong length, a bad
escape, an oversize frame. Every byte fed comes back exactly once, in a frame's ``raw`` or
a rejection's ``raw``, or is still pending; a bad frame never costs the good frames after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# A frame on the wire, brackets included. Binding it bounds a connection's memory; the
# 4-hex length allows 65,535 content bytes, so the longest voice clips exceed this and are
# rejected as oversize (Shouhu does not read voice clips).
MAX_FRAME_BYTES = 64 * 1024

START = ord("[")
END = ord("]")
ESCAPE = ord("}")
# ``}`` + this byte on the wire → this byte in the content.
UNESCAPED = {0x01: b"}", 0x02: b"[", 0x03: b"]", 0x04: b",", 0x05: b"*"}
ESCAPED = {value[0]: bytes((ESCAPE, code)) for code, value in UNESCAPED.items()}

MAKER = re.compile(r"[A-Za-z0-9]{2}")
WATCH_ID = re.compile(r"[0-9]{10,15}")
HEX4 = re.compile(r"[0-9A-Fa-f]{4}")
# The header up to the content: maker, id, an optional index, the length.
_HEADER = re.compile(rb"\[([A-Za-z0-9]{2})\*([0-9]{10,15})\*(?:([0-9A-Fa-f]{4})\*)?([0-9A-Fa-f]{4})\*")
_HEADER_NO_INDEX = re.compile(rb"\[([A-Za-z0-9]{2})\*([0-9]{10,15})\*()([0-9A-Fa-f]{4})\*")
# What the server may put in a text answer: printable ASCII, never a frame delimiter or
# the escape byte (text answers are not escaped: ``SOS1,<phone>`` keeps its comma).
_ANSWER_TEXT = re.compile(r"[\x20-\x5a\x5c\x5e-\x7c\x7e]*")
PHONE = re.compile(r"\+?[0-9]{3,20}")


class FrameError(StrEnum):
    """Why bytes were not a frame; also the label of the gateway's rejection counter."""

    GARBAGE = "garbage"  # bytes between frames (outside any ``[`` … ``]``)
    UNTERMINATED = "unterminated"  # a ``[`` … cut short by the next ``[``
    BAD_HEADER = "bad_header"  # not ``[MF*ID*[INDEX*]LEN*``
    WRONG_LENGTH = "wrong_length"  # LEN is not the length of the unescaped content
    BAD_ESCAPE = "bad_escape"  # ``}`` not followed by a byte 0x01–0x05
    OVERSIZE = "oversize"  # a frame longer than the decoder's limit (or its tail)


@dataclass(frozen=True, slots=True)
class WatchFrame:
    """One frame from a watch. ``content`` is unescaped; ``raw`` is the frame as it came."""

    maker: str
    device_id: str
    index: str | None
    content: bytes
    raw: bytes

    @property
    def command(self) -> str:
        """The command word (``LK``, ``UD``, ``AL`` …): the content up to its first comma.
        Bytes that are not ASCII become U+FFFD, so such a word is simply unknown."""
        return self.content.split(b",", 1)[0].decode("ascii", errors="replace")

    @property
    def body(self) -> bytes:
        """The content after the command word and its comma (empty if there is none)."""
        parts = self.content.split(b",", 1)
        return parts[1] if len(parts) == 2 else b""


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """Bytes that were not a good frame, kept whole for the dead letters."""

    reason: FrameError
    raw: bytes
    detail: str


def unescape(wire: bytes) -> bytes | None:
    """The content of ``wire`` with its ``}``-escapes undone; None if an escape is bad."""
    if ESCAPE not in wire:
        return wire
    out = bytearray()
    i = 0
    while i < len(wire):
        byte = wire[i]
        if byte != ESCAPE:
            out.append(byte)
            i += 1
            continue
        if i + 1 >= len(wire) or wire[i + 1] not in UNESCAPED:
            return None
        out += UNESCAPED[wire[i + 1]]
        i += 2
    return bytes(out)


def escape(content: bytes) -> bytes:
    """``content`` with the five delimiter bytes escaped, as binary content is sent."""
    return b"".join(ESCAPED.get(byte, bytes((byte,))) for byte in content)


def parse_frame(raw: bytes) -> WatchFrame | FrameRejected:
    """One complete frame, ``[`` to ``]``, into a ``WatchFrame``; never raises.

    With two 4-hex fields after the id, the first is the index and the second the length;
    if that reading's length is wrong, the reading without an index (the content starting
    with four hex digits and a ``*``) is tried before the frame is refused."""
    if len(raw) < 2 or raw[0] != START or raw[-1] != END:
        return FrameRejected(FrameError.BAD_HEADER, raw, "not a [ … ] frame")
    wrong: str | None = None
    for header in (_HEADER, _HEADER_NO_INDEX):
        match = header.match(raw)
        if match is None:
            continue
        content = unescape(raw[match.end() : -1])
        if content is None:
            return FrameRejected(FrameError.BAD_ESCAPE, raw, "'}' not followed by a byte 0x01-0x05")
        length = int(match.group(4), 16)
        if length != len(content):
            wrong = wrong or f"LEN says {length} bytes, the content has {len(content)}"
            continue
        index = match.group(3).decode("ascii") if match.group(3) else None
        return WatchFrame(match.group(1).decode("ascii"), match.group(2).decode("ascii"), index, content, raw)
    if wrong is not None:
        return FrameRejected(FrameError.WRONG_LENGTH, raw, wrong)
    return FrameRejected(FrameError.BAD_HEADER, raw, "not [MF*ID*LEN*… (MF 2 characters, ID 10-15 digits, LEN 4 hex)")


def _first_delimiter(buffer: bytearray, start: int) -> int:
    """The index of the first ``[`` or ``]`` at or after ``start``, or -1."""
    opening, closing = buffer.find(b"[", start), buffer.find(b"]", start)
    if opening == -1 or closing == -1:
        return max(opening, closing)
    return min(opening, closing)


class WatchFrameDecoder:
    """Frames from a byte stream, one connection's worth; see the module docstring."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 32:
            raise ValueError("max_frame_bytes must hold at least a header (32 bytes)")
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        # Inside an oversize frame: its bytes are dropped up to its ``]`` (or the next ``[``).
        self._skipping = False

    @property
    def pending(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[WatchFrame | FrameRejected]:
        """Take the next bytes read from the connection; return what they completed."""
        self._buffer += data
        out: list[WatchFrame | FrameRejected] = []
        buffer = self._buffer
        while buffer:
            if self._skipping:
                stop = _first_delimiter(buffer, 0)
                if stop == -1:
                    out.append(FrameRejected(FrameError.OVERSIZE, bytes(buffer), "the rest of an oversize frame"))
                    buffer.clear()
                    break
                self._skipping = False
                tail = stop + 1 if buffer[stop] == END else stop
                if tail:
                    out.append(FrameRejected(FrameError.OVERSIZE, bytes(buffer[:tail]), "the end of an oversize frame"))
                    del buffer[:tail]
                continue
            start = buffer.find(b"[")
            if start != 0:
                garbage = len(buffer) if start == -1 else start
                detail = f"{garbage} bytes between frames"
                out.append(FrameRejected(FrameError.GARBAGE, bytes(buffer[:garbage]), detail))
                del buffer[:garbage]
                continue
            stop = _first_delimiter(buffer, 1)
            if stop == -1:
                if len(buffer) > self.max_frame_bytes:
                    detail = f"no ']' within {self.max_frame_bytes} bytes"
                    out.append(FrameRejected(FrameError.OVERSIZE, bytes(buffer), detail))
                    buffer.clear()
                    self._skipping = True
                break  # wait for the rest of the frame
            if buffer[stop] == START:
                out.append(FrameRejected(FrameError.UNTERMINATED, bytes(buffer[:stop]), "a new '[' before this ']'"))
                del buffer[:stop]
                continue
            raw = bytes(buffer[: stop + 1])
            del buffer[: stop + 1]
            if len(raw) > self.max_frame_bytes:
                out.append(FrameRejected(FrameError.OVERSIZE, raw, f"{len(raw)} bytes > {self.max_frame_bytes}"))
            else:
                out.append(parse_frame(raw))
        return out


# ----------------------------------------------------------------------------- encoding


def encode_frame(maker: str, device_id: str, content: str, index: str | None = None) -> bytes:
    """A text frame from the server, ``[MF*ID*[INDEX*]LEN*CONTENT]``.

    Raises ``ValueError`` for a field the protocol cannot carry: these are our own
    answers and commands, so a bad one is a bug to surface, not input to tolerate."""
    if not MAKER.fullmatch(maker):
        raise ValueError(f"maker {maker!r} is not 2 letters or digits")
    if not WATCH_ID.fullmatch(device_id):
        raise ValueError(f"watch id {device_id!r} is not 10-15 digits")
    if index is not None and not HEX4.fullmatch(index):
        raise ValueError(f"index {index!r} is not 4 hex digits")
    if not _ANSWER_TEXT.fullmatch(content):
        raise ValueError(f"content {content[:40]!r} is not printable ASCII free of '[', ']' and '}}'")
    if len(content) > 0xFFFF:
        raise ValueError("content longer than 65,535 bytes")
    head = f"[{maker}*{device_id}*" + (f"{index}*" if index else "")
    return f"{head}{len(content):04X}*{content}]".encode("ascii")


def answer(frame: WatchFrame, content: str) -> bytes:
    """The server's answer to ``frame``: the same maker, id and index."""
    return encode_frame(frame.maker, frame.device_id, content, frame.index)


def answer_heartbeat(frame: WatchFrame) -> bytes:
    """``LK``: the answer to a heartbeat; a watch that gets none reconnects."""
    return answer(frame, "LK")


def answer_alarm(frame: WatchFrame) -> bytes:
    """``AL``: the answer to an alarm; a watch that gets none sends the alarm again."""
    return answer(frame, "AL")


def command_locate(maker: str, device_id: str, index: str | None = None) -> bytes:
    """``CR``: report the position now."""
    return encode_frame(maker, device_id, "CR", index)


def command_sos_number(maker: str, device_id: str, slot: int, phone: str, index: str | None = None) -> bytes:
    """``SOS1,<phone>`` … ``SOS3,<phone>``: the numbers the watch's own SOS key calls."""
    if slot not in (1, 2, 3):
        raise ValueError(f"SOS slot {slot} is not 1, 2 or 3")
    if not PHONE.fullmatch(phone):
        raise ValueError(f"phone {phone!r} is not digits (3-20, an optional leading +)")
    return encode_frame(maker, device_id, f"SOS{slot},{phone}", index)


def command_upload_interval(maker: str, device_id: str, seconds: int, index: str | None = None) -> bytes:
    """``UPLOAD,<seconds>``: how often the watch reports its position."""
    if not 1 <= seconds <= 86_400:
        raise ValueError(f"upload interval {seconds} s is not 1-86400")
    return encode_frame(maker, device_id, f"UPLOAD,{seconds}", index)
