"""Twilio's callbacks: keypresses, call and SMS status, SMS replies (DESIGN.md "Acknowledging").

Outside the bearer-token API: Twilio holds no token. A request proves it is
Twilio's by ``X-Twilio-Signature``, an HMAC under the account's auth token of the
public URL it was sent to (``SHOUHU_PUBLIC_URL`` + path + query) and its form
fields. A request that fails the check is answered 403 before anything is read or
written. While no auth token is configured, every request is refused, because
an empty key would let anyone sign.

Each request does its database work in one transaction, taking the incident's row
first (the lock order of ``alerts/attempts.py``). The router commits a call's sid
only once Twilio's 201 is back, and Twilio may call back before that; no lock is
held across that send, so nothing here waits for it. A keypress (its URL names the
attempt) or a status (the one attempt in flight to that number) for an attempt still
in flight records the sid Twilio gives it. Neither is lost to that race, and neither
waits on another channel.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qs

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import Response
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb
from pydantic import BaseModel
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse
from twilio.twiml.voice_response import VoiceResponse

from alerts.acknowledge import Actor, Result, acknowledge, decline
from alerts.attempts import lock_incident, mark_answered, record_status, take_provider_id
from alerts.dispatch import attempt_by_id
from alerts.incidents import CODE_ALPHABET, CODE_LENGTH
from alerts.notifiers.text import plain_text
from alerts.notifiers.twilio import (
    GATHER_TIMEOUT_S,
    KEYPRESS_CALLBACK_PATH,
    SAY_LANGUAGE,
    SAY_VOICE,
    STATUS_CALLBACK_PATH,
    VOICE_CALLBACK_PATH,
    keypress_url,
    voice_twiml,
)
from alerts.retry import after_failure
from alerts.states import AttemptState, IncidentState
from alerts.timeline import add_event
from api.deps import ConnDep, Now, SettingsDep, tuple_rows
from api.limits import storable_text
from devices.kinds import Channel
from shouhu.db import Conn

log = logging.getLogger(__name__)

T = TypeVar("T")

# The Twilio number's inbound-SMS webhook ("A message comes in"), set on the number.
SMS_CALLBACK_PATH = "/callbacks/twilio/sms"
# Every route here: their form bodies skip the request limits' text check (api/limits.py),
# because a provider cannot correct a reply; signed_form cleans the fields instead.
CALLBACK_PATHS = frozenset({SMS_CALLBACK_PATH, KEYPRESS_CALLBACK_PATH, STATUS_CALLBACK_PATH, VOICE_CALLBACK_PATH})
# A deadlock with a router (each holding a row the other wants) aborts one side;
# the callback's whole transaction is simply run again.
TRANSACTION_TRIES = 3
TWIML = "text/xml"
PROVIDER = "twilio"

router = APIRouter(tags=["callbacks"])

REFUSED: dict[int | str, dict[str, Any]] = {
    status.HTTP_403_FORBIDDEN: {"description": "Not signed by Twilio with the configured auth token."}
}

GOING = "已确认，您已接单，请尽快前往。"
CANNOT = "已记录，您无法前往，我们将继续联系他人。"
CLOSED = "此事件已结束，无需前往。"
ASK_AGAIN = "未能识别您的按键。前往处置请按1，无法前往请按2。"
SMS_HELP = "【守护】未能识别您的回复。请按短信提示回复：事件编号 1 接单，事件编号 2 无法前往。"


# --- the signature ---------------------------------------------------------------


def signed_url(request: Request, public_url: str) -> str:
    """The URL Twilio signed: the public URL, the path and the query, as Twilio was given them."""
    query = request.url.query
    return public_url.rstrip("/") + request.url.path + (f"?{query}" if query else "")


async def signed_form(request: Request, settings: SettingsDep) -> dict[str, str]:
    """The request's form fields once ``X-Twilio-Signature`` proves Twilio sent them; 403 otherwise.

    The signature is checked over the fields exactly as Twilio signed them. Only then
    is text PostgreSQL cannot hold (a NUL byte in an SMS body) dropped from them: the
    request limits let these routes' form bodies through for that (``api/limits.py``),
    because refusing a provider's callback would lose the acknowledgement it carries.
    """
    # Parsed here, as the phone simulator does: no multipart package is needed.
    fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    form = {name: values[0] for name, values in fields.items()}
    token = settings.twilio_auth_token
    if not token:
        log.error("refused a callback to %s: no Twilio auth token is configured", request.url.path)
        raise HTTPException(status.HTTP_403_FORBIDDEN, "callbacks are refused: no Twilio auth token is configured")
    signature = request.headers.get("X-Twilio-Signature", "")
    if not signature or not RequestValidator(token).validate(signed_url(request, settings.public_url), form, signature):
        log.warning("refused a callback to %s: X-Twilio-Signature missing or wrong", request.url.path)
        raise HTTPException(status.HTTP_403_FORBIDDEN, "X-Twilio-Signature is missing or does not match")
    return {storable_text(name): storable_text(value) for name, value in form.items()}


SignedForm = Annotated[dict[str, str], Depends(signed_form)]


# --- shared ----------------------------------------------------------------------


def in_transaction(conn: psycopg.Connection[DictRow], work: Callable[[Conn], T]) -> T:
    """Run ``work`` in one transaction with tuple rows; a deadlock runs it again from the start."""
    for attempt in range(1, TRANSACTION_TRIES + 1):
        try:
            with conn.transaction(), tuple_rows(conn) as plain:
                return work(plain)
        except psycopg.errors.DeadlockDetected:
            if attempt == TRANSACTION_TRIES:
                raise
            log.warning("a callback's transaction deadlocked (try %s of %s): run again", attempt, TRANSACTION_TRIES)
    raise AssertionError("unreachable")


def _person(conn: Conn, kind: str, person_id: str) -> Actor | None:
    """The staff member or guardian an attempt paged, as who acts."""
    if kind == "staff":
        row = conn.execute("SELECT name, phone, role FROM staff WHERE id = %s", (person_id,)).fetchone()
        return Actor("staff", person_id, row[0], row[1], row[2]) if row else None
    if kind == "guardian":
        row = conn.execute("SELECT name, phone FROM guardians WHERE id = %s", (person_id,)).fetchone()
        return Actor("guardian", person_id, row[0], row[1], "guardian") if row else None
    return None


def _answer(conn: Conn, incident_id: int, actor: Actor, going: bool, result: Result) -> str:
    """What the person is told: taken, declined, or who took it first."""
    if result in (Result.DONE, Result.ALREADY):
        return GOING if going else CANNOT
    row = conn.execute(
        "SELECT state, acknowledged_by, acknowledged_by_name FROM incidents WHERE id = %s", (incident_id,)
    ).fetchone()
    assert row is not None
    state, taken_by, taken_by_name = row
    if state == IncidentState.ACKNOWLEDGED:
        return "此事件已由您接单。" if taken_by == actor.key else f"此事件已由{taken_by_name}接单，无需前往。"
    return CLOSED


def _act(
    conn: Conn, incident_id: int, actor: Actor, going: bool, via: str, now: datetime, resolve_timeout_s: int
) -> str:
    """Acknowledge or decline as ``actor``, audited like the API's acknowledgements; returns the answer."""
    if going:
        result = acknowledge(conn, incident_id, actor, via, now, resolve_timeout_s=resolve_timeout_s)
    else:
        result = decline(conn, incident_id, actor, via, now)
    conn.execute(
        "INSERT INTO audit_log (at, token_id, role, action, subject, detail, actor, actor_name)"
        " VALUES (%s, NULL, %s, %s, %s, %s, %s, %s)",
        (
            now,
            actor.role,
            "acknowledge" if going else "decline",
            f"incident:{incident_id}",
            Jsonb({"result": result.value, "via": via, "actor": actor.key}),
            actor.key,
            actor.label,
        ),
    )
    return _answer(conn, incident_id, actor, going, result)


def _say(text: str) -> str:
    response = VoiceResponse()
    response.say(plain_text(text), language=SAY_LANGUAGE, voice=SAY_VOICE)
    xml: str = response.to_xml()
    return xml


def _ask_again(action: str) -> str:
    response = VoiceResponse()
    gather = response.gather(action=action, method="POST", num_digits=1, timeout=GATHER_TIMEOUT_S)
    gather.say(ASK_AGAIN, language=SAY_LANGUAGE, voice=SAY_VOICE)
    xml: str = response.to_xml()
    return xml


def _sms(text: str) -> str:
    response = MessagingResponse()
    response.message(plain_text(text))
    xml: str = response.to_xml()
    return xml


# --- the call's TwiML, when the call was placed by URL -------------------------------

# Said when the URL names no page of ours: never a silent call (the SMS carries the rest).
UNKNOWN_CALL = "守护紧急呼叫。请查看短信，并按短信提示回复。"


@router.post(VOICE_CALLBACK_PATH, response_class=Response, responses=REFUSED)
def read_call_twiml(request: Request, form: SignedForm, conn: ConnDep, settings: SettingsDep) -> Response:
    """What a page call says, for a call placed with ``Url``: the same TwiML the router sends inline."""
    try:
        attempt_id = int(request.query_params.get("attempt", ""))
    except ValueError:
        attempt_id = 0
    with tuple_rows(conn) as plain:
        attempt = attempt_by_id(plain, attempt_id) if attempt_id else None
    if attempt is None or attempt.channel is not Channel.VOICE:
        log.warning("TwiML asked for call %s naming no voice attempt (%r)", form.get("CallSid"), attempt_id)
        return Response(_say(UNKNOWN_CALL), media_type=TWIML)
    twiml = voice_twiml(attempt.message(), keypress_url=keypress_url(settings.public_url, attempt.id))
    return Response(twiml, media_type=TWIML)


# --- the keypress ----------------------------------------------------------------


@router.post(
    KEYPRESS_CALLBACK_PATH,
    response_class=Response,
    responses={**REFUSED, status.HTTP_404_NOT_FOUND: {"description": "No such attempt."}},
)
def receive_keypress(request: Request, form: SignedForm, conn: ConnDep, now: Now, settings: SettingsDep) -> Response:
    """A digit pressed on a page call: 1 = going (acknowledges), 2 = cannot (declines)."""
    try:
        attempt_id = int(request.query_params.get("attempt", ""))
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no attempt named in the keypress URL") from None
    call_sid = form.get("CallSid", "")
    digit = form.get("Digits", "").strip()
    timeout = settings.resolve_timeout_s
    again = signed_url(request, settings.public_url)

    def work(conn: Conn) -> str:
        row = _lock_attempt(conn, "id = %s", (attempt_id,))
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"attempt {attempt_id} not found")
        incident_id, channel, provider_id, kind, person_id, in_flight = row
        # A call still in flight (the router has not had Twilio's answer yet) has no sid
        # recorded: it takes the one Twilio signed for this attempt's keypress URL.
        known = provider_id == call_sid or (provider_id is None and in_flight)
        if channel != "voice" or not call_sid or not known:
            # Signed, but not this attempt's call: a replay onto another attempt.
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"call {call_sid!r} is not attempt {attempt_id}'s")
        actor = _person(conn, kind, person_id)
        if actor is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"attempt {attempt_id} paged nobody known")
        # A call still in flight takes the sid Twilio gave it (its record may come later).
        take_provider_id(conn, attempt_id, call_sid, now)
        # Only 1 or 2 reaches the person. Any other key (5, #, nothing) leaves the call
        # unsettled: if it then ends without 1 or 2 it is not reached, and retried.
        if digit in ("1", "2"):
            mark_answered(conn, attempt_id, now)
        detail = {"attempt_id": attempt_id, "provider_id": call_sid, "digit": digit}
        add_event(conn, incident_id, now, "keypress", actor.key, detail)
        if digit not in ("1", "2"):
            return _ask_again(again)
        return _say(_act(conn, incident_id, actor, digit == "1", "voice", now, timeout))

    return Response(in_transaction(conn, work), media_type=TWIML)


# --- delivery and call status ----------------------------------------------------

CALL_FAILURES = {"busy": "busy", "no-answer": "no_answer", "failed": "failed", "canceled": "failed"}
SMS_ENDINGS = {"delivered": "delivered", "undelivered": "undelivered", "failed": "failed"}
# Attempts still waiting for their outcome; any other state is settled for good.
UNSETTLED = frozenset({"sent", "answered"})


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a provider's status makes of an attempt."""

    state: str
    failed: bool  # retried, or the channel given up (alerts.retry)


def settle(channel: str, provider_status: str, current: str) -> Settlement | None:
    """The attempt's outcome from a provider status, or ``None``: the status only goes on the timeline.

    Only an attempt still waiting for its outcome is settled, so a late, repeated
    or out-of-order callback never moves it again. A call answered with no keypress
    (a voicemail) did not reach anyone: it fails like a busy line.
    """
    if current not in UNSETTLED:
        return None
    if channel == "voice":
        if current == "answered":
            return None  # the keypress reached us: the call has done its work
        if provider_status == "completed":
            return Settlement("no_keypress", failed=True)
        ending = CALL_FAILURES.get(provider_status)
        return Settlement(ending, failed=True) if ending else None
    ending = SMS_ENDINGS.get(provider_status)
    return Settlement(ending, failed=ending != "delivered") if ending else None


class DeliveryStatusPublic(BaseModel):
    attempt_id: int | None
    state: str | None
    handled: Literal["settled", "recorded", "duplicate", "unknown"]
    """settled (the attempt's outcome); recorded (timeline only); duplicate (seen before); unknown sid."""
    follow_up: str | None = None
    """After a failure: retry, given_up, advanced (the next step paged now), or none."""


def _lock_attempt(conn: Conn, where: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The attempt found by ``where``, locked in the lock order: its incident first, then it.

    (incident, channel, provider id, recipient kind, recipient id, in flight). No lock
    is waited for while a provider is called: a router holds none across its send.
    """
    found = conn.execute(f"SELECT id, incident_id FROM notification_attempts WHERE {where}", params).fetchone()
    if found is None:
        return None
    lock_incident(conn, int(found[1]))
    return conn.execute(
        "SELECT incident_id, channel, provider_id, recipient_kind, recipient_id,"
        " state = 'pending' AND leased_by IS NOT NULL FROM notification_attempts WHERE id = %s FOR UPDATE",
        (found[0],),
    ).fetchone()


def _attempt_by_sid(conn: Conn, channel: str, sid: str, to: str, now: datetime) -> tuple[Any, ...] | None:
    """(id, incident, state) of the attempt ``sid`` reports on, locked (incident first).

    A status may overtake the router's record of the sid. While the send is in flight
    (leased, no sid yet) the one attempt in flight on this channel to ``to`` takes the
    sid and counts as sent; a router settling it right now is waited for.
    """
    where = "provider_id = %s AND channel = %s ORDER BY id DESC LIMIT 1"
    row = _lock_attempt(conn, where, (sid, channel))
    if row is None and to:
        # Wait for the transactions holding that number's pending attempts (a claim or a
        # settle, never a send), holding no other lock meanwhile, and let go of those
        # rows before looking again.
        with conn.transaction(force_rollback=True):
            conn.execute(
                "SELECT id FROM notification_attempts WHERE state = 'pending' AND channel = %s AND address = %s"
                " FOR SHARE",
                (channel, to),
            )
        row = _lock_attempt(conn, where, (sid, channel))
        if row is None:
            flying = conn.execute(
                "SELECT id FROM notification_attempts WHERE state = 'pending' AND leased_by IS NOT NULL"
                " AND provider_id IS NULL AND channel = %s AND address = %s",
                (channel, to),
            ).fetchall()
            if len(flying) == 1:
                row = _lock_attempt(conn, "id = %s", (flying[0][0],))
                if row is not None and row[2] is None and row[5]:
                    take_provider_id(conn, flying[0][0], sid, now)
                    return flying[0][0], row[0], "sent"
            # A settle that committed since the look above (nothing in flight any more)
            # has recorded the sid: look once more, or its status would be lost.
            row = _lock_attempt(conn, where, (sid, channel))
    if row is None:
        return None
    found = conn.execute(
        "SELECT id, state FROM notification_attempts WHERE provider_id = %s AND channel = %s ORDER BY id DESC LIMIT 1",
        (sid, channel),
    ).fetchone()
    assert found is not None
    return found[0], row[0], found[1]


def _event_name(provider_status: str, settlement: Settlement | None) -> str:
    if settlement is not None and settlement.state == "no_keypress":
        return "delivery_no_keypress"
    return "delivery_" + (re.sub(r"[^a-z]+", "_", provider_status) or "unknown")


@router.post(STATUS_CALLBACK_PATH, responses=REFUSED)
def receive_delivery_status(form: SignedForm, conn: ConnDep, now: Now) -> DeliveryStatusPublic:
    """An SMS's or a call's progress: delivered, answered, busy, no answer, failed."""
    if form.get("MessageSid"):
        channel, sid = "sms", form["MessageSid"]
        provider_status = form.get("MessageStatus") or form.get("SmsStatus") or ""
    elif form.get("CallSid"):
        channel, sid, provider_status = "voice", form["CallSid"], form.get("CallStatus", "")
    else:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "neither MessageSid nor CallSid given")
    provider_status = provider_status.strip().lower()
    if not provider_status:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "no MessageStatus or CallStatus given")
    error_code = form.get("ErrorCode") or None

    def work(conn: Conn) -> DeliveryStatusPublic:
        row = _attempt_by_sid(conn, channel, sid, form.get("To", ""), now)
        if row is None:
            # 200 all the same: an error would only make Twilio try again.
            log.warning("status %r for unknown %s %s: nothing to update", provider_status, channel, sid)
            return DeliveryStatusPublic(attempt_id=None, state=None, handled="unknown")
        attempt_id, incident_id, current = row
        seen = conn.execute(
            "SELECT 1 FROM incident_events WHERE incident_id = %s AND event LIKE 'delivery%%' AND detail @> %s LIMIT 1",
            (incident_id, Jsonb({"attempt_id": attempt_id, "status": provider_status})),
        ).fetchone()
        if seen:
            log.info("status %r for %s %s seen before: ignored", provider_status, channel, sid)
            return DeliveryStatusPublic(attempt_id=attempt_id, state=current, handled="duplicate")
        settlement = settle(channel, provider_status, current)
        state = current if settlement is None else settlement.state
        if settlement is not None:
            error = None
            if settlement.failed:
                error = f"{PROVIDER}: {provider_status}" + (f" (error {error_code})" if error_code else "")
            record_status(conn, attempt_id, AttemptState(state), error, now)
        add_event(
            conn,
            incident_id,
            now,
            _event_name(provider_status, settlement),
            PROVIDER,
            {
                "attempt_id": attempt_id,
                "provider_id": sid,
                "channel": channel,
                "status": provider_status,
                "state": state,
                "error_code": error_code,
            },
        )
        if settlement is None:
            return DeliveryStatusPublic(attempt_id=attempt_id, state=state, handled="recorded")
        follow_up = after_failure(conn, attempt_id, now) if settlement.failed else None
        return DeliveryStatusPublic(attempt_id=attempt_id, state=state, handled="settled", follow_up=follow_up)

    return in_transaction(conn, work)


# --- SMS replies -----------------------------------------------------------------

_TOKEN = re.compile(r"[0-9A-Z]+")


@dataclass(frozen=True, slots=True)
class SmsReply:
    """An incident code found in an SMS, and the digits that follow it ("" for none)."""

    code: str
    digits: str

    @property
    def going(self) -> bool | None:
        """1 or nothing: going; 2: cannot; anything else: not understood."""
        return {"": True, "1": True, "2": False}.get(self.digits)


def _is_code(token: str) -> bool:
    return len(token) == CODE_LENGTH and all(char in CODE_ALPHABET for char in token)


def parse_sms_reply(body: str) -> list[SmsReply]:
    """Every incident code in an SMS reply, in order, each with the digits after it.

    Case and full-width characters do not matter, and the digit may follow the code
    directly: "k7p2q 1", "收到K7P2Q，2", "Ｋ７Ｐ２Ｑ１".
    """
    tokens = _TOKEN.findall(unicodedata.normalize("NFKC", body).upper())
    replies: list[SmsReply] = []
    for index, token in enumerate(tokens):
        if len(token) == CODE_LENGTH + 1 and token[-1].isdigit() and _is_code(token[:-1]):
            replies.append(SmsReply(token[:-1], token[-1]))
        elif _is_code(token):
            following = tokens[index + 1] if index + 1 < len(tokens) else ""
            replies.append(SmsReply(token, following if following.isdigit() else ""))
    return replies


def _paged_for(conn: Conn, code: str, phone: str) -> tuple[int, str, Actor] | None:
    """The incident with ``code`` and the staff member or guardian at ``phone`` it paged, if any."""
    row = conn.execute(
        """
        SELECT i.id, i.code, a.recipient_kind, a.recipient_id FROM incidents i
        JOIN notification_attempts a ON a.incident_id = i.id
        WHERE i.code = %s AND a.address = %s AND a.purpose IN ('page', 'repage')
          AND a.recipient_kind IN ('staff', 'guardian')
        ORDER BY a.id LIMIT 1
        """,
        (code, phone),
    ).fetchone()
    if row is None:
        return None
    actor = _person(conn, row[2], row[3])
    return (int(row[0]), str(row[1]), actor) if actor else None


@router.post(SMS_CALLBACK_PATH, response_class=Response, responses=REFUSED)
def receive_sms_reply(form: SignedForm, conn: ConnDep, now: Now, settings: SettingsDep) -> Response:
    """An SMS reply: the incident's code, then 1 (going, the default) or 2 (cannot)."""
    sender = form.get("From", "").strip()
    message_sid = form.get("MessageSid", "")
    replies = parse_sms_reply(form.get("Body", ""))
    timeout = settings.resolve_timeout_s

    def work(conn: Conn) -> str:
        for reply in replies:
            found = _paged_for(conn, reply.code, sender)
            if found is None:
                continue
            incident_id, code, actor = found
            if reply.going is None:
                log.info("SMS %s: %s followed by %r, neither 1 nor 2: help sent", message_sid, code, reply.digits)
                return SMS_HELP
            lock_incident(conn, incident_id)  # before the timeline's insert: incident → attempts
            add_event(
                conn,
                incident_id,
                now,
                "sms_reply",
                actor.key,
                {"provider_id": message_sid, "digit": reply.digits or "1"},
            )
            return f"【守护】{code} " + _act(conn, incident_id, actor, reply.going, "sms", now, timeout)
        # The same answer for an unknown phone and an unknown code: neither is disclosed.
        log.info("SMS %s: no incident code this sender was paged for: help sent", message_sid)
        return SMS_HELP

    return Response(_sms(in_transaction(conn, work)), media_type=TWIML)
