"""What the simulated fleets share: the registry's devices, the messages they publish,
the schedule and rate bound that pace them, and the MQTT connection that carries them.

A fleet's core (:mod:`simulators.camera_fleet`, :mod:`simulators.wristband_fleet`)
is deterministic: given a seed and the times it is asked at, it yields the same
messages, so it is tested without a broker or a clock. :func:`run_fleet` drives a
core with a clock, a wait and a publish function; :class:`MqttPublisher` is the one
that reaches a broker.
"""

from __future__ import annotations

import heapq
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from shouhu.mqtt_address import BrokerAddress

# docs/contract.md, "Topics": QoS 1 for status (retained); telemetry and health may be
# 0 or 1 — the fleets use 1, so what the broker took is known when they stop.
QOS = 1


@dataclass(frozen=True, slots=True)
class Publish:
    """One MQTT message a simulated device sends."""

    topic: str
    payload: bytes
    qos: int = QOS
    retain: bool = False

    @property
    def channel(self) -> str:
        return self.topic.rsplit("/", 1)[-1]

    @property
    def device_id(self) -> str:
        return self.topic.split("/")[3]

    def body(self) -> dict[str, Any]:
        """The JSON payload (not for ``status``, which is plain text)."""
        value = json.loads(self.payload)
        assert isinstance(value, dict)
        return value


def topic(kind: str, device_id: str, channel: str) -> str:
    return f"shouhu/v1/{kind}/{device_id}/{channel}"


def status(kind: str, device_id: str, online: bool) -> Publish:
    """The retained ``status`` a device publishes on connect (``online``), or its Last
    Will (``offline``) as the broker publishes it when the device's connection dies."""
    return Publish(topic(kind, device_id, "status"), b"online" if online else b"offline", QOS, retain=True)


def json_message(kind: str, device_id: str, channel: str, body: Mapping[str, Any]) -> Publish:
    return Publish(topic(kind, device_id, channel), json.dumps(body, ensure_ascii=False).encode())


def rfc3339(at: datetime, zone: ZoneInfo) -> str:
    """A device's ``ts``: RFC 3339 with the local offset, as the contract asks."""
    return at.astimezone(zone).isoformat(timespec="seconds")


# -- the registry's devices -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CameraSpec:
    id: str
    area_id: str
    interval_s: float | None  # the registry's heartbeat interval, if it sets one


@dataclass(frozen=True, slots=True)
class WristbandSpec:
    id: str
    resident_id: str
    lat: float | None
    lon: float | None
    interval_s: float | None
    watch_id: str | None = None  # a 4G watch speaking the TCP protocol (`shouhu simulate watch`)


@dataclass(frozen=True, slots=True)
class Registry:
    cameras: tuple[CameraSpec, ...]
    wristbands: tuple[WristbandSpec, ...]

    @property
    def watch_ids(self) -> list[str]:
        """The watch ids of the wristbands that are 4G watches, in registry order."""
        return [band.watch_id for band in self.wristbands if band.watch_id]


class RegistryFileError(ValueError):
    """The registry file cannot be read as one (named in the message)."""


def read_registry(path: Path) -> Registry:
    """The active cameras and wristbands of a registry YAML file (the one
    ``shouhu registry load`` takes), with each wristband's home from its resident.

    Raises:
        RegistryFileError: the file is missing, not YAML, or has no ``devices`` list.
    """
    try:
        # libyaml's loader where PyYAML has it: the demo county in a third of the time.
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryFileError(f"{path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
        raise RegistryFileError(f"{path}: no 'devices' list")
    homes = {
        str(r["id"]): (r.get("lat"), r.get("lon"))
        for r in data.get("residents") or []
        if isinstance(r, dict) and "id" in r and r.get("active", True)
    }
    cameras: list[CameraSpec] = []
    wristbands: list[WristbandSpec] = []
    for entry in data["devices"]:
        if not isinstance(entry, dict) or not entry.get("active", True) or "id" not in entry:
            continue
        interval = entry.get("heartbeat_interval_s")
        interval_s = float(interval) if isinstance(interval, (int, float)) and interval > 0 else None
        if entry.get("kind") == "camera" and entry.get("area"):
            cameras.append(CameraSpec(str(entry["id"]), str(entry["area"]), interval_s))
        elif entry.get("kind") == "wristband" and str(entry.get("resident")) in homes:
            lat, lon = homes[str(entry["resident"])]
            wristbands.append(
                WristbandSpec(
                    str(entry["id"]),
                    str(entry["resident"]),
                    float(lat) if isinstance(lat, (int, float)) else None,
                    float(lon) if isinstance(lon, (int, float)) else None,
                    interval_s,
                    str(entry["watch_id"]) if entry.get("watch_id") else None,
                )
            )
    return Registry(tuple(cameras), tuple(wristbands))


# -- pacing -----------------------------------------------------------------------------


def stretch(intervals: Iterable[float], rate: float) -> float:
    """The factor (≥ 1) every device's interval is multiplied by so that the fleet's
    steady rate, the sum of 1/interval, stays within ``rate`` messages a second."""
    steady = sum(1.0 / interval for interval in intervals)
    return max(1.0, steady / rate)


@dataclass(slots=True)
class Schedule:
    """Devices by when each is next due (ties: the order they were added)."""

    _heap: list[tuple[datetime, int, int]] = field(default_factory=list)
    _seq: int = 0

    def add(self, at: datetime, index: int) -> None:
        heapq.heappush(self._heap, (at, self._seq, index))
        self._seq += 1

    def next_at(self) -> datetime | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: datetime) -> list[tuple[datetime, int]]:
        due: list[tuple[datetime, int]] = []
        while self._heap and self._heap[0][0] <= now:
            at, _seq, index = heapq.heappop(self._heap)
            due.append((at, index))
        return due


class Fleet(Protocol):
    """A deterministic core: what is due at ``now``, and when it next has something."""

    name: str

    def next_at(self) -> datetime | None: ...

    def due(self, now: datetime) -> list[Publish]: ...

    def summary(self) -> str: ...


class RateBound:
    """A token bucket: ``rate`` messages a second, bursts of a tenth of a second's
    worth, so no second ever holds more than 1.1 × ``rate`` (+1). Time is the
    caller's (seconds on any monotonic scale)."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, not {rate}")
        self.rate = rate
        self.capacity = max(1.0, rate / 10)
        self._tokens = self.capacity
        self._at: float | None = None

    def reserve(self, now: float) -> float:
        """Take one message's token; the seconds to wait before sending it (0: now)."""
        if self._at is not None:
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclass(frozen=True, slots=True)
class RateReport:
    fleet: str
    messages: int
    seconds: float
    bound: float
    summary: str

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.fleet}: published {self.messages} messages in {self.seconds:.0f} s "
            f"({self.per_second:.1f}/s, at most {self.bound:g}/s); {self.summary}"
        )


Clock = Callable[[], datetime]
# Waits up to the seconds given; True when the run should stop (threading.Event.wait).
Wait = Callable[[float], bool]


def run_fleet(
    fleet: Fleet,
    publish: Callable[[Publish], None],
    *,
    clock: Clock,
    wait: Wait,
    bound: RateBound,
    report: Callable[[RateReport], None],
    report_every: timedelta = timedelta(seconds=30),
) -> int:
    """Publish what ``fleet`` has due, when it is due, never faster than ``bound``,
    until ``wait`` says stop; ``report`` gets the rate published every ``report_every``
    and once more on stopping.

    Returns the number of messages published.
    """
    start = clock()
    window_start, window_count, published = start, 0, 0

    def report_window(now: datetime) -> None:
        seconds = (now - window_start).total_seconds()
        report(RateReport(fleet.name, window_count, seconds, bound.rate, fleet.summary()))

    while True:
        now = clock()
        for message in fleet.due(now):
            delay = bound.reserve((clock() - start).total_seconds())
            if delay > 0 and wait(delay):
                report_window(clock())
                return published
            publish(message)
            published += 1
            window_count += 1
        now = clock()
        if now - window_start >= report_every:
            report_window(now)
            window_start, window_count = now, 0
        upcoming = fleet.next_at()
        pause = (upcoming - now).total_seconds() if upcoming is not None else report_every.total_seconds()
        pause = min(max(pause, 0.0), (window_start + report_every - now).total_seconds())
        if wait(max(pause, 0.001)):
            report_window(clock())  # the last stretch, on stopping
            return published


# -- the broker -------------------------------------------------------------------------


# docs/contract.md, "Receipts": an alarm is re-sent, the same bytes, this often until
# the hub's receipt for its msg_id comes back.
RESEND_S = 5.0
ALARM_CHANNELS = frozenset({"sos", "fall"})


@dataclass(frozen=True, slots=True)
class Receipt:
    device_id: str
    msg_id: str
    incident: str | None
    state: str | None
    sends: int  # how many times the alarm went out before its receipt


class MqttPublisher:
    """One MQTT connection that carries a whole fleet's messages.

    A real device has a connection of its own, with its Last Will; a fleet of
    hundreds shares one and publishes each device's ``status`` itself (the Last
    Will's ``offline`` where the broker would have). The hub cannot tell the
    difference: it reads topics, not client ids.

    Alarms (``sos``, ``fall``) follow the receipt protocol: the connection subscribes
    to every wristband's receipt topic on each connect, and re-sends each alarm every
    ``resend_s`` until a receipt carrying its ``msg_id`` arrives; ``on_receipt`` hears
    of each.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        max_unacknowledged: int = 200,
        resend_s: float = RESEND_S,
        on_receipt: Callable[[Receipt], None] | None = None,
    ) -> None:
        address = BrokerAddress.parse(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv311
        )
        address.configure(self.client)
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(1, 5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.max_unacknowledged = max_unacknowledged
        self.resend_s = resend_s
        self.on_receipt = on_receipt
        self.receipts: list[Receipt] = []
        self._unacknowledged: list[mqtt.MQTTMessageInfo] = []
        self._alarms: dict[tuple[str, str], tuple[Publish, int]] = {}  # (device, msg_id) → (alarm, sends)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        self._resender = threading.Thread(target=self._resend_loop, name=f"resend-{client_id}", daemon=True)
        self._resender.start()

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        # Again on every connect: a broker that lost the session lost the subscription too.
        client.subscribe("shouhu/v1/wristband/+/receipt", qos=1)
        self._subscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(body, dict) or not isinstance(body.get("msg_id"), str):
            return
        key = (message.topic.split("/")[3], body["msg_id"])
        with self._lock:
            pending = self._alarms.pop(key, None)
            if pending is None:
                return  # a receipt for a copy already receipted, or for another sender
            receipt = Receipt(key[0], key[1], body.get("incident"), body.get("state"), pending[1])
            self.receipts.append(receipt)
        if self.on_receipt is not None:
            self.on_receipt(receipt)

    @property
    def unreceipted(self) -> list[tuple[str, str]]:
        """The (device, msg_id) of every alarm still waiting for its receipt."""
        with self._lock:
            return list(self._alarms)

    def publish(self, message: Publish) -> None:
        if message.channel in ALARM_CHANNELS:
            self._subscribed.wait(10)  # never send an alarm whose receipt could not be heard
            with self._lock:
                self._alarms[(message.device_id, message.body()["msg_id"])] = (message, 1)
        self._send(message)

    def _send(self, message: Publish) -> None:
        info = self.client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        if message.qos == 0:
            return
        with self._lock:
            self._unacknowledged = [i for i in self._unacknowledged if not i.is_published()]
            self._unacknowledged.append(info)
            oldest = self._unacknowledged[0] if len(self._unacknowledged) > self.max_unacknowledged else None
        # Never run ahead of the broker by more than max_unacknowledged messages.
        if oldest is not None:
            oldest.wait_for_publish(10)

    def _resend_loop(self) -> None:
        while not self._stopping.wait(self.resend_s):
            with self._lock:
                due = list(self._alarms.items())
                for key, (alarm, sends) in due:
                    self._alarms[key] = (alarm, sends + 1)
            for _key, (alarm, _sends) in due:
                self._send(alarm)  # the same bytes, the same msg_id

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the broker acknowledged every QoS 1 message; False if some did not in time."""
        with self._lock:
            pending = list(self._unacknowledged)
        for info in pending:
            try:
                info.wait_for_publish(timeout)
            except RuntimeError:
                return False
        return all(info.is_published() for info in pending)

    def close(self) -> None:
        self._stopping.set()
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()
