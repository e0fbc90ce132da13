"""An Aliyun-compatible voice and SMS service (语音服务 ``dyvmsapi``, 短信服务 ``dysmsapi``) for tests and demos.

It answers the official SDKs' RPC requests — ``IvrCall``, ``SingleCallByTts``,
``SendSms``, version 2017-05-25, on ``POST /`` with the parameters in the query — so the
SDKs run unchanged against it (``SHOUHU_ALIYUN_ENDPOINT=http://127.0.0.1:<port>``).
Every request's V3 signature (:mod:`simulators.aliyun_signature`) is checked against
the one AccessKey it serves; a wrong key or secret is refused as Aliyun refuses it
(``InvalidAccessKeyId.NotFound`` 404, ``SignatureDoesNotMatch`` 400). Nothing is
delivered: each request is recorded, announced on the terminal and listed under
``/_sim/requests``.

How the person at a number behaves is set with ``POST /_sim/behaviour``: a call is
answered and ``1`` or ``2`` pressed (``press1``, ``press2``), answered with no key
(``voicemail``), hung up early (``hangup``), not answered (``no-answer``), ``busy``,
``powered-off`` or ``out-of-service``, after ``answer_after_s``; an SMS ends
``delivered`` or ``undelivered``. The call's record (``VoiceReport``, with ``dtmf``)
and the SMS's delivery report (``SmsReport``) are then pushed, as JSON arrays, to the
push base (``<base>/voice_report``, ``<base>/sms_report``); ``POST /_sim/sms-up``
makes a person reply by SMS (``SmsUp`` to ``<base>/sms_up``). A push not answered 200
within ``push_timeout_s`` is pushed again after each of ``retry_intervals_s`` (the
provider waits 1, 5 and 10 minutes; the simulator seconds), then dropped. Every push
is listed under ``/_sim/pushes``.

Faults are set per number with ``POST /_sim/faults`` (``*``: every number):
``flow-control`` refuses with ``isv.BUSINESS_LIMIT_CONTROL``, ``error`` answers 503,
``hang`` answers nothing for ``hang_s``; ``times`` limits one to the next N requests.
A number that is not a Chinese mainland mobile number is refused with
``isv.MOBILE_NUMBER_ILLEGAL``. Business refusals come as the APIs send them: the SMS
API answers 200 with the error ``Code``, the voice API 400.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal
from urllib.parse import parse_qsl

import requests
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from simulators.aliyun_signature import parse_authorization, signature

API_VERSION = "2017-05-25"
# A Chinese mainland mobile number, as Aliyun takes it: 11 digits from 1, an optional 86 before.
MAINLAND_MOBILE = re.compile(r"(?:\+?86)?1\d{10}")
ANY_NUMBER = re.compile(r"\+[1-9]\d{6,14}")  # E.164, for ``any_number``
DEMO_ACCESS_KEY_ID = "LTAIdemoShouhuSim"
DEMO_ACCESS_KEY_SECRET = "demo-aliyun-secret"  # noqa: S105 - only ever sent to the local simulator
DEMO_VOICE_NUMBER = "057188880000"
PUSH_TIMEOUT_S = 0.7  # the SMS receipts' receiver must answer within about 700 ms
RETRY_INTERVALS_S = (1.0, 5.0, 10.0)  # the provider's 1, 5 and 10 minutes, in seconds
ANSWERED_DURATION_S = 15
# China Standard Time: the provider writes its times so, without a zone.
CST = timezone(timedelta(hours=8))

Answer = Literal["press1", "press2", "voicemail", "hangup", "no-answer", "busy", "powered-off", "out-of-service"]
Fault = Literal["flow-control", "error", "hang"]
SmsOutcome = Literal["delivered", "undelivered"]
PushKind = Literal["voice_report", "sms_report", "sms_up"]
Announce = Callable[[str], None]

# How a call ends, as VoiceReport's status_code (语音服务 "呼叫结果状态码") and status_msg.
STATUS_OF_ANSWER: dict[str, tuple[str, str]] = {
    "press1": ("200000", "用户听完语音"),
    "press2": ("200000", "用户听完语音"),
    "voicemail": ("200000", "用户听完语音"),
    "hangup": ("200001", "用户提前挂机未完整收听"),
    "no-answer": ("200003", "用户收到呼叫但未接听"),
    "busy": ("200002", "用户占线"),
    "powered-off": ("200010", "关机"),
    "out-of-service": ("200011", "停机"),
}
DTMF_OF_ANSWER = {"press1": "1", "press2": "2"}
ANSWERED = frozenset({"press1", "press2", "voicemail", "hangup"})


class AliyunApiError(Exception):
    """A refusal answered in Aliyun's JSON error shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> JSONResponse:
        return JSONResponse(
            {
                "RequestId": _request_id(),
                "HostId": "dyvmsapi.aliyuncs.com",
                "Code": self.code,
                "Message": self.message,
                "Recommend": f"https://api.aliyun.com/troubleshoot?q={self.code}",
            },
            status_code=self.status,
        )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """A request the service took, and how it answered (``code`` ``OK``: accepted)."""

    action: str
    params: dict[str, str]
    to: str
    out_id: str | None
    code: str
    provider_id: str | None
    received_at: datetime
    monotonic: float

    @property
    def template_params(self) -> dict[str, str]:
        """The template's variables, parsed from ``StartTtsParams``, ``TtsParam`` or ``TemplateParam``."""
        raw = self.params.get("StartTtsParams") or self.params.get("TtsParam") or self.params.get("TemplateParam")
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def public(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "params": self.params,
            "template_params": self.template_params,
            "to": self.to,
            "out_id": self.out_id,
            "code": self.code,
            "provider_id": self.provider_id,
            "received_at": self.received_at.isoformat(),
            "monotonic": self.monotonic,
        }


@dataclass(frozen=True, slots=True)
class PushRecord:
    """One push of a receipt batch, and the answer it got (``status`` None: none in time)."""

    kind: PushKind
    url: str
    batch: list[dict[str, Any]]
    attempt: int
    status: int | None
    reply: str
    posted_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "url": self.url,
            "batch": self.batch,
            "attempt": self.attempt,
            "status": self.status,
            "reply": self.reply,
            "posted_at": self.posted_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the person at one number acts."""

    answer: Answer | None = None
    sms: SmsOutcome | None = None
    answer_after_s: float = 0.0

    def public(self) -> dict[str, Any]:
        return {"answer": self.answer, "sms": self.sms, "answer_after_s": self.answer_after_s}


@dataclass(frozen=True, slots=True)
class NumberFault:
    """A fault on one number, for how many more requests (None: until healed)."""

    fail: Fault
    remaining: int | None = None
    hang_s: float = 60.0

    def public(self) -> dict[str, Any]:
        return {"fail": self.fail, "remaining": self.remaining, "hang_s": self.hang_s}


@dataclass(slots=True)
class PushConfig:
    """Where receipts go, and how patiently."""

    base: str | None = None  # <base>/voice_report, /sms_report, /sms_up
    timeout_s: float = PUSH_TIMEOUT_S
    retry_intervals_s: tuple[float, ...] = RETRY_INTERVALS_S

    def url(self, kind: PushKind) -> str | None:
        return f"{self.base.rstrip('/')}/{kind}" if self.base else None


class BehaviourRequest(BaseModel):
    """A field left out keeps its setting; a field given as ``null`` clears it."""

    to: str
    answer: Answer | None = None
    sms: SmsOutcome | None = None
    answer_after_s: float = Field(default=0.0, ge=0, le=120)


class FaultRequest(BaseModel):
    to: str
    fail: Fault | None
    times: int | None = Field(default=None, ge=1, description="The next N requests only; default: until healed.")
    hang_s: float = Field(default=60.0, ge=0, le=600, description="For ``hang``: how long no answer comes.")


class ConfigRequest(BaseModel):
    """A field left out keeps its setting."""

    push_base: str | None = None
    push_timeout_s: float | None = Field(default=None, gt=0, le=60)
    retry_intervals_s: list[float] | None = Field(default=None, max_length=10)


class SmsUpRequest(BaseModel):
    from_: str = Field(alias="from")
    content: str
    sign_name: str | None = Field(default=None, description="Default: the signature last sent to that number.")


def print_flushed(line: str) -> None:
    """Default announcer: one line on stdout, flushed so a terminal demo shows it at once."""
    print(line, flush=True)


def _now() -> tuple[datetime, float]:
    return datetime.now(UTC), time.monotonic()


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


def _provider_time(moment: datetime) -> str:
    return moment.astimezone(CST).strftime("%Y-%m-%d %H:%M:%S")


def _national(number: str) -> str:
    return number[-11:] if MAINLAND_MOBILE.fullmatch(number) else number


@dataclass
class AliyunService:
    """The service's state: the AccessKey, records, behaviours, faults. Safe to use from several threads."""

    access_key_id: str
    access_key_secret: str
    announce: Announce
    push: PushConfig = field(default_factory=PushConfig)
    # The demo's county has fictional +1 555 numbers: it lets them through. Aliyun
    # itself takes Chinese mainland mobile numbers only.
    any_number: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _requests: list[RequestRecord] = field(default_factory=list)
    _pushes: list[PushRecord] = field(default_factory=list)
    _behaviours: dict[str, Behaviour] = field(default_factory=dict)
    _faults: dict[str, NumberFault] = field(default_factory=dict)

    def takes(self, number: str) -> bool:
        """Would the provider call or text this number (``isv.MOBILE_NUMBER_ILLEGAL`` if not)?"""
        return bool(MAINLAND_MOBILE.fullmatch(number) or (self.any_number and ANY_NUMBER.fullmatch(number)))

    # -- records --

    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def pushes(self) -> list[PushRecord]:
        with self._lock:
            return list(self._pushes)

    def record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._pushes.clear()

    # -- behaviours and faults --

    def set_behaviour(self, to: str, changes: dict[str, Any]) -> dict[str, dict[str, Any]]:
        with self._lock:
            behaviour = replace(self._behaviours.get(_national(to), Behaviour()), **changes)
            if behaviour == Behaviour():
                self._behaviours.pop(_national(to), None)
            else:
                self._behaviours[_national(to)] = behaviour
            return {number: b.public() for number, b in self._behaviours.items()}

    def behaviour_for(self, to: str) -> Behaviour:
        with self._lock:
            return self._behaviours.get(_national(to), Behaviour())

    def set_fault(self, to: str, fail: Fault | None, times: int | None, hang_s: float) -> dict[str, dict[str, Any]]:
        number = to if to == "*" else _national(to)
        with self._lock:
            if fail is None:
                self._faults.pop(number, None)
            else:
                self._faults[number] = NumberFault(fail, times, hang_s)
            return {n: fault.public() for n, fault in self._faults.items()}

    def take_fault(self, to: str) -> NumberFault | None:
        """The fault this request to ``to`` meets (its own, else ``*``); a counted one is used up."""
        with self._lock:
            for number in (_national(to), "*"):
                fault = self._faults.get(number)
                if fault is None:
                    continue
                if fault.remaining is not None:
                    if fault.remaining > 1:
                        self._faults[number] = replace(fault, remaining=fault.remaining - 1)
                    else:
                        del self._faults[number]
                return fault
            return None

    # -- the signature --

    def authenticate(self, request: Request, body: bytes) -> None:
        """Check the request's V3 signature for the one AccessKey served; refuse as Aliyun does."""
        authorization = parse_authorization(request.headers.get("authorization", ""))
        if authorization is None:
            raise AliyunApiError(
                400, "IncompleteSignature", "The request signature does not conform to Aliyun standards."
            )
        if not secrets.compare_digest(authorization.access_key_id.encode(), self.access_key_id.encode()):
            raise AliyunApiError(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        headers = {name: request.headers.getlist(name) for name in authorization.signed_headers}
        expected = signature(
            self.access_key_secret,
            request.method,
            request.url.path,
            parse_qsl(request.url.query, keep_blank_values=True),
            headers,
            authorization.signed_headers,
            body,
        )
        if not secrets.compare_digest(expected.encode(), authorization.signature.encode()):
            raise AliyunApiError(
                400, "SignatureDoesNotMatch", "Specified signature is not matched with our calculation."
            )

    # -- pushes --

    def start_push(self, kind: PushKind, batch: list[dict[str, Any]], delay_s: float = 0.0, first: int = 1) -> None:
        """Push ``batch`` to its URL on a thread of its own after ``delay_s``, pushing again as the provider does.

        ``first``: the try to start at (2: the first was made already).
        """
        thread = threading.Thread(target=self._push, args=(kind, batch, delay_s, first), name=f"push-{kind}")
        thread.daemon = True
        thread.start()

    def _push(self, kind: PushKind, batch: list[dict[str, Any]], delay_s: float, first: int) -> None:
        url = self.push.url(kind)
        if url is None:
            self.announce(f"…  {kind} not pushed: no push base (POST /_sim/config)")
            return
        waits = (0.0, *self.push.retry_intervals_s)
        for attempt in range(first, len(waits) + 1):
            # The person lets it ring, or the provider waits to push again: on this thread.
            time.sleep(waits[attempt - 1] + (delay_s if attempt == first else 0.0))
            if self.post(kind, url, batch, attempt).status == 200:
                return
        self.announce(f"✖  {kind} dropped after {len(waits)} pushes to {url}")

    def post(self, kind: PushKind, url: str, batch: list[dict[str, Any]], attempt: int) -> PushRecord:
        """POST ``batch`` as a JSON array, and record the answer."""
        try:
            answer = requests.post(url, json=batch, timeout=self.push.timeout_s)
            status: int | None = answer.status_code
            reply = answer.text
        except requests.RequestException as exc:
            status, reply = None, str(exc)
        record = PushRecord(kind, url, batch, attempt, status, reply, datetime.now(UTC))
        with self._lock:
            self._pushes.append(record)
        self.announce(f"↩  {kind} push {attempt} to {url}: {status if status is not None else reply}")
        return record

    def voice_report(self, record: RequestRecord, answer: Answer) -> dict[str, Any]:
        """The ``VoiceReport`` of a call that ended by ``answer``."""
        status_code, status_msg = STATUS_OF_ANSWER[answer]
        answered = answer in ANSWERED
        ring = record.received_at + timedelta(seconds=1)
        start = ring + timedelta(seconds=self.behaviour_for(record.to).answer_after_s)
        end = start + timedelta(seconds=ANSWERED_DURATION_S if answered else 0)
        return {
            "call_id": record.provider_id,
            "out_id": record.out_id,
            "caller": record.params.get("CalledShowNumber", ""),
            "callee": record.to,
            "status_code": status_code,
            "status_msg": status_msg,
            "dtmf": DTMF_OF_ANSWER.get(answer, ""),
            "originate_time": _provider_time(record.received_at),
            "ring_time": _provider_time(ring),
            "start_time": _provider_time(start) if answered else "",
            "end_time": _provider_time(end) if answered else "",
            "duration": str(ANSWERED_DURATION_S if answered else 0),
            "hangup_direction": "用户" if answered else "",
            "voice_type": "voice",
            "toll_type": "LOCAL",
        }

    def sms_report(self, record: RequestRecord, outcome: SmsOutcome) -> dict[str, Any]:
        """The ``SmsReport`` of an SMS that ended ``outcome``."""
        delivered = outcome == "delivered"
        return {
            "phone_number": record.to,
            "send_time": _provider_time(record.received_at),
            "report_time": _provider_time(datetime.now(UTC)),
            "success": delivered,
            "err_code": "DELIVERED" if delivered else "MK:0001",
            "err_msg": "用户接收成功" if delivered else "用户无法接收",
            "sms_size": "1",
            "biz_id": record.provider_id,
            "out_id": record.out_id or "",
        }

    def sms_up(self, sender: str, content: str, sign_name: str | None) -> dict[str, Any]:
        """A person's reply, as ``SmsUp``: the number and the text, no id of what it answers."""
        if sign_name is None:
            sent = [
                r for r in self.requests() if r.action == "SendSms" and r.to == _national(sender) and r.code == "OK"
            ]
            sign_name = sent[-1].params.get("SignName", "") if sent else ""
        return {
            "phone_number": _national(sender),
            "send_time": _provider_time(datetime.now(UTC)),
            "content": content,
            "sign_name": sign_name,
            "dest_code": "1234",
            "sequence_id": secrets.randbelow(10**10),
        }


def _refuse_business(action: str, code: str, message: str) -> AliyunApiError | JSONResponse:
    """A business refusal as the API sends it: the SMS API 200 with the code, the voice API 400."""
    if action == "SendSms":
        return JSONResponse({"RequestId": _request_id(), "Code": code, "Message": message})
    return AliyunApiError(400, code, message)


def _required(params: dict[str, str], names: tuple[str, ...]) -> None:
    missing = [name for name in names if not params.get(name)]
    if missing:
        raise AliyunApiError(400, "MissingParameter", f"The input parameter {missing[0]} that is mandatory is missing.")


REQUIRED: dict[str, tuple[str, ...]] = {
    "IvrCall": ("CalledNumber", "CalledShowNumber", "StartCode"),
    "SingleCallByTts": ("CalledNumber", "TtsCode"),
    "SendSms": ("PhoneNumbers", "SignName", "TemplateCode"),
}


async def take_request(service: AliyunService, request: Request) -> Response:
    """Authenticate, fault, validate, record and announce one request; Aliyun's answer."""
    body = await request.body()
    service.authenticate(request, body)
    params = dict(parse_qsl(request.url.query, keep_blank_values=True))
    params |= dict(parse_qsl(body.decode(errors="replace"), keep_blank_values=True))
    action = params.get("Action") or request.headers.get("x-acs-action", "")
    version = params.get("Version") or request.headers.get("x-acs-version", "")
    if action not in REQUIRED or version != API_VERSION:
        raise AliyunApiError(404, "InvalidAction.NotFound", f"Specified api {action} ({version}) is not found.")
    _required(params, REQUIRED[action])
    to = params.get("PhoneNumbers") or params.get("CalledNumber", "")
    fault = service.take_fault(to)
    if fault is not None and fault.fail == "hang":
        service.announce(f"…  {to}: no answer for {fault.hang_s:g} s (injected hang)")
        await asyncio.sleep(fault.hang_s)
    received_at, monotonic = _now()

    def record(code: str, provider_id: str | None = None) -> RequestRecord:
        taken = RequestRecord(
            action, params, _national(to), params.get("OutId") or None, code, provider_id, received_at, monotonic
        )
        service.record(taken)
        return taken

    for param in ("StartTtsParams", "TtsParam", "TemplateParam"):
        if params.get(param):
            try:
                json.loads(params[param])
            except ValueError:
                record("isv.INVALID_JSON_PARAM")
                return _answer(_refuse_business(action, "isv.INVALID_JSON_PARAM", f"{param} is not JSON."))
    if fault is not None and fault.fail == "error":
        record("ServiceUnavailable")
        service.announce(f"✖  {action} to {to}: 503 (injected fault)")
        raise AliyunApiError(
            503, "ServiceUnavailable", "The request has failed due to a temporary failure of the server."
        )
    if not service.takes(to):
        record("isv.MOBILE_NUMBER_ILLEGAL")
        return _answer(_refuse_business(action, "isv.MOBILE_NUMBER_ILLEGAL", f"{to} is not a mobile number."))
    if fault is not None and fault.fail == "flow-control":
        record("isv.BUSINESS_LIMIT_CONTROL")
        service.announce(f"✖  {action} to {to}: flow control (injected)")
        return _answer(_refuse_business(action, "isv.BUSINESS_LIMIT_CONTROL", "触发业务流控"))
    if action == "SendSms":
        return _accept_sms(service, record)
    return _accept_call(service, record, action)


def _answer(refusal: AliyunApiError | JSONResponse) -> Response:
    if isinstance(refusal, AliyunApiError):
        raise refusal
    return refusal


def _accept_sms(service: AliyunService, record: Callable[[str, str | None], RequestRecord]) -> JSONResponse:
    biz_id = f"{secrets.randbelow(10**15):015d}^0"
    taken = record("OK", biz_id)
    service.announce(
        f"✉  SMS to {taken.to} 【{taken.params.get('SignName', '')}】{taken.params.get('TemplateCode')}"
        f" {taken.template_params}"
    )
    outcome = service.behaviour_for(taken.to).sms
    report = None
    if outcome is not None:
        report = BackgroundTask(service.start_push, "sms_report", [service.sms_report(taken, outcome)])
    body = {"RequestId": _request_id(), "BizId": biz_id, "Code": "OK", "Message": "OK"}
    return JSONResponse(body, background=report)


def _accept_call(
    service: AliyunService, record: Callable[[str, str | None], RequestRecord], action: str
) -> JSONResponse:
    call_id = f"{secrets.randbelow(10**12):012d}^{secrets.randbelow(10**12):012d}"
    taken = record("OK", call_id)
    code = taken.params.get("StartCode") or taken.params.get("TtsCode")
    service.announce(f"☎  ringing {taken.to} ({action} {code} {taken.template_params}, call {call_id})")
    behaviour = service.behaviour_for(taken.to)
    report = None
    if behaviour.answer is not None:
        answer = behaviour.answer
        takes_keys = action == "IvrCall" and any(name.startswith("MenuKeyMap.") for name in taken.params)
        if answer in DTMF_OF_ANSWER and not takes_keys:
            answer = "voicemail"  # a call with no key map takes no key: heard to the end, no dtmf
        batch = [service.voice_report(taken, answer)]
        report = BackgroundTask(service.start_push, "voice_report", batch, behaviour.answer_after_s + 0.05)
    return JSONResponse(
        {"RequestId": _request_id(), "CallId": call_id, "Code": "OK", "Message": "OK"}, background=report
    )


def create_aliyun_service(
    access_key_id: str,
    access_key_secret: str,
    *,
    announce: Announce | None = None,
    push_base: str | None = None,
    push_timeout_s: float = PUSH_TIMEOUT_S,
    retry_intervals_s: tuple[float, ...] = RETRY_INTERVALS_S,
    any_number: bool = False,
) -> FastAPI:
    """Build the simulator app for one AccessKey.

    Args:
        access_key_id: The only AccessKey it serves.
        access_key_secret: That key's secret: every request's signature is checked with it.
        announce: Called with one human line per request, push and fault; default prints to stdout.
        push_base: Where receipts are pushed (``<base>/voice_report``, ``/sms_report``, ``/sms_up``);
            ``POST /_sim/config`` sets it later. None: nothing is pushed.
        push_timeout_s: How long a push waits for its 200.
        retry_intervals_s: The waits before each push again.
        any_number: Take any E.164 number, not only Chinese mainland mobiles (the demo's
            fictional +1 555 numbers); the real service refuses them.

    Returns:
        The FastAPI app; its ``state.service`` is the :class:`AliyunService`.
    """
    service = AliyunService(
        access_key_id,
        access_key_secret,
        announce or print_flushed,
        PushConfig(push_base, push_timeout_s, retry_intervals_s),
        any_number=any_number,
    )
    app = FastAPI(title="Shouhu Aliyun simulator (dyvmsapi and dysmsapi 2017-05-25)")
    app.state.service = service

    @app.exception_handler(AliyunApiError)
    async def aliyun_error(_: Request, exc: AliyunApiError) -> JSONResponse:
        return exc.response()

    @app.post("/")
    async def call_action(request: Request) -> Response:
        """Take one RPC request (``IvrCall``, ``SingleCallByTts``, ``SendSms``), signed by the SDK."""
        return await take_request(service, request)

    @app.get("/_sim/requests")
    async def read_requests() -> list[dict[str, Any]]:
        """Every request taken so far (refused ones with their error code), newest last."""
        return [record.public() for record in service.requests()]

    @app.get("/_sim/pushes")
    async def read_pushes() -> list[dict[str, Any]]:
        """Every receipt push so far, each try apart, with the answer it got; newest last."""
        return [record.public() for record in service.pushes()]

    @app.delete("/_sim/records", status_code=204)
    async def delete_records() -> Response:
        """Forget every recorded request and push (behaviours and faults stay)."""
        service.clear()
        return Response(status_code=204)

    @app.post("/_sim/behaviour")
    async def set_behaviour(behaviour: BehaviourRequest) -> dict[str, dict[str, Any]]:
        """Set how ``to`` answers calls (``answer``, ``answer_after_s``) and how its SMS end (``sms``)."""
        changes: dict[str, Any] = {
            name: getattr(behaviour, name)
            for name in ("answer", "sms", "answer_after_s")
            if name in behaviour.model_fields_set
        }
        behaviours = service.set_behaviour(behaviour.to, changes)
        service.announce(f"⚙  {behaviour.to} now behaves {behaviours.get(_national(behaviour.to))}")
        return behaviours

    @app.post("/_sim/faults")
    async def set_fault(fault: FaultRequest) -> dict[str, dict[str, Any]]:
        """Make a number (or ``*``) fail (``flow-control``, ``error``, ``hang``), or heal it (``null``)."""
        faults = service.set_fault(fault.to, fault.fail, fault.times, fault.hang_s)
        service.announce(f"⚙  {fault.to} is now {fault.fail or 'healthy'}")
        return faults

    @app.get("/_sim/config")
    async def read_config() -> dict[str, Any]:
        """Where receipts are pushed, and how patiently."""
        return _config(service.push)

    @app.post("/_sim/config")
    async def set_config(config: ConfigRequest) -> dict[str, Any]:
        """Set the push base, the push timeout and the retry intervals (fields left out are kept)."""
        if "push_base" in config.model_fields_set:
            service.push.base = config.push_base
        if config.push_timeout_s is not None:
            service.push.timeout_s = config.push_timeout_s
        if config.retry_intervals_s is not None:
            service.push.retry_intervals_s = tuple(config.retry_intervals_s)
        return _config(service.push)

    @app.post("/_sim/sms-up")
    async def send_sms_up(sms: SmsUpRequest) -> dict[str, Any]:
        """A person replies by SMS: ``SmsUp`` is pushed (retried as the provider does); the first answer is returned."""
        if not service.takes(sms.from_):
            raise AliyunApiError(400, "isv.MOBILE_NUMBER_ILLEGAL", f"{sms.from_} is not a mobile number.")
        url = service.push.url("sms_up")
        if url is None:
            raise AliyunApiError(409, "NoPushBase", "No push base is configured (POST /_sim/config).")
        up = service.sms_up(sms.from_, sms.content, sms.sign_name)
        service.announce(f"✉  SMS from {up['phone_number']}: {sms.content}")
        first = await run_in_threadpool(service.post, "sms_up", url, [up], 1)
        if first.status != 200:
            service.start_push("sms_up", [up], first=2)
        return {"status": first.status, "reply": first.reply, "sms_up": up}

    return app


def _config(push: PushConfig) -> dict[str, Any]:
    return {"push_base": push.base, "push_timeout_s": push.timeout_s, "retry_intervals_s": list(push.retry_intervals_s)}


def serve_aliyun(host: str, port: int, access_key_id: str, access_key_secret: str, push_base: str | None) -> None:
    """Run the simulator in the foreground until interrupted."""
    app = create_aliyun_service(access_key_id, access_key_secret, push_base=push_base)
    uvicorn.run(app, host=host, port=port, log_level="warning")
