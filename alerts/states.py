"""The states of incidents, escalation actions and notification attempts, defined once.

Python code compares against these enums, never bare strings. SQL takes a state as a
parameter, or written out from the enum (``f"state = '{AttemptState.PENDING}'"``, or a
list from :func:`sql_in` such as :data:`OPEN_SQL`) where the query must match a partial
index's predicate: an ``ON CONFLICT`` target repeats it word for word, and a claim of
due rows must be provably inside it, which a parameter is not (a generic plan).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from devices.kinds import IncidentState

__all__ = [
    "ACTIVE",
    "CLOSED",
    "FAILED",
    "OPEN",
    "OPEN_SQL",
    "ActionKind",
    "ActionState",
    "AttemptState",
    "IncidentState",
    "sql_in",
]


class ActionState(StrEnum):
    """An ``escalation_actions`` row: waiting, run, or retired without running."""

    PENDING = "pending"
    DONE = "done"
    CANCELLED = "cancelled"  # the escalation stopped (acknowledged, resolved, cancelled)
    STALE = "stale"  # its fencing token is older than the incident's


class ActionKind(StrEnum):
    STEP = "step"  # run step ``step`` of round ``round``
    RESOLVE_CHECK = "resolve_check"  # acknowledged but not resolved in time: back on the chain


class AttemptState(StrEnum):
    """A ``notification_attempts`` row. ``pending`` includes an attempt leased by a sender (in flight)."""

    PENDING = "pending"
    SENT = "sent"
    DELIVERED = "delivered"
    ANSWERED = "answered"
    FAILED = "failed"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    NO_KEYPRESS = "no_keypress"
    UNDELIVERED = "undelivered"
    CANCELLED = "cancelled"


# An incident is open until resolved or cancelled; it escalates while active.
OPEN: tuple[IncidentState, ...] = (IncidentState.OPEN, IncidentState.ACKNOWLEDGED, IncidentState.UNREACHED)
ACTIVE: tuple[IncidentState, ...] = (IncidentState.OPEN, IncidentState.UNREACHED)
CLOSED: tuple[IncidentState, ...] = (IncidentState.RESOLVED, IncidentState.CANCELLED)
# A delivery that did not reach its person (alerts/retry.py retries it or gives it up).
FAILED: frozenset[AttemptState] = frozenset(
    {AttemptState.FAILED, AttemptState.BUSY, AttemptState.NO_ANSWER, AttemptState.NO_KEYPRESS, AttemptState.UNDELIVERED}
)


def sql_in(states: Iterable[StrEnum]) -> str:
    """``('a', 'b')`` for ``state IN …``: a literal list from enum values (never user input)."""
    return "(" + ", ".join(f"'{s.value}'" for s in states) + ")"


OPEN_SQL = sql_in(OPEN)
