"""What the emergency platform (应急呼叫平台) is told: the interface between the router
and the emergency-platform notifier (``alerts/notifiers/webhook.py``).

Unlike a grid worker's SMS, the platform gets the whole picture a dispatcher needs:
the resident, address, location, medical notes, and who was tried and when
(DESIGN.md, "Escalation", step 3). It is sent as a CAP 1.2 alert; later changes to
the incident are CAP ``Update`` or ``Cancel`` messages referencing the first alert.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from alerts.notifiers.base import SendResult


class CapMsgType(StrEnum):
    ALERT = "Alert"
    UPDATE = "Update"
    CANCEL = "Cancel"


@dataclass(frozen=True, slots=True)
class TriedContact:
    """One earlier notification attempt, for the dispatcher."""

    name: str
    role: str  # grid_worker, guardian, duty_officer, operator, …
    channel: str  # voice, sms
    at: datetime
    outcome: str  # sent, failed, declined, no_answer, …


@dataclass(frozen=True, slots=True)
class PlatformAlert:
    """One CAP message about one incident.

    ``identifier`` is unique per CAP message (the first alert's identifier is kept
    by the router and passed as ``references`` for Update and Cancel).
    """

    identifier: str
    msg_type: CapMsgType
    sent: datetime  # timezone-aware; CAP times carry an offset, no fractional seconds
    exercise: bool  # the demo: CAP status Exercise instead of Actual
    incident_id: int
    incident_code: str
    incident_kind: str  # sos, fall, sos_unregistered
    opened_at: datetime
    state: str  # open, unreached, acknowledged, resolved, cancelled
    resident_name: str
    address: str
    phone: str | None
    lat: float | None
    lon: float | None
    medical_notes: str
    area_name: str
    tried: tuple[TriedContact, ...]
    note: str = ""  # for Update/Cancel: who acknowledged, the outcome, the cancel reason
    references: tuple[tuple[str, datetime], ...] = ()  # earlier (identifier, sent) pairs


class PlatformNotifier(Protocol):
    """Delivers CAP messages to the emergency platform; never raises for a delivery failure."""

    def send_alert(self, alert: PlatformAlert) -> SendResult:
        """POST one CAP message, retrying transient failures; the 2xx reply is the receipt."""
        ...
