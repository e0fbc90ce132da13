"""A paged person's answer by phone — a keypress or an SMS reply — whichever provider carried it.

Twilio's callbacks (``api/routes/callbacks.py``) and Aliyun's receipts
(``alerts/aliyun_receipts.py``) find the attempt or the sender their own way, then
hand the answer here: 1 takes the incident, 2 declines it, through
:mod:`alerts.acknowledge`, audited like the API's acknowledgements. Each runs in the
caller's transaction; the incident is locked first (the lock order of
``alerts/attempts.py``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from psycopg.types.json import Jsonb

from alerts.acknowledge import Actor, Result, acknowledge, decline
from alerts.attempts import lock_incident, mark_answered, take_provider_id
from alerts.incidents import CODE_ALPHABET, CODE_LENGTH
from alerts.states import IncidentState
from alerts.timeline import add_event
from shouhu.db import Conn

__all__ = [
    "CANNOT",
    "CLOSED",
    "GOING",
    "SMS_HELP",
    "ReplyOutcome",
    "SmsReply",
    "act",
    "paged_for",
    "parse_sms_reply",
    "person",
    "record_keypress",
    "take_sms_reply",
]

GOING = "已确认，您已接单，请尽快前往。"
CANNOT = "已记录，您无法前往，我们将继续联系他人。"
CLOSED = "此事件已结束，无需前往。"
SMS_HELP = "【守护】未能识别您的回复。请按短信提示回复：事件编号 1 接单，事件编号 2 无法前往。"
# The keys of a page call that reach the person: 1 going, 2 cannot.
ANSWER_KEYS = ("1", "2")


def person(conn: Conn, kind: str, person_id: str) -> Actor | None:
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


def act(
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


def record_keypress(
    conn: Conn,
    attempt_id: int,
    incident_id: int,
    actor: Actor,
    provider_id: str,
    digit: str,
    now: datetime,
    resolve_timeout_s: int,
) -> str | None:
    """A key pressed on the page call ``attempt_id`` (locked, incident first): what the person is told.

    The call takes ``provider_id`` if its sid is not recorded yet (still in flight).
    Only 1 or 2 reaches the person: the call is answered and the incident taken or
    declined. Any other key (5, #, nothing) goes on the timeline only, and ``None`` is
    returned: the call is unsettled, and if it ends without 1 or 2 it is not reached
    and retried.
    """
    take_provider_id(conn, attempt_id, provider_id, now)
    if digit in ANSWER_KEYS:
        mark_answered(conn, attempt_id, now)
    detail = {"attempt_id": attempt_id, "provider_id": provider_id, "digit": digit}
    add_event(conn, incident_id, now, "keypress", actor.key, detail)
    if digit not in ANSWER_KEYS:
        return None
    return act(conn, incident_id, actor, digit == "1", "voice", now, resolve_timeout_s)


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


def paged_for(conn: Conn, code: str, phone: str) -> tuple[int, str, Actor] | None:
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
    actor = person(conn, row[2], row[3])
    return (int(row[0]), str(row[1]), actor) if actor else None


@dataclass(frozen=True, slots=True)
class ReplyOutcome:
    """What an SMS reply did: the answer to text back, and whether it named a page to its sender."""

    text: str
    paged: bool  # a code in it is an incident that paged the sender
    going: bool | None = None  # taken (True), declined (False), or nothing done (None)
    incident_id: int | None = None


def take_sms_reply(
    conn: Conn, body: str, sender: str, provider_id: str, now: datetime, resolve_timeout_s: int
) -> ReplyOutcome:
    """An SMS reply from ``sender`` (an E.164 number): the first code in it that paged them is acted on.

    A reply naming no incident that paged the sender changes nothing: the same help
    text answers an unknown phone and an unknown code, so neither is disclosed.
    """
    for reply in parse_sms_reply(body):
        found = paged_for(conn, reply.code, sender)
        if found is None:
            continue
        incident_id, code, actor = found
        if reply.going is None:
            return ReplyOutcome(SMS_HELP, paged=True, incident_id=incident_id)
        lock_incident(conn, incident_id)  # before the timeline's insert: incident → attempts
        add_event(
            conn, incident_id, now, "sms_reply", actor.key, {"provider_id": provider_id, "digit": reply.digits or "1"}
        )
        text = f"【守护】{code} " + act(conn, incident_id, actor, reply.going, "sms", now, resolve_timeout_s)
        return ReplyOutcome(text, paged=True, going=reply.going, incident_id=incident_id)
    return ReplyOutcome(SMS_HELP, paged=False)
