"""The Traccar bridge: Traccar's JSON forwarding in, v1 messages to the broker out
(docs/contract.md, "Traccar").

Traccar POSTs each event (``event.forward.url``) or position (``forward.url``,
``forward.type`` ``json``) here. It holds no token: a request proves it is Traccar's
by the shared secret in ``X-Shouhu-Traccar-Secret`` (Traccar's ``event.forward.header``
and ``forward.header``), compared in constant time; while ``SHOUHU_TRACCAR_SECRET`` is
empty every request is refused, because an empty secret would let anyone in. A refused
request is answered before its body is read, and nothing is published.

The mapping is ``devices.traccar`` (pure; the api may not import the watch gateway,
tests/test_layering.py). A ``uniqueId`` is a registered wristband when the registry has
a wristband with that id, or (``SHOUHU_REGISTRY_FILE``) one with that ``watch_id``. The
messages are published at QoS 1 as a device publishes them, on one MQTT connection of
the API process opened at the first forward, and the answer is 200 only once the broker
has acknowledged every one (PUBACK): otherwise 503, and Traccar's retry publishes the
same ``msg_id`` and bytes, which the hub's ledger folds into one message.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import paho.mqtt.client as mqtt
import psycopg
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from psycopg.rows import DictRow
from pydantic import BaseModel, ValidationError

from api.deps import ConnDep, Now, SettingsDep
from devices.contract import DEVICE_ID
from devices.kinds import DeviceKind
from devices.registry_file import RegistryFileError
from devices.traccar import Publication, TraccarForward, map_forward
from devices.watch_ids import RegistryWatches
from shouhu.mqtt_address import BrokerAddress, broker_url

log = logging.getLogger(__name__)

TRACCAR_CALLBACK_PATH = "/callbacks/traccar"
SECRET_HEADER = "X-Shouhu-Traccar-Secret"  # noqa: S105 (a header name, not a secret)
# How long a forward waits for the broker (connected, then every PUBACK) before 503.
PUBACK_TIMEOUT_S = 10.0

router = APIRouter(tags=["callbacks"])

RESPONSES: dict[int | str, dict[str, Any]] = {
    status.HTTP_401_UNAUTHORIZED: {"description": f"No {SECRET_HEADER}."},
    status.HTTP_403_FORBIDDEN: {"description": "The secret is wrong, or none is configured."},
    status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Not Traccar's JSON; the message names the field."},
    status.HTTP_503_SERVICE_UNAVAILABLE: {"description": "The broker did not acknowledge in time; Traccar retries."},
}


class TraccarForwardPublic(BaseModel):
    device_id: str
    """The v1 device id the messages went out under (``traccar-<uniqueId>`` if not registered)."""
    unregistered: bool
    published: list[str]
    """The channels published and acknowledged, in order."""
    ignored: str | None = None
    """Why nothing was published (an event Shouhu does not read, an unknown device's position)."""


# --- the broker connection --------------------------------------------------------


class BrokerPublisher:
    """The API process's MQTT connection for the bridge: QoS 1 publishes, each waited on
    until its PUBACK. A clean session: nothing is owed to it across restarts, because an
    unacknowledged forward is answered 503 and Traccar sends it again."""

    def __init__(self, mqtt_url: str) -> None:
        self._connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"shouhu-api-traccar-{uuid.uuid4().hex[:12]}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        address = BrokerAddress.parse(mqtt_url)
        address.configure(self._client)
        self._client.reconnect_delay_set(1, 5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.connect_async(address.host, address.port)
        self._client.loop_start()

    def _on_connect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, *_rest: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self._connected.clear()

    def publish(self, publications: Sequence[Publication], timeout: float | None = None) -> bool:
        """True once the broker has acknowledged every publication within ``timeout``
        (default ``PUBACK_TIMEOUT_S``)."""
        timeout = PUBACK_TIMEOUT_S if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self._connected.wait(timeout):
            return False
        infos = [self._client.publish(str(p.topic), p.payload, qos=1) for p in publications]
        for info in infos:
            try:
                info.wait_for_publish(max(deadline - time.monotonic(), 0.0))
            except (RuntimeError, ValueError):  # not queued: the connection dropped meanwhile
                return False
            if not info.is_published():
                return False
        return True

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# Guards the lazily made state on app.state (the broker connection, the watch-id map).
_state_lock = threading.Lock()


def broker_publisher(request: Request, settings: SettingsDep) -> BrokerPublisher:
    """The process's bridge connection, opened at the first forward that passed the secret."""
    with _state_lock:
        publisher: BrokerPublisher | None = getattr(request.app.state, "traccar_publisher", None)
        if publisher is None:
            publisher = request.app.state.traccar_publisher = BrokerPublisher(broker_url(settings))
        return publisher


def close_publisher(app: FastAPI) -> None:
    """Close the bridge connection, if a forward opened one (the API's lifespan ends)."""
    with _state_lock:
        publisher: BrokerPublisher | None = getattr(app.state, "traccar_publisher", None)
        app.state.traccar_publisher = None
    if publisher is not None:
        publisher.close()


# --- which wristband ------------------------------------------------------------


def registry_watch_ids(request: Request, settings: SettingsDep) -> RegistryWatches | None:
    """The process's watch-id map (the one the watch gateway reads: a 4G watch sent through
    Traccar has its watch id as ``uniqueId``), or None while no registry file is configured
    or while it cannot be read at first (logged; an unknown device's SOS still pages)."""
    if not settings.registry_file:
        return None
    with _state_lock:
        watches: RegistryWatches | None = getattr(request.app.state, "traccar_watch_ids", None)
        if watches is None:
            try:
                watches = RegistryWatches(Path(settings.registry_file))
            except RegistryFileError as exc:
                log.error("Traccar forwards: registry file refused, no watch id known yet: %s", exc)
                return None
            request.app.state.traccar_watch_ids = watches
        return watches


def find_wristband(conn: psycopg.Connection[DictRow], watches: RegistryWatches | None, unique_id: str) -> str | None:
    """The registry's wristband for a Traccar ``uniqueId``: the wristband of that id, else the
    wristband whose ``watch_id`` it is; None for neither."""
    # An id no topic can carry is no registered wristband's (and may hold a NUL, which
    # PostgreSQL refuses): it is not looked up.
    if DEVICE_ID.fullmatch(unique_id):
        row = conn.execute(
            "SELECT id FROM devices WHERE id = %s AND kind = %s", (unique_id, DeviceKind.WRISTBAND.value)
        ).fetchone()
        if row is not None:
            return str(row["id"])
    return watches(unique_id) if watches is not None else None


# --- the route --------------------------------------------------------------------


def check_secret(request: Request, settings: SettingsDep) -> None:
    """403 while no secret is configured or the one sent is wrong; 401 when none is sent."""
    expected = settings.traccar_secret
    if not expected:
        log.error("refused a Traccar forward: SHOUHU_TRACCAR_SECRET is not configured")
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Traccar forwards are refused: no SHOUHU_TRACCAR_SECRET is set")
    sent = request.headers.get(SECRET_HEADER)
    if sent is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, f"the {SECRET_HEADER} header is required")
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        log.warning("refused a Traccar forward: %s is wrong", SECRET_HEADER)
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{SECRET_HEADER} does not match")


async def traccar_forward(request: Request, _secret: Annotated[None, Depends(check_secret)]) -> TraccarForward:
    """The forwarded JSON, read only after the secret passed; 422 naming the field otherwise."""
    try:
        return TraccarForward.model_validate_json(await request.body())
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


Forward = Annotated[TraccarForward, Depends(traccar_forward)]
Publisher = Annotated[BrokerPublisher, Depends(broker_publisher)]
WatchIds = Annotated[RegistryWatches | None, Depends(registry_watch_ids)]


@router.post(TRACCAR_CALLBACK_PATH, responses=RESPONSES)
def receive_traccar_forward(
    forward: Forward, conn: ConnDep, now: Now, publisher: Publisher, watches: WatchIds
) -> TraccarForwardPublic:
    """An event or a position forwarded by Traccar: its v1 messages, acknowledged by the broker."""
    unique_id = forward.device.uniqueId
    mapped = map_forward(forward, find_wristband(conn, watches, unique_id), now)
    if mapped.publications and not publisher.publish(mapped.publications):
        log.warning("Traccar forward of %r: the broker did not acknowledge in time", unique_id)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the broker did not acknowledge; send it again")
    if mapped.unregistered and mapped.publications:
        log.warning("Traccar device %r is not in the registry: its alarm pages as %s", unique_id, mapped.device_id)
    return TraccarForwardPublic(
        device_id=mapped.device_id,
        unregistered=mapped.unregistered,
        published=[str(p.topic.channel) for p in mapped.publications],
        ignored=mapped.ignored,
    )
