"""A provider's word on how a call or an SMS went: settle the attempt, or only note it on the timeline.

Each provider names its statuses its own way; its route (Twilio's
``api/routes/callbacks.py``) or receipt handler (``alerts/aliyun_receipts.py``) maps
them to an *ending* — one of the attempt states below — or to none (an intermediate
status such as ringing). :func:`record_delivery` does the rest the same for every
provider, in the caller's transaction with the incident locked: a status seen
before is a duplicate; only an attempt still waiting for its outcome is settled, so
a late, repeated or out-of-order status never moves it again; a failure is retried
or given up (``alerts/retry.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from psycopg.types.json import Jsonb

from alerts.attempts import record_status
from alerts.retry import after_failure
from alerts.states import AttemptState
from alerts.timeline import add_event
from shouhu.db import Conn

__all__ = ["ENDINGS", "UNSETTLED", "Delivery", "DeliveryOutcome", "Settlement", "record_delivery", "settlement"]

# Attempts still waiting for their outcome; any other state is settled for good.
UNSETTLED = frozenset({AttemptState.SENT.value, AttemptState.ANSWERED.value})
# What a status may settle an attempt as.
ENDINGS = frozenset(
    {
        AttemptState.DELIVERED,
        AttemptState.UNDELIVERED,
        AttemptState.FAILED,
        AttemptState.BUSY,
        AttemptState.NO_ANSWER,
        AttemptState.NO_KEYPRESS,
    }
)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a provider's status makes of an attempt."""

    state: str
    failed: bool  # retried, or the channel given up (alerts.retry)


def settlement(channel: str, ending: AttemptState | None, current: str) -> Settlement | None:
    """The attempt's outcome from a status's ``ending``, or ``None``: the status only goes on the timeline.

    Only an attempt still waiting for its outcome is settled. A call whose person
    pressed 1 or 2 (``answered``) has done its work: how it ended changes nothing.
    """
    if current not in UNSETTLED or ending is None:
        return None
    assert ending in ENDINGS, ending
    if channel == "voice" and current == AttemptState.ANSWERED:
        return None
    return Settlement(ending.value, failed=ending is not AttemptState.DELIVERED)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One status of one attempt, as a provider reported it."""

    attempt_id: int
    incident_id: int
    current: str  # the attempt's state as read under its lock ("sent" while in flight)
    provider: str
    channel: str
    provider_id: str
    status: str  # the provider's status in words: the timeline's event name, the duplicate check
    ending: AttemptState | None
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    state: str
    handled: Literal["settled", "recorded", "duplicate"]
    follow_up: str | None = None  # after a failure: retry, given_up, advanced, or none


def _event_name(status: str, settled: Settlement | None) -> str:
    if settled is not None and settled.state == AttemptState.NO_KEYPRESS:
        return "delivery_no_keypress"
    return "delivery_" + (re.sub(r"[^a-z]+", "_", status) or "unknown")


def record_delivery(conn: Conn, delivery: Delivery, now: datetime) -> DeliveryOutcome:
    """Settle the attempt from ``delivery`` (or note it on the timeline), once per status."""
    seen = conn.execute(
        "SELECT 1 FROM incident_events WHERE incident_id = %s AND event LIKE 'delivery%%' AND detail @> %s LIMIT 1",
        (delivery.incident_id, Jsonb({"attempt_id": delivery.attempt_id, "status": delivery.status})),
    ).fetchone()
    if seen:
        return DeliveryOutcome(delivery.current, "duplicate")
    settled = settlement(delivery.channel, delivery.ending, delivery.current)
    state = delivery.current if settled is None else settled.state
    if settled is not None:
        error = None
        if settled.failed:
            code = f" (error {delivery.error_code})" if delivery.error_code else ""
            error = f"{delivery.provider}: {delivery.status}{code}"
        record_status(conn, delivery.attempt_id, AttemptState(state), error, now)
    add_event(
        conn,
        delivery.incident_id,
        now,
        _event_name(delivery.status, settled),
        delivery.provider,
        {
            "attempt_id": delivery.attempt_id,
            "provider_id": delivery.provider_id,
            "channel": delivery.channel,
            "status": delivery.status,
            "state": state,
            "error_code": delivery.error_code,
        },
    )
    if settled is None:
        return DeliveryOutcome(state, "recorded")
    follow_up = after_failure(conn, delivery.attempt_id, now) if settled.failed else None
    return DeliveryOutcome(state, "settled", follow_up)
