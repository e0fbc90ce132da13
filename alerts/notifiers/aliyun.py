"""Voice calls and SMS through Aliyun (阿里云语音服务 ``dyvmsapi``, 短信服务 ``dysmsapi``), or its simulator.

The official SDKs send the requests: a voice page is an ``IvrCall`` whose spoken text is
the approved page TTS template filled with the page's variables, with key 1 (take it)
and key 2 (cannot go) each answered by a TTS template of their own; an SMS is a
``SendSms`` with the approved page or notice template. ``OutId`` is the attempt's id,
so the provider's receipts (pushed to the API) find their attempt. What the variables
hold, and how they are clipped to the provider's limits, is in :mod:`alerts.notifiers.aliyun_text`.

``SHOUHU_ALIYUN_ENDPOINT`` (``http://host:port``) points both SDKs at one other host,
the simulator's (``shouhu simulate aliyun``); empty, they reach Aliyun's own
``dyvmsapi.aliyuncs.com`` and ``dysmsapi.aliyuncs.com`` over HTTPS.

A refusal is mapped by the provider's error code (:func:`classify`): retry here,
fall back to another provider, or give up (docs/escalation.md has the table).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from alibabacloud_dysmsapi20170525 import models as sms_models
from alibabacloud_dysmsapi20170525.client import Client as SmsClient
from alibabacloud_dyvmsapi20170525 import models as voice_models
from alibabacloud_dyvmsapi20170525.client import Client as VoiceClient
from alibabacloud_tea_openapi.utils_models import Config
from darabonba.exceptions import ResponseException, RetryError, UnretryableException, ValidateException
from Tea.exceptions import TeaException
from Tea.exceptions import ValidateException as TeaValidateException

from alerts.notifiers.aliyun_keys import OUT_ID_MAX_LENGTH, aliyun_number, aliyun_out_id
from alerts.notifiers.aliyun_text import sms_notice_params, sms_page_params, tts_page_params
from alerts.notifiers.base import Delivery, Notifier, Provider, SendOutcome, SendResult
from devices.kinds import Channel

if TYPE_CHECKING:
    from shouhu.settings import Settings

log = logging.getLogger(__name__)

# Each request gets no more than this to connect, and again to read the answer: a
# provider that does not answer cannot hold a sender thread (Twilio's HTTP_TIMEOUT_S).
# 6 s, as Twilio's: a hung Aliyun is given up in time for the page to go out on the
# secondary provider within 10 s of the request (docs/escalation.md, "Choosing providers
# and failover").
HTTP_TIMEOUT_S = 6.0
VOICE_ENDPOINT = "dyvmsapi.aliyuncs.com"
SMS_ENDPOINT = "dysmsapi.aliyuncs.com"
# How long the call waits for a key after the page is spoken, and how often it is said.
KEY_TIMEOUT_MS = 10000
PLAY_TIMES = 2
# OutId: 1 to 15 bytes (IvrCall), as the attempt id always is.


class Verdict(StrEnum):
    """What a refusal means for the page."""

    RETRY = "retry"  # passing: send it again here, later
    FALL_BACK = "fall_back"  # this account or provider cannot send it now; another provider may
    GIVE_UP = "give_up"  # no provider can: the number itself is wrong


# Provider error codes (help.aliyun.com, 短信服务 and 语音服务 "API错误码"), by verdict.
# A code not listed falls back: for a page, another provider now beats a guess.
GIVE_UP_CODES = frozenset({"isv.MOBILE_NUMBER_ILLEGAL"})
RETRY_CODES = frozenset({"isp.SYSTEM_ERROR"})
FALL_BACK_CODES = frozenset(
    {
        # Refused by the account: authentication, permissions, the product, the balance.
        "InvalidAccessKeyId.NotFound",
        "InvalidAccessKeyId.Inactive",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "isp.RAM_PERMISSION_DENY",
        "isv.ACCOUNT_NOT_EXISTS",
        "isv.ACCOUNT_ABNORMAL",
        "isv.PRODUCT_UN_SUBSCRIPT",
        "isv.PRODUCT_UNSUBSCRIBE",
        "isv.AMOUNT_NOT_ENOUGH",
        "isv.OUT_OF_SERVICE",
        # Flow control: per number and per account, per minute, hour and day.
        "isv.BUSINESS_LIMIT_CONTROL",
        "isv.DAY_LIMIT_CONTROL",
        "isv.MONTH_LIMIT_CONTROL",
        "Throttling",
        "Throttling.User",
        "Throttling.Api",
        # The templates, signature or caller number are not (or no longer) approved.
        "isv.SMS_TEMPLATE_ILLEGAL",
        "isv.SMS_SIGNATURE_ILLEGAL",
        "isv.TTS_TEMPLATE_ILLEGAL",
        "isv.TEMPLATE_ILLEGAL",
        "isv.TEMPLATE_MISSING_PARAMETERS",
        "isv.TEMPLATE_PARAMS_ILLEGAL",
        "isv.DISPLAY_NUMBER_ILLEGAL",
        "isv.PARAM_LENGTH_LIMIT",
        "isv.INVALID_PARAMETERS",
        "isv.INVALID_JSON_PARAM",
        "isv.BLACK_KEY_CONTROL_LIMIT",
        "isv.COMPLAINT_REJECT",
        # The provider's own failures past retrying (HTTP 5xx).
        "isp.GATEWAY_ERROR",
        "InternalError",
        "ServiceUnavailable",
    }
)


def classify(code: str | None) -> Verdict:
    """What the provider's error ``code`` means for the page: listed in ``FALL_BACK_CODES``,
    a 5xx of another code, or a code no list knows, another provider may send it."""
    if code in GIVE_UP_CODES:
        return Verdict.GIVE_UP
    if code in RETRY_CODES:
        return Verdict.RETRY
    return Verdict.FALL_BACK


def refused(code: str | None, detail: str, status: int | None = None) -> SendResult:
    """The ``SendResult`` of a refusal with the provider's error ``code``."""
    verdict = classify(code)
    where = f" (HTTP {status})" if status is not None else ""
    error = f"aliyun error {code or 'unknown'}{where}: {detail}"
    return SendResult(
        SendOutcome.FAILED,
        error=error,
        final=verdict is Verdict.GIVE_UP,
        fall_back=verdict is Verdict.FALL_BACK,
    )


@dataclass(frozen=True, slots=True)
class AliyunAccount:
    """The account and its approved resources: the caller number, templates and signature."""

    access_key_id: str
    access_key_secret: str
    endpoint: str = ""  # empty: Aliyun's own hosts; else http(s)://host[:port] for both APIs
    voice_number: str = ""
    tts_page_code: str = ""
    tts_taken_code: str = ""
    tts_declined_code: str = ""
    sms_sign_name: str = ""
    sms_page_template: str = ""
    sms_notice_template: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> AliyunAccount:
        return cls(
            access_key_id=settings.aliyun_access_key_id,
            access_key_secret=settings.aliyun_access_key_secret,
            endpoint=settings.aliyun_endpoint,
            voice_number=settings.aliyun_voice_number,
            tts_page_code=settings.aliyun_tts_page_code,
            tts_taken_code=settings.aliyun_tts_taken_code,
            tts_declined_code=settings.aliyun_tts_declined_code,
            sms_sign_name=settings.aliyun_sms_sign_name,
            sms_page_template=settings.aliyun_sms_page_template,
            sms_notice_template=settings.aliyun_sms_notice_template,
        )

    @property
    def has_keys(self) -> bool:
        return bool(self.access_key_id and self.access_key_secret)

    @property
    def voice_ready(self) -> bool:
        return self.has_keys and all(
            (self.voice_number, self.tts_page_code, self.tts_taken_code, self.tts_declined_code)
        )

    @property
    def sms_ready(self) -> bool:
        return self.has_keys and all((self.sms_sign_name, self.sms_page_template, self.sms_notice_template))


def sdk_config(account: AliyunAccount, default_host: str, timeout: float) -> Config:
    """The SDK's ``Config``: the keys, the host (``default_host`` or the endpoint's), and the timeouts."""
    host, protocol = default_host, "HTTPS"
    if account.endpoint:
        parts = urlsplit(account.endpoint if "://" in account.endpoint else f"https://{account.endpoint}")
        host, protocol = parts.netloc, parts.scheme.upper()
    milliseconds = max(int(timeout * 1000), 1)
    return Config(
        access_key_id=account.access_key_id,
        access_key_secret=account.access_key_secret,
        endpoint=host,
        protocol=protocol,
        region_id="cn-hangzhou",
        read_timeout=milliseconds,
        connect_timeout=milliseconds,
        # No retry_options: each request is made once, and the router retries (or falls
        # back) on its own schedule.
    )


def _json(params: dict[str, str]) -> str:
    return json.dumps(params, ensure_ascii=False, separators=(",", ":"))


def _out_id(delivery: Delivery) -> str | None:
    """The attempt's ``OutId`` (``aliyun_keys``, which the receipts read back); None for
    a page with no attempt row (the spool's, attempt 0) or an id past Aliyun's 15 characters."""
    if delivery.attempt_id <= 0:
        return None
    out_id = aliyun_out_id(delivery.attempt_id)
    return out_id if len(out_id) <= OUT_ID_MAX_LENGTH else None


class _AliyunSender:
    """What both notifiers share: one SDK call, with every failure turned into a ``SendResult``."""

    provider = Provider.ALIYUN

    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout

    def _guarded(self, call: Callable[[], Any], id_field: str) -> SendResult:
        try:
            body = call().body
        except ResponseException as exc:  # a 4xx or 5xx answer, the provider's code in it
            status = getattr(exc, "status_code", None)
            return refused(getattr(exc, "code", None), str(getattr(exc, "message", exc)), status)
        except (RetryError, UnretryableException) as exc:  # not reached, or no answer in time
            return SendResult(
                SendOutcome.FAILED,
                error=f"no answer from {self.endpoint} (timeout {self.timeout:g} s): {exc}",
                fall_back=True,
            )
        except (ValueError, KeyError, TypeError) as exc:  # a 2xx answer that is not Aliyun's JSON
            return SendResult(
                SendOutcome.FAILED, error=f"unreadable answer from {self.endpoint}: {exc}", fall_back=True
            )
        except (TeaException, ValidateException, TeaValidateException) as exc:  # the SDK refused it (a model check)
            return SendResult(SendOutcome.FAILED, error=f"the Aliyun SDK did not send it: {exc}", fall_back=True)
        code = getattr(body, "code", None)
        if code != "OK":  # a business refusal answered 200, as the SMS API does
            return refused(code, str(getattr(body, "message", "")))
        provider_id = getattr(body, id_field, None)
        if not provider_id:
            return SendResult(SendOutcome.FAILED, error="Aliyun accepted it but gave no id", fall_back=True)
        return SendResult(SendOutcome.SENT, provider_id=str(provider_id))


class AliyunVoiceNotifier(_AliyunSender):
    """Places voice pages as ``IvrCall``: the page TTS template, then key 1 takes it, key 2 declines."""

    channels: frozenset[Channel] = frozenset({Channel.VOICE})

    def __init__(self, account: AliyunAccount, *, timeout: float = HTTP_TIMEOUT_S) -> None:
        config = sdk_config(account, VOICE_ENDPOINT, timeout)
        super().__init__(str(config.endpoint), timeout)
        self.account = account
        self.client = VoiceClient(config)

    def send(self, delivery: Delivery) -> SendResult:
        """Place one call; a provider or network failure returns FAILED, never raises."""
        if delivery.channel is not Channel.VOICE:
            return SendResult(SendOutcome.FAILED, error=f"channel {delivery.channel} is not sent by Aliyun voice")
        if delivery.message.notice is not None:
            # Notices (who took it, a cancel) are SMS only: there is no TTS template for them,
            # and a call that asks for a key about a notice would mislead.
            return SendResult(SendOutcome.FAILED, error="a notice is not sent as an Aliyun call", final=True)
        return self._guarded(lambda: self.client.ivr_call(self.request(delivery)), "call_id")

    def request(self, delivery: Delivery) -> voice_models.IvrCallRequest:
        """The ``IvrCall`` for ``delivery``.

        A page with no attempt row yet (attempt 0: the hub's spool, while the database is
        down) has no ``OutId`` and no key map: nothing could record a keypress, and a
        "thank you, you took it" for a key that took nothing would mislead. Its SMS
        carries the code to reply with.
        """
        out_id = _out_id(delivery)
        keys = None
        if out_id is not None:
            keys = [
                voice_models.IvrCallRequestMenuKeyMap(key="1", code=self.account.tts_taken_code),
                voice_models.IvrCallRequestMenuKeyMap(key="2", code=self.account.tts_declined_code),
            ]
        return voice_models.IvrCallRequest(
            called_number=aliyun_number(delivery.to),
            called_show_number=self.account.voice_number,
            start_code=self.account.tts_page_code,
            start_tts_params=_json(tts_page_params(delivery.message)),
            menu_key_map=keys,
            out_id=out_id,
            play_times=PLAY_TIMES,
            timeout=KEY_TIMEOUT_MS,
        )


class AliyunSmsNotifier(_AliyunSender):
    """Sends SMS pages and notices with ``SendSms`` and their approved templates."""

    channels: frozenset[Channel] = frozenset({Channel.SMS})

    def __init__(self, account: AliyunAccount, *, timeout: float = HTTP_TIMEOUT_S) -> None:
        config = sdk_config(account, SMS_ENDPOINT, timeout)
        super().__init__(str(config.endpoint), timeout)
        self.account = account
        self.client = SmsClient(config)

    def send(self, delivery: Delivery) -> SendResult:
        """Send one SMS; a provider or network failure returns FAILED, never raises."""
        if delivery.channel is not Channel.SMS:
            return SendResult(SendOutcome.FAILED, error=f"channel {delivery.channel} is not sent by Aliyun SMS")
        return self._guarded(lambda: self.client.send_sms(self.request(delivery)), "biz_id")

    def request(self, delivery: Delivery) -> sms_models.SendSmsRequest:
        """The ``SendSms`` for ``delivery``: the notice template for a notice, else the page template."""
        message = delivery.message
        if message.notice is not None:
            template, params = self.account.sms_notice_template, sms_notice_params(message)
        else:
            template, params = self.account.sms_page_template, sms_page_params(message)
        return sms_models.SendSmsRequest(
            phone_numbers=aliyun_number(delivery.to),
            sign_name=self.account.sms_sign_name,
            template_code=template,
            template_param=_json(params),
            out_id=_out_id(delivery),
        )


def aliyun_notifiers(settings: Settings, *, timeout: float = HTTP_TIMEOUT_S) -> dict[Channel, Notifier]:
    """The Aliyun notifiers ``SHOUHU_ALIYUN_*`` configures, by channel; empty when none is.

    Voice needs the keys, the caller number and the three TTS codes; SMS the keys, the
    signature and both SMS templates. A channel half configured is left out, and said
    so in the log.
    """
    account = AliyunAccount.from_settings(settings)
    if not account.has_keys:
        return {}
    notifiers: dict[Channel, Notifier] = {}
    if account.voice_ready:
        notifiers[Channel.VOICE] = AliyunVoiceNotifier(account, timeout=timeout)
    else:
        log.warning("Aliyun voice is not configured: set the voice number and the three SHOUHU_ALIYUN_TTS_* codes")
    if account.sms_ready:
        notifiers[Channel.SMS] = AliyunSmsNotifier(account, timeout=timeout)
    else:
        log.warning("Aliyun SMS is not configured: set SHOUHU_ALIYUN_SMS_SIGN_NAME and both SMS templates")
    return notifiers
