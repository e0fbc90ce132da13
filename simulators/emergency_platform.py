"""An emergency call platform (应急呼叫平台) for tests and demos.

It receives what ``alerts/notifiers/webhook.py`` sends — ``POST /cap`` with a CAP 1.2
alert, signed as DESIGN.md's "The emergency-platform webhook" says — and checks it
the way a careful receiver would, in this order:

1. ``Content-Type`` is ``application/common-alerting-protocol+xml`` (else 415);
2. the three ``X-Shouhu-*`` headers are there and the signature matches, compared in
   constant time (else 401);
3. the timestamp is within 300 s of the platform's clock (else 401: a delivery held
   back and replayed later, or a clock badly off);
4. the delivery id has not been seen (else 409: a replay);
5. the body is a CAP 1.2 alert it can read (else 400, naming the problem);
6. the CAP (sender, identifier) is new: a second delivery of the same message (a
   retry whose first answer was lost) answers 200 with the first receipt and is not
   recorded again. A new message answers 202: received, not acknowledged.

Nothing is dispatched: each alert is recorded, announced on the terminal and listed
under ``/_sim/…``. ``POST /_sim/faults`` makes the next deliveries fail: ``error``
answers 503, ``timeout`` holds the answer for ``hang_s`` seconds and then handles the
delivery normally (as a slow platform does: the alert lands, the answer comes too
late for the sender), ``reject`` answers 400.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import requests
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

# The contract's names and the signature are written out again here on purpose, not
# imported from alerts/notifiers/webhook.py: the simulator plays the other party, and a
# mistake shared by both sides would pass every test.
CAP_NAMESPACE = "urn:oasis:names:tc:emergency:cap:1.2"
CAP_CONTENT_TYPE = "application/common-alerting-protocol+xml"
DELIVERY_HEADER = "X-Shouhu-Delivery"
TIMESTAMP_HEADER = "X-Shouhu-Timestamp"
SIGNATURE_HEADER = "X-Shouhu-Signature"
RECEIPT_HEADER = "X-Receipt-Id"
TIMESTAMP_TOLERANCE_S = 300
MAX_BODY_BYTES = 1_000_000
DEFAULT_HANG_S = 15.0  # longer than the notifier's default 10 s timeout
CAP_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[-+]\d\d:\d\d")
MSG_TYPES = frozenset({"Alert", "Update", "Cancel", "Ack", "Error"})

Fault = Literal["error", "timeout", "reject"]
Announce = Callable[[str], None]


class Refused(Exception):
    """A delivery the platform will not take, answered as ``{"error": reason}``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.reason}, status_code=self.status)


@dataclass(frozen=True, slots=True)
class Reference:
    sender: str
    identifier: str
    sent: str


@dataclass(frozen=True, slots=True)
class CapSummary:
    """What the platform reads out of a CAP alert."""

    identifier: str
    sender: str
    sent: str
    status: str
    msg_type: str
    scope: str
    references: tuple[Reference, ...]
    incident_code: str | None
    incident_id: str | None
    state: str | None
    resident_name: str | None
    headline: str | None


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """A CAP message the platform accepted."""

    receipt: str
    cap: CapSummary
    delivery: str
    received_at: datetime
    xml: str

    def public(self, known: set[tuple[str, str]]) -> dict[str, Any]:
        cap = self.cap
        return {
            "receipt": self.receipt,
            "identifier": cap.identifier,
            "sender": cap.sender,
            "sent": cap.sent,
            "status": cap.status,
            "msgType": cap.msg_type,
            "scope": cap.scope,
            "references": [
                {
                    "sender": ref.sender,
                    "identifier": ref.identifier,
                    "sent": ref.sent,
                    "known": (ref.sender, ref.identifier) in known,
                }
                for ref in cap.references
            ],
            "incident_code": cap.incident_code,
            "incident_id": cap.incident_id,
            "state": cap.state,
            "resident_name": cap.resident_name,
            "headline": cap.headline,
            "delivery": self.delivery,
            "received_at": self.received_at.isoformat(),
            "xml": self.xml,
        }


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One POST and how it was answered."""

    delivery: str | None
    status: int
    outcome: str  # recorded, duplicate, refused: …, fault: …
    identifier: str | None
    received_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "delivery": self.delivery,
            "status": self.status,
            "outcome": self.outcome,
            "identifier": self.identifier,
            "received_at": self.received_at.isoformat(),
        }


class FaultRequest(BaseModel):
    fail: Fault | None
    times: int = Field(default=1, ge=0)
    hang_s: float = Field(default=DEFAULT_HANG_S, gt=0, le=120)


@dataclass(frozen=True, slots=True)
class ActiveFault:
    fail: Fault
    remaining: int
    hang_s: float

    def public(self) -> dict[str, Any]:
        return {"fail": self.fail, "remaining": self.remaining, "hang_s": self.hang_s}


def print_flushed(line: str) -> None:
    """Default announcer: one line on stdout, flushed so a terminal demo shows it at once."""
    print(line, flush=True)


def expected_signature(secret: str, timestamp: str, delivery: str, body: bytes) -> str:
    """``sha256=<hex>`` of ``{timestamp}.{delivery}.{body}`` under ``secret``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.{delivery}.".encode() + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


class EmergencyPlatform:
    """The platform's state: alerts, seen deliveries, faults. Safe to use from several threads."""

    def __init__(self, secret: str, announce: Announce, clock: Callable[[], float]) -> None:
        self.secret = secret
        self.announce = announce
        self.clock = clock
        self._lock = threading.Lock()
        self._alerts: list[AlertRecord] = []
        self._by_key: dict[tuple[str, str], AlertRecord] = {}
        self._deliveries: list[DeliveryRecord] = []
        self._seen: dict[str, float] = {}  # delivery id → when first seen
        self._fault: ActiveFault | None = None
        # Set to take every new alert through Shouhu's API (see ``Dispatcher``).
        self.dispatcher: Dispatcher | None = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def alerts(self) -> list[dict[str, Any]]:
        with self._lock:
            known = set(self._by_key)
            return [record.public(known) for record in self._alerts]

    def deliveries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [record.public() for record in self._deliveries]

    def log(self, delivery: str | None, status: int, outcome: str, identifier: str | None = None) -> None:
        with self._lock:
            self._deliveries.append(DeliveryRecord(delivery, status, outcome, identifier, self.now()))

    def clear(self) -> None:
        # Seen delivery ids stay: forgetting them would let an old delivery replay.
        with self._lock:
            self._alerts.clear()
            self._by_key.clear()
            self._deliveries.clear()

    def set_fault(self, fail: Fault | None, times: int, hang_s: float) -> ActiveFault | None:
        with self._lock:
            self._fault = ActiveFault(fail, times, hang_s) if fail is not None and times > 0 else None
            return self._fault

    def fault(self) -> ActiveFault | None:
        with self._lock:
            return self._fault

    def take_fault(self) -> ActiveFault | None:
        """The fault this delivery meets, if any; each delivery uses up one."""
        with self._lock:
            fault = self._fault
            if fault is None:
                return None
            remaining = fault.remaining - 1
            self._fault = ActiveFault(fault.fail, remaining, fault.hang_s) if remaining > 0 else None
            return fault

    def authenticate(self, headers: Mapping[str, str], body: bytes) -> str:
        """Check signature, timestamp and replay; returns the delivery id.

        Raises:
            Refused: 401 for a missing or bad signature or a stale timestamp, 409 for
                a delivery id already seen.
        """
        delivery = headers.get(DELIVERY_HEADER)
        timestamp = headers.get(TIMESTAMP_HEADER)
        signature = headers.get(SIGNATURE_HEADER)
        if not (delivery and timestamp and signature):
            given = ((DELIVERY_HEADER, delivery), (TIMESTAMP_HEADER, timestamp), (SIGNATURE_HEADER, signature))
            raise Refused(401, "missing " + ", ".join(name for name, value in given if not value))
        expected = expected_signature(self.secret, timestamp, delivery, body)
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise Refused(
                401, f"bad {SIGNATURE_HEADER}: not signed with the shared secret, or the body or headers were altered"
            )
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise Refused(401, f"{TIMESTAMP_HEADER} {timestamp!r} is not Unix seconds") from None
        now = self.clock()
        skew = now - sent_at
        if abs(skew) > TIMESTAMP_TOLERANCE_S:
            direction = "old" if skew > 0 else "in the future"
            raise Refused(
                401,
                f"{TIMESTAMP_HEADER} is {abs(skew):.0f} s {direction} (limit {TIMESTAMP_TOLERANCE_S} s): "
                "a held-back or replayed delivery, or a clock that is off",
            )
        with self._lock:
            # An id older than twice the window can only come with a timestamp the
            # check above refuses, so it need not be remembered any longer.
            horizon = now - 2 * TIMESTAMP_TOLERANCE_S
            for old in [key for key, seen_at in self._seen.items() if seen_at < horizon]:
                del self._seen[old]
            if delivery in self._seen:
                raise Refused(409, f"delivery {delivery} was already received: replay refused")
            self._seen[delivery] = now
        return delivery

    def record(self, cap: CapSummary, delivery: str, xml: str) -> tuple[AlertRecord, bool]:
        """Record ``cap`` unless its (sender, identifier) is known; returns the record and whether it is new."""
        key = (cap.sender, cap.identifier)
        with self._lock:
            existing = self._by_key.get(key)
            if existing is not None:
                return existing, False
            record = AlertRecord("PLT-" + secrets.token_hex(8), cap, delivery, self.now(), xml)
            self._alerts.append(record)
            self._by_key[key] = record
            return record, True


def _child_text(parent: ET.Element, name: str) -> str | None:
    element = parent.find(f"{{{CAP_NAMESPACE}}}{name}")
    return None if element is None or element.text is None else element.text.strip()


def _required(root: ET.Element, name: str) -> str:
    value = _child_text(root, name)
    if not value:
        raise Refused(400, f"CAP <{name}> is missing or empty")
    return value


def _references(text: str | None) -> tuple[Reference, ...]:
    references = []
    for entry in (text or "").split():
        parts = entry.split(",")
        if len(parts) != 3 or not CAP_TIME.fullmatch(parts[2]):
            raise Refused(400, f"CAP <references> entry {entry!r} is not sender,identifier,sent")
        references.append(Reference(*parts))
    return tuple(references)


def _parameters(root: ET.Element) -> dict[str, str]:
    parameters: dict[str, str] = {}
    for parameter in root.iterfind(f"{{{CAP_NAMESPACE}}}info/{{{CAP_NAMESPACE}}}parameter"):
        name, value = _child_text(parameter, "valueName"), _child_text(parameter, "value")
        if name and value is not None:
            parameters.setdefault(name, value)
    return parameters


def parse_cap(body: bytes) -> CapSummary:
    """Read the fields the platform files a CAP 1.2 alert under.

    Raises:
        Refused: 400, naming what is wrong.
    """
    # A DTD is how entity-expansion attacks get in, and CAP never needs one.
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise Refused(400, "a DTD or entity declaration is not accepted in a CAP alert")
    try:
        root = ET.fromstring(body)  # noqa: S314 - no DTD can reach here (refused above)
    except ET.ParseError as exc:
        raise Refused(400, f"malformed XML: {exc}") from None
    if root.tag != f"{{{CAP_NAMESPACE}}}alert":
        raise Refused(400, f"not a CAP 1.2 alert: the root element is {root.tag}, not {{{CAP_NAMESPACE}}}alert")
    sent = _required(root, "sent")
    if not CAP_TIME.fullmatch(sent):
        raise Refused(400, f"CAP <sent> {sent!r} must be like 2026-11-24T18:00:00+08:00 (an offset, no Z)")
    msg_type = _required(root, "msgType")
    if msg_type not in MSG_TYPES:
        raise Refused(400, f"CAP <msgType> {msg_type!r} is not one of {', '.join(sorted(MSG_TYPES))}")
    references = _references(_child_text(root, "references"))
    if msg_type in ("Update", "Cancel") and not references:
        raise Refused(400, f"a CAP {msg_type} must carry <references> to the message it changes")
    parameters = _parameters(root)
    info = root.find(f"{{{CAP_NAMESPACE}}}info")
    return CapSummary(
        identifier=_required(root, "identifier"),
        sender=_required(root, "sender"),
        sent=sent,
        status=_required(root, "status"),
        msg_type=msg_type,
        scope=_required(root, "scope"),
        references=references,
        incident_code=parameters.get("incidentCode") or _child_text(root, "incidents"),
        incident_id=parameters.get("incidentId"),
        state=parameters.get("state"),
        resident_name=parameters.get("residentName"),
        headline=None if info is None else _child_text(info, "headline"),
    )


async def receive_cap(platform: EmergencyPlatform, request: Request) -> JSONResponse:
    """Check, record and announce one delivery (see the module docstring for the order)."""
    # Read first: a sender that gave up during a "timeout" fault has closed the
    # connection by the time the platform gets round to it.
    body = await request.body()
    delivery_header = request.headers.get(DELIVERY_HEADER)
    fault = platform.take_fault()
    if fault is not None and fault.fail == "error":
        platform.announce("✖  platform answers 503 (injected fault)")
        platform.log(delivery_header, 503, "fault: error")
        return JSONResponse({"error": "service unavailable (injected fault)"}, status_code=503)
    if fault is not None and fault.fail == "reject":
        platform.announce("✖  platform answers 400 (injected fault)")
        platform.log(delivery_header, 400, "fault: reject")
        return JSONResponse({"error": "rejected (injected fault)"}, status_code=400)
    if fault is not None:
        platform.announce(f"⏳ platform holds the answer {fault.hang_s:g} s (injected fault)")
        await asyncio.sleep(fault.hang_s)
    try:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != CAP_CONTENT_TYPE:
            raise Refused(415, f"Content-Type must be {CAP_CONTENT_TYPE}, not {media_type or 'missing'}")
        if len(body) > MAX_BODY_BYTES:
            raise Refused(413, f"a CAP alert over {MAX_BODY_BYTES} bytes is not accepted")
        delivery = platform.authenticate(request.headers, body)
        cap = parse_cap(body)
    except Refused as exc:
        platform.announce(f"✖  platform refused a delivery (HTTP {exc.status}): {exc.reason}")
        platform.log(delivery_header, exc.status, f"refused: {exc.reason}")
        return exc.response()
    record, new = platform.record(cap, delivery, body.decode("utf-8", errors="replace"))
    who = cap.resident_name or "?"
    if new:
        platform.announce(
            f"🚑 platform received CAP {cap.msg_type} {cap.incident_code or cap.identifier} for {who} "
            f"({cap.status}) — receipt {record.receipt}"
        )
    else:
        platform.announce(f"↺  platform already has {cap.identifier} (receipt {record.receipt}); not recorded again")
    status = 202 if new else 200
    platform.log(delivery, status, "recorded" if new else "duplicate", cap.identifier)
    dispatcher = platform.dispatcher
    take = None
    if new and cap.msg_type == "Alert" and dispatcher is not None and cap.incident_id:
        # The receipt goes out first; then a dispatcher takes the case through the API.
        take = BackgroundTask(dispatcher.acknowledge, platform, cap.incident_id)
    return JSONResponse(
        {"receipt": record.receipt, "identifier": cap.identifier, "duplicate": not new},
        status_code=status,
        headers={RECEIPT_HEADER: record.receipt},
        background=take,
    )


@dataclass(frozen=True, slots=True)
class Dispatcher:
    """A platform dispatcher who takes every new alert: ``POST /api/v1/incidents/{id}/ack``
    with a ``platform``-role token, as DESIGN.md lets the platform do."""

    api_url: str
    token: str

    def acknowledge(self, platform: EmergencyPlatform, incident_id: str) -> None:
        url = f"{self.api_url.rstrip('/')}/api/v1/incidents/{incident_id}/ack"
        try:
            answer = requests.post(
                url, headers={"Authorization": f"Bearer {self.token}"}, json={"note": "平台调度已接警"}, timeout=10
            )
        except requests.RequestException as exc:
            platform.announce(f"✖  platform could not acknowledge incident {incident_id}: {exc}")
            return
        platform.announce(f"☑  platform acknowledged incident {incident_id}: HTTP {answer.status_code}")


class DispatcherRequest(BaseModel):
    api_url: str
    token: str


def create_emergency_platform(
    secret: str,
    *,
    announce: Announce | None = None,
    clock: Callable[[], float] = time.time,
    dispatcher: Dispatcher | None = None,
) -> FastAPI:
    """Build the simulator app.

    Args:
        secret: The HMAC secret shared with Shouhu (``SHOUHU_EMERGENCY_WEBHOOK_SECRET``).
        announce: Called with one human line per delivery and fault; default prints to stdout.
        clock: Unix time, for the timestamp window and ``received_at``.

    Returns:
        The FastAPI app; its ``state.platform`` is the :class:`EmergencyPlatform`.
    """
    if not secret:
        raise ValueError("the emergency platform needs a shared secret")
    platform = EmergencyPlatform(secret, announce or print_flushed, clock)
    platform.dispatcher = dispatcher
    app = FastAPI(title="Shouhu emergency-platform simulator (CAP 1.2 webhook)")
    app.state.platform = platform

    @app.post("/_sim/dispatcher")
    async def set_dispatcher(request: DispatcherRequest | None = None) -> dict[str, str | None]:
        """Have a dispatcher acknowledge every new alert through Shouhu's API (``null``: stop)."""
        platform.dispatcher = Dispatcher(request.api_url, request.token) if request else None
        return {"api_url": request.api_url if request else None}

    @app.post("/cap", status_code=202)
    async def create_cap_alert(request: Request) -> JSONResponse:
        """Receive one signed CAP 1.2 message; the answer is a receipt, not an acknowledgement."""
        return await receive_cap(platform, request)

    @app.get("/_sim/alerts")
    async def read_alerts() -> list[dict[str, Any]]:
        """Every CAP message recorded so far (duplicates once), oldest first."""
        return platform.alerts()

    @app.get("/_sim/deliveries")
    async def read_deliveries() -> list[dict[str, Any]]:
        """Every POST to /cap and how it was answered, oldest first."""
        return platform.deliveries()

    @app.delete("/_sim/records", status_code=204)
    async def delete_records() -> Response:
        """Forget recorded alerts and deliveries (faults and seen delivery ids stay)."""
        platform.clear()
        return Response(status_code=204)

    @app.get("/_sim/faults")
    async def read_faults() -> dict[str, Any] | None:
        """The injected fault and how many deliveries it still applies to."""
        fault = platform.fault()
        return None if fault is None else fault.public()

    @app.post("/_sim/faults")
    async def set_fault(fault: FaultRequest) -> dict[str, Any] | None:
        """Fail the next ``times`` deliveries (``error`` 503, ``timeout``, ``reject`` 400), or heal (``null``)."""
        active = platform.set_fault(fault.fail, fault.times, fault.hang_s)
        if active is None:
            platform.announce("⚙  platform is healthy")
        else:
            platform.announce(f"⚙  platform fails the next {active.remaining} deliveries: {active.fail}")
        return None if active is None else active.public()

    return app


def serve_emergency_platform(host: str, port: int, secret: str) -> None:
    """Run the simulator in the foreground until interrupted."""
    uvicorn.run(create_emergency_platform(secret), host=host, port=port, log_level="warning")
