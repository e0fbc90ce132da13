"""Aliyun's receipts: what each pushed item is, and what it does once queued (``alerts/receipts.py``).

Aliyun pushes JSON arrays to the URLs set in its console (docs/contract.md, "Aliyun
receipts"); the field names are Aliyun's own:

- ``VoiceReport`` (语音服务, after a call ends): ``call_id``, ``status_code``, ``out_id``,
  ``callee``… The result settles the page call as Twilio's status does: heard or
  hung up without 1 or 2 (a voicemail, a key timeout) is not reached, as are busy,
  no answer, unreachable; each is retried as today (``alerts/delivery_status.py``).
  An ``IvrCall``'s result may carry the key in ``dtmf`` too: it is taken as the
  keypress, once, whichever of the two pushes brings it first.
- ``VoiceCallReport`` (during the call): ``call_id``, ``status_code``, ``out_id``,
  ``status_time`` and, when ``status_code`` is ``300000``, ``dtmf``: the key pressed on
  the ``IvrCall``. 1 takes the incident, 2 declines, through the same path as
  Twilio's keypress (``alerts/answers.py``). Other codes (ringing, answered) go on
  the timeline.
- ``SmsReport`` (短信服务): ``phone_number``, ``success``, ``err_code``, ``biz_id``,
  ``out_id``…: delivered, or failed with the provider's ``err_code`` and retried.
- ``SmsUp``: ``phone_number``, ``content``, ``sequence_id``…: a reply, which names no
  message; it is taken like Twilio's SMS reply (the incident code, then 1 or 2), and
  only from a number paged for that code.

Aliyun signs no push, so an item is believed only when it names what Shouhu set: the
``out_id`` an attempt was sent with (:mod:`alerts.notifiers.aliyun_keys`), that
attempt's channel, the ``call_id`` or ``biz_id`` the provider gave it, and the number it
was sent to. Anything else changes nothing and is audited (``receipt_refused``).
"""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, StringConstraints, TypeAdapter

from alerts.answers import parse_sms_reply, person, record_keypress, take_sms_reply
from alerts.attempts import LockedAttempt, lock_attempt, take_provider_id
from alerts.delivery_status import Delivery, record_delivery
from alerts.notifiers.aliyun_keys import address_from_aliyun, parse_out_id
from alerts.receipts import NewReceipt, Receipt, ReceiptOutcome, audit_refused
from alerts.states import AttemptState
from shouhu.db import Conn

log = logging.getLogger(__name__)

__all__ = [
    "PROVIDER",
    "ReceiptKind",
    "SmsReport",
    "SmsUp",
    "VoiceCallReport",
    "VoiceReport",
    "handle",
    "new_receipt",
    "validate_item",
]

PROVIDER = "aliyun"
KEYPRESS = "300000"  # VoiceCallReport: a DTMF key, in ``dtmf``

# VoiceReport's status_code: the call's result, in words (the timeline's event), and
# what it ends the attempt as. Any other code is a failure (retried).
VOICE_RESULTS: dict[str, tuple[str, AttemptState]] = {
    "200000": ("heard", AttemptState.NO_KEYPRESS),  # listened to the end without 1 or 2 (or a voicemail)
    "200001": ("hung_up", AttemptState.NO_KEYPRESS),  # hung up before the end
    "200008": ("keypress_timeout", AttemptState.NO_KEYPRESS),
    "200002": ("busy", AttemptState.BUSY),
    "200003": ("no_answer", AttemptState.NO_ANSWER),
    "200005": ("unreachable", AttemptState.NO_ANSWER),  # rejected, or the carrier could not connect
    "200007": ("out_of_service_area", AttemptState.NO_ANSWER),
    "200010": ("powered_off", AttemptState.NO_ANSWER),
    "200004": ("invalid_number", AttemptState.FAILED),
    "200011": ("suspended", AttemptState.FAILED),
}
# VoiceCallReport's intermediate codes: on the timeline only.
CALL_PROGRESS = {"200101": "calling", "200201": "ringing", "200102": "answered", "200100": "ended"}


class ReceiptKind(StrEnum):
    """Which push an item came in: the route's last path segment."""

    VOICE_REPORT = "voice_report"
    VOICE_CALL_REPORT = "voice_call_report"
    SMS_REPORT = "sms_report"
    SMS_UP = "sms_up"


Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
Code = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]
Phone = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]
Short = Annotated[str, StringConstraints(max_length=64)]
Note = Annotated[str, StringConstraints(max_length=500)]


class _Item(BaseModel):
    # Strict: a number where Aliyun documents a string is refused, not guessed at. Fields
    # Shouhu does not read (duration, ring_time, smart_status_code…) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class VoiceReport(_Item):
    call_id: Id
    status_code: Code
    callee: Phone
    out_id: Short | None = None  # none, or one Shouhu never set: refused (audited), not malformed
    status_msg: Note = ""
    dtmf: Short = ""  # an IvrCall's key, when the result carries it


class VoiceCallReport(_Item):
    call_id: Id
    status_code: Code
    out_id: Short | None = None
    status_time: Short = ""
    dtmf: Short = ""


class SmsReport(_Item):
    phone_number: Phone
    success: bool
    biz_id: Id
    out_id: Short | None = None
    err_code: Short = ""
    err_msg: Note = ""
    report_time: Short = ""


class SmsUp(_Item):
    phone_number: Phone
    content: Annotated[str, StringConstraints(max_length=2000)]
    sequence_id: int | Id  # a number in some of Aliyun's documents, a string in others
    send_time: Short = ""
    dest_code: Short = ""
    sign_name: Short = ""


Item = VoiceReport | VoiceCallReport | SmsReport | SmsUp
MODELS: dict[ReceiptKind, TypeAdapter[Any]] = {
    ReceiptKind.VOICE_REPORT: TypeAdapter(VoiceReport),
    ReceiptKind.VOICE_CALL_REPORT: TypeAdapter(VoiceCallReport),
    ReceiptKind.SMS_REPORT: TypeAdapter(SmsReport),
    ReceiptKind.SMS_UP: TypeAdapter(SmsUp),
}


def validate_item(kind: ReceiptKind, raw: Any) -> Item:
    """One pushed item as its model; raises ``pydantic.ValidationError`` naming the field."""
    item: Item = MODELS[kind].validate_python(raw)
    return item


def new_receipt(kind: ReceiptKind, item: Item, raw: dict[str, Any]) -> NewReceipt:
    """The queue row of a validated item, keyed so that Aliyun's retry of the same push is a no-op.

    The key holds the ``out_id`` too: an item naming another attempt is never folded
    into the real one (and refused on its own).
    """
    if isinstance(item, VoiceReport):
        key = f"{item.call_id}:{item.status_code}:{item.out_id or ''}"
        return NewReceipt(kind, key, raw, ref=item.call_id, final=True)
    if isinstance(item, VoiceCallReport):
        key = f"{item.call_id}:{item.status_code}:{item.out_id or ''}"
        if item.status_code == KEYPRESS:  # several keys on one call are several receipts
            key += f":{item.dtmf}:{item.status_time}"
        return NewReceipt(kind, key, raw, ref=item.call_id)
    if isinstance(item, SmsReport):
        key = f"{item.biz_id}:{item.phone_number}:{item.success}:{item.err_code}:{item.out_id or ''}"
        return NewReceipt(kind, key, raw)
    return NewReceipt(kind, str(item.sequence_id), raw)


# --- handling (the worker, alerts/receipts.py) -----------------------------------------


class _Refused(Exception):
    """The item names nothing Shouhu sent: nothing changes, and it is audited."""


def _attempt(
    conn: Conn, out_id: str | None, channel: str, provider_id: str, number: str | None, now: datetime
) -> LockedAttempt:
    """The attempt an item reports on, locked (incident first), once it proves it names it."""
    attempt_id = parse_out_id(out_id or "")
    found = None if attempt_id is None else lock_attempt(conn, "id = %s", (attempt_id,))
    if found is None:
        raise _Refused("unknown out_id")
    if found.channel != channel:
        raise _Refused(f"out_id names a {found.channel} attempt, not {channel}")
    # An attempt still in flight (the router has not had Aliyun's answer yet) has no id
    # recorded: it takes the one the provider reports.
    if found.provider_id != provider_id and not (found.provider_id is None and found.in_flight):
        raise _Refused("not the provider id the attempt was given")
    if number is not None and address_from_aliyun(number) != found.address:
        raise _Refused("not the number the attempt was sent to")
    if found.provider_id is None:
        take_provider_id(conn, found.id, provider_id, now)
    return found


def _current(found: LockedAttempt) -> str:
    # A status that overtakes the router's record of the send counts the attempt as sent:
    # the router's settle then keeps what the status made of it.
    return AttemptState.SENT.value if found.in_flight else found.state


def _delivery(conn: Conn, delivery: Delivery, now: datetime) -> ReceiptOutcome:
    outcome = record_delivery(conn, delivery, now)
    return {
        "settled": ReceiptOutcome.SETTLED,
        "recorded": ReceiptOutcome.RECORDED,
        "duplicate": ReceiptOutcome.DUPLICATE,
    }[outcome.handled]


def _keypress(conn: Conn, found: LockedAttempt, call_id: str, dtmf: str, now: datetime, timeout: int) -> ReceiptOutcome:
    """The key pressed on a page call: 1 takes, 2 declines (``alerts/answers.py``), once per key and call."""
    digit = dtmf.strip()
    seen = conn.execute(
        "SELECT 1 FROM incident_events WHERE incident_id = %s AND event = 'keypress' AND detail @> %s LIMIT 1",
        (found.incident_id, Jsonb({"attempt_id": found.id, "provider_id": call_id, "digit": digit})),
    ).fetchone()
    if seen:  # a key reported in both the call's progress and its result
        return ReceiptOutcome.DUPLICATE
    actor = person(conn, found.recipient_kind, found.recipient_id)
    if actor is None:
        log.warning("aliyun keypress on attempt %s, which paged nobody known: nothing done", found.id)
        return ReceiptOutcome.NOT_UNDERSTOOD
    if record_keypress(conn, found.id, found.incident_id, actor, call_id, digit, now, timeout) is None:
        return ReceiptOutcome.KEY_IGNORED
    return ReceiptOutcome.TAKEN if digit == "1" else ReceiptOutcome.DECLINED


def _voice_report(conn: Conn, item: VoiceReport, now: datetime, resolve_timeout_s: int) -> ReceiptOutcome:
    found = _attempt(conn, item.out_id, "voice", item.call_id, item.callee, now)
    current = _current(found)
    key = None
    if item.dtmf.strip():  # the result carries the key (as well as, or instead of, VoiceCallReport)
        key = _keypress(conn, found, item.call_id, item.dtmf, now, resolve_timeout_s)
        if key in (ReceiptOutcome.TAKEN, ReceiptOutcome.DECLINED):
            current = AttemptState.ANSWERED.value
    status, ending = VOICE_RESULTS.get(item.status_code, ("failed", AttemptState.FAILED))
    delivery = Delivery(
        found.id, found.incident_id, current, PROVIDER, "voice", item.call_id, status, ending, item.status_code
    )
    settled = _delivery(conn, delivery, now)
    return key if key in (ReceiptOutcome.TAKEN, ReceiptOutcome.DECLINED) else settled


def _voice_call_report(conn: Conn, item: VoiceCallReport, now: datetime, resolve_timeout_s: int) -> ReceiptOutcome:
    found = _attempt(conn, item.out_id, "voice", item.call_id, None, now)
    if item.status_code == KEYPRESS:
        return _keypress(conn, found, item.call_id, item.dtmf, now, resolve_timeout_s)
    status = CALL_PROGRESS.get(item.status_code, "progress")
    delivery = Delivery(
        found.id, found.incident_id, _current(found), PROVIDER, "voice", item.call_id, status, None, item.status_code
    )
    return _delivery(conn, delivery, now)


def _sms_report(conn: Conn, item: SmsReport, now: datetime) -> ReceiptOutcome:
    found = _attempt(conn, item.out_id, "sms", item.biz_id, item.phone_number, now)
    status, ending = ("delivered", AttemptState.DELIVERED) if item.success else ("failed", AttemptState.FAILED)
    error_code = None if item.success else item.err_code or None
    delivery = Delivery(
        found.id, found.incident_id, _current(found), PROVIDER, "sms", item.biz_id, status, ending, error_code
    )
    return _delivery(conn, delivery, now)


def _sms_up(conn: Conn, item: SmsUp, now: datetime, resolve_timeout_s: int) -> ReceiptOutcome:
    sender = address_from_aliyun(item.phone_number)
    outcome = take_sms_reply(conn, item.content, sender, f"smsup:{item.sequence_id}", now, resolve_timeout_s)
    if not outcome.paged:
        codes = len(parse_sms_reply(item.content))
        raise _Refused("no incident code in it paged this number" if codes else "no incident code in it")
    if outcome.going is None:
        log.info("aliyun SMS reply %s: no 1 or 2 after the code: nothing done", item.sequence_id)
        return ReceiptOutcome.NOT_UNDERSTOOD
    return ReceiptOutcome.TAKEN if outcome.going else ReceiptOutcome.DECLINED


def handle(conn: Conn, receipt: Receipt, now: datetime, *, resolve_timeout_s: int) -> ReceiptOutcome:
    """Do what one queued Aliyun receipt says, in the caller's transaction (the worker's savepoint).

    A refused item is audited in its own savepoint, so whatever its checks locked or
    wrote is undone first.
    """
    kind = ReceiptKind(receipt.kind)
    item = validate_item(kind, receipt.body)
    try:
        with conn.transaction():
            if isinstance(item, VoiceReport):
                return _voice_report(conn, item, now, resolve_timeout_s)
            if isinstance(item, VoiceCallReport):
                return _voice_call_report(conn, item, now, resolve_timeout_s)
            if isinstance(item, SmsReport):
                return _sms_report(conn, item, now)
            return _sms_up(conn, item, now, resolve_timeout_s)
    except _Refused as refused:
        reason = str(refused)
        log.warning("aliyun %s receipt %s refused: %s", kind, receipt.id, reason)
        detail = {"kind": kind.value, "receipt_id": receipt.id, "out_id": receipt.body.get("out_id")}
        audit_refused(conn, now, PROVIDER, f"provider_receipt:{receipt.id}", reason, detail)
        return ReceiptOutcome.REFUSED
