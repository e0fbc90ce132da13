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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeGuard, TypeVar

import psycopg

from alerts.incidents import (
    Alarm,
    AlarmGroup,
    AlarmOutcome,
    AlarmResult,
    open_alarms,
    open_fallback_incident,
    record_alarm,
)
from alerts.timeline import wake_routers
from devices.contract import (
    ALARM_CHANNELS,
    DeviceMessage,
    MqttChannel,
    Rejected,
    RejectReason,
    SosPayload,
    StatusMessage,
    Topic,
    parse_message,
    parse_topic,
    payload_hash,
)
from devices.kinds import DeviceKind, IncidentKind
from hub import metrics
from hub.batch import SightingSink, prepare_staging, record_sightings_safely, storable_text, store_batch
from hub.mqtt import Received
from hub.sightings import Sighting
from shouhu.db import Conn
from shouhu.settings import DEFAULT_CANCEL_WINDOW_S

log = logging.getLogger(__name__)


# Rejections of an alarm that still page: the bytes arrived on a wristband's alarm
# topic (or one with extra levels after it), only unreadable.
UNREADABLE_ALARM = frozenset(
    {
        RejectReason.SCHEMA,
        RejectReason.MALFORMED_JSON,
        RejectReason.NOT_UTF8,
        RejectReason.OVERSIZED,
        RejectReason.TOO_DEEP,
        RejectReason.NUMBER_OUT_OF_RANGE,
        RejectReason.BAD_TEXT,
        RejectReason.UNKNOWN_TOPIC,
    }
)
STORE_TRIES = 3


@dataclass(frozen=True, slots=True)
class AlarmReceipt:
    """What the hub tells a wristband after its alarm committed (``…/receipt``)."""

    device_id: str
    msg_id: str | None
    incident_code: str | None
    state: str | None


@dataclass(frozen=True, slots=True)
class IngestConfig:
    hub_id: str
    ack_timeout_s: int
    cancel_window_s: int = DEFAULT_CANCEL_WINDOW_S


def _dead_letter(conn: Conn, message: Received, hub_id: str, reason: RejectReason, detail: str) -> None:
    conn.execute(
        "INSERT INTO dead_letters (received_at, hub_id, topic, payload, reason, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (message.received_at, hub_id, storable_text(message.topic[:1024]), message.payload, reason.value,
         storable_text(detail)),
    )
    metrics.DEAD_LETTERS.labels(reason.value).inc()


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
    conn: Conn,
    message: Received,
    parsed: DeviceMessage | Rejected,
    topic: Topic,
    config: IngestConfig,
    group: AlarmGroup | None = None,
) -> AlarmReceipt:
    if isinstance(parsed, Rejected):
        # Kept for forensics too; the page goes out regardless (DESIGN.md exception).
        _dead_letter(conn, message, config.hub_id, parsed.reason, parsed.detail)
    outcome = record_alarm(
        conn,
        _alarm_from(message, parsed, topic),
        ack_timeout_s=config.ack_timeout_s,
        hub_id=config.hub_id,
        cancel_window_s=config.cancel_window_s,
        group=group,
    )
    metrics.ALARMS.labels(outcome.result.value).inc()
    if outcome.result is AlarmResult.OPENED:
        log.warning("red incident %s opened by %s on %s", outcome.incident_id, topic.device_id, topic.channel)
    return _receipt(conn, topic.device_id, parsed, outcome)


def _receipt(conn: Conn, device_id: str, parsed: DeviceMessage | Rejected, outcome: AlarmOutcome) -> AlarmReceipt:
    """The incident this alarm opened or joined; for a redelivery, the device's newest."""
    msg_id = parsed.payload.msg_id if isinstance(parsed, DeviceMessage) else None
    if outcome.code is not None and outcome.state is not None:
        # Opened or joined: its statement returned the code and state (no query of its own).
        return AlarmReceipt(device_id, msg_id, outcome.code, outcome.state.value)
    incident_id = outcome.incident_id
    if incident_id is not None:
        row = conn.execute("SELECT code, state FROM incidents WHERE id = %s", (incident_id,)).fetchone()
    else:
        row = conn.execute(
            "SELECT code, state FROM incidents WHERE device_id = %s ORDER BY opened_at DESC, id DESC LIMIT 1",
            (device_id,),
        ).fetchone()
    return AlarmReceipt(device_id, msg_id, row[0] if row else None, row[1] if row else None)


def _pages(parsed: DeviceMessage | StatusMessage | Rejected, topic: Topic) -> TypeGuard[DeviceMessage | Rejected]:
    """Whether this message opens or joins a red incident.

    Any bytes on a wristband's SOS or fall topic page someone, even unreadable ones
    (DESIGN.md): only a bad topic or an unknown kind or channel is not an alarm.
    """
    if topic.kind is not DeviceKind.WRISTBAND or topic.channel not in ALARM_CHANNELS:
        return False
    return isinstance(parsed, DeviceMessage) or (isinstance(parsed, Rejected) and parsed.reason in UNREADABLE_ALARM)


def store_message(
    conn: Conn,
    message: Received,
    config: IngestConfig,
    record_sightings: SightingSink | None = None,
    group: AlarmGroup | None = None,
) -> AlarmReceipt | None:
    """Store one message in the caller's transaction; bad input is dead-lettered.

    An alarm opens or joins its incident and returns the receipt to publish after
    the commit; anything else is a batch of one. ``group``: what the alarms of this
    transaction share (``Writer.store_group``), which then wakes the routers itself.
    """
    parsed = parse_message(message.topic, message.payload)
    topic = parsed.topic
    if topic is not None and _pages(parsed, topic):
        metrics.MESSAGES_RECEIVED.labels(topic.channel.value).inc()
        receipt = _store_alarm(conn, message, parsed, topic, config, group)
        if record_sightings is not None and not message.retain:
            # A press proves the wristband alive too (when it is registered).
            registered = conn.execute(
                "SELECT 1 FROM devices WHERE id = %s AND kind = 'wristband'", (topic.device_id,)
            ).fetchone()
            if registered:
                sighting = Sighting(topic.device_id, DeviceKind.WRISTBAND, message.received_at, True)
                record_sightings_safely(conn, record_sightings, [sighting])
        return receipt
    store_batch(conn, [message], config.hub_id, record_sightings)
    return None


def _alarm_sightings(conn: Conn, messages: Sequence[Received], record: SightingSink) -> None:
    """A press proves its wristband alive: one liveness update for a group of alarms."""
    devices: dict[str, Received] = {}
    for message in messages:
        topic = parse_topic(message.topic)
        if isinstance(topic, Topic) and topic.kind is DeviceKind.WRISTBAND and not message.retain:
            devices[topic.device_id] = message
    if not devices:
        return
    rows = conn.execute(
        "SELECT id FROM devices WHERE id = ANY(%s) AND kind = 'wristband'", (sorted(devices),)
    ).fetchall()
    sightings = [
        Sighting(str(device_id), DeviceKind.WRISTBAND, devices[str(device_id)].received_at, True)
        for (device_id,) in rows
    ]
    if sightings:
        record_sightings_safely(conn, record, sightings)


T = TypeVar("T")
# A host that is unreachable (not just refusing) must not hold a lane for minutes.
CONNECT_TIMEOUT_S = 3


class DatabaseUnavailable(Exception):
    """The database stayed away longer than the caller was willing to wait."""


class StoreAlone(Enum):
    """A group member whose savepoint failed: store it by itself, after the group commits."""

    STORE_ALONE = "store_alone"


STORE_ALONE = StoreAlone.STORE_ALONE


class Writer:
    """Stores messages — one alarm, or one batch — per transaction, reconnecting as needed.

    A database that is away is waited for (with backoff), for as long as it takes or
    for ``outage_limit_s`` when the caller has something better to do meanwhile (the
    alarm lane pages from its spool): nothing is acknowledged meanwhile, so nothing
    is lost. A message that fails to store for another reason (a bug, a constraint)
    is retried a little and then kept as a dead letter, so it cannot stall
    everything behind it.
    """

    def __init__(
        self,
        database_url: str,
        config: IngestConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        lane: str = "alarm",
        record_sightings: SightingSink | None = None,
    ) -> None:
        self.database_url = database_url
        self.config = config
        self.lane = lane
        self.record_sightings = record_sightings
        self._sleep = sleep
        self._conn: Conn | None = None

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.database_url,
                application_name=f"shouhu-hub-{self.config.hub_id}"[:63],
                connect_timeout=CONNECT_TIMEOUT_S,
            )
            prepare_staging(self._conn)
            self._conn.commit()
        return self._conn

    def _committed(self, work: Callable[[Conn], T], outage_limit_s: float | None = None) -> T:
        """Run ``work`` in a transaction until it commits; database outages are waited out
        (for at most ``outage_limit_s``, then ``DatabaseUnavailable``)."""
        delay = 0.2
        started = time.monotonic()
        while True:
            try:
                conn = self._connection()
                with conn.transaction():
                    result = work(conn)
                if conn.broken or conn.closed:
                    # psycopg does not always raise when the connection dies under the
                    # COMMIT: never take "no exception" for "committed".
                    raise psycopg.OperationalError("the connection broke before the commit was confirmed")
                return result
            except psycopg.OperationalError as exc:
                metrics.DATABASE_RETRIES.inc()
                log.warning("database unavailable (%s); retrying in %.1fs", exc, delay)
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if outage_limit_s is not None and time.monotonic() - started >= outage_limit_s:
                    raise DatabaseUnavailable(str(exc)) from exc
                self._sleep(delay)
                delay = min(delay * 2, 5.0)

    def store(self, message: Received, *, outage_limit_s: float | None = None) -> AlarmReceipt | None:
        """Commit one message; returns only once it is durable (or dead-lettered).

        Whatever storing it raises — a database error other than an outage, a bug,
        a value the decoder let through — costs this message alone: after a few
        tries it is dead-lettered (and an alarm still pages, see ``_give_up``).
        """
        for failures in range(1, STORE_TRIES + 1):
            try:
                receipt = self._committed(
                    lambda conn: store_message(conn, message, self.config, self.record_sightings), outage_limit_s
                )
            except DatabaseUnavailable:
                raise
            except Exception as exc:
                metrics.LANE_ERRORS.labels(self.lane).inc()
                log.exception("storing %r failed (%d of %d)", message.topic[:200], failures, STORE_TRIES)
                self._reset()
                if failures == STORE_TRIES:
                    self._give_up(message, exc)
                    return None
                continue
            metrics.COMMIT_SECONDS.labels(self.lane).observe(time.monotonic() - message.monotonic)
            parsed_channel = message.topic.rsplit("/", 1)[-1]
            metrics.MESSAGES_STORED.labels(parsed_channel[:16]).inc()
            return receipt
        return None  # pragma: no cover - the loop returns on its last try

    def _reset(self) -> None:
        """After a failure that was not an outage: a fresh connection, in a known state
        (a COPY cut short by an exception may leave the old one mid-protocol)."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _give_up(self, message: Received, exc: Exception) -> None:
        """Keep the message as a dead letter — and if it was an alarm, page anyway.

        When in doubt, page: an SOS or fall that cannot be stored the normal way (a
        bug, a broken constraint) still opens a red incident for the county operators,
        by the plainest insert there is. If even that fails, the failure is logged as
        critical and the message acknowledged: holding it would stop every alarm
        behind it, and its redelivery would fail the same way.
        """
        try:
            self._committed(lambda conn: self._dead_letter_and_page(conn, message, exc))
        except Exception:
            metrics.LANE_ERRORS.labels(self.lane).inc()
            log.critical("could not even dead-letter %r; acknowledged and dropped", message.topic[:200], exc_info=True)
            self._reset()

    def _dead_letter_and_page(self, conn: Conn, message: Received, exc: Exception) -> None:
        _dead_letter(conn, message, self.config.hub_id, RejectReason.STORE_FAILED, repr(exc)[:1000])
        parsed = parse_topic(message.topic)
        topic = parsed if isinstance(parsed, Topic) else parsed.topic
        if topic is not None and topic.kind is DeviceKind.WRISTBAND and topic.channel in ALARM_CHANNELS:
            incident_id = open_fallback_incident(
                conn, topic.device_id, message.received_at, ack_timeout_s=self.config.ack_timeout_s
            )
            log.critical("alarm on %s could not be stored normally; fallback incident %s", message.topic, incident_id)

    def store_group(
        self, messages: Sequence[Received], *, outage_limit_s: float | None = None
    ) -> list[AlarmReceipt | StoreAlone | None]:
        """Commit several alarms in one transaction, each in a savepoint of its own.

        A mass event (a thousand presses in two seconds) must not wait for a thousand
        commits. One alarm whose storing fails costs only its savepoint; it comes back
        as ``STORE_ALONE`` for the caller to store by itself after this commit (the
        retries and the dead letter of ``store``). Nothing here is acknowledged: the
        caller acknowledges each message after this returns, i.e. after the commit.
        """
        alone: set[int] = set()

        def work(conn: Conn) -> list[AlarmReceipt | None]:
            alone.clear()
            receipts: list[AlarmReceipt | None] = []
            # Each area's escalation policy and every device read once per group, not once per alarm.
            group = AlarmGroup()
            topics = [parse_topic(m.topic) for m in messages]
            group.read_devices(conn, [topic.device_id for topic in topics if isinstance(topic, Topic)])
            opened = self._open_together(conn, messages, group)
            for index, message in enumerate(messages):
                if index in opened:
                    receipts.append(opened[index])
                    continue
                try:
                    with conn.transaction():
                        # Liveness once for the whole group, below: it is a third of an alarm's cost.
                        receipt = store_message(conn, message, self.config, None, group)
                    receipts.append(receipt)
                except psycopg.OperationalError:
                    raise
                except Exception:
                    if conn.broken or conn.closed:
                        raise
                    log.exception("storing %r in a group failed; it is stored alone", message.topic[:200])
                    alone.add(index)
                    receipts.append(None)
            if self.record_sightings is not None:
                stored = [m for i, m in enumerate(messages) if i not in alone and receipts[i] is not None]
                _alarm_sightings(conn, stored, self.record_sightings)
            if group.opened:
                wake_routers(conn, "alarms")  # once for the group; NOTIFY is delivered at the commit
            return receipts

        started = time.monotonic()
        try:
            receipts = self._committed(work, outage_limit_s)
        except DatabaseUnavailable:
            raise
        except Exception:
            log.exception("a group of %d alarms failed to commit; storing them one by one", len(messages))
            self._reset()
            return [STORE_ALONE] * len(messages)
        metrics.ALARM_GROUP_SIZE.observe(len(messages))
        done = time.monotonic()
        for message in messages:
            metrics.COMMIT_SECONDS.labels(self.lane).observe(done - message.monotonic)
        log.debug("%d alarms committed together in %.1f ms", len(messages), 1000 * (done - started))
        return [STORE_ALONE if index in alone else receipt for index, receipt in enumerate(receipts)]

    def _open_together(self, conn: Conn, messages: Sequence[Received], group: AlarmGroup) -> dict[int, AlarmReceipt]:
        """The group's readable presses and falls, stored together (``open_alarms``): their
        receipts by index. The rest, and all of them if storing them together fails, are
        left to be stored one by one, each in its own savepoint.

        Every alarm of the group goes to ``open_alarms`` in order, cancels and unreadable
        ones too: it takes a press only when nothing of the same resident came before it
        in the group, so that storing it first changes no outcome."""
        alarms: dict[int, tuple[Alarm, DeviceMessage | Rejected, Topic]] = {}
        try:
            for index, message in enumerate(messages):
                parsed = parse_message(message.topic, message.payload)
                topic = parsed.topic
                if topic is not None and _pages(parsed, topic):
                    alarms[index] = (_alarm_from(message, parsed, topic), parsed, topic)
        except Exception:
            # A message the parser chokes on (a bug): its place in the group is unknown, so
            # nothing is stored ahead of it; each is stored alone and it fails alone.
            log.exception("reading a group of %d alarms failed; each is stored by itself", len(messages))
            return {}
        if len(alarms) < 2:
            return {}
        try:
            with conn.transaction():
                outcomes = open_alarms(
                    conn,
                    [alarm for alarm, _parsed, _topic in alarms.values()],
                    ack_timeout_s=self.config.ack_timeout_s,
                    hub_id=self.config.hub_id,
                    group=group,
                )
        except psycopg.OperationalError:
            raise
        except Exception:
            if conn.broken or conn.closed:
                raise
            log.exception("storing %d alarms together failed; each is stored by itself", len(alarms))
            return {}
        receipts: dict[int, AlarmReceipt] = {}
        for (index, (_alarm, parsed, topic)), outcome in zip(alarms.items(), outcomes, strict=True):
            if outcome is None:
                continue
            metrics.MESSAGES_RECEIVED.labels(topic.channel.value).inc()
            metrics.ALARMS.labels(outcome.result.value).inc()
            if outcome.result is AlarmResult.OPENED:
                log.warning("red incident %s opened by %s on %s", outcome.incident_id, topic.device_id, topic.channel)
            receipts[index] = _receipt(conn, topic.device_id, parsed, outcome)
        return receipts

    def store_batch(self, messages: Sequence[Received], *, outage_limit_s: float | None = None) -> None:
        """Commit a batch of non-alarm messages; one that breaks the batch is stored alone."""
        started = time.monotonic()
        try:
            self._committed(
                lambda conn: store_batch(conn, messages, self.config.hub_id, self.record_sightings), outage_limit_s
            )
        except DatabaseUnavailable:
            raise
        except Exception:
            log.exception("a batch of %d failed to store; storing its messages one by one", len(messages))
            self._reset()
            for message in messages:
                self.store(message, outage_limit_s=outage_limit_s)
            return
        metrics.BATCH_SIZE.observe(len(messages))
        metrics.COMMIT_SECONDS.labels(self.lane).observe(time.monotonic() - min(m.monotonic for m in messages))
        metrics.BATCH_SECONDS.observe(time.monotonic() - started)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
