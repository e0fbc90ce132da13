"""gateway/watch_messages.py: watch frames → v1 messages, from the protocol's rules with
frames written here (pure: no services). Every publication is checked with the hub's own
parser (devices/contract.py), so what the gateway sends is what the hub stores."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.contract import (
    DeviceMessage,
    GatewayDeadLetter,
    MqttChannel,
    Rejected,
    RejectReason,
    gateway_dead_letter_topic,
    parse_message,
)
from gateway.watch_frames import WatchFrame, escape, parse_frame
from gateway.watch_messages import (
    AnswerWhen,
    DeadLetter,
    DeadLetterReason,
    Ignored,
    IgnoreReason,
    Mapped,
    MapResult,
    Publication,
    map_frame,
    unregistered_device_id,
)

WATCH = "8612345678"
BAND = "wb-0001"
CHINA = timezone(timedelta(hours=8))
NOW = datetime(2026, 12, 4, 2, 30, tzinfo=UTC)


def lookup(watch_id: str) -> str | None:
    return {WATCH: BAND}.get(watch_id)


def watch_frame(content: str | bytes, *, watch: str = WATCH, index: str | None = None, maker: str = "3G") -> WatchFrame:
    body = content.encode() if isinstance(content, str) else content
    head = f"[{maker}*{watch}*" + (f"{index}*" if index else "") + f"{len(body):04X}*"
    parsed = parse_frame(head.encode() + escape(body) + b"]")
    assert isinstance(parsed, WatchFrame), parsed
    return parsed


def mapped(content: str | bytes, now: datetime = NOW, **kwargs: Any) -> Mapped:
    result = map_frame(watch_frame(content, **kwargs), lookup, now, CHINA)
    assert isinstance(result, Mapped), result
    return result


def payloads(result: Mapped) -> dict[MqttChannel, dict[str, Any]]:
    return {p.topic.channel: json.loads(p.payload) for p in result.publications}


def hub_reads(publication: Publication) -> DeviceMessage:
    """The hub's own parser takes the publication as a stored message."""
    parsed = parse_message(str(publication.topic), publication.payload)
    assert isinstance(parsed, DeviceMessage), parsed
    assert parsed.payload.msg_id == publication.msg_id
    return parsed


def position(
    status: str = "00000000",
    *,
    valid: str = "A",
    lat: str = "30.274085",
    ns: str = "N",
    lon: str = "120.155070",
    ew: str = "E",
    battery: str = "76",
    steps: str = "1520",
    date: str = "041226",
    time: str = "101500",
) -> str:
    """A position body: date,time,A|V,lat,N|S,lon,E|W,speed,course,altitude,satellites,gsm,
    battery,steps,rolls,status, then a cell tower."""
    head = f"{date},{time},{valid},{lat},{ns},{lon},{ew},0.5,90.0,12.0,7,80"
    return f"{head},{battery},{steps},0,{status},1,255,460,0,9340,3663,35"


# ------------------------------------------------------------------------------- heartbeat


def test_a_bare_heartbeat_is_telemetry_stamped_now_and_answered_at_once() -> None:
    result = mapped("LK")
    [publication] = result.publications
    assert str(publication.topic) == f"shouhu/v1/wristband/{BAND}/telemetry"
    assert hub_reads(publication).payload.ts == NOW
    assert set(payloads(result)[MqttChannel.TELEMETRY]) == {"msg_id", "ts"}
    assert result.answer is not None
    assert (result.answer.frame, result.answer.when) == (b"[3G*8612345678*0002*LK]", AnswerWhen.NOW)


def test_a_heartbeat_with_steps_rolls_and_battery_carries_them() -> None:
    result = mapped("LK,2048,3,64", index="00A1")
    telemetry = payloads(result)[MqttChannel.TELEMETRY]
    assert (telemetry["steps"], telemetry["battery"]) == (2048, 64)
    assert result.answer is not None
    assert result.answer.frame == b"[3G*8612345678*00A1*0002*LK]"


@pytest.mark.parametrize("content", ["LK,0,100", "LK,a,b,c", "LK,,,", "LK,1_0,2,3", "LK," + "9" * 5000 + ",1,2"])
def test_a_heartbeat_with_other_fields_still_proves_the_watch_alive(content: str) -> None:
    result = mapped(content)
    assert set(payloads(result)[MqttChannel.TELEMETRY]) == {"msg_id", "ts"}
    assert result.answer is not None
    assert result.answer.when is AnswerWhen.NOW


def test_each_heartbeat_has_its_own_msg_id() -> None:
    """A heartbeat carries no time of the watch's: the gateway's clock tells two apart."""
    first, second = mapped("LK,1,0,90"), mapped("LK,1,0,90", now=NOW + timedelta(minutes=5))
    assert first.publications[0].msg_id != second.publications[0].msg_id


# ------------------------------------------------------------------------------- positions


@pytest.mark.parametrize("command", ["UD", "UD2", "UD_LTE", "UD_WCDMA"])
def test_a_position_report_is_telemetry_at_the_watchs_time(command: str) -> None:
    result = mapped(f"{command},{position()}")
    [publication] = result.publications
    message = hub_reads(publication)
    assert message.topic.channel is MqttChannel.TELEMETRY
    assert message.payload.ts == datetime(2026, 12, 4, 10, 15, tzinfo=CHINA)
    assert payloads(result)[MqttChannel.TELEMETRY] == {
        "msg_id": publication.msg_id,
        "ts": "2026-12-04T10:15:00+08:00",
        "battery": 76,
        "steps": 1520,
        "worn": True,
        "lat": 30.274085,
        "lon": 120.15507,
        "watch_status": "00000000",
    }
    assert result.answer is None


@pytest.mark.parametrize(
    ("ns", "lat", "ew", "lon", "expected"),
    [
        ("S", "33.5", "W", "70.25", (-33.5, -70.25)),
        ("N", "-33.5", "E", "-70.25", (-33.5, -70.25)),  # the sign and the hemisphere both
        ("S", "-33.5", "W", "-70.25", (-33.5, -70.25)),
        ("N", " 9.25", "", "8.5", (9.25, 8.5)),  # padded, and no E|W at all
    ],
)
def test_hemispheres(ns: str, lat: str, ew: str, lon: str, expected: tuple[float, float]) -> None:
    telemetry = payloads(mapped("UD," + position(ns=ns, lat=lat, ew=ew, lon=lon)))[MqttChannel.TELEMETRY]
    assert (telemetry["lat"], telemetry["lon"]) == expected


def test_a_position_without_a_fix_gives_no_coordinates() -> None:
    telemetry = payloads(mapped("UD," + position(valid="V")))[MqttChannel.TELEMETRY]
    assert "lat" not in telemetry
    assert "lon" not in telemetry
    assert telemetry["battery"] == 76


def test_a_removed_band_is_not_worn() -> None:
    telemetry = payloads(mapped("UD2," + position("00100000")))[MqttChannel.TELEMETRY]
    assert telemetry["worn"] is False


def test_a_position_reports_status_word_is_kept_but_never_pages() -> None:
    result = mapped("UD," + position("00610000"))  # SOS and both fall bits
    assert [p.topic.channel for p in result.publications] == [MqttChannel.TELEMETRY]
    assert payloads(result)[MqttChannel.TELEMETRY]["watch_status"] == "00610000"


# ---------------------------------------------------------------------------------- alarms


@pytest.mark.parametrize("command", ["AL", "AL_LTE"])
def test_an_sos_alarm_pages_and_is_answered_after_its_receipt(command: str) -> None:
    result = mapped(f"{command},{position('00010000')}", index="0007")
    sos, telemetry = result.publications
    assert hub_reads(sos).topic.channel is MqttChannel.SOS
    assert json.loads(sos.payload) == {
        "msg_id": sos.msg_id,
        "ts": "2026-12-04T10:15:00+08:00",
        "action": "press",
        "lat": 30.274085,
        "lon": 120.15507,
        "battery": 76,
    }
    assert hub_reads(telemetry).topic.channel is MqttChannel.TELEMETRY
    assert sos.msg_id != telemetry.msg_id
    assert result.answer is not None
    assert result.answer.frame == b"[3G*8612345678*0007*0002*AL]"
    assert (result.answer.when, result.answer.receipt_msg_ids) == (AnswerWhen.AFTER_RECEIPTS, (sos.msg_id,))


@pytest.mark.parametrize("status", ["00200000", "00400000", "00600000"])
def test_a_fall_alarm_pages(status: str) -> None:
    result = mapped("AL," + position(status, valid="V"))
    fall = result.publications[0]
    assert hub_reads(fall).topic.channel is MqttChannel.FALL
    assert json.loads(fall.payload) == {"msg_id": fall.msg_id, "ts": "2026-12-04T10:15:00+08:00"}
    assert result.answer is not None
    assert result.answer.receipt_msg_ids == (fall.msg_id,)


def test_sos_and_fall_in_one_alarm_both_page_and_both_are_awaited() -> None:
    result = mapped("AL," + position("00210000"))
    channels = [p.topic.channel for p in result.publications]
    assert channels == [MqttChannel.SOS, MqttChannel.FALL, MqttChannel.TELEMETRY]
    assert result.answer is not None
    assert result.answer.receipt_msg_ids == (result.publications[0].msg_id, result.publications[1].msg_id)


@pytest.mark.parametrize(
    ("status", "alarms", "worn"),
    [
        ("00000001", ["low_battery"], True),
        ("00020000", ["low_battery"], True),
        ("00004000", ["power_cut"], True),
        ("00024001", ["low_battery", "power_cut"], True),
        ("00100000", None, False),
        ("00000000", None, True),
        ("0001", ["low_battery"], True),  # a short status word
    ],
)
def test_an_alarm_that_pages_nothing_is_telemetry_answered_at_once(
    status: str, alarms: list[str] | None, worn: bool
) -> None:
    result = mapped("AL," + position(status))
    [telemetry] = result.publications
    assert json.loads(telemetry.payload).get("watch_alarms") == alarms
    assert json.loads(telemetry.payload)["worn"] is worn
    assert result.answer is not None
    assert (result.answer.when, result.answer.receipt_msg_ids) == (AnswerWhen.NOW, ())


def test_a_resent_alarm_has_the_same_msg_ids_and_the_same_bytes() -> None:
    """The hub's ledger folds a resend into a redelivery only if both are equal."""
    first = mapped("AL," + position("00010000"), index="0001")
    again = mapped("AL," + position("00010000"), index="0002", now=NOW + timedelta(seconds=20))
    assert first.publications == again.publications


def test_alarms_at_other_times_are_other_messages() -> None:
    first = mapped("AL," + position("00010000", time="101500"))
    later = mapped("AL," + position("00010000", time="101530"))
    assert {p.msg_id for p in first.publications}.isdisjoint(p.msg_id for p in later.publications)


def test_another_watchs_alarm_is_another_message() -> None:
    other = "8600000002"

    def both(watch_id: str) -> str | None:
        return {WATCH: BAND, other: "wb-0002"}.get(watch_id)

    mine = map_frame(watch_frame("AL," + position("00010000")), both, NOW, CHINA)
    theirs = map_frame(watch_frame("AL," + position("00010000"), watch=other), both, NOW, CHINA)
    assert isinstance(mine, Mapped)
    assert isinstance(theirs, Mapped)
    assert mine.publications[0].msg_id != theirs.publications[0].msg_id


def test_an_alarm_with_an_impossible_date_is_stamped_now_and_still_pages() -> None:
    result = mapped("AL," + position("00010000", date="000000"))
    assert hub_reads(result.publications[0]).payload.ts == NOW
    later = mapped("AL," + position("00010000", date="000000"), now=NOW + timedelta(seconds=20))
    # Without the watch's time its resends cannot be told from new presses: each is its own
    # message (the hub joins them to the open incident), never a reused msg_id.
    assert result.publications[0].msg_id != later.publications[0].msg_id


@pytest.mark.parametrize(
    "body",
    [
        "041226,101500,A,30.1,N",  # too few fields
        position("00010000", lat="north"),
        position("00010000", valid="X"),
        position("zz010000"),
        position("00010000", battery="7e"),
        position("00010000", lat="inf"),
        position("00010000", lat="1" * 400),
    ],
)
def test_an_unreadable_alarm_still_goes_to_the_sos_topic_as_it_came(body: str) -> None:
    """It may be an SOS: the hub pages what it cannot read (``payload_unreadable``)."""
    frame = watch_frame("AL," + body)
    result = map_frame(frame, lookup, NOW, CHINA)
    assert isinstance(result, Mapped)
    [publication] = result.publications
    assert (publication.msg_id, publication.payload) == (None, frame.raw)
    parsed = parse_message(str(publication.topic), publication.payload)
    assert isinstance(parsed, Rejected)
    assert parsed.topic is not None
    assert parsed.topic.channel is MqttChannel.SOS
    assert result.answer is not None
    assert result.answer.when is AnswerWhen.NOW


def test_a_value_out_of_its_range_is_left_out_and_the_rest_kept() -> None:
    result = mapped("AL," + position("00010000", battery="140", lat="95.5"))
    sos, telemetry = (json.loads(p.payload) for p in result.publications)
    assert sos.keys() == {"msg_id", "ts", "action"}  # no battery, and half a position is none
    assert telemetry["steps"] == 1520
    assert "battery" not in telemetry
    assert "lon" not in telemetry
    for publication in result.publications:
        hub_reads(publication)


# ---------------------------------------------------------------------------------- health


@pytest.mark.parametrize(
    ("content", "fields"),
    [
        ("bphrt,128,82,71,,,,", {"heart_rate": 71, "bp_systolic": 128, "bp_diastolic": 82}),
        ("bphrt,128,82", {"bp_systolic": 128, "bp_diastolic": 82}),
        ("BLOOD,131,85", {"bp_systolic": 131, "bp_diastolic": 85}),
        ("heart,66", {"heart_rate": 66}),
        ("oxygen,97", {"spo2": 97}),
        ("btemp2,1,36.55", {"body_temp_c": 36.55}),
    ],
)
def test_a_health_reading_is_telemetry_stamped_now(content: str, fields: dict[str, float]) -> None:
    result = mapped(content)
    [publication] = result.publications
    assert hub_reads(publication).payload.ts == NOW
    body = json.loads(publication.payload)
    assert {key: body[key] for key in body if key not in ("msg_id", "ts")} == fields
    assert result.answer is None


@pytest.mark.parametrize("content", ["heart,0", "oxygen,0", "btemp2,0,0", "bphrt,0,0,0", "btemp2,1"])
def test_a_health_frame_without_a_value_is_ignored(content: str) -> None:
    result = map_frame(watch_frame(content), lookup, NOW, CHINA)
    assert isinstance(result, Ignored)
    assert result.reason is IgnoreReason.NO_READING


def test_an_impossible_reading_is_left_out() -> None:
    result = map_frame(watch_frame("oxygen,140"), lookup, NOW, CHINA)
    assert isinstance(result, Mapped)
    assert set(json.loads(result.publications[0].payload)) == {"msg_id", "ts"}


# ------------------------------------------------------------------ ignored and dead letters


@pytest.mark.parametrize(
    "content", ["TKQ", "TK,#!AMR\x01\x02", "INIT", "WT," + position(), "UD3," + position(), "", "lk"]
)
def test_a_command_shouhu_does_not_read_is_ignored(content: str) -> None:
    result = map_frame(watch_frame(content), lookup, NOW, CHINA)
    assert isinstance(result, Ignored)
    assert result.reason is IgnoreReason.UNKNOWN_COMMAND


@pytest.mark.parametrize("content", ["LK", "UD," + position("00010000"), "AL," + position("00100000"), "heart,70"])
def test_a_watch_the_registry_does_not_have_is_a_dead_letter_with_its_bytes(content: str) -> None:
    frame = watch_frame(content, watch="8699999999")
    result = map_frame(frame, lookup, NOW, CHINA)
    assert result == DeadLetter(DeadLetterReason.UNKNOWN_WATCH, "watch 8699999999", "8699999999", frame.raw)


@pytest.mark.parametrize(
    ("status", "channels"), [("00010000", ["sos"]), ("00200000", ["fall"]), ("00410000", ["sos", "fall"])]
)
def test_an_sos_or_fall_of_a_watch_the_registry_does_not_have_still_pages(status: str, channels: list[str]) -> None:
    """When in doubt about an SOS, page: its alarms alone, under the derived id the hub
    does not know either (so it opens ``sos_unregistered``), answered after the receipt."""
    result = map_frame(watch_frame("AL," + position(status), watch="8699999999"), lookup, NOW, CHINA)
    assert isinstance(result, Mapped)
    assert result.unregistered
    assert result.wristband_id == unregistered_device_id("8699999999") == "watch-8699999999"
    assert [p.topic.channel.value for p in result.publications] == channels
    assert all(hub_reads(p).topic.device_id == "watch-8699999999" for p in result.publications)
    assert result.answer is not None
    assert result.answer.when is AnswerWhen.AFTER_RECEIPTS
    assert result.answer.receipt_msg_ids == tuple(p.msg_id for p in result.publications)


def test_an_unreadable_alarm_of_a_watch_the_registry_does_not_have_still_pages() -> None:
    result = map_frame(watch_frame("AL,041226,101500,A,north", watch="8699999999"), lookup, NOW, CHINA)
    assert isinstance(result, Mapped)
    assert result.unregistered
    assert [str(p.topic) for p in result.publications] == ["shouhu/v1/wristband/watch-8699999999/sos"]


@pytest.mark.parametrize(
    "content",
    [
        "UD,041226,101500",
        "UD," + position(lat="30,5"),
        "heart,seventy",
        "bphrt,120",
        "UD," + position(steps="-5"),
        "UD_LTE," + position(steps="1" * 30),
        b"UD," + position().encode().replace(b"N", "北".encode()),
        b"heart," + "７０".encode(),
    ],
)
def test_an_unreadable_report_is_a_dead_letter_with_its_bytes(content: str | bytes) -> None:
    frame = watch_frame(content)
    result = map_frame(frame, lookup, NOW, CHINA)
    assert isinstance(result, DeadLetter)
    assert (result.reason, result.raw, result.watch_id) == (DeadLetterReason.UNREADABLE, frame.raw, WATCH)


def test_now_must_carry_its_zone() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        map_frame(watch_frame("LK"), lookup, datetime(2026, 12, 4, 2, 30), CHINA)  # noqa: DTZ001


# ---------------------------------------------------------------------------------- fuzz

commands = st.sampled_from(
    ["LK", "UD", "UD2", "UD_LTE", "UD_WCDMA", "AL", "AL_LTE", "bphrt", "BLOOD", "heart", "oxygen", "btemp2", "TK"]
)
field = st.one_of(
    st.from_regex(r"-?[0-9]{1,6}(\.[0-9]{1,6})?", fullmatch=True),
    st.sampled_from(["", "A", "V", "N", "S", "E", "W", "00010000", "00200000", "041226", "101500", "inf", "ffff"]),
    st.text(max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(command=commands, fields=st.lists(field, max_size=22), now_s=st.integers(0, 10**9))
def test_fuzz_any_known_command_maps_without_raising_to_what_the_hub_accepts(
    command: str, fields: list[str], now_s: int
) -> None:
    now = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(seconds=now_s)
    content = ",".join([command, *fields]).encode("utf-8")
    if len(content) > 0xFFFF:
        return
    result: MapResult = map_frame(watch_frame(content), lookup, now, CHINA)
    if not isinstance(result, Mapped):
        return
    for publication in result.publications:
        if publication.msg_id is None:
            assert publication.topic.channel is MqttChannel.SOS  # an unreadable alarm, paged as such
            continue
        hub_reads(publication)
        assert len(publication.msg_id) <= 64
    if result.answer is not None and result.answer.when is AnswerWhen.AFTER_RECEIPTS:
        alarm_ids = {p.msg_id for p in result.publications if p.alarm}
        assert set(result.answer.receipt_msg_ids) == alarm_ids


def test_reject_reason_of_an_unreadable_alarm_is_one_the_hub_pages() -> None:
    """The bytes of an unreadable ``AL`` are not JSON: the hub dead-letters them as
    ``malformed_json`` (or ``not_utf8``) and pages the topic's wristband."""
    frame = watch_frame(b"AL,\xff\xfe")
    result = map_frame(frame, lookup, NOW, CHINA)
    assert isinstance(result, Mapped)
    parsed = parse_message(str(result.publications[0].topic), result.publications[0].payload)
    assert isinstance(parsed, Rejected)
    assert parsed.reason in (RejectReason.MALFORMED_JSON, RejectReason.NOT_UTF8)


@st.composite
def position_bodies(draw: st.DrawFn) -> str:
    """Well-formed position bodies with any values, in range or not."""
    number = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).map(lambda x: f"{x:.6f}")
    whole = st.integers(0, 10**12).map(str)
    return position(
        draw(st.integers(0, 0xFFFFFFFF).map(lambda x: f"{x:08X}")),
        valid=draw(st.sampled_from(["A", "V"])),
        lat=draw(number),
        ns=draw(st.sampled_from(["N", "S"])),
        lon=draw(number),
        ew=draw(st.sampled_from(["E", "W", ""])),
        battery=draw(whole),
        steps=draw(whole),
        date=draw(st.from_regex(r"[0-9]{6}", fullmatch=True)),
        time=draw(st.from_regex(r"[0-9]{6}", fullmatch=True)),
    )


@settings(max_examples=300, deadline=None)
@given(command=st.sampled_from(["AL", "AL_LTE", "UD", "UD2"]), body=position_bodies())
def test_fuzz_any_readable_position_maps_to_messages_the_hub_stores(command: str, body: str) -> None:
    result = map_frame(watch_frame(f"{command},{body}"), lookup, NOW, CHINA)
    assert isinstance(result, Mapped)
    for publication in result.publications:
        hub_reads(publication)
    status = int(body.split(",")[15], 16)
    pages = command.startswith("AL") and bool(status & (1 << 16 | 1 << 21 | 1 << 22))
    assert any(p.alarm for p in result.publications) is pages


def test_a_gateway_dead_letter_keeps_the_watchs_bytes_and_reason() -> None:
    topic = gateway_dead_letter_topic("gw-1")
    letter = GatewayDeadLetter(
        reason=RejectReason.UNKNOWN_WATCH,
        detail="watch 8699999999",
        device="8699999999",
        peer="10.0.0.5:40000",
        raw_base64=base64.b64encode(b"[3G*8699999999*0002*LK]").decode(),
    )
    parsed = parse_message(topic, letter.model_dump_json().encode())
    assert parsed == Rejected(
        RejectReason.UNKNOWN_WATCH,
        "gateway gw-1 (device 8699999999, 10.0.0.5:40000): watch 8699999999",
        raw=b"[3G*8699999999*0002*LK]",
    )


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"reason": "unknown_watch", "detail": "x", "raw_base64": "%%%"}',
        b'{"reason": "unknown_watch", "detail": "x", "raw_base64": "", "extra": 1}',
        # Only the gateway's own reasons: a dead letter cannot pretend to be another kind.
        b'{"reason": "store_failed", "detail": "x", "raw_base64": ""}',
    ],
)
def test_a_gateway_dead_letter_that_does_not_read_is_kept_whole_as_schema(payload: bytes) -> None:
    parsed = parse_message(gateway_dead_letter_topic("gw-1"), payload)
    assert isinstance(parsed, Rejected)
    assert parsed.reason is RejectReason.SCHEMA
    assert parsed.raw is None  # the envelope itself is what the hub keeps


def test_a_later_frame_of_a_watch_has_a_greater_msg_id() -> None:
    """The watch's own time leads its msg_id: a watch's ledger keys grow (devices/msg_ids.py)."""
    earlier = mapped("AL," + position("00010000", time="101500"))
    later = mapped("AL," + position("00010000", time="101501"))
    assert earlier.publications[0].msg_id is not None
    assert later.publications[0].msg_id is not None
    assert earlier.publications[0].msg_id < later.publications[0].msg_id
    heartbeat, next_heartbeat = mapped("LK,1,0,90"), mapped("LK,1,0,90", now=NOW + timedelta(seconds=1))
    assert heartbeat.publications[0].msg_id is not None
    assert next_heartbeat.publications[0].msg_id is not None
    assert heartbeat.publications[0].msg_id < next_heartbeat.publications[0].msg_id
