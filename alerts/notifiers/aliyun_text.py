"""What Aliyun's approved templates are filled with: the variables of a voice page, an SMS page and a notice.

Aliyun speaks and sends only templates approved in advance (docs/escalation.md,
"Aliyun (阿里云) voice and SMS", has their exact text); Shouhu sends the variables.
Each variable has a length limit of the provider's, so every one is clipped here,
explicitly, and a page always fits: the incident code and callback number are never
clipped (they are how the person answers), the name and address are. What is said is
the minimum PIPL allows, as with Twilio: no medical notes (``Message`` has none), and
no control character (``plain_text``, through the Twilio text's ``_plain``).
"""

from __future__ import annotations

from alerts.notifiers.base import Message
from alerts.notifiers.twilio import _clip, _event, _kind, _plain, _spelled, _subject
from devices.kinds import IncidentKind

# Aliyun's SMS templates: a variable holds 1 to 35 characters (申请短信模板, 变量规范).
# Its voice templates name no limit per variable, only 1 to 1,000 characters a template:
# the SMS bound is used for both, so a variable fits either kind of template.
VARIABLE_MAX_CHARS = 35
# What Shouhu gives a name and an address: with the template's fixed text, the SMS
# page stays within two segments (2 × 67 characters, the signature included).
NAME_MAX_CHARS = 12
ADDRESS_MAX_CHARS = 24
# The SMS page template's fixed text, and the signature Aliyun puts before it
# (【守护】): what the page's length is counted with (sms_length).
SMS_PAGE_TEMPLATE = (
    "守护提醒：${name}（${address}）${event}。回拨${callback}。事件编号${code}，回复“编号 1”接单，“编号 2”无法前往。"
)
SMS_NOTICE_TEMPLATE = "守护平台通知：${content}"
SIGNATURE_CHARS = len("【守护】")
# Said for an empty part: a template variable may not be empty (1 to 35 characters).
NO_ADDRESS = "地址未登记"
NO_CALLBACK = "无"


def national(number: str) -> str:
    """A Chinese mainland number as Aliyun takes it and a person reads it: ``+8613800138000`` → ``13800138000``.

    Any other number is left as it is (as a callee, Aliyun refuses it: ``isv.MOBILE_NUMBER_ILLEGAL``).
    """
    return number.removeprefix("+86")


def _callback(message: Message) -> str:
    return national(message.callback_number) if message.callback_number else ""


def _variable(text: str, limit: int = VARIABLE_MAX_CHARS) -> str:
    return _clip(text, min(limit, VARIABLE_MAX_CHARS)) or NO_CALLBACK


def _name(message: Message) -> str:
    kind = _kind(message)
    subject = _subject(kind, message)
    if kind in (IncidentKind.SOS_UNREGISTERED, IncidentKind.CAMERA_OFFLINE):
        return _variable(subject)  # the device id names it: clipped only at the provider's limit
    return _variable(subject, NAME_MAX_CHARS)


def _address(message: Message) -> str:
    return _variable(message.address, ADDRESS_MAX_CHARS) if message.address else NO_ADDRESS


def tts_page_params(message: Message) -> dict[str, str]:
    """The page's TTS variables (``name``, ``address``, ``event``, ``callback``, ``code``).

    The code and the callback number are spelled out one character at a time, so the
    voice reads "1 3 8…" and not a large number.
    """
    message = _plain(message)
    kind = _kind(message)
    name = _name(message)
    if kind in (IncidentKind.SOS_UNREGISTERED, IncidentKind.CAMERA_OFFLINE):
        for label in ("未登记手环", "摄像头"):
            if name.startswith(label) and len(name) > len(label):
                name = _variable(f"{label}，编号{_spelled(name[len(label) :])}")
    return {
        "name": name,
        "address": _address(message),
        "event": _variable(_event(kind)),
        "callback": _variable(_spelled(_callback(message))) if message.callback_number else NO_CALLBACK,
        "code": _spelled(message.incident_code),
    }


def sms_page_params(message: Message) -> dict[str, str]:
    """The SMS page's template variables (``name``, ``address``, ``event``, ``callback``, ``code``)."""
    message = _plain(message)
    return {
        "name": _name(message),
        "address": _address(message),
        "event": _variable(_event(_kind(message))),
        "callback": _variable(_callback(message)) if message.callback_number else NO_CALLBACK,
        "code": _variable(message.incident_code),
    }


def sms_notice_params(message: Message) -> dict[str, str]:
    """A notice's one variable (``content``): its text without the 【守护】 the signature adds, clipped."""
    text = _plain(message).notice or ""
    text = text.removeprefix("【守护】").strip()
    return {"content": _variable(text)}


def rendered(template: str, params: dict[str, str]) -> str:
    """``template`` with its ``${name}`` variables filled: the text the person reads."""
    for name, value in params.items():
        template = template.replace("${" + name + "}", value)
    return template


def sms_length(template: str, params: dict[str, str]) -> int:
    """The characters Aliyun counts for an SMS: the signature and the filled template."""
    return SIGNATURE_CHARS + len(rendered(template, params))
