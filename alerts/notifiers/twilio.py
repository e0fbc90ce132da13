"""SMS and voice calls through Twilio (or the phone-network simulator).

What a person hears or reads is the minimum PIPL allows: name, address, callback
number, incident code and how to answer — never medical notes (``Message`` has no
field for them). The voice call gathers one keypress (1 = going, 2 = cannot) and
posts it to the API; SMS replies reach the API through the Twilio number's inbound
webhook, which is configured on the number, not per message.

``SHOUHU_TWILIO_API_BASE`` points the real ``twilio`` client at another host: the
client's ``https://api.twilio.com`` prefix is rewritten by :class:`RebasingHttpClient`,
and everything else the client does (auth, form encoding, error parsing) is unchanged.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

import certifi
import requests
import urllib3
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http import HttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from alerts.notifiers.base import Delivery, Message, SendOutcome, SendResult
from alerts.notifiers.keepalive import KeepAliveTransport
from alerts.notifiers.text import plain_text
from devices.kinds import SEVERITY_OF_KIND, Channel, IncidentKind, Severity
from shouhu.settings import TWILIO_DEFAULT_API_BASE

# The SDK logs every request and response at INFO (ten lines a page, headers included):
# in a mass event that is a tenth of the router's CPU and buries what matters. Shouhu
# records each send itself (the timeline, the router's log); the SDK's lines are kept
# for warnings and errors only.
_SDK_HTTP_LOG = logging.getLogger("shouhu.twilio.http")
_SDK_HTTP_LOG.setLevel(logging.WARNING)

if TYPE_CHECKING:
    from shouhu.settings import Settings

# Each request's hard timeout. A hung Twilio must be given up in time for the page to go
# out on the secondary provider within 10 s of the send starting (issue 17): 6 s leaves
# 4 s for settling, the claim of the fallback and the other provider's own request.
# Twilio answers a create in well under a second; 6 s is many times its usual latency.
HTTP_TIMEOUT_S = 6.0
# Connections kept per proxy: more than the senders of one channel in a router.
POOL_CONNECTIONS = 16
# The keys of the environment's proxies (``HTTPS_PROXY``, ``ALL_PROXY`` …) that name a proxy.
PROXY_SCHEMES = frozenset({"http", "https", "all"})
SMS_MAX_CHARS = 140
NAME_MAX_CHARS = 12
# Twilio's <Say> takes the Polly/Google language id; Mandarin is cmn-CN, and Zhiyu is
# the Polly voice that speaks it (the default voice "man" has no Chinese).
SAY_LANGUAGE = "cmn-CN"
SAY_VOICE = "Polly.Zhiyu"
GATHER_TIMEOUT_S = 10
# Where the API receives Twilio's callbacks (relative to SHOUHU_PUBLIC_URL).
STATUS_CALLBACK_PATH = "/callbacks/twilio/status"
KEYPRESS_CALLBACK_PATH = "/callbacks/twilio/keypress"
# Where Twilio fetches a call's TwiML when the call is placed by URL.
VOICE_CALLBACK_PATH = "/callbacks/twilio/voice"

# What happened, as told on the phone; a kind this table does not know gets "告警".
_EVENT_OF_KIND: dict[IncidentKind, str] = {
    IncidentKind.SOS: "按下SOS",
    IncidentKind.FALL: "疑似跌倒",
    IncidentKind.SOS_UNREGISTERED: "按下SOS",
    IncidentKind.WRISTBAND_OFFLINE: "手环离线，请上门探视",
    IncidentKind.NOT_WORN: "未佩戴手环，请上门探视",
    IncidentKind.LOW_BATTERY: "手环电量低，请提醒充电",
    IncidentKind.CAMERA_OFFLINE: "离线，请安排维修",  # after "摄像头<id>"
}


def _kind(message: Message) -> IncidentKind | None:
    try:
        return IncidentKind(message.incident_kind)
    except ValueError:
        return None


def _event(kind: IncidentKind | None) -> str:
    return _EVENT_OF_KIND.get(kind, "告警") if kind is not None else "告警"


def _headline(kind: IncidentKind | None) -> str:
    red = kind is not None and SEVERITY_OF_KIND[kind] is Severity.RED
    return "紧急呼叫" if red or kind is None else "提醒"


# What the dispatcher stores as the name of an incident with no resident (an
# unregistered wristband, a camera): a placeholder, not a name to print twice.
NO_RESIDENT_NAME = "未登记手环"


def _subject(kind: IncidentKind | None, message: Message) -> str:
    """Who or what the page is about: the resident, or the device when there is none."""
    name = "" if message.resident_name == NO_RESIDENT_NAME else message.resident_name
    if kind is IncidentKind.SOS_UNREGISTERED:
        # No resident: say so, and name the band so the operators can find it. The hub's
        # spool passes the device id as the name; the dispatcher passes it as device_id.
        return f"未登记手环{message.device_id or name}"
    if kind is IncidentKind.CAMERA_OFFLINE:
        return f"摄像头{message.device_id}"
    return _clip(name, NAME_MAX_CHARS) if name else "住户"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def _plain(message: Message) -> Message:
    # Whatever the database holds, no control character reaches TwiML or an SMS.
    return replace(
        message,
        incident_code=plain_text(message.incident_code),
        resident_name=plain_text(message.resident_name).strip(),
        address=plain_text(message.address).strip(),
        callback_number=plain_text(message.callback_number).strip(),
        notice=None if message.notice is None else plain_text(message.notice),
        device_id=plain_text(message.device_id).strip(),
    )


def _no_callback(kind: IncidentKind | None) -> str:
    # Said instead of an empty "回拨" so nobody waits for a number that is not there;
    # a camera has nobody to call back, so nothing is said.
    if kind is IncidentKind.CAMERA_OFFLINE:
        return ""
    return "无回拨号码（手环未登记）。" if kind is IncidentKind.SOS_UNREGISTERED else "住户未登记电话，无回拨号码。"


def _sms(message: Message, subject: str, address: str) -> str:
    kind = _kind(message)
    code = message.incident_code
    where = f"（{address}）" if address else ""
    back = f"回拨{message.callback_number}。" if message.callback_number else _no_callback(kind)
    return (
        f"【守护】{_headline(kind)}：{subject}{where}{_event(kind)}。{back}"
        f"回复 {code} 1 接单，{code} 2 无法前往。"
    )


def sms_text(message: Message) -> str:
    """The SMS for ``message``: at most 140 characters, clipping the address, then the name.

    The incident code and callback number are never clipped: they are how the
    recipient answers. A part that is empty is left out (no empty brackets, no bare
    "回拨"): a missing callback number is said to be missing. Control characters are
    taken out first (``plain_text``).
    """
    message = _plain(message)
    if message.notice is not None:
        return message.notice[:SMS_MAX_CHARS]
    subject, address = _subject(_kind(message), message), message.address
    text = _sms(message, subject, address)
    overflow = len(text) - SMS_MAX_CHARS
    if overflow > 0 and address:
        room = len(address) - overflow
        address = _clip(address, room) if room >= 2 else ""
        text = _sms(message, subject, address)
    overflow = len(text) - SMS_MAX_CHARS
    if overflow > 0:
        text = _sms(message, _clip(subject, len(subject) - overflow), address)
    return text


def _spelled(text: str) -> str:
    # Digits and letters one by one, so the voice reads "1 3 8…" and not a large number.
    return " ".join(char for char in text if char.isalnum())


def voice_text(message: Message, *, keypress: bool) -> str:
    """What the call says (once; the TwiML repeats it), with no control character in it."""
    message = _plain(message)
    kind = _kind(message)
    subject = _subject(kind, message)
    # A device id is spelled out, after what the device is ("未登记手环，编号 w b 4 2").
    for label in ("未登记手环", "摄像头"):
        if kind in (IncidentKind.SOS_UNREGISTERED, IncidentKind.CAMERA_OFFLINE) and subject.startswith(label):
            device = subject[len(label) :]
            subject = f"{label}，编号{_spelled(device)}" if device else label
    subject += "，"
    where = f"地址{message.address}，" if message.address else ""
    back = f"回拨电话：{_spelled(message.callback_number)}。" if message.callback_number else _no_callback(kind)
    text = (
        f"守护{_headline(kind)}。{subject}{where}{_event(kind)}。{back}"
        f"事件编号：{_spelled(message.incident_code)}。"
    )
    if keypress:
        text += "前往处置请按1，无法前往请按2。"
    return text


def voice_twiml(message: Message, *, keypress_url: str | None = None) -> str:
    """Inline TwiML for the call: the message in Mandarin, said twice.

    Args:
        message: What to say.
        keypress_url: Where Twilio posts the digit pressed (1 = going, 2 = cannot).
            Without it the call only speaks and asks for no keypress.
    """
    response = VoiceResponse()
    text = voice_text(message, keypress=keypress_url is not None)
    if keypress_url is None:
        response.say(text, language=SAY_LANGUAGE, voice=SAY_VOICE, loop=2)
    else:
        gather = response.gather(action=keypress_url, method="POST", num_digits=1, timeout=GATHER_TIMEOUT_S)
        gather.say(text, language=SAY_LANGUAGE, voice=SAY_VOICE, loop=2)
    xml: str = response.to_xml()
    return xml


class RebasingHttpClient(HttpClient):  # type: ignore[misc]  # twilio ships no types
    """The twilio SDK's HTTP transport: what is meant for ``https://api.twilio.com`` goes
    to ``api_base``, any other URL where it points.

    Every request gets a timeout (``timeout`` unless the caller passes one), so a
    network that does not answer cannot hold an escalation. The proxy settings of the
    environment (``HTTPS_PROXY``, ``NO_PROXY``) and the CA bundle a site may set for its
    outbound proxy (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``) are read once, here.

    It does not send through the SDK's default (requests): preparing and merging a
    requests ``Session``'s settings for every page was a sixth of the router's CPU in a
    mass event (bench/escalation.py). Unproxied requests go over each sender thread's
    own kept-alive connection (:mod:`alerts.notifiers.keepalive`, half urllib3's CPU per
    request); proxied ones through urllib3's proxy pools, which speak CONNECT and HTTPS
    proxies. The SDK still builds every request; failures reach the caller as requests'
    exceptions, ``requests.Timeout`` and ``requests.ConnectionError`` (a URL or header
    refused before anything was sent: ``requests.exceptions.InvalidURL``), as they did.
    """

    def __init__(self, api_base: str, *, timeout: float = HTTP_TIMEOUT_S) -> None:
        super().__init__(logger=_SDK_HTTP_LOG, is_async=False, timeout=timeout)
        self.api_base = api_base.rstrip("/")
        self.proxy: dict[str, str] = dict(requests.utils.get_environ_proxies(self.api_base))
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
        # Unproxied: each sender thread's own kept-alive connection (urllib3's pools cost
        # twice the CPU per request).
        self._direct = KeepAliveTransport(bundle)
        # The environment's proxies by scheme; the same dict also carries NO_PROXY's list
        # under "no", which is no proxy (requests ignored it too).
        self._proxied = {
            scheme: urllib3.ProxyManager(proxy, maxsize=POOL_CONNECTIONS, ca_certs=bundle)
            for scheme, proxy in self.proxy.items()
            if scheme in PROXY_SCHEMES
        }

    def rebase(self, url: str) -> str:
        """``url`` with the Twilio API prefix replaced by ``api_base``."""
        if url == TWILIO_DEFAULT_API_BASE or url.startswith(TWILIO_DEFAULT_API_BASE + "/"):
            return self.api_base + url[len(TWILIO_DEFAULT_API_BASE) :]
        return url

    def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> TwilioResponse:
        if timeout is None:
            timeout = self.timeout
        elif timeout <= 0:
            raise ValueError(timeout)
        target = self.rebase(url)
        if params:
            target += ("&" if "?" in target else "?") + urlencode(_present(params), doseq=True)
        sent = dict(headers or {})
        body: bytes | None = None
        if data is not None:
            if sent.get("Content-Type") in ("application/json", "application/scim+json"):
                body = json.dumps(data).encode()
            else:
                body = urlencode(_present(data), doseq=True).encode()
                sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        if auth is not None:
            sent["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        scheme = urlsplit(target).scheme
        proxy = self._proxied.get(scheme) or self._proxied.get("all")
        if proxy is None:
            return self._direct_request(method.upper(), target, body, sent, timeout)
        return _proxied_request(proxy, method.upper(), target, body, sent, timeout, allow_redirects)

    def _direct_request(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str], timeout: float
    ) -> TwilioResponse:
        try:
            answer = self._direct.request(method, target, body=body, headers=headers, timeout=timeout)
        except TimeoutError as exc:
            raise requests.Timeout(str(exc)) from exc
        except http.client.InvalidURL as exc:  # an HTTPException, but nothing was sent
            raise requests.exceptions.InvalidURL(str(exc)) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise requests.ConnectionError(str(exc) or repr(exc)) from exc
        except ValueError as exc:  # the URL or a header refused before a byte was sent
            raise requests.exceptions.InvalidURL(str(exc)) from exc
        return TwilioResponse(answer.status, answer.body.decode("utf-8", errors="replace"), answer.headers)


def _proxied_request(
    proxy: urllib3.ProxyManager,
    method: str,
    target: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
    allow_redirects: bool,
) -> TwilioResponse:
    try:
        answer = proxy.request(
            method,
            target,
            body=body,
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            redirect=allow_redirects,
            retries=False,
        )
    except urllib3.exceptions.NewConnectionError as exc:  # urllib3 files it under timeouts too
        raise requests.ConnectionError(str(exc)) from exc
    except urllib3.exceptions.TimeoutError as exc:
        raise requests.Timeout(str(exc)) from exc
    except urllib3.exceptions.HTTPError as exc:
        raise requests.ConnectionError(str(exc)) from exc
    return TwilioResponse(answer.status, answer.data.decode("utf-8", errors="replace"), answer.headers)


def _present(values: dict[str, object]) -> dict[str, object]:
    """Form or query values without the ``None`` ones, which requests (the SDK's default) leaves out too."""
    return {key: value for key, value in values.items() if value is not None}


# HTTP statuses Twilio answers when retrying on Twilio cannot help but another provider
# may: the account's credentials refused (401, 403), too many requests (429).
_FALL_BACK_STATUSES = frozenset({401, 403, 429})


def falls_back(exc: TwilioException) -> bool:
    """Whether a refusal means "send it through another provider": the credentials were
    refused (401, 403), Twilio throttles the account (429), or Twilio failed (5xx).

    Any other 4xx is about the message itself (an invalid number, a number that cannot
    take SMS): another provider would refuse it too, so it is retried as before.
    """
    status = getattr(exc, "status", None)
    return isinstance(status, int) and (status in _FALL_BACK_STATUSES or status >= 500)


def _twilio_error(exc: TwilioException) -> str:
    # str() of twilio's exceptions is a coloured multi-line text when stderr is a
    # terminal; the timeline wants one plain line.
    if isinstance(exc, TwilioRestException):
        return f"twilio error {exc.code} (HTTP {exc.status}): {exc.msg}"
    code, status = getattr(exc, "code", None), getattr(exc, "status", None)
    detail = getattr(exc, "detail", None) or getattr(exc, "title", None) or repr(exc)
    return f"twilio error {code} (HTTP {status}): {detail}"


def keypress_url(public_url: str, attempt_id: int) -> str:
    """Where the call's ``<Gather>`` posts the digit: the attempt is named, so the press finds its page."""
    return f"{public_url.rstrip('/')}{KEYPRESS_CALLBACK_PATH}?attempt={attempt_id}"


class TwilioNotifier:
    """Sends SMS and voice calls through Twilio's REST API."""

    channels: frozenset[Channel] = frozenset({Channel.SMS, Channel.VOICE})

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        from_number: str,
        api_base: str = TWILIO_DEFAULT_API_BASE,
        public_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = HTTP_TIMEOUT_S,
        twiml_by_url: bool = False,
    ) -> None:
        """``twiml_by_url``: place calls with a ``Url`` Twilio fetches the TwiML from
        (``VOICE_CALLBACK_PATH`` on the API) instead of the TwiML inline. Inline is the
        default because it makes a call say its message even while the API is down;
        by URL suits a provider that takes no inline TwiML.
        """
        self.twiml_by_url = twiml_by_url
        self.from_number = from_number
        self.api_base = api_base.rstrip("/")
        self.public_url = public_url.rstrip("/")
        self.timeout = timeout
        self.client = Client(account_sid, auth_token, http_client=RebasingHttpClient(api_base, timeout=timeout))
        # TWILIO_EDGE / TWILIO_REGION in the environment would make the client call
        # api.{edge}.{region}.twilio.com, which the rebasing does not match: a demo
        # would then reach the real Twilio. Shouhu is configured by SHOUHU_* only.
        self.client.edge = None
        self.client.region = None

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout: float = HTTP_TIMEOUT_S) -> TwilioNotifier:
        """Build from ``SHOUHU_TWILIO_*`` and ``SHOUHU_PUBLIC_URL``; ``timeout`` bounds each request.

        Raises:
            ValueError: the account sid, auth token or caller number is not set.
        """
        missing = [
            f"SHOUHU_TWILIO_{name.upper()}"
            for name, value in (
                ("account_sid", settings.twilio_account_sid),
                ("auth_token", settings.twilio_auth_token),
                ("from", settings.twilio_from),
            )
            if not value
        ]
        if missing:
            raise ValueError(f"Twilio is not configured: set {', '.join(missing)}")
        return cls(
            settings.twilio_account_sid,
            settings.twilio_auth_token,
            settings.twilio_from,
            settings.twilio_api_base,
            settings.public_url,
            timeout=timeout,
        )

    def send(self, delivery: Delivery) -> SendResult:
        """Send one SMS or call; a provider or network failure returns FAILED, never raises."""
        if delivery.channel not in self.channels:
            return SendResult(SendOutcome.FAILED, error=f"channel {delivery.channel} is not sent by Twilio")
        return self._guarded(lambda: self._create(delivery))

    def send_text(self, to: str, body: str) -> SendResult:
        """Send an SMS that belongs to no incident (a sign-in code); FAILED, never raises, on failure.

        No status callback is asked for: there is no attempt row to settle.
        """
        return self._guarded(
            lambda: _sid(self.client.messages.create(to=to, from_=self.from_number, body=plain_text(body)))
        )

    def _guarded(self, create: Callable[[], str | None]) -> SendResult:
        """Run ``create``; a failure is FAILED, with ``fall_back`` when only another provider can help.

        Falls back: credentials refused (401, 403), throttled (429), a 5xx, no answer
        within the timeout, a refused or broken connection. Not: any other 4xx (the
        message or number is wrong), or a 2xx Twilio may have acted on (an unreadable
        answer, no sid) — falling back then could page the person twice at once.
        """
        fall_back = True
        try:
            sid = create()
        except TwilioException as exc:
            error = _twilio_error(exc)
            fall_back = falls_back(exc)
        except requests.Timeout as exc:
            error = f"no answer from {self.api_base} within {self.timeout:g} s: {exc}"
        except requests.RequestException as exc:
            error = f"cannot reach {self.api_base}: {exc}"
        except ValueError as exc:  # a 2xx answer that is not Twilio's JSON
            error = f"unreadable answer from {self.api_base}: {exc}"
            fall_back = False
        else:
            if sid:
                return SendResult(SendOutcome.SENT, provider_id=sid)
            error = "Twilio accepted it but gave no sid"
            fall_back = False
        return SendResult(SendOutcome.FAILED, error=error, fall_back=fall_back)

    def _create(self, delivery: Delivery) -> str | None:
        """Create the Message or Call resource; returns its sid."""
        status_callback = self.public_url + STATUS_CALLBACK_PATH
        if delivery.channel is Channel.SMS:
            resource = self.client.messages.create(
                to=delivery.to,
                from_=self.from_number,
                body=sms_text(delivery.message),
                status_callback=status_callback,
            )
        elif self.twiml_by_url:
            resource = self.client.calls.create(
                to=delivery.to,
                from_=self.from_number,
                url=f"{self.public_url}{VOICE_CALLBACK_PATH}?attempt={delivery.attempt_id}",
                status_callback=status_callback,
            )
        else:
            # A page with no attempt row yet (attempt_id 0: the hub's spool, while the
            # database is down) asks for no keypress: nothing could record it, and a
            # "1" that acknowledges nothing would mislead. Its SMS carries the code to reply.
            keys = keypress_url(self.public_url, delivery.attempt_id) if delivery.attempt_id > 0 else None
            resource = self.client.calls.create(
                to=delivery.to,
                from_=self.from_number,
                twiml=voice_twiml(delivery.message, keypress_url=keys),
                status_callback=status_callback,
            )
        return _sid(resource)


def _sid(resource: object) -> str | None:
    sid = getattr(resource, "sid", None)
    return sid if isinstance(sid, str) else None
