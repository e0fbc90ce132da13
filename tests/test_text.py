"""``alerts/notifiers/text.py``: no control character reaches TwiML, an SMS or CAP XML."""

from __future__ import annotations

import unicodedata
import xml.etree.ElementTree as ET
from typing import Any

import pytest
import xmlschema

from alerts.notifiers.base import Message
from alerts.notifiers.text import plain_text
from alerts.notifiers.twilio import sms_text, voice_twiml
from alerts.notifiers.webhook import cap_xml
from simulators.phone_network import gather_action
from tests.support.cap import SENDER, cap_schema_path, parameters, platform_alert, text

# Excel's in-cell line break, a bell, NUL, ESC, DEL, a C1 control (CSI), and XML specials.
NAME = "王\x0b奶奶\x07<&>"
ADDRESS = "东关村\x001组\x0b1号\x1b\x7f\x9b 3单元"


@pytest.mark.parametrize(
    ("value", "one_line", "multiline"),
    [
        ("王奶奶", "王奶奶", "王奶奶"),
        ("12号\x0b3单元", "12号 3单元", "12号\n3单元"),
        ("a\r\nb\rc\nd", "a b c d", "a\nb\nc\nd"),
        ("a\tb", "a b", "a\tb"),
        ("a\x0cb\x85c\u2028d\u2029e", "a b c d e", "a\nb\nc\nd\ne"),
        ("\x00\x07\x08\x1b\x1f\x7f\x80\x9f铃", "铃", "铃"),
        ("<&>\"'", "<&>\"'", "<&>\"'"),  # escaping is the XML builder's job
        ("\ud800\ufffe\uffff", "", ""),
    ],
)
def test_plain_text_folds_breaks_and_drops_other_controls(value: str, one_line: str, multiline: str) -> None:
    assert plain_text(value) == one_line
    assert plain_text(value, multiline=True) == multiline


def test_no_control_character_survives_either_way() -> None:
    every = "".join(chr(c) for c in (*range(0x20), *range(0x7F, 0xA0)))
    for cleaned in (plain_text(every), plain_text(every, multiline=True)):
        assert all(char in " \t\n" for char in cleaned), repr(cleaned)


def _page(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "incident_id": 7,
        "incident_code": "K7P2Q",
        "incident_kind": "sos",
        "resident_name": NAME,
        "address": ADDRESS,
        "callback_number": "+8613800138000\x07",
    }
    return Message(**{**fields, **changes})


def _controls(value: str) -> list[str]:
    return [char for char in value if unicodedata.category(char) == "Cc"]


def test_the_call_twiml_is_well_formed_and_says_the_cleaned_text() -> None:
    twiml = voice_twiml(_page(), keypress_url="https://hub.example/callbacks/twilio/keypress?attempt=1&x=2")
    said = ET.fromstring(twiml).findtext("Gather/Say") or ""  # raises on malformed XML
    assert "王 奶奶<&>，地址东关村1组 1号 3单元" in said
    assert _controls(said) == []
    assert gather_action(twiml) == "https://hub.example/callbacks/twilio/keypress?attempt=1&x=2"
    assert ET.fromstring(voice_twiml(_page())).findtext("Say")  # no keypress: still well formed


def test_the_sms_is_clean() -> None:
    body = sms_text(_page())
    assert body.startswith("【守护】紧急呼叫：王 奶奶<&>（东关村1组 1号 3单元）按下SOS。回拨+8613800138000。")
    assert _controls(body) == []
    assert _controls(sms_text(_page(notice="【守护】K7P2Q 已由李\x0b网格\x07接单处置"))) == []


def test_the_cap_alert_is_valid_and_clean() -> None:
    schema = xmlschema.XMLSchema(str(cap_schema_path()))
    alert = platform_alert(
        resident_name=NAME, address=ADDRESS, medical_notes="高血压\x0b糖尿病\x07", area_name="一\x0b网格"
    )
    xml = cap_xml(alert, sender=SENDER)
    assert schema.is_valid(xml)
    root = ET.fromstring(xml)
    assert parameters(root)["residentName"] == "王 奶奶<&>"
    assert text(root, "info/area/areaDesc") == "一 网格 东关村1组 1号 3单元"
    description = str(text(root, "info/description"))
    assert "医疗备注：高血压\n糖尿病" in description
    assert [c for c in _controls(xml.decode()) if c not in "\n\t"] == []
