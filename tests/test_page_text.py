"""What an SMS and a call say (``alerts/notifiers/twilio.py``), for every incident kind
and every missing field: no doubled label, no empty brackets, no bare "回拨", the device
of an unregistered band named, a missing callback number said to be missing (issue 14)."""

from __future__ import annotations

from typing import Any

import pytest

from alerts.notifiers.base import Message
from alerts.notifiers.twilio import NO_RESIDENT_NAME, SMS_MAX_CHARS, sms_text, voice_text
from devices.kinds import IncidentKind

CODE = "K7P2Q"
REPLY = f"回复 {CODE} 1 接单，{CODE} 2 无法前往。"


def _page(kind: str, **changes: Any) -> Message:
    fields: dict[str, Any] = {
        "incident_id": 7,
        "incident_code": CODE,
        "incident_kind": kind,
        "resident_name": "王奶奶",
        "address": "东关村1组1号",
        "callback_number": "+12015550199",
    }
    return Message(**{**fields, **changes})


@pytest.mark.parametrize(
    ("message", "sms", "voice"),
    [
        # The dispatcher's unregistered band: the placeholder name, no address, no phone.
        (
            _page(
                "sos_unregistered", resident_name=NO_RESIDENT_NAME, address="", callback_number="", device_id="wb-0042"
            ),
            f"【守护】紧急呼叫：未登记手环wb-0042按下SOS。无回拨号码（手环未登记）。{REPLY}",
            "守护紧急呼叫。未登记手环，编号w b 0 0 4 2，按下SOS。无回拨号码（手环未登记）。事件编号：K 7 P 2 Q。",
        ),
        # The same from a sender that does not know the device: still no doubled label.
        (
            _page("sos_unregistered", resident_name=NO_RESIDENT_NAME, address="", callback_number=""),
            f"【守护】紧急呼叫：未登记手环按下SOS。无回拨号码（手环未登记）。{REPLY}",
            "守护紧急呼叫。未登记手环，按下SOS。无回拨号码（手环未登记）。事件编号：K 7 P 2 Q。",
        ),
        # The hub's spool: the device id as the name, the county as the address.
        (
            _page("sos_unregistered", resident_name="wb-0042", address="守护县", callback_number=""),
            f"【守护】紧急呼叫：未登记手环wb-0042（守护县）按下SOS。无回拨号码（手环未登记）。{REPLY}",
            "守护紧急呼叫。未登记手环，编号w b 0 0 4 2，地址守护县，按下SOS。无回拨号码（手环未登记）。"
            "事件编号：K 7 P 2 Q。",
        ),
        # A resident with no phone: the address stays, the missing number is said.
        (
            _page("sos", callback_number=""),
            f"【守护】紧急呼叫：王奶奶（东关村1组1号）按下SOS。住户未登记电话，无回拨号码。{REPLY}",
            "守护紧急呼叫。王奶奶，地址东关村1组1号，按下SOS。住户未登记电话，无回拨号码。事件编号：K 7 P 2 Q。",
        ),
        (
            _page("fall", address=""),
            f"【守护】紧急呼叫：王奶奶疑似跌倒。回拨+12015550199。{REPLY}",
            "守护紧急呼叫。王奶奶，疑似跌倒。回拨电话：1 2 0 1 5 5 5 0 1 9 9。事件编号：K 7 P 2 Q。",
        ),
        (
            _page("camera_offline", resident_name=NO_RESIDENT_NAME, address="", callback_number="", device_id="cam-7"),
            f"【守护】提醒：摄像头cam-7离线，请安排维修。{REPLY}",
            "守护提醒。摄像头，编号c a m 7，离线，请安排维修。事件编号：K 7 P 2 Q。",
        ),
        (
            _page("sos"),
            f"【守护】紧急呼叫：王奶奶（东关村1组1号）按下SOS。回拨+12015550199。{REPLY}",
            "守护紧急呼叫。王奶奶，地址东关村1组1号，按下SOS。回拨电话：1 2 0 1 5 5 5 0 1 9 9。事件编号：K 7 P 2 Q。",
        ),
    ],
)
def test_exact_texts(message: Message, sms: str, voice: str) -> None:
    assert sms_text(message) == sms
    assert voice_text(message, keypress=False) == voice


MISSING: dict[str, dict[str, str]] = {
    "nothing": {},
    "name": {"resident_name": NO_RESIDENT_NAME},
    "address": {"address": ""},
    "callback": {"callback_number": ""},
    "device": {"device_id": ""},
    "everything": {"resident_name": NO_RESIDENT_NAME, "address": "", "callback_number": "", "device_id": ""},
    "blank": {"resident_name": " ", "address": " \x0b", "callback_number": "\x00", "device_id": " "},
}


@pytest.mark.parametrize("kind", [*(k.value for k in IncidentKind), "unknown-kind"])
@pytest.mark.parametrize("missing", list(MISSING))
def test_every_kind_reads_right_whatever_is_missing(kind: str, missing: str) -> None:
    message = _page(kind, **{"device_id": "wb-0042", **MISSING[missing]})
    sms = sms_text(message)
    voice = voice_text(message, keypress=True)

    assert len(sms) <= SMS_MAX_CHARS
    assert sms.endswith(REPLY)
    assert "事件编号：K 7 P 2 Q。前往处置请按1，无法前往请按2。" in voice
    for text in (sms, voice):
        assert "（）" not in text
        for wrong in ("回拨。", "回拨电话：。", "地址，", "，，", "。。"):
            assert wrong not in text
        assert NO_RESIDENT_NAME * 2 not in text
        if message.callback_number.strip("\x00"):
            assert "+12015550199" in text or "1 2 0 1 5 5 5 0 1 9 9" in text
        elif kind != IncidentKind.CAMERA_OFFLINE:
            assert "无回拨号码" in text
    if kind == IncidentKind.SOS_UNREGISTERED and message.device_id.strip():
        assert "未登记手环wb-0042" in sms
        assert "编号w b 0 0 4 2" in voice


def test_a_long_device_id_and_address_keep_the_code_and_the_number() -> None:
    message = _page("sos_unregistered", resident_name=NO_RESIDENT_NAME, address="东关村" * 40, device_id="w" * 64)
    sms = sms_text(message)

    assert len(sms) <= SMS_MAX_CHARS
    assert sms.endswith(f"回拨+12015550199。{REPLY}")
    assert "w" * 64 in sms  # the band is named whole; the address gives way


def test_the_router_names_an_unregistered_wristband_in_its_page(county_url: str, phone_network: str) -> None:
    """Issue 14, item 8: the operators' SMS for an unregistered wristband names the device
    (the dispatcher passes the incident's device id), through the router and the simulator."""
    from tests.support.escalation import DAY, Clock, make_router, messages, press

    press(county_url, "ghost-042", DAY)
    make_router(county_url, phone_network, Clock(DAY)).run_once()
    bodies = [m["body"] for m in messages(phone_network)]
    assert bodies
    assert all("未登记手环ghost-042按下SOS" in body for body in bodies), bodies
