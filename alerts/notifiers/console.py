"""The console channel: an attempt the web consoles show from the incident feed.

Nothing leaves the building, so "sending" is recording; the live feed (SSE) reads
the attempt and its timeline entry from the database.
"""

from __future__ import annotations

from alerts.notifiers.base import Delivery, SendOutcome, SendResult
from devices.kinds import Channel


class ConsoleNotifier:
    channels = frozenset({Channel.CONSOLE})

    def send(self, delivery: Delivery) -> SendResult:
        return SendResult(SendOutcome.SENT, provider_id=f"console-{delivery.attempt_id}")
