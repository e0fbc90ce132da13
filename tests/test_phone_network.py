"""TwilioNotifier and the phone-network simulator, end to end over real HTTP.

The real ``twilio.rest.Client`` talks to the simulator served by uvicorn on a free
port; nothing here mocks the twilio client.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from alerts.notifiers.base import Delivery, Message, SendOutcome
from alerts.notifiers.twilio import (
    KEYPRESS_CALLBACK_PATH,
    SAY_LANGUAGE,
    SMS_MAX_CHARS,
    STATUS_CALLBACK_PATH,
    RebasingHttpClient,
    TwilioNotifier,
    sms_text,
    voice_twiml,
)
from devices.kinds import Channel
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from simulators.phone_network import create_phone_network
from tests.support.services import serve_app

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "f" * 32
FROM = "+12015550100"
GRID_WORKER = "+12015550101"
PUBLIC_URL = "http://127.0.0.1:8000"

SOS = Message(
    incident_id=7,
    incident_code="K7P2Q",
    incident_kind="sos",
    resident_name="王奶奶",
    address="东关村1组1号",
    callback_number="+12015550199",
)


@dataclass
class Simulator:
    url: str
    announced: list[str] = field(default_factory=list)

    def messages(self) -> list[dict[str, object]]:
        records: list[dict[str, object]] = httpx.get(f"{self.url}/_sim/messages").json()
        return records

    def calls(self) -> list[dict[str, object]]:
        records: list[dict[str, object]] = httpx.get(f"{self.url}/_sim/calls").json()
        return records

    def fault(self, to: str, fail: str | None) -> None:
        httpx.post(f"{self.url}/_sim/faults", json={"to": to, "fail": fail}).raise_for_status()

    def notifier(self, *, auth_token: str = AUTH_TOKEN, public_url: str = PUBLIC_URL) -> TwilioNotifier:
        return TwilioNotifier(ACCOUNT_SID, auth_token, FROM, self.url, public_url)


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    announced: list[str] = []
    app = create_phone_network(ACCOUNT_SID, AUTH_TOKEN, announce=announced.append)
    for url in serve_app(app):
        yield Simulator(url, announced)


@dataclass
class Callbacks:
    """A plain HTTP server that keeps every POST it receives."""

    url: str
    received: queue.Queue[tuple[str, dict[str, str], dict[str, str]]]


@pytest.fixture
def callbacks() -> Iterator[Callbacks]:
    received: queue.Queue[tuple[str, dict[str, str], dict[str, str]]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            form = {name: values[0] for name, values in parse_qs(body).items()}
            received.put((self.path, dict(self.headers), form))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Callbacks(f"http://127.0.0.1:{server.server_address[1]}", received)
    server.shutdown()
    server.server_close()
    thread.join(10)


def delivery(channel: Channel, to: str = GRID_WORKER, message: Message = SOS) -> Delivery:
    return Delivery(attempt_id=1, channel=channel, to=to, message=message)


# --- through the real twilio client -------------------------------------------------


def test_sms_arrives_with_its_text_and_the_simulators_sid(simulator: Simulator) -> None:
    result = simulator.notifier().send(delivery(Channel.SMS))

    assert result.outcome is SendOutcome.SENT, result.error
    [record] = simulator.messages()
    assert result.provider_id == record["sid"]
    assert str(record["sid"]).startswith("SM")
    assert len(str(record["sid"])) == 34
    assert record["to"] == GRID_WORKER
    assert record["from"] == FROM
    assert record["body"] == sms_text(SOS)
    assert record["status_callback"] == PUBLIC_URL + STATUS_CALLBACK_PATH
    assert simulator.calls() == []
    assert simulator.announced == [f"✉  SMS to {GRID_WORKER}: {sms_text(SOS)}"]


def test_call_arrives_with_mandarin_twiml_said_twice(simulator: Simulator) -> None:
    result = simulator.notifier().send(delivery(Channel.VOICE))

    assert result.outcome is SendOutcome.SENT, result.error
    [record] = simulator.calls()
    assert result.provider_id == record["sid"]
    assert str(record["sid"]).startswith("CA")
    assert len(str(record["sid"])) == 34
    assert (record["to"], record["from"], record["status"]) == (GRID_WORKER, FROM, "queued")
    twiml = str(record["twiml"])
    # The keypress comes back naming the attempt it answers.
    assert twiml == voice_twiml(SOS, keypress_url=f"{PUBLIC_URL}{KEYPRESS_CALLBACK_PATH}?attempt=1")
    gather = ET.fromstring(twiml).find("Gather")
    assert gather is not None
    assert gather.get("action") == f"{PUBLIC_URL}{KEYPRESS_CALLBACK_PATH}?attempt=1"
    assert gather.get("numDigits") == "1"
    [say] = gather.findall("Say")
    assert (say.get("language"), say.get("loop")) == ("cmn-CN", "2")
    assert simulator.messages() == []
    assert simulator.announced == [f"☎  ringing {GRID_WORKER} (call {record['sid']})"]


def test_the_twilio_client_parses_the_simulators_resources(simulator: Simulator) -> None:
    client = simulator.notifier().client

    message = client.messages.create(to=GRID_WORKER, from_=FROM, body="测试")
    call = client.calls.create(to=GRID_WORKER, from_=FROM, url="http://127.0.0.1/twiml")

    assert (message.to, message.status, message.from_) == (GRID_WORKER, "queued", FROM)
    assert message.date_created.tzinfo is not None
    assert message.account_sid == ACCOUNT_SID
    assert (call.to, call.status) == (GRID_WORKER, "queued")
    assert call.sid == simulator.calls()[0]["sid"]


def test_wrong_auth_token_fails_with_twilio_error_20003(simulator: Simulator) -> None:
    notifier = simulator.notifier(auth_token="0" * 32)

    for channel in (Channel.SMS, Channel.VOICE):
        result = notifier.send(delivery(channel))
        assert result.outcome is SendOutcome.FAILED
        assert result.error is not None
        assert "20003" in result.error
        assert "Authenticate" in result.error
    assert simulator.messages() == []
    assert simulator.calls() == []


@pytest.mark.parametrize("channel", [Channel.SMS, Channel.VOICE])
def test_number_not_in_e164_fails_with_21211(simulator: Simulator, channel: Channel) -> None:
    result = simulator.notifier().send(delivery(channel, to="13800138000"))

    assert result.outcome is SendOutcome.FAILED
    assert result.error is not None
    assert "21211" in result.error
    assert simulator.messages() == []
    assert simulator.calls() == []


def test_injected_network_error_fails_only_that_number(simulator: Simulator) -> None:
    notifier = simulator.notifier()
    simulator.fault(GRID_WORKER, "error")

    for channel in (Channel.SMS, Channel.VOICE):
        result = notifier.send(delivery(channel))
        assert result.outcome is SendOutcome.FAILED
        assert result.error is not None
        assert "20500" in result.error
    assert notifier.send(delivery(Channel.SMS, to="+12015550102")).outcome is SendOutcome.SENT

    simulator.fault(GRID_WORKER, None)
    assert notifier.send(delivery(Channel.VOICE)).outcome is SendOutcome.SENT


def test_busy_number_accepts_the_call_then_posts_a_signed_busy_callback(
    simulator: Simulator, callbacks: Callbacks
) -> None:
    simulator.fault(GRID_WORKER, "busy")

    result = simulator.notifier(public_url=callbacks.url).send(delivery(Channel.VOICE))

    assert result.outcome is SendOutcome.SENT  # as Twilio: busy is known only later
    path, headers, form = callbacks.received.get(timeout=10)
    assert path == STATUS_CALLBACK_PATH
    assert (form["CallSid"], form["CallStatus"], form["To"]) == (result.provider_id, "busy", GRID_WORKER)
    validator = RequestValidator(AUTH_TOKEN)
    assert validator.validate(callbacks.url + path, form, headers["X-Twilio-Signature"])
    assert not RequestValidator("0" * 32).validate(callbacks.url + path, form, headers["X-Twilio-Signature"])
    assert [call["status"] for call in simulator.calls()] == ["busy"]


def test_simulator_down_fails_instead_of_raising() -> None:
    notifier = TwilioNotifier(ACCOUNT_SID, AUTH_TOKEN, FROM, f"http://127.0.0.1:{free_port()}", PUBLIC_URL)

    for channel in (Channel.SMS, Channel.VOICE):
        result = notifier.send(delivery(channel))
        assert result.outcome is SendOutcome.FAILED
        assert result.error is not None
        assert result.error.startswith("cannot reach")


def test_a_network_that_never_answers_fails_after_the_timeout() -> None:
    # Connections complete in the kernel's backlog, but nobody ever reads or answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        notifier = TwilioNotifier(ACCOUNT_SID, AUTH_TOKEN, FROM, f"http://127.0.0.1:{port}", PUBLIC_URL, timeout=0.5)

        result = notifier.send(delivery(Channel.SMS))

    assert result.outcome is SendOutcome.FAILED
    assert result.error is not None
    assert result.error.startswith("no answer from")


def test_other_channels_are_refused_without_a_request(simulator: Simulator) -> None:
    result = simulator.notifier().send(delivery(Channel.CONSOLE))

    assert result.outcome is SendOutcome.FAILED
    assert simulator.messages() == []
    assert simulator.calls() == []


def test_from_settings_reaches_the_configured_api_base(simulator: Simulator) -> None:
    configured = Settings(
        twilio_account_sid=ACCOUNT_SID,
        twilio_auth_token=AUTH_TOKEN,
        twilio_from=FROM,
        twilio_api_base=simulator.url,
        public_url="http://shouhu.example:8000/",
    )

    result = TwilioNotifier.from_settings(configured).send(delivery(Channel.SMS))

    assert result.outcome is SendOutcome.SENT, result.error
    assert simulator.messages()[0]["status_callback"] == "http://shouhu.example:8000" + STATUS_CALLBACK_PATH
    with pytest.raises(ValueError, match="SHOUHU_TWILIO_FROM"):
        TwilioNotifier.from_settings(configured.model_copy(update={"twilio_from": ""}))


def test_twilio_edge_in_the_environment_cannot_steer_around_the_api_base(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client would turn api.twilio.com into api.sydney.au1.twilio.com, which the
    # rebasing does not match: a demo would then leave for the real Twilio.
    monkeypatch.setenv("TWILIO_EDGE", "sydney")
    monkeypatch.setenv("TWILIO_REGION", "au1")

    result = simulator.notifier().send(delivery(Channel.SMS))

    assert result.outcome is SendOutcome.SENT, result.error
    assert [message["sid"] for message in simulator.messages()] == [result.provider_id]


# --- the rebasing HTTP client -------------------------------------------------------


def test_rebasing_rewrites_only_the_twilio_api_prefix() -> None:
    client = RebasingHttpClient("http://127.0.0.1:9999/")
    path = "/2010-04-01/Accounts/AC1/Messages.json"

    assert client.rebase("https://api.twilio.com" + path) == "http://127.0.0.1:9999" + path
    for other in (
        "https://api.twilio.com.evil.example" + path,
        "https://messaging.twilio.com/v1/Services",
        "http://api.twilio.com" + path,
        "https://example.com" + path,
    ):
        assert client.rebase(other) == other


def test_rebasing_client_sends_other_hosts_where_they_point(simulator: Simulator) -> None:
    # The base points at nothing; a request for another host must still reach that host.
    client = RebasingHttpClient(f"http://127.0.0.1:{free_port()}")

    response = client.request("GET", f"{simulator.url}/_sim/messages")

    assert (response.status_code, response.text) == (200, "[]")


def test_rebasing_client_reads_the_proxy_once_and_still_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment's proxy is read when the client is made (requests would re-read it
    on every page); a page still goes through it, and NO_PROXY still exempts a host."""
    received: list[bytes] = []
    proxy = socket.create_server(("127.0.0.1", 0))
    proxy_port = proxy.getsockname()[1]

    def answer_once() -> None:
        conn, _ = proxy.accept()
        with conn:
            received.append(conn.recv(65536))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    server = threading.Thread(target=answer_once, daemon=True)
    server.start()
    target = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
    monkeypatch.delenv("no_proxy", raising=False)
    # A NO_PROXY that does not name the target: its list is no proxy of its own.
    monkeypatch.setenv("NO_PROXY", "internal.example")
    client = RebasingHttpClient(target)
    monkeypatch.delenv("HTTP_PROXY")  # read once, at construction

    response = client.request("POST", "https://api.twilio.com/2010-04-01/Accounts/AC1/Calls.json", data={"To": "+1"})

    server.join(5)
    proxy.close()
    assert response.status_code == 200
    assert received
    assert received[0].startswith(f"POST {target}/2010-04-01/Accounts/AC1/Calls.json ".encode())
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert RebasingHttpClient(target).proxy == {}


def test_the_sdk_logs_no_request_lines_at_info(simulator: Simulator, caplog: pytest.LogCaptureFixture) -> None:
    notifier = simulator.notifier()
    with caplog.at_level(logging.INFO):
        result = notifier.send(Delivery(1, Channel.SMS, GRID_WORKER, SOS))
    assert result.outcome is SendOutcome.SENT
    assert not [r for r in caplog.records if "Twilio API Request" in r.getMessage()]


# --- the simulator's own Twilio behaviour --------------------------------------------


def test_simulator_answers_bad_requests_like_twilio(simulator: Simulator) -> None:
    base = f"{simulator.url}/2010-04-01/Accounts/{ACCOUNT_SID}"
    auth = (ACCOUNT_SID, AUTH_TOKEN)

    unauthorized = httpx.post(f"{base}/Messages.json", data={"To": GRID_WORKER}, auth=(ACCOUNT_SID, "x"))
    assert unauthorized.status_code == 401
    assert unauthorized.json() == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    assert httpx.post(f"{base}/Messages.json", data={"To": GRID_WORKER}).status_code == 401

    def code(resource: str, form: dict[str, str]) -> tuple[int, int]:
        answer = httpx.post(f"{base}/{resource}", data=form, auth=auth)
        return answer.status_code, answer.json()["code"]

    assert code("Messages.json", {"From": FROM, "Body": "x"}) == (400, 21604)
    assert code("Messages.json", {"To": GRID_WORKER, "Body": "x"}) == (400, 21603)
    assert code("Messages.json", {"To": "12345", "From": FROM, "Body": "x"}) == (400, 21211)
    assert code("Messages.json", {"To": GRID_WORKER, "From": FROM}) == (400, 21602)
    assert code("Calls.json", {"From": FROM, "Url": "http://x/"}) == (400, 21201)
    assert code("Calls.json", {"To": GRID_WORKER, "Url": "http://x/"}) == (400, 21213)
    assert code("Calls.json", {"To": GRID_WORKER, "From": FROM}) == (400, 21205)
    other_account = f"{simulator.url}/2010-04-01/Accounts/AC{'1' * 32}/Calls.json"
    assert httpx.post(other_account, data={}, auth=auth).status_code == 404
    assert simulator.messages() == []
    assert simulator.calls() == []


def test_records_carry_times_and_can_be_cleared(simulator: Simulator) -> None:
    notifier = simulator.notifier()
    notifier.send(delivery(Channel.SMS, to="+12015550102"))
    notifier.send(delivery(Channel.SMS, to="+12015550103"))
    notifier.send(delivery(Channel.VOICE))

    first, second = simulator.messages()
    assert (first["to"], second["to"]) == ("+12015550102", "+12015550103")  # newest last
    assert float(str(first["monotonic"])) <= float(str(second["monotonic"]))
    assert str(first["received_at"]).endswith("+00:00")

    assert httpx.delete(f"{simulator.url}/_sim/records").status_code == 204
    assert simulator.messages() == []
    assert simulator.calls() == []


# --- what the phone says (PIPL: the minimum) -----------------------------------------


def test_sms_says_exactly_who_where_callback_code_and_how_to_reply() -> None:
    text = sms_text(SOS)

    assert text == (
        "【守护】紧急呼叫：王奶奶（东关村1组1号）按下SOS。回拨+12015550199。回复 K7P2Q 1 接单，K7P2Q 2 无法前往。"
    )
    assert len(text) <= SMS_MAX_CHARS


def test_sms_names_a_fall_and_an_unregistered_wristband() -> None:
    fall = sms_text(Message(7, "K7P2Q", "fall", "王奶奶", "东关村1组1号", "+12015550199"))
    unregistered = sms_text(Message(8, "M3X9A", "sos_unregistered", "WB-0042", "未知", "+12015550199"))

    assert "跌倒" in fall
    assert "SOS" not in fall
    assert "未登记手环WB-0042" in unregistered
    assert "M3X9A 1" in unregistered


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(min_size=1, max_size=60),
    address=st.text(min_size=1, max_size=300),
    code=st.from_regex(r"[A-Z0-9]{5}", fullmatch=True),
    callback=st.from_regex(r"\+[1-9][0-9]{7,14}", fullmatch=True),
    kind=st.sampled_from(["sos", "fall", "sos_unregistered", "low_battery", "unknown-kind"]),
)
@example(name="王" * 200, address="1号", code="K7P2Q", callback="+861380013800", kind="fall")
@example(name="王" * 40, address="东关村" * 100, code="K7P2Q", callback="+861380013800", kind="sos")
def test_sms_stays_within_140_characters_and_keeps_code_and_callback(
    name: str, address: str, code: str, callback: str, kind: str
) -> None:
    text = sms_text(Message(1, code, kind, name, address, callback))

    assert len(text) <= SMS_MAX_CHARS
    assert f"回复 {code} 1 接单，{code} 2 无法前往。" in text
    assert f"回拨{callback}。" in text


def test_voice_says_the_same_fields_spelled_out() -> None:
    root = ET.fromstring(voice_twiml(SOS))

    assert root.find("Gather") is None  # no keypress URL, no keypress asked for
    [say] = root.findall("Say")
    assert (say.get("language"), say.get("voice"), say.get("loop")) == (SAY_LANGUAGE, "Polly.Zhiyu", "2")
    assert say.text == (
        "守护紧急呼叫。王奶奶，地址东关村1组1号，按下SOS。回拨电话：1 2 0 1 5 5 5 0 1 9 9。事件编号：K 7 P 2 Q。"
    )
    with_keypress = ET.fromstring(voice_twiml(SOS, keypress_url="http://h/k"))
    spoken = with_keypress.findtext("Gather/Say")
    assert spoken is not None
    assert spoken.endswith("前往处置请按1，无法前往请按2。")


def test_a_fault_can_be_limited_to_calls_and_to_the_next_n_requests(simulator: Simulator) -> None:
    notifier = simulator.notifier()
    httpx.post(
        f"{simulator.url}/_sim/faults", json={"to": GRID_WORKER, "fail": "error", "times": 2, "only": "call"}
    ).raise_for_status()
    assert httpx.get(f"{simulator.url}/_sim/faults").json() == {
        GRID_WORKER: {"fail": "error", "only": "call", "remaining": 2}
    }

    outcomes = [notifier.send(delivery(channel)).outcome for channel in (Channel.VOICE, Channel.SMS, Channel.VOICE)]
    assert outcomes == [SendOutcome.FAILED, SendOutcome.SENT, SendOutcome.FAILED]  # SMS untouched, not counted
    assert notifier.send(delivery(Channel.VOICE)).outcome is SendOutcome.SENT  # the third call: healed
    assert httpx.get(f"{simulator.url}/_sim/faults").json() == {}
    assert [c["to"] for c in simulator.calls()] == [GRID_WORKER]
