"""The bulk lane: telemetry, camera health and status, stored a batch per transaction.

One transaction per batch: parse every message, dead-letter what is unreadable or
names an unknown device, binary-COPY the rest into temporary staging tables, let
the ledger pick the first sightings (``INSERT … ON CONFLICT DO NOTHING RETURNING``)
and move only those into the time-partitioned tables, dead-letter reused ids, and
hand every sighting to liveness. The caller commits, then acknowledges the batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from devices.contract import (
    DeviceMessage,
    HealthPayload,
    MqttChannel,
    Rejected,
    RejectReason,
    StatusMessage,
    TelemetryPayload,
    parse_message,
)
from devices.kinds import DeviceKind
from hub import metrics
from hub.mqtt import Received
from hub.sightings import Sighting
from shouhu.db import Conn

log = logging.getLogger(__name__)

SightingSink = Callable[[Conn, Sequence[Sighting]], object]


@dataclass(frozen=True, slots=True)
class StagedSeries:
    """How one kind of series is staged and copied."""

    table: str
    channel: MqttChannel
    columns: tuple[str, ...]
    types: tuple[str, ...]


TELEMETRY = StagedSeries(
    "telemetry",
    MqttChannel.TELEMETRY,
    (
        "device_id",
        "msg_id",
        "ts",
        "received_at",
        "battery",
        "heart_rate",
        "spo2",
        "worn",
        "lat",
        "lon",
        "steps",
        "extra",
    ),
    ("text", "text", "timestamptz", "timestamptz", "int2", "int2", "int2", "bool", "float8", "float8", "int4", "jsonb"),
)
CAMERA_HEALTH = StagedSeries(
    "camera_health",
    MqttChannel.HEALTH,
    ("device_id", "msg_id", "ts", "received_at", "online", "reason", "fps", "bitrate_kbps", "storage_ok", "extra"),
    ("text", "text", "timestamptz", "timestamptz", "bool", "text", "float4", "float4", "bool", "jsonb"),
)
SERIES = {s.channel: s for s in (TELEMETRY, CAMERA_HEALTH)}


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL can hold it: no NUL, no lone surrogate (for dead letters,
    which keep whatever came)."""
    cleaned = text.replace("\x00", "\\x00")
    return cleaned.encode("utf-8", errors="backslashreplace").decode("utf-8")


def _round(value: float | None) -> int | None:
    return None if value is None else round(value)


def _row(series: StagedSeries, message: Received, parsed: DeviceMessage) -> tuple[Any, ...]:
    payload = parsed.payload
    head = (parsed.topic.device_id, payload.msg_id, payload.ts, message.received_at)
    if isinstance(payload, TelemetryPayload):
        body: tuple[Any, ...] = (
            _round(payload.battery),
            _round(payload.heart_rate),
            _round(payload.spo2),
            payload.worn,
            payload.lat,
            payload.lon,
            payload.steps,
        )
    elif isinstance(payload, HealthPayload):
        body = (payload.online, payload.reason, payload.fps, payload.bitrate_kbps, payload.storage_ok)
    else:  # pragma: no cover - only telemetry and health are staged
        raise TypeError(f"cannot stage {type(payload).__name__}")
    return (*head, *body, Jsonb(payload.extra), parsed.payload_hash)


def prepare_staging(conn: Conn) -> None:
    """Per-connection temporary staging tables, emptied at every commit."""
    for series in SERIES.values():
        staging = sql.Identifier(f"staging_{series.table}")
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS, payload_hash bytea NOT NULL)"
                " ON COMMIT DELETE ROWS"
            ).format(staging, sql.Identifier(series.table))
        )


@dataclass
class BatchResult:
    stored: dict[str, int] = field(default_factory=dict)
    redelivered: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message: Received
    reason: RejectReason
    detail: str
    payload: bytes | None = None  # kept instead of the MQTT payload (a gateway's dead letter)


def _dead_letters(conn: Conn, letters: list[DeadLetter], hub_id: str, result: BatchResult) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO dead_letters (received_at, hub_id, topic, payload, reason, detail)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            [
                (
                    d.message.received_at,
                    hub_id,
                    storable_text(d.message.topic[:1024]),
                    d.message.payload if d.payload is None else d.payload,
                    d.reason.value,
                    storable_text(d.detail),
                )
                for d in letters
            ],
        )
    for letter in letters:
        metrics.DEAD_LETTERS.labels(letter.reason.value).inc()
        result.dead_letters[letter.reason.value] = result.dead_letters.get(letter.reason.value, 0) + 1


def _known_devices(conn: Conn, ids: set[str]) -> dict[str, DeviceKind]:
    rows = conn.execute("SELECT id, kind FROM devices WHERE id = ANY(%s)", (sorted(ids),)).fetchall()
    return {str(device_id): DeviceKind(kind) for device_id, kind in rows}


def _stage_and_move(
    conn: Conn, series: StagedSeries, items: list[tuple[Received, DeviceMessage]], letters: list[DeadLetter]
) -> tuple[int, int]:
    """COPY into staging, keep first sightings via the ledger, dead-letter reused ids.

    Returns (stored, redelivered).
    """
    staging = f"staging_{series.table}"
    columns = (*series.columns, "payload_hash")
    with conn.cursor() as cur:
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(staging), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        with cur.copy(copy_sql) as copy:
            copy.set_types([*series.types, "bytea"])
            for message, parsed in items:
                copy.write_row(_row(series, message, parsed))
    cols = sql.SQL(", ").join(map(sql.Identifier, series.columns))
    moved = conn.execute(
        sql.SQL(
            """
            WITH fresh AS (
                INSERT INTO message_ledger (device_id, msg_id, payload_hash, channel, received_at)
                SELECT DISTINCT ON (device_id, msg_id) device_id, msg_id, payload_hash, {channel}, received_at
                FROM {staging} ORDER BY device_id, msg_id, received_at
                ON CONFLICT DO NOTHING
                RETURNING device_id, msg_id, payload_hash
            )
            INSERT INTO {table} ({cols})
            SELECT DISTINCT ON (s.device_id, s.msg_id) {scols}
            FROM {staging} s JOIN fresh f
              ON f.device_id = s.device_id AND f.msg_id = s.msg_id AND f.payload_hash = s.payload_hash
            ORDER BY s.device_id, s.msg_id, s.received_at
            """
        ).format(
            channel=sql.Literal(series.channel.value),
            staging=sql.Identifier(staging),
            table=sql.Identifier(series.table),
            cols=cols,
            scols=sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in series.columns),
        )
    ).rowcount
    if moved == len(items):
        # Every message was new (a backlog's usual case): nothing can be a reused id or a
        # redelivery, and the ledger is not read again. Its cost stays flat as it grows.
        return moved, 0
    # Anything staged whose key the ledger holds with another hash is a reused id.
    reused = conn.execute(
        sql.SQL(
            "SELECT s.device_id, s.msg_id, s.payload_hash FROM {} s JOIN message_ledger l"
            " ON l.device_id = s.device_id AND l.msg_id = s.msg_id WHERE l.payload_hash <> s.payload_hash"
        ).format(sql.Identifier(staging))
    ).fetchall()
    reused_keys = {(str(d), str(m), bytes(h)) for d, m, h in reused}
    for message, parsed in items:
        key = (parsed.topic.device_id, parsed.payload.msg_id, parsed.payload_hash)
        if key in reused_keys:
            letters.append(
                DeadLetter(
                    message, RejectReason.REUSED_MSG_ID, f"msg_id {parsed.payload.msg_id!r} seen with other content"
                )
            )
    redelivered = len(items) - max(moved, 0) - len(reused_keys)
    return max(moved, 0), max(redelivered, 0)


def _sighting(message: Received, parsed: DeviceMessage | StatusMessage, kind: DeviceKind) -> Sighting:
    topic = parsed.topic
    if isinstance(parsed, StatusMessage):
        # A retained status is history and an `offline` is a will or a goodbye:
        # neither proves the device is alive now.
        return Sighting(
            topic.device_id,
            kind,
            message.received_at,
            refreshes=parsed.online and not message.retain,
            reported_online=None if message.retain else parsed.online,
            reported_reason=None if parsed.online else "last_will",
        )
    payload = parsed.payload
    refreshes = not message.retain
    if isinstance(payload, TelemetryPayload):
        return Sighting(
            topic.device_id,
            kind,
            message.received_at,
            refreshes,
            payload.battery,
            payload.worn,
            payload.lat,
            payload.lon,
        )
    if isinstance(payload, HealthPayload):
        return Sighting(
            topic.device_id,
            kind,
            message.received_at,
            refreshes,
            # A retained report is history: it says nothing about the camera now.
            reported_online=None if message.retain else payload.online,
            reported_reason=None if message.retain else payload.reason,
        )
    return Sighting(topic.device_id, kind, message.received_at, refreshes)


def record_sightings_safely(conn: Conn, record: SightingSink, sightings: Sequence[Sighting]) -> None:
    """Liveness in a savepoint: if it fails, the message it came with still commits.

    An SOS must never be lost because device-state bookkeeping broke.
    """
    try:
        with conn.transaction():
            record(conn, sightings)
    except psycopg.OperationalError:
        # The database went away, not the bookkeeping: the whole transaction is lost
        # and must be retried by the caller, never reported as stored.
        raise
    except Exception:  # a constraint, a bug: the savepoint is rolled back, the messages stay
        if conn.broken or conn.closed:
            raise
        metrics.LIVENESS_FAILURES.inc()
        log.exception("recording %d sighting(s) failed; the messages are stored regardless", len(sightings))


def store_batch(
    conn: Conn, messages: Sequence[Received], hub_id: str, record_sightings: SightingSink | None = None
) -> BatchResult:
    """Store a batch of non-alarm messages in the caller's transaction."""
    result = BatchResult()
    letters: list[DeadLetter] = []
    parsed_items: list[tuple[Received, DeviceMessage | StatusMessage]] = []
    received: Counter[str] = Counter()
    for message in messages:
        parsed = parse_message(message.topic, message.payload)
        received[parsed.topic.channel.value if parsed.topic else "invalid"] += 1
        if isinstance(parsed, Rejected):
            letters.append(DeadLetter(message, parsed.reason, parsed.detail, parsed.raw))
        else:
            parsed_items.append((message, parsed))
    for channel_name, count in received.items():  # counted per batch: a label lookup costs more than a message
        metrics.MESSAGES_RECEIVED.labels(channel_name).inc(count)
    known = _known_devices(conn, {p.topic.device_id for _m, p in parsed_items})
    by_series: dict[MqttChannel, list[tuple[Received, DeviceMessage]]] = {}
    statuses: list[tuple[Received, StatusMessage]] = []
    sightings: list[Sighting] = []
    for message, parsed in parsed_items:
        topic = parsed.topic
        if known.get(topic.device_id) is not topic.kind:
            letters.append(DeadLetter(message, RejectReason.UNKNOWN_DEVICE, f"no {topic.kind} {topic.device_id!r}"))
            continue
        sightings.append(_sighting(message, parsed, topic.kind))
        if isinstance(parsed, StatusMessage):
            statuses.append((message, parsed))
        else:
            by_series.setdefault(topic.channel, []).append((message, parsed))
    for channel, items in by_series.items():
        stored, redelivered = _stage_and_move(conn, SERIES[channel], items, letters)
        result.stored[channel.value] = stored
        result.redelivered += redelivered
        metrics.MESSAGES_STORED.labels(channel.value).inc(stored)
    if statuses:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO device_events (device_id, at, event, reason, detail) VALUES (%s, %s, %s, %s, %s)",
                [
                    (
                        s.topic.device_id,
                        m.received_at,
                        "status_online" if s.online else "status_offline",
                        None if s.online else "last_will",
                        Jsonb({"retained": m.retain, "hub_id": hub_id}),
                    )
                    for m, s in statuses
                ],
            )
        result.stored["status"] = len(statuses)
        metrics.MESSAGES_STORED.labels("status").inc(len(statuses))
    if record_sightings is not None and sightings:
        record_sightings_safely(conn, record_sightings, sightings)
    if letters:
        _dead_letters(conn, letters, hub_id, result)
    return result
