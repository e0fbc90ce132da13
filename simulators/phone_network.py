"""A Twilio-compatible phone network for tests and demos.

It answers the two REST calls the ``twilio`` client makes for us — create a Message,
create a Call — with Twilio's status codes, error codes and JSON shapes, so
``twilio.rest.Client`` runs unchanged against it (``SHOUHU_TWILIO_API_BASE``). Nothing
is delivered: each accepted SMS or call is recorded, announced on the terminal (so a
demo shows the phone ring) and listed under ``/_sim/…`` for tests and the demo.

Faults are injected per number with ``POST /_sim/faults``:

- ``error``: every request to that number answers Twilio's 500 (error 20500);
- ``unavailable``: every request to that number answers 503 (error 20503), as Twilio
  does when it cannot take requests: the provider is down, another one may not be;
- ``busy`` / ``no-answer``: a call is accepted (201, ``queued``, as Twilio does) and
  then ends ``busy`` / ``no-answer``; if the request gave a ``StatusCallback`` the
  network posts that final status to it, signed with ``X-Twilio-Signature`` like
  Twilio. An SMS to such a number is delivered normally: a busy phone still gets SMS.

- ``hang``: the request gets no answer for ``hang_s`` seconds (default 60), then is
  handled as usual: a provider that hangs (past the client's timeout) or is slow (a
  shorter ``hang_s``: the send is provably in flight meanwhile).

``to`` ``*`` applies a fault to every number (a provider down), after any fault set
on the number itself.

A fault may be narrowed: ``only`` (``call`` or ``sms``) applies it to that kind of
request alone, and ``times`` to the next N such requests to the number, after
which the number is healthy again (a provider that recovers).

How the person at a number behaves is set with ``POST /_sim/behaviour``, so tests
and demos drive the API's callbacks for real:

- ``answer``: ``press1`` / ``press2`` answer the call and press that digit, posted
  to the TwiML's ``<Gather action>`` like Twilio, then the ``completed`` status;
  ``press5`` presses a key the call did not ask for, and ``press#`` the finishing
  key alone (posted with empty ``Digits`` and ``FinishedOnKey`` ``#``): either way
  the person then hangs up whatever the call says next, and the call ends
  ``completed``; ``hangup`` answers and hangs up without a key, ``voicemail``
  answers without a keypress (only ``completed`` for both); ``busy`` /
  ``no-answer`` end the call so, as the faults do;
- ``answer_after_s``: how long it rings before the person answers (or the line ends);
- ``unreachable``: a switched-off or unknown handset, the call ends ``failed``;
- ``sms``: ``delivered`` / ``undelivered`` is posted to an SMS's ``StatusCallback``.

Every callback is posted on its own thread once the 201 has gone out, signed with
``X-Twilio-Signature``; ``GET /_sim/webhooks`` lists each with the reply it got.
``POST /_sim/inbound-sms`` sends a person's SMS to the ``sms_url`` webhook (set
with ``create_phone_network(sms_url=…)`` or ``POST /_sim/config``) and returns the
reply, as the Twilio number's inbound webhook does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Literal
from urllib.parse import parse_qs

import requests
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from twilio.request_validator import RequestValidator

API_VERSION = "2010-04-01"
# E.164: a plus, a non-zero country code digit, at most 15 digits in all.
E164 = re.compile(r"\+[1-9]\d{1,14}")
SMS_BODY_LIMIT = 1600  # Twilio refuses a longer concatenated body (error 21617)
CALLBACK_TIMEOUT_S = 5.0

Fault = Literal["busy", "no-answer", "error", "unavailable", "hang"]
RequestKind = Literal["call", "sms"]
Answer = Literal["press1", "press2", "press5", "press#", "hangup", "voicemail", "busy", "no-answer", "unreachable"]
WebhookKind = Literal["status", "keypress", "inbound_sms", "twiml"]
SmsOutcome = Literal["delivered", "undelivered"]
Announce = Callable[[str], None]

# The keys pressed, as Twilio posts them: (Digits, FinishedOnKey). The finishing key
# (#) alone ends the <Gather> with no digits.
KEYS_OF_ANSWER: dict[str, tuple[str, str]] = {
    "press1": ("1", ""),
    "press2": ("2", ""),
    "press5": ("5", ""),
    "press#": ("", "#"),
}
# How a call ends, by the callee's behaviour.
CALL_END_OF_ANSWER: dict[str, str] = {
    "press1": "completed",
    "press2": "completed",
    "press5": "completed",
    "press#": "completed",
    "hangup": "completed",
    "voicemail": "completed",
    "busy": "busy",
    "no-answer": "no-answer",
    "unreachable": "failed",  # a switched-off or unknown handset: Twilio ends the call `failed`
}
ANSWERED_CALL_DURATION_S = "15"
UNDELIVERED_ERROR_CODE = "30003"  # Twilio: "Unreachable destination handset"


class TwilioApiError(Exception):
    """A refusal answered in Twilio's JSON error shape."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> JSONResponse:
        return JSONResponse(
            {
                "code": self.code,
                "message": self.message,
                "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
                "status": self.status,
            },
            status_code=self.status,
        )


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """An SMS the network accepted."""

    sid: str
    to: str
    from_: str
    body: str
    status_callback: str | None
    received_at: datetime
    monotonic: float

    def public(self) -> dict[str, Any]:
        return {
            "sid": self.sid,
            "to": self.to,
            "from": self.from_,
            "body": self.body,
            "status_callback": self.status_callback,
            "received_at": self.received_at.isoformat(),
            "monotonic": self.monotonic,
        }


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call the network accepted; ``status`` is how it ends (``queued`` = rang normally)."""

    sid: str
    to: str
    from_: str
    twiml: str | None
    url: str | None
    status: str
    status_callback: str | None
    received_at: datetime
    monotonic: float
    answer: Answer | None = None
    answer_after_s: float = 0.0

    def public(self) -> dict[str, Any]:
        return {
            "sid": self.sid,
            "to": self.to,
            "from": self.from_,
            "twiml": self.twiml,
            "url": self.url,
            "status": self.status,
            "status_callback": self.status_callback,
            "received_at": self.received_at.isoformat(),
            "monotonic": self.monotonic,
            "answer": self.answer,
        }


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the person at one number acts: answers calls so, and their SMS end so."""

    answer: Answer | None = None
    sms: SmsOutcome | None = None
    # How long the phone rings before the person answers (and presses, or not).
    answer_after_s: float = 0.0

    def public(self) -> dict[str, str | None]:
        return {"answer": self.answer, "sms": self.sms, "answer_after_s": str(self.answer_after_s)}


@dataclass(frozen=True, slots=True)
class WebhookRecord:
    """A signed request the network posted (a status callback, a keypress, an inbound SMS) and its reply."""

    kind: WebhookKind
    url: str
    params: dict[str, str]
    signature: str
    status: int | None  # None: the request got no answer
    reply: str
    posted_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "url": self.url,
            "params": self.params,
            "signature": self.signature,
            "status": self.status,
            "reply": self.reply,
            "posted_at": self.posted_at.isoformat(),
        }


class FaultRequest(BaseModel):
    to: str
    fail: Fault | None
    times: int | None = Field(default=None, ge=1, description="The next N requests only; default: until healed.")
    only: RequestKind | None = Field(default=None, description="Calls or SMS only; default: both.")
    hang_s: float = Field(default=60.0, ge=0, le=600, description="For ``hang``: how long no answer comes.")


@dataclass(frozen=True, slots=True)
class NumberFault:
    """A fault on one number: what fails, for which requests, and how many more times (None: until healed)."""

    fail: Fault
    only: RequestKind | None = None
    remaining: int | None = None
    hang_s: float = 60.0

    def applies_to(self, kind: RequestKind) -> bool:
        # Busy and no-answer are how a call ends; an SMS to that phone goes through.
        refusals = ("error", "unavailable", "hang")
        return (self.only is None or self.only == kind) and (kind == "call" or self.fail in refusals)

    def public(self) -> dict[str, Any]:
        public: dict[str, Any] = {"fail": self.fail, "only": self.only, "remaining": self.remaining}
        return public | ({"hang_s": self.hang_s} if self.fail == "hang" else {})


class BehaviourRequest(BaseModel):
    """A field left out keeps its setting; a field given as ``null`` clears it."""

    to: str
    answer: Answer | None = None
    sms: SmsOutcome | None = None
    answer_after_s: float = Field(default=0.0, ge=0, le=120)


class ConfigRequest(BaseModel):
    """A field left out keeps its setting."""

    sms_url: str | None = None
    number: str | None = Field(default=None, description="The Twilio number inbound SMS are sent to.")


class InboundSmsRequest(BaseModel):
    from_: str = Field(alias="from")
    body: str
    to: str | None = Field(
        default=None, description="Default: the configured number, else the number that last texted the sender."
    )


def print_flushed(line: str) -> None:
    """Default announcer: one line on stdout, flushed so a terminal demo shows it at once."""
    print(line, flush=True)


class PhoneNetwork:
    """The network's state: records, faults, credentials. Safe to use from several threads."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        announce: Announce,
        *,
        sms_url: str | None = None,
        number: str | None = None,
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.announce = announce
        self.sms_url = sms_url
        self.number = number
        self._lock = threading.Lock()
        self._messages: list[MessageRecord] = []
        self._calls: list[CallRecord] = []
        self._faults: dict[str, NumberFault] = {}
        self._behaviours: dict[str, Behaviour] = {}
        self._webhooks: list[WebhookRecord] = []

    def messages(self) -> list[MessageRecord]:
        with self._lock:
            return list(self._messages)

    def calls(self) -> list[CallRecord]:
        with self._lock:
            return list(self._calls)

    def add_message(self, record: MessageRecord) -> None:
        with self._lock:
            self._messages.append(record)

    def add_call(self, record: CallRecord) -> None:
        with self._lock:
            self._calls.append(record)

    def webhooks(self) -> list[WebhookRecord]:
        with self._lock:
            return list(self._webhooks)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()
            self._calls.clear()
            self._webhooks.clear()

    def set_fault(
        self,
        to: str,
        fail: Fault | None,
        *,
        times: int | None = None,
        only: RequestKind | None = None,
        hang_s: float = 60.0,
    ) -> dict[str, dict[str, Any]]:
        with self._lock:
            if fail is None:
                self._faults.pop(to, None)
            else:
                self._faults[to] = NumberFault(fail, only, times, hang_s)
            return {number: fault.public() for number, fault in self._faults.items()}

    def faults(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {number: fault.public() for number, fault in self._faults.items()}

    def take_hang(self, to: str, kind: RequestKind) -> float | None:
        """How long this request to ``to`` hangs, if a ``hang`` fault meets it (``*``: any number)."""
        with self._lock:
            for number in (to, "*"):
                fault = self._faults.get(number)
                if fault is not None and fault.fail == "hang" and fault.applies_to(kind):
                    self._use(number, fault)
                    return fault.hang_s
            return None

    def _use(self, number: str, fault: NumberFault) -> None:
        if fault.remaining is not None:
            if fault.remaining > 1:
                self._faults[number] = replace(fault, remaining=fault.remaining - 1)
            else:
                del self._faults[number]

    def take_fault(self, to: str, kind: RequestKind) -> Fault | None:
        """The fault this request to ``to`` meets, if any (``*``: any number); a counted fault is used up by it."""
        with self._lock:
            for number in (to, "*"):
                fault = self._faults.get(number)
                if fault is not None and fault.fail != "hang" and fault.applies_to(kind):
                    self._use(number, fault)
                    return fault.fail
            return None

    def set_behaviour(self, to: str, changes: dict[str, Any]) -> dict[str, dict[str, str | None]]:
        """Change the named fields of ``to``'s behaviour; a number left with none is forgotten."""
        with self._lock:
            behaviour = replace(self._behaviours.get(to, Behaviour()), **changes)
            if behaviour == Behaviour():
                self._behaviours.pop(to, None)
            else:
                self._behaviours[to] = behaviour
            return {number: b.public() for number, b in self._behaviours.items()}

    def behaviours(self) -> dict[str, dict[str, str | None]]:
        with self._lock:
            return {number: b.public() for number, b in self._behaviours.items()}

    def behaviour_for(self, to: str) -> Behaviour:
        with self._lock:
            return self._behaviours.get(to, Behaviour())

    def reply_number(self, sender: str) -> str | None:
        """Where ``sender``'s SMS goes: the configured number, else whoever last texted them."""
        if self.number:
            return self.number
        with self._lock:
            texted = [m.from_ for m in self._messages if m.to == sender and m.from_]
        return texted[-1] if texted else None

    def post_webhook(self, kind: WebhookKind, url: str, params: dict[str, str]) -> WebhookRecord:
        """POST ``params`` to ``url`` signed like Twilio (``X-Twilio-Signature``), and record the reply."""
        signature = RequestValidator(self.auth_token).compute_signature(url, params)
        try:
            answer = requests.post(
                url,
                data=params,
                headers={"X-Twilio-Signature": signature},
                timeout=CALLBACK_TIMEOUT_S,
            )
            status: int | None = answer.status_code
            reply = answer.text
        except requests.RequestException as exc:
            status, reply = None, str(exc)
        record = WebhookRecord(kind, url, params, signature, status, reply, datetime.now(UTC))
        with self._lock:
            self._webhooks.append(record)
        return record

    def _call_params(self, record: CallRecord, status: str) -> dict[str, str]:
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": record.sid,
            "CallStatus": status,
            "Direction": "outbound-api",
            "From": record.from_,
            "To": record.to,
        }

    def start_call(self, record: CallRecord) -> None:
        """Play out the callee's side of the call on a thread of its own, as Twilio does."""
        threading.Thread(target=self._play_call, args=(record,), name=f"call-{record.sid}", daemon=True).start()

    def _play_call(self, record: CallRecord) -> None:
        if record.answer_after_s:
            # The person lets it ring: a simulated human, on the simulator's own thread.
            time.sleep(record.answer_after_s)
        keys = KEYS_OF_ANSWER.get(record.answer or "")
        twiml = record.twiml
        if twiml is None and record.url is not None and CALL_END_OF_ANSWER.get(record.answer or "") == "completed":
            # Answered, the call asks its Url what to say, as Twilio does: a signed POST.
            fetched = self.post_webhook("twiml", record.url, self._call_params(record, "in-progress"))
            twiml = fetched.reply if fetched.status == 200 else None
            self.announce(f"☎  {record.to} answered; TwiML from {record.url}: HTTP {fetched.status}")
        if keys is not None:
            digits, finished_on = keys
            key = digits or finished_on
            action = gather_action(twiml)
            if action is None:
                self.announce(f"✖  {record.to} would press {key}, but call {record.sid} gathers no keypress")
            else:
                params = self._call_params(record, "in-progress") | {"Digits": digits, "FinishedOnKey": finished_on}
                pressed = self.post_webhook("keypress", action, params)
                self.announce(f"☎  {record.to} pressed {key} (call {record.sid}): HTTP {pressed.status}")
        elif record.answer == "hangup":
            self.announce(f"☎  {record.to} answered and hung up without a key (call {record.sid})")
        elif record.answer == "voicemail":
            self.announce(f"☎  {record.to}: voicemail answered, no keypress (call {record.sid})")
        if record.status_callback is not None:
            self.post_status_callback(record.status_callback, record)

    def post_status_callback(self, url: str, record: CallRecord) -> None:
        """Tell ``url`` how the call ended, signed like Twilio's own callbacks."""
        duration = ANSWERED_CALL_DURATION_S if record.status == "completed" else "0"
        params = self._call_params(record, record.status) | {"CallDuration": duration}
        posted = self.post_webhook("status", url, params)
        if posted.status is None:
            self.announce(f"✖  status callback for {record.sid} failed: {posted.reply}")
            return
        self.announce(f"↩  status callback {record.status} for {record.sid}: HTTP {posted.status}")

    def start_message_status(self, record: MessageRecord, outcome: SmsOutcome) -> None:
        """Post the SMS's final status to its ``StatusCallback`` on a thread of its own."""
        threading.Thread(
            target=self.post_message_status, args=(record, outcome), name=f"sms-{record.sid}", daemon=True
        ).start()

    def post_message_status(self, record: MessageRecord, outcome: SmsOutcome) -> None:
        if record.status_callback is None:
            return
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "From": record.from_,
            "MessageSid": record.sid,
            "MessageStatus": outcome,
            "SmsSid": record.sid,
            "SmsStatus": outcome,
            "To": record.to,
        }
        if outcome == "undelivered":
            params["ErrorCode"] = UNDELIVERED_ERROR_CODE
        posted = self.post_webhook("status", record.status_callback, params)
        self.announce(f"↩  SMS {outcome} for {record.sid}: HTTP {posted.status}")

    def receive_sms(self, sender: str, body: str, to: str | None) -> WebhookRecord:
        """A person's SMS to the Twilio number: posted to ``sms_url`` as Twilio's inbound webhook.

        Raises:
            TwilioApiError: no ``sms_url`` is configured, or no number to send to is known.
        """
        if not self.sms_url:
            raise TwilioApiError(409, 21606, "No sms_url is configured (POST /_sim/config)")
        number = to or self.reply_number(sender)
        if number is None:
            raise TwilioApiError(409, 21606, f"No number for {sender} to text: give 'to' or configure 'number'")
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "Body": body,
            "From": sender,
            "MessageSid": _sid("SM"),
            "NumMedia": "0",
            "NumSegments": str(_segments(body)),
            "SmsMessageSid": "",
            "SmsSid": "",
            "SmsStatus": "received",
            "To": number,
        }
        params["SmsMessageSid"] = params["SmsSid"] = params["MessageSid"]
        self.announce(f"✉  SMS from {sender} to {number}: {body}")
        posted = self.post_webhook("inbound_sms", self.sms_url, params)
        self.announce(f"↩  inbound SMS webhook: HTTP {posted.status}")
        return posted

    def authenticate(self, account_sid: str, request: Request) -> None:
        """Check HTTP Basic credentials as Twilio does, then the account in the path."""
        if not self._credentials_match(request.headers.get("authorization", "")):
            raise TwilioApiError(401, 20003, "Authenticate")
        if account_sid != self.account_sid:
            resource = f"/{API_VERSION}/Accounts/{account_sid}"
            raise TwilioApiError(404, 20404, f"The requested resource {resource} was not found")

    def _credentials_match(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        # Both compared in full, so the answer's timing says nothing about either.
        user_ok = secrets.compare_digest(user.encode(), self.account_sid.encode())
        password_ok = secrets.compare_digest(password.encode(), self.auth_token.encode())
        return user_ok and password_ok


def _now() -> tuple[datetime, float]:
    return datetime.now(UTC), time.monotonic()


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _rfc2822(moment: datetime) -> str:
    return format_datetime(moment)  # e.g. "Tue, 24 Nov 2026 08:00:00 +0000", as Twilio writes


async def _form(request: Request) -> dict[str, str]:
    # Twilio's REST API takes application/x-www-form-urlencoded; parsed here so the
    # simulator needs no multipart package. A repeated field keeps its first value.
    fields = parse_qs((await request.body()).decode(), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def _segments(body: str) -> int:
    # GSM-7 (approximated as ASCII) fits 160 per SMS, 153 per part; UCS-2 fits 70 / 67.
    single, part = (160, 153) if body.isascii() else (70, 67)
    return 1 if len(body) <= single else -(-len(body) // part)


def _check_to(to: str) -> None:
    if not E164.fullmatch(to):
        raise TwilioApiError(400, 21211, f"Invalid 'To' Phone Number: {to}")


def gather_action(twiml: str | None) -> str | None:
    """The ``action`` URL of the TwiML's ``<Gather>``: where a keypress is posted."""
    if not twiml or "<!" in twiml:  # TwiML has no DTD: an entity bomb is not parsed
        return None
    try:
        gather = ET.fromstring(twiml).find(".//Gather")  # noqa: S314 - no DTD can reach here (refused above)
    except ET.ParseError:
        return None
    return gather.get("action") if gather is not None else None


async def _hang(network: PhoneNetwork, to: str, kind: RequestKind) -> None:
    """Hold the request while a ``hang`` fault says so (the event loop serves others meanwhile)."""
    hang = network.take_hang(to, kind)
    if hang:
        network.announce(f"…  {to}: no answer for {hang:g} s (injected hang)")
        await asyncio.sleep(hang)


def _injected_fault(network: PhoneNetwork, to: str, kind: RequestKind) -> Fault | None:
    """The fault this request meets; an ``error`` is raised as Twilio's 500, the others returned."""
    fault = network.take_fault(to, kind)
    if fault == "error":
        network.announce(f"✖  network error for {to} (injected fault)")
        raise TwilioApiError(500, 20500, "An internal server error has occurred")
    if fault == "unavailable":
        network.announce(f"✖  service unavailable for {to} (injected fault)")
        raise TwilioApiError(503, 20503, "Service unavailable")
    return fault


def _message_resource(record: MessageRecord, account_sid: str, form: dict[str, str]) -> dict[str, Any]:
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{record.sid}"
    stamp = _rfc2822(record.received_at)
    return {
        "account_sid": account_sid,
        "api_version": API_VERSION,
        "body": record.body,
        "date_created": stamp,
        "date_sent": None,
        "date_updated": stamp,
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": record.from_,
        "messaging_service_sid": form.get("MessagingServiceSid"),
        "num_media": "0",
        "num_segments": str(_segments(record.body)),
        "price": None,
        "price_unit": "USD",
        "sid": record.sid,
        "status": "queued",
        "subresource_uris": {"media": f"{uri}/Media.json"},
        "to": record.to,
        "uri": f"{uri}.json",
    }


def _call_resource(record: CallRecord, account_sid: str) -> dict[str, Any]:
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Calls/{record.sid}"
    stamp = _rfc2822(record.received_at)
    return {
        "account_sid": account_sid,
        "annotation": None,
        "answered_by": None,
        "api_version": API_VERSION,
        "caller_name": None,
        "date_created": stamp,
        "date_updated": stamp,
        "direction": "outbound-api",
        "duration": None,
        "end_time": None,
        "forwarded_from": None,
        "from": record.from_,
        "from_formatted": record.from_,
        "group_sid": None,
        "parent_call_sid": None,
        "phone_number_sid": None,
        "price": None,
        "price_unit": "USD",
        "queue_time": "0",
        "sid": record.sid,
        "start_time": None,
        # Twilio answers "queued" even for a call that will end busy: it cannot know yet.
        "status": "queued",
        "subresource_uris": {
            "notifications": f"{uri}/Notifications.json",
            "recordings": f"{uri}/Recordings.json",
        },
        "to": record.to,
        "to_formatted": record.to,
        "trunk_sid": None,
        "uri": f"{uri}.json",
    }


def accept_message(network: PhoneNetwork, account_sid: str, form: dict[str, str]) -> JSONResponse:
    """Validate, record and announce one SMS; the answer is Twilio's 201 Message resource."""
    to, from_, body = form.get("To", ""), form.get("From", ""), form.get("Body", "")
    if not to:
        raise TwilioApiError(400, 21604, "A 'To' phone number is required.")
    if not from_ and not form.get("MessagingServiceSid"):
        raise TwilioApiError(400, 21603, "A 'From' phone number is required.")
    _check_to(to)
    if not body and not form.get("MediaUrl"):
        raise TwilioApiError(400, 21602, "Message body is required.")
    if len(body) > SMS_BODY_LIMIT:
        raise TwilioApiError(400, 21617, "The concatenated message body exceeds the 1600 character limit.")
    _injected_fault(network, to, "sms")
    received_at, monotonic = _now()
    record = MessageRecord(
        sid=_sid("SM"),
        to=to,
        from_=from_,
        body=body,
        status_callback=form.get("StatusCallback") or None,
        received_at=received_at,
        monotonic=monotonic,
    )
    network.add_message(record)
    network.announce(f"✉  SMS to {to}: {body}")
    outcome = network.behaviour_for(to).sms
    status = None
    if outcome is not None and record.status_callback is not None:
        status = BackgroundTask(network.start_message_status, record, outcome)
    return JSONResponse(_message_resource(record, account_sid, form), status_code=201, background=status)


def accept_call(network: PhoneNetwork, account_sid: str, form: dict[str, str]) -> JSONResponse:
    """Validate, record and announce one call; the answer is Twilio's 201 Call resource.

    A ``busy`` or ``no-answer`` fault on the number posts that final status to the
    request's ``StatusCallback`` after the answer has gone out; so does the callee's
    behaviour (a keypress to the ``<Gather action>`` first). A fault wins over a
    behaviour.
    """
    to, from_ = form.get("To", ""), form.get("From", "")
    twiml, url = form.get("Twiml") or None, form.get("Url") or None
    if not to:
        raise TwilioApiError(400, 21201, "No 'To' number is specified")
    if not from_:
        raise TwilioApiError(400, 21213, "No 'From' number is specified")
    _check_to(to)
    if not E164.fullmatch(from_):
        raise TwilioApiError(400, 21212, f"Invalid From Number (caller ID): {from_}")
    if twiml is None and url is None and not form.get("ApplicationSid"):
        raise TwilioApiError(400, 21205, "Url parameter is required.")
    fault = _injected_fault(network, to, "call")
    behaviour = network.behaviour_for(to)
    answer = behaviour.answer if fault is None else None
    received_at, monotonic = _now()
    record = CallRecord(
        sid=_sid("CA"),
        to=to,
        from_=from_,
        twiml=twiml,
        url=url,
        status=fault or CALL_END_OF_ANSWER.get(answer or "", "queued"),
        status_callback=form.get("StatusCallback") or None,
        received_at=received_at,
        monotonic=monotonic,
        answer=answer,
        answer_after_s=behaviour.answer_after_s if answer is not None else 0.0,
    )
    network.add_call(record)
    if record.status == "busy":
        network.announce(f"☎  {to} is busy (call {record.sid})")
    elif record.status == "no-answer":
        network.announce(f"☎  ringing {to}, no answer (call {record.sid})")
    else:
        network.announce(f"☎  ringing {to} (call {record.sid})")
    # The callee's side starts once this answer has gone out (Twilio's callbacks
    # never overtake its 201), on a thread of its own: a callback that waits on the
    # caller (as the API waits for the router's commit) holds up neither this request
    # nor the server's threadpool.
    callee = None
    if (fault is not None and record.status_callback is not None) or answer is not None:
        callee = BackgroundTask(network.start_call, record)
    return JSONResponse(_call_resource(record, account_sid), status_code=201, background=callee)


def create_phone_network(
    account_sid: str,
    auth_token: str,
    *,
    announce: Announce | None = None,
    sms_url: str | None = None,
    number: str | None = None,
) -> FastAPI:
    """Build the simulator app for one Twilio account.

    Args:
        account_sid: The only account it serves (HTTP Basic user, and the path's ``AccountSid``).
        auth_token: That account's token (HTTP Basic password); also signs every callback.
        announce: Called with one human line per SMS, call and fault; default prints to stdout.
        sms_url: The Twilio number's inbound-SMS webhook (``POST /_sim/config`` sets it later).
        number: The Twilio number people text; by default, whoever last texted them.

    Returns:
        The FastAPI app; its ``state.network`` is the :class:`PhoneNetwork`.
    """
    network = PhoneNetwork(account_sid, auth_token, announce or print_flushed, sms_url=sms_url, number=number)
    app = FastAPI(title="Shouhu phone-network simulator (Twilio-compatible)")
    app.state.network = network

    @app.exception_handler(TwilioApiError)
    async def twilio_error(_: Request, exc: TwilioApiError) -> JSONResponse:
        return exc.response()

    @app.post(f"/{API_VERSION}/Accounts/{{account_sid}}/Messages.json", status_code=201)
    async def create_message(account_sid: str, request: Request) -> JSONResponse:
        """Accept an SMS, as Twilio's Messages resource does."""
        network.authenticate(account_sid, request)
        form = await _form(request)
        await _hang(network, form.get("To", ""), "sms")
        return accept_message(network, account_sid, form)

    @app.post(f"/{API_VERSION}/Accounts/{{account_sid}}/Calls.json", status_code=201)
    async def create_call(account_sid: str, request: Request) -> JSONResponse:
        """Place a call, as Twilio's Calls resource does."""
        network.authenticate(account_sid, request)
        form = await _form(request)
        await _hang(network, form.get("To", ""), "call")
        return accept_call(network, account_sid, form)

    @app.get("/_sim/messages")
    async def read_messages() -> list[dict[str, Any]]:
        """Every SMS accepted so far, newest last."""
        return [record.public() for record in network.messages()]

    @app.get("/_sim/calls")
    async def read_calls() -> list[dict[str, Any]]:
        """Every call accepted so far, newest last."""
        return [record.public() for record in network.calls()]

    @app.delete("/_sim/records", status_code=204)
    async def delete_records() -> Response:
        """Forget every recorded SMS, call and webhook (faults and behaviours stay)."""
        network.clear()
        return Response(status_code=204)

    @app.get("/_sim/faults")
    async def read_faults() -> dict[str, dict[str, Any]]:
        """The injected faults, by number."""
        return network.faults()

    @app.post("/_sim/faults")
    async def set_fault(fault: FaultRequest) -> dict[str, dict[str, Any]]:
        """Make a number fail (``busy``, ``no-answer``, ``error``, ``unavailable``, ``hang``), or heal it (``null``).

        ``only`` narrows it to calls or SMS; ``times`` to the next N of those requests.
        """
        faults = network.set_fault(fault.to, fault.fail, times=fault.times, only=fault.only, hang_s=fault.hang_s)
        scope = f" for the next {fault.times} {fault.only or 'request'}(s)" if fault.times else ""
        network.announce(f"⚙  {fault.to} is now {fault.fail or 'healthy'}{scope}")
        return faults

    @app.get("/_sim/behaviour")
    async def read_behaviours() -> dict[str, dict[str, str | None]]:
        """How the person at each number answers calls and receives SMS."""
        return network.behaviours()

    @app.post("/_sim/behaviour")
    async def set_behaviour(behaviour: BehaviourRequest) -> dict[str, dict[str, str | None]]:
        """Set how ``to`` answers calls (``answer``) and how its SMS end (``sms``); ``null`` clears."""
        changes: dict[str, Any] = {
            name: getattr(behaviour, name)
            for name in ("answer", "sms", "answer_after_s")
            if name in behaviour.model_fields_set
        }
        behaviours = network.set_behaviour(behaviour.to, changes)
        network.announce(f"⚙  {behaviour.to} now behaves {behaviours.get(behaviour.to, Behaviour().public())}")
        return behaviours

    @app.get("/_sim/config")
    async def read_config() -> dict[str, str | None]:
        """Where inbound SMS are posted, and the number they are sent to."""
        return {"sms_url": network.sms_url, "number": network.number}

    @app.post("/_sim/config")
    async def set_config(config: ConfigRequest) -> dict[str, str | None]:
        """Set the inbound-SMS webhook URL and the Twilio number (fields left out are kept)."""
        if "sms_url" in config.model_fields_set:
            network.sms_url = config.sms_url
        if "number" in config.model_fields_set:
            network.number = config.number
        return {"sms_url": network.sms_url, "number": network.number}

    @app.post("/_sim/inbound-sms")
    async def receive_inbound_sms(sms: InboundSmsRequest) -> dict[str, Any]:
        """A person texts the Twilio number: the signed webhook is posted, and its answer returned."""
        _check_to(sms.from_)
        posted = await run_in_threadpool(network.receive_sms, sms.from_, sms.body, sms.to)
        return {"sid": posted.params["MessageSid"], "status": posted.status, "reply": posted.reply}

    @app.get("/_sim/webhooks")
    async def read_webhooks() -> list[dict[str, Any]]:
        """Every signed request the network posted (status callbacks, keypresses, inbound SMS), newest last."""
        return [record.public() for record in network.webhooks()]

    return app


def serve_phone_network(host: str, port: int, account_sid: str, auth_token: str) -> None:
    """Run the simulator in the foreground until interrupted."""
    uvicorn.run(create_phone_network(account_sid, auth_token), host=host, port=port, log_level="warning")
