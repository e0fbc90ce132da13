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
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qs

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import Response
from psycopg.rows import DictRow
from pydantic import BaseModel
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse
from twilio.twiml.voice_response import VoiceResponse

from alerts.answers import SMS_HELP, SmsReply, parse_sms_reply, person, record_keypress, take_sms_reply
from alerts.attempts import LockedAttempt, lock_attempt, take_provider_id
from alerts.delivery_status import Delivery, Settlement, record_delivery, settlement
from alerts.dispatch import attempt_by_id
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
from alerts.states import AttemptState
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

ASK_AGAIN = "未能识别您的按键。前往处置请按1，无法前往请按2。"
# Re-exported: the SMS reply's help text and parsing live in alerts/answers.py.
__all__ = ["SMS_CALLBACK_PATH", "SMS_HELP", "Settlement", "SmsReply", "parse_sms_reply", "router", "settle"]


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
        found = lock_attempt(conn, "id = %s", (attempt_id,))
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"attempt {attempt_id} not found")
        # A call still in flight (the router has not had Twilio's answer yet) has no sid
        # recorded: it takes the one Twilio signed for this attempt's keypress URL.
        known = found.provider_id == call_sid or (found.provider_id is None and found.in_flight)
        if found.channel != "voice" or not call_sid or not known:
            # Signed, but not this attempt's call: a replay onto another attempt.
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"call {call_sid!r} is not attempt {attempt_id}'s")
        actor = person(conn, found.recipient_kind, found.recipient_id)
        if actor is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"attempt {attempt_id} paged nobody known")
        answer = record_keypress(conn, attempt_id, found.incident_id, actor, call_sid, digit, now, timeout)
        return _ask_again(again) if answer is None else _say(answer)

    return Response(in_transaction(conn, work), media_type=TWIML)


# --- delivery and call status ----------------------------------------------------

CALL_FAILURES = {
    "busy": AttemptState.BUSY,
    "no-answer": AttemptState.NO_ANSWER,
    "failed": AttemptState.FAILED,
    "canceled": AttemptState.FAILED,
}
SMS_ENDINGS = {
    "delivered": AttemptState.DELIVERED,
    "undelivered": AttemptState.UNDELIVERED,
    "failed": AttemptState.FAILED,
}


def twilio_ending(channel: str, provider_status: str) -> AttemptState | None:
    """What a Twilio status ends an attempt as, or ``None`` (ringing, queued, sent…).

    A call ``completed`` without a keypress settling it (a voicemail, a hang-up) did
    not reach anyone: it fails like a busy line.
    """
    if channel == "voice":
        return AttemptState.NO_KEYPRESS if provider_status == "completed" else CALL_FAILURES.get(provider_status)
    return SMS_ENDINGS.get(provider_status)


def settle(channel: str, provider_status: str, current: str) -> Settlement | None:
    """The attempt's outcome from a Twilio status, or ``None``: the status only goes on the timeline."""
    return settlement(channel, twilio_ending(channel, provider_status), current)


class DeliveryStatusPublic(BaseModel):
    attempt_id: int | None
    state: str | None
    handled: Literal["settled", "recorded", "duplicate", "unknown"]
    """settled (the attempt's outcome); recorded (timeline only); duplicate (seen before); unknown sid."""
    follow_up: str | None = None
    """After a failure: retry, given_up, advanced (the next step paged now), or none."""


def _attempt_by_sid(conn: Conn, channel: str, sid: str, to: str, now: datetime) -> tuple[int, int, str] | None:
    """(id, incident, state) of the attempt ``sid`` reports on, locked (incident first).

    A status may overtake the router's record of the sid. While the send is in flight
    (leased, no sid yet) the one attempt in flight on this channel to ``to`` takes the
    sid and counts as sent; a router settling it right now is waited for.
    """
    where = "provider_id = %s AND channel = %s ORDER BY id DESC LIMIT 1"
    row: LockedAttempt | None = lock_attempt(conn, where, (sid, channel))
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
        row = lock_attempt(conn, where, (sid, channel))
        if row is None:
            flying = conn.execute(
                "SELECT id FROM notification_attempts WHERE state = 'pending' AND leased_by IS NOT NULL"
                " AND provider_id IS NULL AND channel = %s AND address = %s",
                (channel, to),
            ).fetchall()
            if len(flying) == 1:
                row = lock_attempt(conn, "id = %s", (flying[0][0],))
                if row is not None and row.provider_id is None and row.in_flight:
                    take_provider_id(conn, row.id, sid, now)
                    return row.id, row.incident_id, AttemptState.SENT.value
            # A settle that committed since the look above (nothing in flight any more)
            # has recorded the sid: look once more, or its status would be lost.
            row = lock_attempt(conn, where, (sid, channel))
    if row is None:
        return None
    found = conn.execute(
        "SELECT id, state FROM notification_attempts WHERE provider_id = %s AND channel = %s ORDER BY id DESC LIMIT 1",
        (sid, channel),
    ).fetchone()
    assert found is not None
    return int(found[0]), row.incident_id, str(found[1])


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
        ending = twilio_ending(channel, provider_status)
        delivery = Delivery(
            attempt_id, incident_id, current, PROVIDER, channel, sid, provider_status, ending, error_code
        )
        outcome = record_delivery(conn, delivery, now)
        if outcome.handled == "duplicate":
            log.info("status %r for %s %s seen before: ignored", provider_status, channel, sid)
        return DeliveryStatusPublic(
            attempt_id=attempt_id, state=outcome.state, handled=outcome.handled, follow_up=outcome.follow_up
        )

    return in_transaction(conn, work)


# --- SMS replies -----------------------------------------------------------------


@router.post(SMS_CALLBACK_PATH, response_class=Response, responses=REFUSED)
def receive_sms_reply(form: SignedForm, conn: ConnDep, now: Now, settings: SettingsDep) -> Response:
    """An SMS reply: the incident's code, then 1 (going, the default) or 2 (cannot)."""
    sender = form.get("From", "").strip()
    message_sid = form.get("MessageSid", "")
    timeout = settings.resolve_timeout_s

    def work(conn: Conn) -> str:
        outcome = take_sms_reply(conn, form.get("Body", ""), sender, message_sid, now, timeout)
        if outcome.going is None:
            # The same answer for an unknown phone and an unknown code: neither is disclosed.
            log.info("SMS %s: no 1 or 2 after an incident code this sender was paged for: help sent", message_sid)
        return outcome.text

    return Response(_sms(in_transaction(conn, work)), media_type=TWIML)
