"""gateway/watch_frames.py: the 4G watch protocol's framing, from its rules, with frames
written here (pure: no services). Ends with a fuzz test of the decoder."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.watch_frames import (
    FrameError,
    FrameRejected,
    WatchFrame,
    WatchFrameDecoder,
    answer_alarm,
    answer_heartbeat,
    command_locate,
    command_sos_number,
    command_upload_interval,
    encode_frame,
    escape,
    parse_frame,
    unescape,
)

WATCH = "8612345678"
LONG_WATCH = "860000111122223"


def frame(content: bytes, *, maker: bytes = b"3G", watch: str = WATCH, index: bytes | None = None) -> bytes:
    """A frame as a watch writes it: LEN counts the content before escaping."""
    head = b"[" + maker + b"*" + watch.encode() + b"*" + (index + b"*" if index else b"")
    return head + f"{len(content):04X}".encode() + b"*" + escape(content) + b"]"


def decode_all(data: bytes, max_frame_bytes: int = 1024) -> list[WatchFrame | FrameRejected]:
    return WatchFrameDecoder(max_frame_bytes).feed(data)


def frames_of(results: list[WatchFrame | FrameRejected]) -> list[WatchFrame]:
    return [r for r in results if isinstance(r, WatchFrame)]


def rejections(results: list[WatchFrame | FrameRejected]) -> list[FrameError]:
    return [r.reason for r in results if isinstance(r, FrameRejected)]


# ------------------------------------------------------------------------------ one frame


@pytest.mark.parametrize(
    ("raw", "maker", "watch", "index", "content"),
    [
        (b"[3G*8612345678*0002*LK]", "3G", WATCH, None, b"LK"),
        (b"[SG*8612345678*000B*LK,120,3,88]", "SG", WATCH, None, b"LK,120,3,88"),
        # Lower-case hex length, a 15-digit id.
        (b"[CS*860000111122223*000b*LK,120,3,88]", "CS", LONG_WATCH, None, b"LK,120,3,88"),
        # An index field between the id and the length.
        (b"[ZJ*860000111122223*01A0*0002*LK]", "ZJ", LONG_WATCH, "01A0", b"LK"),
        # Content starting with four hex digits and '*': the length decides there is no index.
        (b"[3G*8612345678*0009*CAFE*1234]", "3G", WATCH, None, b"CAFE*1234"),
        # An empty content is a frame (its command is unknown to the mapping, not to framing).
        (b"[3G*8612345678*0000*]", "3G", WATCH, None, b""),
        # Binary content: LEN counts the unescaped bytes; all five escapes.
        (b"[3G*8612345678*0009*TK,}\x01}\x02}\x03}\x04}\x05\xff]", "3G", WATCH, None, b"TK,}[],*\xff"),
        # Non-ASCII content is framed as bytes.
        ("[3G*8612345678*000A*MSG,你好]".encode(), "3G", WATCH, None, "MSG,你好".encode()),
    ],
)
def test_a_frame_is_read(raw: bytes, maker: str, watch: str, index: str | None, content: bytes) -> None:
    [got] = decode_all(raw)
    assert got == WatchFrame(maker, watch, index, content, raw)


def test_the_command_and_body_split_at_the_first_comma() -> None:
    [got] = frames_of(decode_all(b"[3G*8612345678*000B*LK,120,3,88]"))
    assert (got.command, got.body) == ("LK", b"120,3,88")
    [bare] = frames_of(decode_all(b"[3G*8612345678*0002*LK]"))
    assert (bare.command, bare.body) == ("LK", b"")
    [odd] = frames_of(decode_all("[3G*8612345678*0004*Ł,1]".encode()))
    assert odd.command == "\ufffd\ufffd"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[3G*8612345678*0003*LK]", FrameError.WRONG_LENGTH),
        (b"[3G*8612345678*0001*LK]", FrameError.WRONG_LENGTH),
        (b"[3G*8612345678*0005*TK,}\x01]", FrameError.WRONG_LENGTH),  # counted escaped: 4 ≠ 5
        (b"[3G*8612345678*0004*TK,}\x06]", FrameError.BAD_ESCAPE),
        (b"[3G*8612345678*0004*TK,}]", FrameError.BAD_ESCAPE),
        (b"[3GX*8612345678*0002*LK]", FrameError.BAD_HEADER),  # maker of three
        (b"[3G*861234567*0002*LK]", FrameError.BAD_HEADER),  # id of nine digits
        (b"[3G*8612345678901234*0002*LK]", FrameError.BAD_HEADER),  # id of sixteen digits
        (b"[3G*86123456AB*0002*LK]", FrameError.BAD_HEADER),  # id not digits
        (b"[3G*8612345678*00G2*LK]", FrameError.BAD_HEADER),  # length not hex
        (b"[3G*8612345678*002*LK]", FrameError.BAD_HEADER),  # length of three digits
        (b"[3G*8612345678*0002LK]", FrameError.BAD_HEADER),  # no '*' after the length
        ("[3G*86123456７8*0002*LK]".encode(), FrameError.BAD_HEADER),  # a full-width digit
        (b"[]", FrameError.BAD_HEADER),
    ],
)
def test_a_bad_frame_is_rejected_with_its_reason_and_the_next_good_frame_still_comes(
    raw: bytes, reason: FrameError
) -> None:
    good = frame(b"LK,1,2,3")
    results = decode_all(raw + good)
    first = results[0]
    assert isinstance(first, FrameRejected)
    assert (first.reason, first.raw) == (reason, raw)
    assert rejections(results) == [reason]
    assert [f.raw for f in frames_of(results)] == [good]


def test_a_wrong_length_names_both_lengths() -> None:
    [rejected] = decode_all(b"[3G*8612345678*0003*LK]")
    assert isinstance(rejected, FrameRejected)
    assert rejected.detail == "LEN says 3 bytes, the content has 2"


# ----------------------------------------------------------------------- the byte stream


def test_several_frames_in_one_read_come_out_in_order() -> None:
    frames = [frame(b"LK"), frame(b"heart,71", index=b"0001"), frame(b"oxygen,97", maker=b"SG")]
    assert [f.raw for f in frames_of(decode_all(b"".join(frames)))] == frames


def test_a_frame_split_across_reads_at_every_point_is_read_once() -> None:
    raw = frame(b"UD,041226,101500,A,30.1,N,120.2,E,0,0,0,8,20,80,100,0,00000000,0,0", index=b"0042")
    for cut in range(len(raw) + 1):
        decoder = WatchFrameDecoder()
        first, second = decoder.feed(raw[:cut]), decoder.feed(raw[cut:])
        assert first + second == [parse_frame(raw)], cut
        assert decoder.pending == 0


def test_a_frame_fed_a_byte_at_a_time_is_read() -> None:
    raw = frame(b"TK,\x00}[]*,\xff", maker=b"CS")
    decoder = WatchFrameDecoder()
    results = [r for byte in raw for r in decoder.feed(bytes([byte]))]
    assert results == [WatchFrame("CS", WATCH, None, b"TK,\x00}[]*,\xff", raw)]


def test_garbage_between_frames_is_skipped_and_given_back_as_garbage() -> None:
    results = decode_all(b"\r\n" + frame(b"LK") + b"GET / HTTP/1.1\r\n]]" + frame(b"LK") + b"\x00\xff")
    assert [type(r).__name__ for r in results] == [
        "FrameRejected",
        "WatchFrame",
        "FrameRejected",
        "WatchFrame",
        "FrameRejected",
    ]
    assert [r.raw for r in results if isinstance(r, FrameRejected)] == [b"\r\n", b"GET / HTTP/1.1\r\n]]", b"\x00\xff"]
    assert set(rejections(results)) == {FrameError.GARBAGE}


def test_a_frame_cut_short_by_the_next_one_is_rejected_and_the_next_one_read() -> None:
    cut = b"[3G*8612345678*0010*UD,0412"
    results = decode_all(cut + frame(b"LK"))
    assert results == [
        FrameRejected(FrameError.UNTERMINATED, cut, "a new '[' before this ']'"),
        parse_frame(frame(b"LK")),
    ]


def test_an_oversize_frame_is_rejected_and_the_next_one_read() -> None:
    big = frame(b"TK," + b"\x01" * 100)
    results = decode_all(big + frame(b"LK"), max_frame_bytes=64)
    assert rejections(results) == [FrameError.OVERSIZE]
    assert [f.content for f in frames_of(results)] == [b"LK"]


def test_an_oversize_frame_arriving_in_pieces_is_dropped_without_holding_it() -> None:
    """The decoder gives up at the limit and drops the rest as it comes: its memory stays
    bounded by the limit plus one read."""
    decoder = WatchFrameDecoder(max_frame_bytes=64)
    head = b"[3G*8612345678*FFFF*TK,"
    results = decoder.feed(head + b"a" * 30)
    assert results == []
    assert decoder.pending == len(head) + 30
    results = decoder.feed(b"a" * 50)
    assert rejections(results) == [FrameError.OVERSIZE]
    assert decoder.pending == 0
    for _ in range(100):
        assert rejections(decoder.feed(b"b" * 1000)) == [FrameError.OVERSIZE]
        assert decoder.pending == 0
    results = decoder.feed(b"bbb]" + frame(b"LK"))
    assert results[0] == FrameRejected(FrameError.OVERSIZE, b"bbb]", "the end of an oversize frame")
    assert [f.content for f in frames_of(results)] == [b"LK"]


def test_an_oversize_frame_ended_by_a_new_frame_lets_it_through() -> None:
    decoder = WatchFrameDecoder(max_frame_bytes=64)
    decoder.feed(b"[" + b"x" * 100)
    results = decoder.feed(b"yy" + frame(b"LK"))
    assert results[0] == FrameRejected(FrameError.OVERSIZE, b"yy", "the end of an oversize frame")
    assert [f.content for f in frames_of(results)] == [b"LK"]


def test_the_limit_must_hold_a_header() -> None:
    with pytest.raises(ValueError, match="at least a header"):
        WatchFrameDecoder(max_frame_bytes=16)


# ------------------------------------------------------------------------------ escaping


@pytest.mark.parametrize(
    ("content", "wire"),
    [
        (b"plain", b"plain"),
        (b"}", b"}\x01"),
        (b"[", b"}\x02"),
        (b"]", b"}\x03"),
        (b",", b"}\x04"),
        (b"*", b"}\x05"),
        (b"a}}b", b"a}\x01}\x01b"),
    ],
)
def test_escape_and_unescape(content: bytes, wire: bytes) -> None:
    assert escape(content) == wire
    assert unescape(wire) == content


@pytest.mark.parametrize("wire", [b"}", b"a}", b"}\x00", b"}\x06", b"}}"])
def test_a_bad_escape_is_none(wire: bytes) -> None:
    assert unescape(wire) is None


# ------------------------------------------------------------------------------ encoding


def test_answers_keep_the_watchs_maker_id_and_index() -> None:
    [with_index] = frames_of(decode_all(frame(b"LK", maker=b"ZJ", watch=LONG_WATCH, index=b"00A1")))
    assert answer_heartbeat(with_index) == b"[ZJ*860000111122223*00A1*0002*LK]"
    [plain] = frames_of(decode_all(frame(b"AL,x")))
    assert answer_alarm(plain) == b"[3G*8612345678*0002*AL]"


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (command_locate("3G", WATCH), b"[3G*8612345678*0002*CR]"),
        (command_sos_number("SG", WATCH, 1, "13800138000"), b"[SG*8612345678*0010*SOS1,13800138000]"),
        (command_sos_number("SG", WATCH, 3, "+8613800138000"), b"[SG*8612345678*0013*SOS3,+8613800138000]"),
        (command_upload_interval("CS", WATCH, 300), b"[CS*8612345678*000A*UPLOAD,300]"),
        (command_locate("ZJ", LONG_WATCH, index="0007"), b"[ZJ*860000111122223*0007*0002*CR]"),
    ],
)
def test_commands_are_framed(encoded: bytes, expected: bytes) -> None:
    assert encoded == expected
    [decoded] = decode_all(encoded)
    assert isinstance(decoded, WatchFrame)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: encode_frame("3GX", WATCH, "LK"), "maker"),
        (lambda: encode_frame("3G", "123", "LK"), "watch id"),
        (lambda: encode_frame("3G", WATCH, "LK", index="12"), "index"),
        (lambda: encode_frame("3G", WATCH, "a]b"), "content"),
        (lambda: encode_frame("3G", WATCH, "你好"), "content"),
        (lambda: command_sos_number("3G", WATCH, 4, "13800138000"), "slot"),
        (lambda: command_sos_number("3G", WATCH, 1, "138-0013"), "phone"),
        (lambda: command_sos_number("3G", WATCH, 1, "1380013800,0"), "phone"),
        (lambda: command_upload_interval("3G", WATCH, 0), "interval"),
        (lambda: command_upload_interval("3G", WATCH, 86_401), "interval"),
    ],
)
def test_the_encoder_refuses_what_the_protocol_cannot_carry(build: object, message: str) -> None:
    assert callable(build)
    with pytest.raises(ValueError, match=message):
        build()


# ---------------------------------------------------------------------------------- fuzz

MAX = 256
makers = st.sampled_from([b"3G", b"SG", b"CS", b"ZJ"])
watch_ids = st.from_regex(r"[0-9]{10,15}", fullmatch=True)
indexes = st.none() | st.from_regex(rb"[0-9A-F]{4}", fullmatch=True)
contents = st.binary(max_size=120)


@st.composite
def good_frames(draw: st.DrawFn) -> bytes:
    return frame(draw(contents), maker=draw(makers), watch=draw(watch_ids), index=draw(indexes))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_in_pieces(pieces: list[bytes]) -> tuple[list[WatchFrame | FrameRejected], WatchFrameDecoder]:
    decoder = WatchFrameDecoder(MAX)
    return [r for piece in pieces for r in decoder.feed(piece)], decoder


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=8))
@example(data=b"[3G*8612345678*0002*LK]" * 3, cuts=[5, 30])
@example(data=b"[" + b"}" * 300 + b"]", cuts=[])
@example(data=b"x[ab[3G*8612345678*0002*LK]]", cuts=[3])
def test_fuzz_arbitrary_bytes_never_raise_and_every_byte_is_accounted_for(data: bytes, cuts: list[int]) -> None:
    results, decoder = feed_in_pieces(split(data, cuts))
    consumed = b"".join(r.raw for r in results)
    # Every byte comes back once, in order, in a frame or a rejection; the rest is pending.
    assert consumed + data[len(data) - decoder.pending :] == data
    for result in results:
        if isinstance(result, WatchFrame):
            assert parse_frame(result.raw) == result  # a frame is exactly what its bytes say
            assert len(result.raw) <= MAX
        else:
            assert result.raw


@FUZZ
@given(
    parts=st.lists(st.tuples(st.binary(max_size=300), good_frames()), max_size=6),
    tail=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 3000), max_size=10),
)
def test_fuzz_good_frames_among_garbage_all_come_out(
    parts: list[tuple[bytes, bytes]], tail: bytes, cuts: list[int]
) -> None:
    """Whatever the garbage (it may hold '[', ']', '}' or whole frames of its own), and
    however the stream is cut into reads, every good frame comes out, in order."""
    stream = b"".join(garbage + good for garbage, good in parts) + tail
    results, _ = feed_in_pieces(split(stream, cuts))
    decoded = iter(f.raw for f in frames_of(results))
    for _, good in parts:
        assert any(raw == good for raw in decoded), f"lost {good!r}"
