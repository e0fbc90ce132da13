"""The emergency platform (应急呼叫平台): a signed webhook carrying a CAP 1.2 alert.

DESIGN.md, "The emergency-platform webhook": a ``POST`` whose body is a CAP 1.2 XML
alert, with ``X-Shouhu-Delivery`` (a new UUID per delivery attempt),
``X-Shouhu-Timestamp`` (Unix seconds) and ``X-Shouhu-Signature: sha256=<hex>``, the
HMAC-SHA256 under the shared secret of ``{timestamp}.{delivery}.{raw body}``. The
2xx reply is a receipt, not an acknowledgement.

Choices made here, where CAP 1.2 leaves room:

- ``scope`` is ``Private`` with ``addresses`` naming the platform: the alert carries
  medical notes for one dispatcher, not the public (``Restricted`` would describe a
  class of readers, not one recipient).
- Times are rendered in ``SHOUHU_TIMEZONE`` (Asia/Shanghai by default, so the
  dispatcher reads local time) as ``2026-11-24T18:00:00+08:00``: seconds only, an
  explicit offset, never ``Z``; UTC is written ``-00:00``, as CAP 1.2 requires. The
  same instant always renders the same text, which matters because ``references``
  must repeat the first alert's ``sent`` exactly.
- ``category``: ``Safety`` for an SOS (a general emergency, cause unknown until
  someone gets there), ``Health`` for a fall (a medical event).
  ``certainty``: ``Observed`` for a button press, ``Likely`` for a fall (a detector's
  inference). ``urgency``/``responseType`` follow the incident's state:
  ``Immediate``/``Execute`` while nobody has it, ``Immediate``/``Monitor`` once
  acknowledged, ``Past``/``AllClear`` when resolved or cancelled.
- The location is a ``<circle>`` of 0.05 km around the WGS-84 point the wristband
  reported (GPS gives WGS-84, not the GCJ-02 of Chinese web maps). A point that is
  not a valid coordinate is left out rather than stopping the alert: the address
  still goes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import re
import socket
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import requests

from alerts.notifiers.base import SendOutcome, SendResult
from alerts.notifiers.platform import CapMsgType, PlatformAlert, TriedContact
from alerts.notifiers.text import plain_text
from alerts.states import CLOSED, IncidentState
from devices.kinds import SEVERITY_OF_KIND, IncidentKind, Severity

if TYPE_CHECKING:
    from shouhu.settings import Settings

CAP_NAMESPACE = "urn:oasis:names:tc:emergency:cap:1.2"
CAP_CONTENT_TYPE = "application/common-alerting-protocol+xml"
DELIVERY_HEADER = "X-Shouhu-Delivery"
TIMESTAMP_HEADER = "X-Shouhu-Timestamp"
SIGNATURE_HEADER = "X-Shouhu-Signature"
RECEIPT_HEADER = "X-Receipt-Id"
DEFAULT_ZONE = ZoneInfo("Asia/Shanghai")
CIRCLE_RADIUS_KM = 0.05
HEADLINE_MAX_CHARS = 160  # CAP 1.2 asks for a headline under 160 characters
ERROR_BODY_CHARS = 200
SENDER_NAME = "守护 独居老人守护平台"

# CAP 1.2: identifier, sender (and each references entry) "MUST NOT include spaces,
# commas or restricted characters (< and &)".
_CAP_TOKEN = re.compile(r"[^\s,<&]+")

_EVENT: dict[str, str] = {
    IncidentKind.SOS: "独居老人一键求助",
    IncidentKind.FALL: "独居老人疑似跌倒",
    IncidentKind.SOS_UNREGISTERED: "未登记手环一键求助",
}
_CATEGORY: dict[str, str] = {IncidentKind.FALL: "Health"}  # everything else: Safety
_CERTAINTY: dict[str, str] = {IncidentKind.FALL: "Likely"}  # a press is Observed
_CAP_SEVERITY: dict[Severity, str] = {Severity.RED: "Severe", Severity.YELLOW: "Moderate", Severity.BLUE: "Minor"}
_STATE_LABEL: dict[str, str] = {
    "open": "待响应",
    "unreached": "无人响应",
    "acknowledged": "已接单",
    "resolved": "已处置",
    "cancelled": "已取消",
}
_ROLE_LABEL: dict[str, str] = {
    "grid_worker": "网格员",
    "guardian": "监护人",
    "duty_officer": "值班员",
    "operator": "综治中心",
    "technician": "技术员",
}
_CHANNEL_LABEL: dict[str, str] = {"voice": "电话", "sms": "短信"}
_OUTCOME_LABEL: dict[str, str] = {
    "sent": "已发出",
    "delivered": "已送达",
    "answered": "已接听",
    "failed": "失败",
    "declined": "表示无法前往",
    "no_answer": "无人接听",
    "busy": "占线",
    "acknowledged": "已接单",
}
_CLOSED_STATES = frozenset(CLOSED)


def cap_time(moment: datetime, zone: ZoneInfo = DEFAULT_ZONE) -> str:
    """``moment`` as a CAP 1.2 time: seconds, an explicit offset, UTC as ``-00:00``.

    Raises:
        ValueError: ``moment`` is naive (its instant is unknown).
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"CAP times need a timezone-aware datetime, got naive {moment.isoformat()}")
    local = moment.astimezone(zone).replace(microsecond=0)
    offset = local.utcoffset() or timedelta(0)
    if offset == timedelta(0):
        return local.strftime("%Y-%m-%dT%H:%M:%S") + "-00:00"
    return local.isoformat()


def _token(value: str, what: str) -> str:
    if not _CAP_TOKEN.fullmatch(value):
        raise ValueError(f"CAP {what} {value!r} must be non-empty, without spaces, commas, '<' or '&'")
    return value


def _text(value: str) -> str:
    # XML 1.0 cannot carry a control character at all, even escaped: one stray in a
    # name must not make the whole alert unparseable. Lines (the description) stay.
    return plain_text(value, multiline=True)


def _location(alert: PlatformAlert) -> tuple[float, float] | None:
    lat, lon = alert.lat, alert.lon
    if lat is None or lon is None or not (math.isfinite(lat) and math.isfinite(lon)):
        return None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return lat, lon


def _event(kind: str) -> str:
    return _EVENT.get(kind, "独居老人守护告警")


def _severity(kind: str) -> str:
    try:
        return _CAP_SEVERITY[SEVERITY_OF_KIND[IncidentKind(kind)]]
    except ValueError:
        return "Unknown"


def _subject(alert: PlatformAlert) -> str:
    # An unregistered wristband has no resident: say so, so nobody looks for one by name.
    if alert.incident_kind == IncidentKind.SOS_UNREGISTERED:
        return f"未登记手环{alert.resident_name}"
    return alert.resident_name


def _closed(alert: PlatformAlert) -> bool:
    return alert.msg_type is CapMsgType.CANCEL or alert.state in _CLOSED_STATES


def _headline(alert: PlatformAlert) -> str:
    prefix = "【演练】" if alert.exercise else ""
    if alert.msg_type is CapMsgType.ALERT:
        text = f"{prefix}{_event(alert.incident_kind)}：{_subject(alert)}（{alert.address}）"
    else:
        state = _STATE_LABEL.get(alert.state, alert.state)
        text = f"{prefix}{state}：{_subject(alert)} {_event(alert.incident_kind)}（{alert.incident_code}）"
    return text if len(text) <= HEADLINE_MAX_CHARS else text[: HEADLINE_MAX_CHARS - 1] + "…"


def _clock_text(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S") if moment.tzinfo else moment.isoformat()


def _tried_line(contact: TriedContact, zone: ZoneInfo) -> str:
    role = _ROLE_LABEL.get(contact.role, contact.role)
    channel = _CHANNEL_LABEL.get(contact.channel, contact.channel)
    outcome = _OUTCOME_LABEL.get(contact.outcome, contact.outcome)
    return f"- {_clock_text(contact.at, zone)} {contact.name}（{role}）{channel}：{outcome}"


def _description(alert: PlatformAlert, zone: ZoneInfo) -> str:
    location = _location(alert)
    if location is not None:
        where = f"{location[0]:.6f},{location[1]:.6f}（WGS-84）"
    elif alert.lat is not None or alert.lon is not None:
        where = "未知（设备上报的坐标无效）"
    else:
        where = "未知"
    lines = [
        f"事件编号：{alert.incident_code}（#{alert.incident_id}）",
        f"类型：{_event(alert.incident_kind)}",
        f"发生时间：{_clock_text(alert.opened_at, zone)}（{zone.key}）",
        f"当前状态：{_STATE_LABEL.get(alert.state, alert.state)}",
        f"老人：{_subject(alert)}",
        f"地址：{alert.address}",
        f"电话：{alert.phone or '未知'}",
        f"位置：{where}",
        f"医疗备注：{alert.medical_notes or '无'}",
        "已联系：" if alert.tried else "已联系：无",
        *(_tried_line(contact, zone) for contact in alert.tried),
    ]
    if alert.note:
        lines.append(f"说明：{alert.note}")
    return "\n".join(lines)


def _instruction(alert: PlatformAlert) -> str:
    if alert.state == IncidentState.CANCELLED or alert.msg_type is CapMsgType.CANCEL:
        return "求助已取消，无需派员。"
    if alert.state == IncidentState.RESOLVED:
        return "事件已处置完毕，无需行动。"
    if alert.state == IncidentState.ACKNOWLEDGED:
        return "已有人接单前往，请继续关注，如有需要可协助。"
    return (
        "此前联系的人员均未响应（见描述）。请立即回拨老人并就近派员上门，必要时呼叫120。"
        f"接单请调用守护 API：POST /api/v1/incidents/{alert.incident_id}/ack。"
    )


def _response_and_urgency(alert: PlatformAlert) -> tuple[str, str]:
    if _closed(alert):
        return "AllClear", "Past"
    if alert.state == IncidentState.ACKNOWLEDGED:
        return "Monitor", "Immediate"
    return "Execute", "Immediate"


def _element(parent: ET.Element, name: str) -> ET.Element:
    return ET.SubElement(parent, f"{{{CAP_NAMESPACE}}}{name}")


def _sub(parent: ET.Element, name: str, text: str) -> None:
    _element(parent, name).text = _text(text)


def _pair(parent: ET.Element, name: str, value_name: str, value: str) -> None:
    element = _element(parent, name)
    _sub(element, "valueName", value_name)
    _sub(element, "value", value)


def _alert_block(root: ET.Element, alert: PlatformAlert, sender: str, addresses: str, zone: ZoneInfo) -> None:
    references = " ".join(
        f"{sender},{_token(identifier, 'reference identifier')},{cap_time(sent, zone)}"
        for identifier, sent in alert.references
    )
    _sub(root, "identifier", alert.identifier)
    _sub(root, "sender", sender)
    _sub(root, "sent", cap_time(alert.sent, zone))
    _sub(root, "status", "Exercise" if alert.exercise else "Actual")
    _sub(root, "msgType", str(alert.msg_type))
    _sub(root, "source", "守护 Shouhu")
    _sub(root, "scope", "Private")
    _sub(root, "addresses", addresses)
    if alert.exercise:
        _sub(root, "note", "演练消息，非真实警情。" + alert.note)
    elif alert.note:
        _sub(root, "note", alert.note)
    if references:
        _sub(root, "references", references)
    if _CAP_TOKEN.fullmatch(alert.incident_code):
        # Every message about one incident shares this, Alert, Updates and Cancel alike.
        _sub(root, "incidents", alert.incident_code)


def _info_block(info: ET.Element, alert: PlatformAlert, zone: ZoneInfo) -> None:
    response_type, urgency = _response_and_urgency(alert)
    _sub(info, "language", "zh-CN")
    _sub(info, "category", _CATEGORY.get(alert.incident_kind, "Safety"))
    _sub(info, "event", _event(alert.incident_kind))
    _sub(info, "responseType", response_type)
    _sub(info, "urgency", urgency)
    _sub(info, "severity", _severity(alert.incident_kind))
    _sub(info, "certainty", _CERTAINTY.get(alert.incident_kind, "Observed"))
    _sub(info, "onset", cap_time(alert.opened_at, zone))
    _sub(info, "senderName", f"{SENDER_NAME}（{alert.area_name}）" if alert.area_name else SENDER_NAME)
    _sub(info, "headline", _headline(alert))
    _sub(info, "description", _description(alert, zone))
    _sub(info, "instruction", _instruction(alert))
    _sub(info, "contact", f"老人电话 {alert.phone}" if alert.phone else f"综治中心（事件 {alert.incident_code}）")
    _pair(info, "parameter", "incidentCode", alert.incident_code)
    _pair(info, "parameter", "incidentId", str(alert.incident_id))
    _pair(info, "parameter", "incidentKind", alert.incident_kind)
    _pair(info, "parameter", "state", alert.state)
    _pair(info, "parameter", "residentName", alert.resident_name)
    area = _element(info, "area")
    _sub(area, "areaDesc", " ".join(part for part in (alert.area_name, alert.address) if part) or "未知")
    location = _location(alert)
    if location is not None:
        _sub(area, "circle", f"{location[0]:.6f},{location[1]:.6f} {CIRCLE_RADIUS_KM}")


def cap_xml(
    alert: PlatformAlert,
    *,
    sender: str,
    addresses: str = "emergency-platform",
    zone: ZoneInfo = DEFAULT_ZONE,
) -> bytes:
    """The CAP 1.2 XML (UTF-8, with an XML declaration) for one platform message.

    Args:
        alert: What to tell the platform.
        sender: CAP ``sender``, e.g. ``shouhu@hub.example.cn``; it must be the same for
            every message about an incident, since ``references`` repeat it.
        addresses: CAP ``addresses`` for the ``Private`` scope: the platform.
        zone: The zone times are rendered in (the instant is the same in any zone).

    Raises:
        ValueError: a naive time, an identifier/sender CAP forbids, or an Update or
            Cancel without the alert it refers to — mistakes in the caller, not in
            the delivery.
    """
    _token(alert.identifier, "identifier")
    _token(sender, "sender")
    if not addresses.strip():
        raise ValueError("CAP Private scope needs addresses")
    if alert.msg_type is not CapMsgType.ALERT and not alert.references:
        raise ValueError(f"a CAP {alert.msg_type} must reference the alert it changes")
    # Names and the address are one line wherever they appear (headline, parameters,
    # areaDesc); every element's text is cleaned again by _text.
    alert = dataclasses.replace(
        alert,
        resident_name=plain_text(alert.resident_name),
        address=plain_text(alert.address),
        area_name=plain_text(alert.area_name),
    )
    root = ET.Element(f"{{{CAP_NAMESPACE}}}alert")
    _alert_block(root, alert, sender, addresses, zone)
    _info_block(_element(root, "info"), alert, zone)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True, default_namespace=CAP_NAMESPACE)
    return xml


def sign(secret: str, timestamp: int, delivery: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 under ``secret`` of ``{timestamp}.{delivery}.{body}``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.{delivery}.".encode() + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def sender_for(public_url: str) -> str:
    """``shouhu@<host of SHOUHU_PUBLIC_URL>``: one sender shared by every router worker.

    The host name of the machine would differ between workers, and a Cancel sent by
    one worker must reference the Alert another sent under the same sender.
    """
    host = urlsplit(public_url).hostname or socket.gethostname()
    return f"shouhu@{host}"


class WebhookNotifier:
    """POSTs signed CAP messages to the emergency platform: one request per call.

    The router calls it once per attempt and retries a transient failure (a connection
    error, a timeout, a 5xx or a 429) as a new attempt row with backoff
    (``alerts/retry.py``), so no thread or lock waits between tries. Every try is a
    new delivery (a new ``X-Shouhu-Delivery`` and timestamp) of the same CAP message,
    which the platform deduplicates on its identifier. Any other 4xx, or a redirect,
    is a hard failure (``SendResult.final``): sending the same thing again would be
    refused again. Built with ``retries`` > 0 (the default, for a caller with no retry
    rows of its own) it retries within the call, sleeping ``backoff_s``, doubling;
    the router builds it with ``retries=0`` (:meth:`from_settings`).
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        sender: str,
        addresses: str | None = None,
        zone: ZoneInfo = DEFAULT_ZONE,
        exercise: bool = False,
        timeout: float = 10.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Set up the notifier.

        Args:
            url: The platform's webhook URL (http or https).
            secret: The shared HMAC secret.
            sender: CAP ``sender``; see :func:`sender_for`.
            addresses: CAP ``addresses``; default the platform URL's host.
            zone: The zone CAP times are rendered in.
            exercise: Send every message with status ``Exercise`` (the demo), whatever
                the alert says; never turns an exercise into ``Actual``.
            timeout: Seconds to wait for each try's answer (connecting, and each read).
            retries: Tries after the first within one call, for transient failures
                (the router uses none: its retries are attempt rows).
            backoff_s: The first wait between tries; it doubles each time.
            sleep: How to wait (tests pass a recorder).
            clock: Unix time for ``X-Shouhu-Timestamp``.

        Raises:
            ValueError: the URL, secret, sender or numbers are unusable.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the emergency webhook URL must be http(s)://host/…, got {url!r}")
        if not secret:
            raise ValueError("the emergency webhook secret is empty")
        if timeout <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError("timeout must be positive, retries and backoff_s not negative")
        self.url = url
        self.secret = secret
        self.sender = _token(sender, "sender")
        self.addresses = addresses or parts.hostname
        self.zone = zone
        self.exercise = exercise
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, *, exercise: bool) -> WebhookNotifier:
        """Build from ``SHOUHU_EMERGENCY_WEBHOOK_*``, ``SHOUHU_PUBLIC_URL`` and ``SHOUHU_TIMEZONE``.

        One request per call: the router retries as attempt rows (``alerts/retry.py``).

        Raises:
            ValueError: the webhook URL or secret is not set.
        """
        missing = [
            name
            for name, value in (
                ("SHOUHU_EMERGENCY_WEBHOOK_URL", settings.emergency_webhook_url),
                ("SHOUHU_EMERGENCY_WEBHOOK_SECRET", settings.emergency_webhook_secret),
            )
            if not value
        ]
        if missing:
            raise ValueError(f"the emergency platform is not configured: set {', '.join(missing)}")
        return cls(
            settings.emergency_webhook_url,
            settings.emergency_webhook_secret,
            sender=sender_for(settings.public_url),
            zone=settings.zone,
            exercise=exercise,
            retries=0,
        )

    def body(self, alert: PlatformAlert) -> bytes:
        """The CAP XML this notifier sends for ``alert``."""
        if self.exercise and not alert.exercise:
            alert = dataclasses.replace(alert, exercise=True)
        return cap_xml(alert, sender=self.sender, addresses=self.addresses, zone=self.zone)

    def send_alert(self, alert: PlatformAlert) -> SendResult:
        """POST one CAP message (``retries`` more times for a transient failure); the 2xx reply is the receipt."""
        try:
            body = self.body(alert)
        except ValueError as exc:
            return SendResult(SendOutcome.FAILED, error=f"cannot build the CAP message: {exc}", final=True)
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
            result, retry = self._deliver(body)
            if result is not None:
                return result
            error = retry
        if not self.retries:
            return SendResult(SendOutcome.FAILED, error=error)
        return SendResult(SendOutcome.FAILED, error=f"no receipt after {self.retries + 1} tries; last: {error}")

    def _deliver(self, body: bytes) -> tuple[SendResult | None, str]:
        """One delivery: a final result, or ``None`` and why it is worth trying again."""
        delivery = str(uuid.uuid4())
        timestamp = int(self.clock())
        headers = {
            "Content-Type": CAP_CONTENT_TYPE,
            DELIVERY_HEADER: delivery,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self.secret, timestamp, delivery, body),
        }
        try:
            reply = requests.post(self.url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False)
        except requests.Timeout:
            return None, f"no answer from {self.url} within {self.timeout:g} s"
        except requests.ConnectionError as exc:
            return None, f"cannot reach {self.url}: {exc}"
        except requests.RequestException as exc:
            return SendResult(SendOutcome.FAILED, error=f"cannot send to {self.url}: {exc}", final=True), ""
        status = reply.status_code
        if 200 <= status < 300:
            return SendResult(SendOutcome.SENT, provider_id=_receipt(reply) or delivery), ""
        answer = f"HTTP {status} from {self.url}: {reply.text[:ERROR_BODY_CHARS]}"
        if status >= 500 or status == 429:
            return None, answer
        if 300 <= status < 400:
            answer += f" (a redirect to {reply.headers.get('Location')}: set the final URL)"
        return SendResult(SendOutcome.FAILED, error=f"refused: {answer}", final=True), ""


def _receipt(reply: requests.Response) -> str | None:
    header = reply.headers.get(RECEIPT_HEADER)
    if header:
        return header
    try:
        payload = reply.json()
    except ValueError:
        return None
    receipt = payload.get("receipt") if isinstance(payload, dict) else None
    return str(receipt) if receipt else None
