"""The notifier interface: the router hands an attempt to a notifier and records the result.

Another provider (a domestic SMS gateway, say) implements the same protocol; the
router does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from devices.kinds import Channel


class Provider(StrEnum):
    """Who carries a phone page: the notifiers for voice and SMS each belong to one."""

    TWILIO = "twilio"
    ALIYUN = "aliyun"


class SendOutcome(StrEnum):
    SENT = "sent"  # the provider accepted it; delivery callbacks may follow
    FAILED = "failed"  # the provider refused it or could not be reached


@dataclass(frozen=True, slots=True)
class Message:
    """What a person is told: the minimum (PIPL) — no medical notes."""

    incident_id: int
    incident_code: str
    incident_kind: str
    resident_name: str
    address: str
    callback_number: str
    notice: str | None = None  # an information SMS (who took it, a cancel) instead of a page
    # The wristband or camera the incident is about: what names an unregistered band
    # or a camera, which have no resident. Empty when the sender does not know it.
    device_id: str = ""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One notification attempt to send: its key fields and where it goes."""

    attempt_id: int
    channel: Channel
    to: str
    message: Message


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: SendOutcome
    provider_id: str | None = None
    error: str | None = None
    final: bool = False  # a refusal that would be refused again (a 4xx): not retried
    # A failure retrying on this provider cannot fix (refused, 5xx, timeout, flow
    # control) but another provider may: the page goes out on the secondary provider.
    fall_back: bool = False


class Notifier(Protocol):
    """Sends deliveries on the channels it handles."""

    channels: frozenset[Channel]

    def send(self, delivery: Delivery) -> SendResult:
        """Send one delivery; never raises for a provider failure, returns FAILED."""
        ...
