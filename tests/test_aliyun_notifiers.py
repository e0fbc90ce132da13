"""The Aliyun notifiers and the Aliyun simulator, end to end over real HTTP.

The official SDKs (``alibabacloud-dyvmsapi20170525``, ``alibabacloud-dysmsapi20170525``)
talk to the simulator served by uvicorn on a free port, which checks their V3
signatures; receipts are pushed to a plain HTTP server of the test's own. Nothing here
mocks an SDK.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from alibabacloud_tea_openapi.utils import Utils as OpenApiUtils
from darabonba.request import DaraRequest

from alerts.notifiers.aliyun import (
    FALL_BACK_CODES,
    AliyunAccount,
    AliyunSmsNotifier,
    AliyunVoiceNotifier,
    Verdict,
    aliyun_notifiers,
    classify,
)
from alerts.notifiers.aliyun_text import (
    ADDRESS_MAX_CHARS,
    NAME_MAX_CHARS,
    SMS_NOTICE_TEMPLATE,
    SMS_PAGE_TEMPLATE,
    TTS_DECLINED_TEMPLATE,
    TTS_PAGE_TEMPLATE,
    TTS_TAKEN_TEMPLATE,
    VARIABLE_MAX_CHARS,
    rendered,
    sms_length,
    sms_notice_params,
    sms_page_params,
    tts_page_params,
)
from alerts.notifiers.base import Delivery, Message, SendOutcome, SendResult
from devices.kinds import Channel
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from simulators.aliyun import create_aliyun_service
from tests.support.hub import wait_until
from tests.support.services import serve_app, wait_for_port

KEY_ID = "LTAItestShouhu"
SECRET = "test-aliyun-secret"
VOICE_NUMBER = "057188880000"
GRID_WORKER = "+8613800138000"
ACCOUNT = AliyunAccount(
    access_key_id=KEY_ID,
    access_key_secret=SECRET,
    voice_number=VOICE_NUMBER,
    tts_page_code="TTS_100001",
    tts_taken_code="TTS_100002",
    tts_declined_code="TTS_100003",
    sms_sign_name="守护",
    sms_page_template="SMS_200001",
    sms_notice_template="SMS_200002",
)
SOS = Message(
    incident_id=7,
    incident_code="K7P2Q",
    incident_kind="sos",
    resident_name="王奶奶",
    address="东关村1组1号",
    callback_number="+8613900139000",
)


@dataclass
class Simulator:
    url: str

    def requests(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(f"{self.url}/_sim/requests").json()
        return records

    def pushes(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(f"{self.url}/_sim/pushes").json()
        return records

    def post(self, path: str, body: dict[str, Any]) -> Any:
        answer = httpx.post(f"{self.url}/_sim/{path}", json=body)
        answer.raise_for_status()
        return answer.json()

    def account(self, **changes: str) -> AliyunAccount:
        return replace(ACCOUNT, endpoint=self.url, **changes)


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    app = create_aliyun_service(
        KEY_ID, SECRET, announce=lambda _line: None, push_timeout_s=2.0, retry_intervals_s=(0.2, 0.2)
    )
    for url in serve_app(app):
        yield Simulator(url)


@dataclass
class Receiver:
    """A plain HTTP server that keeps every POST and answers each with the next of ``statuses`` (then 200)."""

    url: str
    received: queue.Queue[tuple[str, Any]]
    statuses: list[int]

    def take(self, timeout: float = 5.0) -> tuple[str, Any]:
        return self.received.get(timeout=timeout)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    received: queue.Queue[tuple[str, Any]] = queue.Queue()
    statuses: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.put((self.path, body))
            status = statuses.pop(0) if statuses else 200
            reply = json.dumps({"code": 0, "msg": "接收成功"} if status == 200 else {"code": 1}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Receiver(f"http://127.0.0.1:{server.server_address[1]}/callbacks/aliyun/t0ken", received, statuses)
    server.shutdown()
    server.server_close()
    thread.join(10)


def page(channel: Channel, message: Message = SOS, attempt_id: int = 42, to: str = GRID_WORKER) -> Delivery:
    return Delivery(attempt_id=attempt_id, channel=channel, to=to, message=message)


def voice(simulator: Simulator, **changes: str) -> AliyunVoiceNotifier:
    return AliyunVoiceNotifier(simulator.account(**changes))


def sms(simulator: Simulator, **changes: str) -> AliyunSmsNotifier:
    return AliyunSmsNotifier(simulator.account(**changes))


# --- pages through the SDKs --------------------------------------------------------


def test_a_voice_page_is_an_ivr_call_with_the_page_variables_the_keys_and_the_attempt(simulator: Simulator) -> None:
    result = voice(simulator).send(page(Channel.VOICE))

    assert result.outcome is SendOutcome.SENT, result.error
    [record] = simulator.requests()
    assert record["action"] == "IvrCall"
    assert record["code"] == "OK"
    assert result.provider_id == record["provider_id"]
    assert record["to"] == "13800138000"
    assert record["out_id"] == "42"
    params = record["params"]
    assert params["CalledShowNumber"] == VOICE_NUMBER
    assert params["StartCode"] == "TTS_100001"
    keys = {
        params["MenuKeyMap.1.Key"]: params["MenuKeyMap.1.Code"],
        params["MenuKeyMap.2.Key"]: params["MenuKeyMap.2.Code"],
    }
    assert keys == {"1": "TTS_100002", "2": "TTS_100003"}
    assert record["template_params"] == {
        "level": "紧急呼叫",
        "name": "王奶奶",
        "address": "东关村1组1号",
        "event": "按下SOS",
        "callback": "1 3 9 0 0 1 3 9 0 0 0",
        "code": "K 7 P 2 Q",
    }


def test_a_page_with_no_attempt_row_asks_for_no_key(simulator: Simulator) -> None:
    result = voice(simulator).send(page(Channel.VOICE, attempt_id=0))

    assert result.outcome is SendOutcome.SENT, result.error
    [record] = simulator.requests()
    assert record["out_id"] is None
    assert not any(name.startswith("MenuKeyMap") for name in record["params"])


def test_an_sms_page_and_a_notice_use_their_own_templates(simulator: Simulator) -> None:
    notifier = sms(simulator)
    notice = replace(SOS, notice="【守护】K7P2Q 王奶奶的求助已由李网格员接单处置。")

    paged = notifier.send(page(Channel.SMS))
    told = notifier.send(page(Channel.SMS, notice, attempt_id=43))

    assert paged.outcome is told.outcome is SendOutcome.SENT, (paged.error, told.error)
    first, second = simulator.requests()
    assert first["action"] == second["action"] == "SendSms"
    assert (first["out_id"], second["out_id"]) == ("42", "43")
    assert first["provider_id"] == paged.provider_id
    assert first["params"]["SignName"] == "守护"
    assert first["params"]["TemplateCode"] == "SMS_200001"
    assert first["template_params"] == {
        "level": "紧急呼叫",
        "name": "王奶奶",
        "address": "东关村1组1号",
        "event": "按下SOS",
        "callback": "13900139000",
        "code": "K7P2Q",
    }
    assert second["params"]["TemplateCode"] == "SMS_200002"
    assert second["template_params"] == {"content": "K7P2Q 王奶奶的求助已由李网格员接单处置。"}


def test_a_notice_is_not_placed_as_a_call(simulator: Simulator) -> None:
    result = voice(simulator).send(page(Channel.VOICE, replace(SOS, notice="【守护】已取消")))

    assert result.outcome is SendOutcome.FAILED
    assert result.final
    assert simulator.requests() == []


# --- refusals, mapped ---------------------------------------------------------------


def failed(result: SendResult, *, fall_back: bool = False, final: bool = False) -> None:
    assert result.outcome is SendOutcome.FAILED, result
    assert (result.fall_back, result.final) == (fall_back, final), result


def test_a_wrong_secret_or_key_is_refused_and_falls_back(simulator: Simulator) -> None:
    wrong_secret = voice(simulator, access_key_secret="not-the-secret").send(page(Channel.VOICE))
    wrong_key = sms(simulator, access_key_id="LTAInobody").send(page(Channel.SMS))

    failed(wrong_secret, fall_back=True)
    assert "SignatureDoesNotMatch" in (wrong_secret.error or "")
    failed(wrong_key, fall_back=True)
    assert "InvalidAccessKeyId.NotFound" in (wrong_key.error or "")
    assert simulator.requests() == []


def test_an_unsigned_request_is_refused_in_aliyuns_shape(simulator: Simulator) -> None:
    answer = httpx.post(f"{simulator.url}/?Action=SendSms&Version=2017-05-25&PhoneNumbers=13800138000")

    assert answer.status_code == 400
    assert answer.json()["Code"] == "IncompleteSignature"
    assert {"RequestId", "Message"} <= set(answer.json())


def test_a_request_changed_after_signing_is_refused(simulator: Simulator) -> None:
    # Signed by the SDK's own signer, then sent as signed and with the number changed.
    request = DaraRequest()
    request.method, request.pathname = "POST", "/"
    request.query = {
        "PhoneNumbers": "13800138000",
        "SignName": "守护",
        "TemplateCode": "SMS_200001",
        "TemplateParam": json.dumps({"name": "王奶奶"}, ensure_ascii=False),
    }
    request.headers = {
        "host": simulator.url.removeprefix("http://"),
        "x-acs-action": "SendSms",
        "x-acs-version": "2017-05-25",
        "x-acs-date": "2026-12-04T08:00:00Z",
        "x-acs-signature-nonce": "n0nce",
        "x-acs-content-sha256": hashlib.sha256(b"").hexdigest(),
    }
    request.headers["Authorization"] = OpenApiUtils.get_authorization(
        request, "ACS3-HMAC-SHA256", hashlib.sha256(b"").hexdigest(), KEY_ID, SECRET
    )

    def send(query: dict[str, str]) -> httpx.Response:
        return httpx.post(f"{simulator.url}/", params=query, headers=request.headers)

    signed = send(request.query)
    changed = send(request.query | {"PhoneNumbers": "13900139000"})

    assert signed.status_code == 200, signed.text
    assert signed.json()["Code"] == "OK"
    assert changed.status_code == 400
    assert changed.json()["Code"] == "SignatureDoesNotMatch"


def test_flow_control_and_a_5xx_fall_back_and_an_illegal_number_gives_up(simulator: Simulator) -> None:
    simulator.post("faults", {"to": GRID_WORKER, "fail": "flow-control", "times": 2})
    limited_call = voice(simulator).send(page(Channel.VOICE))  # answered 400, as the voice API does
    limited_sms = sms(simulator).send(page(Channel.SMS))  # answered 200 with the code, as the SMS API does
    simulator.post("faults", {"to": "*", "fail": "error", "times": 1})
    broken = sms(simulator).send(page(Channel.SMS))
    illegal_call = voice(simulator).send(page(Channel.VOICE, to="+12015550100"))
    illegal_sms = sms(simulator).send(page(Channel.SMS, to="12345"))
    healed = sms(simulator).send(page(Channel.SMS))

    failed(limited_call, fall_back=True)
    failed(limited_sms, fall_back=True)
    assert "isv.BUSINESS_LIMIT_CONTROL" in (limited_call.error or "")
    assert "isv.BUSINESS_LIMIT_CONTROL" in (limited_sms.error or "")
    failed(broken, fall_back=True)
    assert "HTTP 503" in (broken.error or "")
    failed(illegal_call, final=True)
    failed(illegal_sms, final=True)
    assert healed.outcome is SendOutcome.SENT
    codes = [record["code"] for record in simulator.requests()]
    assert codes == [
        "isv.BUSINESS_LIMIT_CONTROL",
        "isv.BUSINESS_LIMIT_CONTROL",
        "ServiceUnavailable",
        "isv.MOBILE_NUMBER_ILLEGAL",
        "isv.MOBILE_NUMBER_ILLEGAL",
        "OK",
    ]


def test_the_error_codes_map_to_retry_fall_back_and_give_up() -> None:
    assert classify("isv.MOBILE_NUMBER_ILLEGAL") is Verdict.GIVE_UP
    assert classify("isp.SYSTEM_ERROR") is Verdict.RETRY
    assert {classify(code) for code in FALL_BACK_CODES} == {Verdict.FALL_BACK}
    assert classify("isv.SOMETHING_NEW") is Verdict.FALL_BACK
    assert classify(None) is Verdict.FALL_BACK


def test_a_hung_provider_cannot_hold_the_sender_past_its_timeout(simulator: Simulator) -> None:
    simulator.post("faults", {"to": GRID_WORKER, "fail": "hang", "hang_s": 3, "times": 1})
    notifier = AliyunVoiceNotifier(simulator.account(), timeout=0.5)

    started = time.monotonic()
    result = notifier.send(page(Channel.VOICE))
    elapsed = time.monotonic() - started

    failed(result, fall_back=True)
    assert "no answer" in (result.error or "")
    assert elapsed < 2.0, elapsed


# --- text budgets -------------------------------------------------------------------

LONG = replace(
    SOS,
    resident_name="欧阳" + "娜" * 40,
    address="新疆维吾尔自治区伊犁哈萨克自治州" + "某某乡某某村" * 10 + "1号",
)


def test_long_names_and_addresses_are_clipped_and_the_code_and_number_kept(simulator: Simulator) -> None:
    for params in (tts_page_params(LONG), sms_page_params(LONG)):
        assert all(1 <= len(value) <= VARIABLE_MAX_CHARS for value in params.values()), params
        assert len(params["name"]) == NAME_MAX_CHARS
        assert params["name"].endswith("…")
        assert len(params["address"]) == ADDRESS_MAX_CHARS
    assert sms_page_params(LONG)["code"] == "K7P2Q"
    assert sms_page_params(LONG)["callback"] == "13900139000"
    # Two segments of a long SMS (67 characters each), the 【守护】 signature included.
    assert sms_length(SMS_PAGE_TEMPLATE, sms_page_params(LONG)) <= 2 * 67

    result = sms(simulator).send(page(Channel.SMS, LONG))

    assert result.outcome is SendOutcome.SENT, result.error
    [record] = simulator.requests()
    assert record["template_params"] == sms_page_params(LONG)


KINDS = [
    SOS,
    replace(SOS, callback_number="", address=""),
    replace(SOS, incident_kind="sos_unregistered", resident_name="未登记手环", device_id="wb-0042", address=""),
    replace(SOS, incident_kind="camera_offline", resident_name="", device_id="cam-7", callback_number=""),
    replace(SOS, incident_kind="low_battery"),
]


@pytest.mark.parametrize("message", KINDS, ids=[m.incident_kind + str(i) for i, m in enumerate(KINDS)])
def test_every_template_variable_is_filled_and_no_other(message: Message) -> None:
    for template, params in (
        (TTS_PAGE_TEMPLATE, tts_page_params(message)),
        (SMS_PAGE_TEMPLATE, sms_page_params(message)),
        (SMS_NOTICE_TEMPLATE, sms_notice_params(replace(message, notice="【守护】已取消"))),
    ):
        assert set(re.findall(r"\$\{(\w+)\}", template)) == set(params)
        assert "${" not in rendered(template, params)
        assert all(1 <= len(value) <= VARIABLE_MAX_CHARS for value in params.values()), params
    # No character a TTS template may not hold reaches the spoken text.
    assert not set("#/:-%¥【】") & set(rendered(TTS_PAGE_TEMPLATE, tts_page_params(message)))


def test_the_templates_to_have_approved_are_in_the_docs_word_for_word() -> None:
    escalation = (Path(__file__).resolve().parent.parent / "docs" / "escalation.md").read_text(encoding="utf-8")

    for template in (
        TTS_PAGE_TEMPLATE,
        TTS_TAKEN_TEMPLATE,
        TTS_DECLINED_TEMPLATE,
        SMS_PAGE_TEMPLATE,
        SMS_NOTICE_TEMPLATE,
    ):
        assert f"`{template}`" in escalation


def test_control_characters_never_reach_a_template(simulator: Simulator) -> None:
    dirty = replace(SOS, resident_name="王\x0b奶奶\x07", address="东关村\r\n1组\x001号")

    voice(simulator).send(page(Channel.VOICE, dirty))
    sms(simulator).send(page(Channel.SMS, dirty))

    for record in simulator.requests():
        assert record["template_params"]["name"] == "王 奶奶"
        assert record["template_params"]["address"] == "东关村 1组1号"


# --- receipts pushed ----------------------------------------------------------------


def test_a_keypress_comes_back_as_a_voice_report_pushed_again_until_answered_200(
    simulator: Simulator, receiver: Receiver
) -> None:
    simulator.post("config", {"push_base": receiver.url})
    simulator.post("behaviour", {"to": GRID_WORKER, "answer": "press1"})
    receiver.statuses.append(500)

    result = voice(simulator).send(page(Channel.VOICE))
    first_path, first = receiver.take()
    again_path, again = receiver.take()

    assert result.outcome is SendOutcome.SENT, result.error
    assert first_path == again_path == "/callbacks/aliyun/t0ken/voice_report"
    assert first == again
    [report] = first
    assert report["call_id"] == result.provider_id
    assert report["out_id"] == "42"
    assert report["dtmf"] == "1"
    assert report["status_code"] == "200000"
    assert (report["caller"], report["callee"]) == (VOICE_NUMBER, "13800138000")
    assert int(report["duration"]) > 0
    pushes = wait_until(lambda: len(simulator.pushes()) == 2 and simulator.pushes(), what="both pushes recorded")
    assert [(p["attempt"], p["status"]) for p in pushes] == [(1, 500), (2, 200)]


def test_a_key_pressed_in_a_call_with_no_key_map_is_not_reported(simulator: Simulator, receiver: Receiver) -> None:
    simulator.post("config", {"push_base": receiver.url})
    simulator.post("behaviour", {"to": GRID_WORKER, "answer": "press1"})

    voice(simulator).send(page(Channel.VOICE, attempt_id=0))
    _, [report] = receiver.take()

    assert report["out_id"] is None
    assert report["dtmf"] == ""
    assert report["status_code"] == "200000"


def test_the_verb_serves_the_simulator_with_the_key_it_prints(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOUHU_")}
    shouhu = shutil.which("shouhu") or str(Path(sys.executable).with_name("shouhu"))
    process = subprocess.Popen(
        [shouhu, "simulate", "aliyun", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert process.stdout is not None
    try:
        banner = dict(
            line.strip().split("=", 1) for line in (process.stdout.readline() for _ in range(5)) if "=" in line
        )
        wait_for_port(port)
        account = replace(
            ACCOUNT,
            endpoint=banner["SHOUHU_ALIYUN_ENDPOINT"],
            access_key_id=banner["SHOUHU_ALIYUN_ACCESS_KEY_ID"],
            access_key_secret=banner["SHOUHU_ALIYUN_ACCESS_KEY_SECRET"],
        )
        result = AliyunSmsNotifier(account).send(page(Channel.SMS))
        [record] = httpx.get(f"http://127.0.0.1:{port}/_sim/requests").json()
    finally:
        process.terminate()
        process.wait(15)

    assert banner["SHOUHU_ALIYUN_ENDPOINT"] == f"http://127.0.0.1:{port}"
    assert result.outcome is SendOutcome.SENT, result.error
    assert record["provider_id"] == result.provider_id


def test_a_delivery_report_and_a_reply_are_pushed(simulator: Simulator, receiver: Receiver) -> None:
    simulator.post("config", {"push_base": receiver.url})
    simulator.post("behaviour", {"to": GRID_WORKER, "sms": "delivered"})

    result = sms(simulator).send(page(Channel.SMS))
    report_path, [report] = receiver.take()
    replied = simulator.post("sms-up", {"from": GRID_WORKER, "content": "K7P2Q 1"})
    up_path, [up] = receiver.take()

    assert report_path.endswith("/sms_report")
    assert report["biz_id"] == result.provider_id
    assert (report["out_id"], report["phone_number"], report["success"]) == ("42", "13800138000", True)
    assert report["err_code"] == "DELIVERED"
    assert replied["status"] == 200
    assert up_path.endswith("/sms_up")
    assert up["phone_number"] == "13800138000"
    assert up["content"] == "K7P2Q 1"
    assert up["sign_name"] == "守护"
    assert "out_id" not in up  # a reply says nothing of what it answers


# --- configuration ------------------------------------------------------------------


def test_the_notifiers_exist_only_where_aliyun_is_configured() -> None:
    fields: dict[str, Any] = {
        "aliyun_access_key_id": KEY_ID,
        "aliyun_access_key_secret": SECRET,
        "aliyun_endpoint": "http://127.0.0.1:9",
        "aliyun_sms_sign_name": "守护",
        "aliyun_sms_page_template": "SMS_1",
        "aliyun_sms_notice_template": "SMS_2",
    }
    voice_fields: dict[str, Any] = {
        "aliyun_voice_number": VOICE_NUMBER,
        "aliyun_tts_page_code": "TTS_1",
        "aliyun_tts_taken_code": "TTS_2",
        "aliyun_tts_declined_code": "TTS_3",
    }

    assert aliyun_notifiers(Settings()) == {}
    assert set(aliyun_notifiers(Settings(**fields))) == {Channel.SMS}
    assert set(aliyun_notifiers(Settings(**fields, **voice_fields))) == {Channel.SMS, Channel.VOICE}
    with pytest.raises(ValueError, match="SHOUHU_ALIYUN_ENDPOINT"):
        Settings(aliyun_endpoint="ftp://example")
