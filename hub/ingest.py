"""The writer: one received message → one transaction → commit → acknowledge.

SOS and falls (the priority lane) open or join their incident in the same
transaction that records them. Bad input goes to ``dead_letters`` with its reason
and is acknowledged; nothing here raises on bad bytes. A database error is retried
(with a fresh connection) until the message commits: it is never acknowledged
before, so at worst the broker redelivers it and the ledger makes it a no-op.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

import psycopg
from psycopg.types.json import Jsonb

from alerts.incidents import Alarm, AlarmResult, record_alarm
from devices.contract import (
    ALARM_CHANNELS,
    DeviceMessage,
    HealthPayload,
    MqttChannel,
    Rejected,
    RejectReason,
    SosPayload,
    StatusMessage,
    TelemetryPayload,
    Topic,
    parse_message,
    payload_hash,
)
from devices.kinds import DeviceKind, IncidentKind
from hub import metrics
from hub.mqtt import Received

log = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[Any, ...]]

# Rejections of an alarm topic that still page: the bytes arrived, only unreadable.
UNREADABLE_ALARM = frozenset(
    {RejectReason.SCHEMA, RejectReason.MALFORMED_JSON, RejectReason.NOT_UTF8, RejectReason.OVERSIZED}
)


@dataclass(frozen=True, slots=True)
class IngestConfig:
    hub_id: str
    ack_timeout_s: int
    cancel_window_s: int = 30


def _dead_letter(conn: Conn, message: Received, hub_id: str, reason: RejectReason, detail: str) -> None:
    conn.execute(
        "INSERT INTO dead_letters (received_at, hub_id, topic, payload, reason, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (message.received_at, hub_id, message.topic[:1024], message.payload, reason.value, detail),
    )
    metrics.DEAD_LETTERS.labels(reason.value).inc()


def _ledger_new(conn: Conn, device_id: str, msg_id: str, digest: bytes, channel: str, at: datetime) -> bool | None:
    """True: first sight. None: a redelivery (same hash). False: a reused id."""
    inserted = conn.execute(
        "INSERT INTO message_ledger (device_id, msg_id, payload_hash, channel, received_at)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
        (device_id, msg_id, digest, channel, at),
    ).fetchone()
    if inserted:
        return True
    row = conn.execute(
        "SELECT payload_hash FROM message_ledger WHERE device_id = %s AND msg_id = %s",
        (device_id, msg_id),
    ).fetchone()
    return None if row is not None and bytes(row[0]) == digest else False


def _known_device(conn: Conn, topic: Topic) -> bool:
    row = conn.execute(
        "SELECT 1 FROM devices WHERE id = %s AND kind = %s", (topic.device_id, topic.kind.value)
    ).fetchone()
    return row is not None


def _alarm_from(message: Received, parsed: DeviceMessage | Rejected, topic: Topic) -> Alarm:
    kind = IncidentKind.SOS if topic.channel is MqttChannel.SOS else IncidentKind.FALL
    if isinstance(parsed, Rejected):
        return Alarm(
            device_id=topic.device_id,
            kind=kind,
            msg_id=None,
            raw=message.payload,
            payload_hash=payload_hash(message.payload),
            received_at=message.received_at,
            detail={"unreadable_reason": parsed.reason.value, "unreadable_detail": parsed.detail},
        )
    payload = parsed.payload
    cancel = isinstance(payload, SosPayload) and payload.action == "cancel"
    return Alarm(
        device_id=topic.device_id,
        kind=kind,
        msg_id=payload.msg_id,
        raw=message.payload,
        payload_hash=parsed.payload_hash,
        received_at=message.received_at,
        cancel=cancel,
        lat=getattr(payload, "lat", None),
        lon=getattr(payload, "lon", None),
        detail={"device_ts": payload.ts.isoformat()},
    )


def _store_alarm(
    conn: Conn, message: Received, parsed: DeviceMessage | Rejected, topic: Topic, config: IngestConfig
) -> None:
    if isinstance(parsed, Rejected):
        # Kept for forensics too; the page goes out regardless (DESIGN.md exception).
        _dead_letter(conn, message, config.hub_id, parsed.reason, parsed.detail)
    outcome = record_alarm(
        conn,
        _alarm_from(message, parsed, topic),
        ack_timeout_s=config.ack_timeout_s,
        hub_id=config.hub_id,
        cancel_window_s=config.cancel_window_s,
    )
    metrics.ALARMS.labels(outcome.result.value).inc()
    if outcome.result is AlarmResult.OPENED:
        log.warning("red incident %s opened by %s on %s", outcome.incident_id, topic.device_id, topic.channel)


def _store_status(conn: Conn, message: Received, status: StatusMessage, config: IngestConfig) -> None:
    topic = status.topic
    if not _known_device(conn, topic):
        _dead_letter(conn, message, config.hub_id, RejectReason.UNKNOWN_DEVICE, f"no {topic.kind} {topic.device_id!r}")
        return
    conn.execute(
        "INSERT INTO device_events (device_id, at, event, reason, detail) VALUES (%s, %s, %s, %s, %s)",
        (
            topic.device_id,
            message.received_at,
            "status_online" if status.online else "status_offline",
            None if status.online else "last_will",
            Jsonb({"retained": message.retain, "hub_id": config.hub_id}),
        ),
    )


def _store_series(conn: Conn, message: Received, parsed: DeviceMessage, config: IngestConfig) -> None:
    topic = parsed.topic
    if not _known_device(conn, topic):
        _dead_letter(conn, message, config.hub_id, RejectReason.UNKNOWN_DEVICE, f"no {topic.kind} {topic.device_id!r}")
        return
    payload = parsed.payload
    seen = _ledger_new(
        conn, topic.device_id, payload.msg_id, parsed.payload_hash, topic.channel.value, message.received_at
    )
    if seen is None:
        return
    if seen is False:
        _dead_letter(
            conn,
            message,
            config.hub_id,
            RejectReason.REUSED_MSG_ID,
            f"msg_id {payload.msg_id!r} seen with other content",
        )
        return
    if isinstance(payload, TelemetryPayload):
        conn.execute(
            """
            INSERT INTO telemetry (device_id, msg_id, ts, received_at, battery, heart_rate, spo2,
                worn, lat, lon, steps, extra)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            (
                topic.device_id,
                payload.msg_id,
                payload.ts,
                message.received_at,
                payload.battery,
                payload.heart_rate,
                payload.spo2,
                payload.worn,
                payload.lat,
                payload.lon,
                payload.steps,
                Jsonb(payload.extra),
            ),
        )
    elif isinstance(payload, HealthPayload):
        conn.execute(
            """
            INSERT INTO camera_health (device_id, msg_id, ts, received_at, online, reason, fps,
                bitrate_kbps, storage_ok, extra)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            (
                topic.device_id,
                payload.msg_id,
                payload.ts,
                message.received_at,
                payload.online,
                payload.reason,
                payload.fps,
                payload.bitrate_kbps,
                payload.storage_ok,
                Jsonb(payload.extra),
            ),
        )


def _pages(parsed: DeviceMessage | StatusMessage | Rejected, topic: Topic) -> TypeGuard[DeviceMessage | Rejected]:
    """Whether this message opens or joins a red incident.

    Any bytes on a wristband's SOS or fall topic page someone, even unreadable ones
    (DESIGN.md): only a bad topic or an unknown kind or channel is not an alarm.
    """
    if topic.kind is not DeviceKind.WRISTBAND or topic.channel not in ALARM_CHANNELS:
        return False
    return isinstance(parsed, DeviceMessage) or (isinstance(parsed, Rejected) and parsed.reason in UNREADABLE_ALARM)


def store_message(conn: Conn, message: Received, config: IngestConfig) -> None:
    """Store one message in the caller's transaction; bad input is dead-lettered."""
    parsed = parse_message(message.topic, message.payload)
    topic = parsed.topic
    channel = topic.channel.value if topic else "invalid"
    metrics.MESSAGES_RECEIVED.labels(channel).inc()
    if topic is not None and _pages(parsed, topic):
        _store_alarm(conn, message, parsed, topic, config)
        return
    if isinstance(parsed, Rejected):
        _dead_letter(conn, message, config.hub_id, parsed.reason, parsed.detail)
    elif isinstance(parsed, StatusMessage):
        _store_status(conn, message, parsed, config)
    else:
        _store_series(conn, message, parsed, config)


class Writer:
    """Stores messages one transaction each, reconnecting to the database as needed."""

    def __init__(
        self,
        database_url: str,
        config: IngestConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.database_url = database_url
        self.config = config
        self._sleep = sleep
        self._conn: Conn | None = None

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, application_name=f"shouhu-hub-{self.config.hub_id}")
        return self._conn

    def store(self, message: Received) -> None:
        """Commit ``message``; returns only once it is durable. Retries database errors."""
        delay = 0.2
        failures = 0
        while True:
            try:
                conn = self._connection()
                with conn.transaction():
                    store_message(conn, message, self.config)
                metrics.COMMIT_SECONDS.observe(time.monotonic() - message.monotonic)
                parsed_channel = message.topic.rsplit("/", 1)[-1]
                metrics.MESSAGES_STORED.labels(parsed_channel[:16]).inc()
                return
            except psycopg.OperationalError as exc:
                failures = 0
                metrics.DATABASE_RETRIES.inc()
                log.warning("database unavailable (%s); retrying in %.1fs", exc, delay)
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                self._sleep(delay)
                delay = min(delay * 2, 5.0)
            except psycopg.Error as exc:
                # Not the database being away but this message failing to store (a
                # bug, a constraint). Retry a little, then keep it as a dead letter
                # rather than stall every message behind it.
                failures += 1
                log.exception("storing %s failed (%d)", message.topic, failures)
                if failures >= 3:
                    self._store_failed(message, exc)
                    return

    def _store_failed(self, message: Received, exc: Exception) -> None:
        conn = self._connection()
        with conn.transaction():
            _dead_letter(conn, message, self.config.hub_id, RejectReason.STORE_FAILED, repr(exc)[:1000])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
