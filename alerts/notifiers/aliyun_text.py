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

from alerts.notifiers.aliyun_keys import aliyun_number
from alerts.notifiers.base import Message
from alerts.notifiers.twilio import _clip, _event, _headline, _kind, _plain, _spelled, _subject
from devices.kinds import IncidentKind

# Aliyun's SMS templates: a variable holds 1 to 35 characters (申请短信模板, 变量规范).
# Its voice templates name no limit per variable, only 1 to 1,000 characters a template:
# the SMS bound is used for both, so a variable fits either kind of template.
VARIABLE_MAX_CHARS = 35
# What Shouhu gives a name and an address: with the template's fixed text, the SMS
# page stays within two segments (2 × 67 characters, the signature included).
NAME_MAX_CHARS = 12
ADDRESS_MAX_CHARS = 24
# The templates to have approved, word for word (docs/escalation.md repeats them): what
# the variables below fill, and what a page's length is counted with (sms_length).
# Aliyun puts the signature (【守护】) before an SMS; a TTS template may hold none of
# # / : - % ¥ 【 】, and no template two variables side by side or one twice.
TTS_PAGE_TEMPLATE = (
    "您好，这里是守护平台${level}。${name}，地址${address}，${event}。"
    "回拨电话${callback}。事件编号${code}。前往处置请按1，无法前往请按2。"
)
TTS_TAKEN_TEMPLATE = "已为您接单，请尽快前往处置，谢谢。"
TTS_DECLINED_TEMPLATE = "已记录您无法前往，我们将继续通知其他人员，谢谢。"
SMS_PAGE_TEMPLATE = (
    "${level}：${name}（${address}）${event}。回拨${callback}。事件编号${code}，回复“编号 1”接单，“编号 2”无法前往。"
)
SMS_NOTICE_TEMPLATE = "通知：${content}"
SIGNATURE_CHARS = len("【守护】")
# Said for an empty part: a template variable may not be empty (1 to 35 characters).
NO_ADDRESS = "地址未登记"  # in brackets after the name (SMS)
NO_ADDRESS_SPOKEN = "未登记"  # after "地址" (TTS)
NO_CALLBACK = "无号码"


def _callback(message: Message) -> str:
    return aliyun_number(message.callback_number) if message.callback_number else ""


def _variable(text: str, limit: int = VARIABLE_MAX_CHARS) -> str:
    # A template variable may not be empty: "无" (none) stands in for what is missing.
    return _clip(text, min(limit, VARIABLE_MAX_CHARS)) or "无"


def _name(message: Message) -> str:
    kind = _kind(message)
    subject = _subject(kind, message)
    if kind in (IncidentKind.SOS_UNREGISTERED, IncidentKind.CAMERA_OFFLINE):
        return _variable(subject)  # the device id names it: clipped only at the provider's limit
    return _variable(subject, NAME_MAX_CHARS)


def _address(message: Message, missing: str = NO_ADDRESS) -> str:
    return _variable(message.address, ADDRESS_MAX_CHARS) if message.address else missing


def tts_page_params(message: Message) -> dict[str, str]:
    """The page's TTS variables (``level``, ``name``, ``address``, ``event``, ``callback``, ``code``).

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
        "level": _headline(kind),
        "name": name,
        "address": _address(message, NO_ADDRESS_SPOKEN),
        "event": _variable(_event(kind)),
        "callback": _variable(_spelled(_callback(message))) if message.callback_number else NO_CALLBACK,
        "code": _spelled(message.incident_code),
    }


def sms_page_params(message: Message) -> dict[str, str]:
    """The SMS page's template variables (``level``, ``name``, ``address``, ``event``, ``callback``, ``code``)."""
    message = _plain(message)
    return {
        "level": _headline(_kind(message)),
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
