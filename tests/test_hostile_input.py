"""Hostile bytes on every topic, through a real Mosquitto into real `shouhu hub` (with a
bulk worker process, `--workers 2`) and `shouhu router` processes: whatever arrives, one
message's trouble is its own, in whichever process it lands.

After each batch of hostile messages a canary SOS from a wristband no hostile message
touched must still reach the phone network (issue 12, item 1: a single SOS nested
10,000 deep used to kill the alarm lane and silence every SOS after it).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.support.hub import wait_until
from tests.support.services import Mosquitto, http_status, shouhu_stack

# Hostile messages use these devices; the canaries use wb-0101 and up, so a hostile
# SOS (which still pages, as "payload unreadable") never joins a canary's incident.
HOSTILE_DEVICES = ("wb-0001", "wb-0002", "wb-0003", "cam-001", "cam-002", "ghost-9")
TOPICS = (
    "shouhu/v1/wristband/{d}/sos",
    "shouhu/v1/wristband/{d}/fall",
    "shouhu/v1/wristband/{d}/telemetry",
    "shouhu/v1/wristband/{d}/status",
    "shouhu/v1/wristband/{d}/receipt",
    "shouhu/v1/camera/{d}/health",
    "shouhu/v1/camera/{d}/status",
    "shouhu/v1/camera/{d}/sos",
    "shouhu/v1/wristband/{d}/sos/extra",
    "shouhu/v1/wristband/{d}/telemetry/x/y",
    "shouhu/v1/wristband/{d}/firmware",
    "shouhu/v1/toaster/{d}/telemetry",
    "shouhu/v1/{d}",
)
HEAD = b'{"msg_id": "%s", "ts": "2026-12-03T10:00:00+08:00", "action": "press", '
FIELDS = (b"steps", b"battery", b"heart_rate", b"spo2", b"lat", b"lon", b"fps", b"bitrate_kbps", b"confidence", b"x")
NUMBERS = (b"1e400", b"-1e999", b"NaN", b"Infinity", b"-Infinity", b"3000000000", b"1e20", b"-1", b"1.5", b"1e-400")
TEXTS = (b'"\\u0000"', b'"a\\u0000b"', b'"\\ud800"', b'"\\udfff tail"', b'"\xff\xfe"', b'"\xc3"')


def _head() -> bytes:
    return HEAD % uuid.uuid4().hex.encode()


def _deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    return _head() + b'"x": ' + opener * depth + b"1" + closer * depth + b"}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

payloads = st.one_of(
    st.binary(max_size=600),
    st.integers(33, 20_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(33, 12_000).map(lambda n: _deep(n, b'{"a": ', b"}")),
    st.integers(33, 12_000).map(lambda n: _deep(n, b"[", b"]")),
    st.integers(4_301, 8_000).map(lambda n: _head() + b'"steps": ' + b"9" * n + b"}"),
    st.tuples(st.sampled_from(FIELDS), st.sampled_from(NUMBERS)).map(lambda f: _head() + f[0] + b": " + f[1] + b"}"),
    st.tuples(st.sampled_from((b"msg_id", b"reason", b"x", b"action")), st.sampled_from(TEXTS)).map(
        lambda f: b'{"ts": "2026-12-03T10:00:00+08:00", "msg_id": "m", "' + f[0] + b'": ' + f[1] + b"}"
    ),
    st.integers(64 * 1024 + 1, 300_000).map(lambda n: _head() + b'"x": "' + b"a" * n + b'"}'),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from([f.decode() for f in FIELDS]), json_values, max_size=5).map(
        lambda d: _head() + json.dumps(d).encode()[1:]
    ),
)
messages = st.tuples(st.sampled_from(TOPICS), st.sampled_from(HOSTILE_DEVICES), payloads).map(
    lambda t: (t[0].format(d=t[1]), t[2])
)


@pytest.fixture(scope="module")
def hostile_stack(postgres: Any) -> Iterator[dict[str, Any]]:
    from tests.support.database import fresh_database

    broker = Mosquitto()
    broker.start()
    databases = fresh_database(postgres)
    url = next(databases)
    try:
        # With a bulk worker process: hostile telemetry reaches both processes' lanes.
        yield from shouhu_stack(url, broker, name="hostile", hub_args=("--workers", "2"))
    finally:
        broker.remove()
        next(databases, None)


class Canaries:
    """One wristband per canary press, each of a resident with no open incident."""

    def __init__(self) -> None:
        self.next = 101

    def take(self) -> str:
        device = f"wb-{self.next:04d}"
        self.next += 1
        return device


CANARIES = Canaries()


def publish_all(port: int, batch: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        sent = [client.publish(topic, payload, qos=1) for topic, payload in batch]
        for info in sent:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def resident_name(url: str, device_id: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT r.name FROM devices d JOIN residents r ON r.id = d.resident_id WHERE d.id = %s", (device_id,)
        ).fetchone()
    assert row is not None
    return str(row[0])


def canary_is_paged(stack: dict[str, Any]) -> None:
    device = CANARIES.take()
    name = resident_name(stack["database_url"], device)
    body = {"msg_id": str(uuid.uuid4()), "ts": datetime.now(UTC).isoformat(), "action": "press"}
    publish_all(stack["mosquitto"].port, [(f"shouhu/v1/wristband/{device}/sos", json.dumps(body).encode())])
    wait_until(
        lambda: [m for m in httpx.get(f"{stack['phone']}/_sim/messages").json() if name in m["body"]],
        timeout=15,
        what=f"the canary SOS of {device} ({name}) paged",
    )


@settings(
    max_examples=40,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=(HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large),
)
@given(batch=st.lists(messages, min_size=1, max_size=20))
# The faults issue 12 found, each on its own, as its first examples.
@example(batch=[("shouhu/v1/wristband/wb-0001/sos", b"[" * 10_000 + b"]" * 10_000)])
@example(batch=[("shouhu/v1/wristband/wb-0002/sos", _head() + b'"x": ' + b"7" * 4_301 + b"}")])
@example(batch=[("shouhu/v1/wristband/wb-0003/telemetry", _deep(10_000, b"[", b"]"))])
@example(batch=[("shouhu/v1/wristband/wb-0003/telemetry", _head() + b'"steps": 1e20}')])
@example(batch=[("shouhu/v1/wristband/wb-0003/telemetry", _head() + b'"steps": 3000000000}')])
@example(batch=[("shouhu/v1/wristband/wb-0001/sos", _head() + b'"x": "' + b"a" * (1024 * 1024) + b'"}')])
@example(batch=[("shouhu/v1/wristband/wb-0002/sos/x", _head()[:-2] + b"}")])
def test_hostile_input_never_silences_an_sos(hostile_stack: dict[str, Any], batch: list[tuple[str, bytes]]) -> None:
    publish_all(hostile_stack["mosquitto"].port, batch)
    canary_is_paged(hostile_stack)
    hub = hostile_stack["processes"][1]
    assert hub.process.poll() is None, f"the hub exited:\n{hub.output()[-3000:]}"
    assert http_status(hub.ready_url) == 200


def test_after_the_storm_nothing_was_stored_wrong_and_every_reason_was_named(hostile_stack: dict[str, Any]) -> None:
    """Runs after the property test (same module stack): what it left behind."""
    with psycopg.connect(hostile_stack["database_url"]) as conn:
        reasons = {r[0] for r in conn.execute("SELECT DISTINCT reason FROM dead_letters").fetchall()}
        wrapped = conn.execute("SELECT count(*) FROM telemetry WHERE steps < 0").fetchone()
        store_failed = conn.execute("SELECT count(*) FROM dead_letters WHERE reason = 'store_failed'").fetchone()
        unreadable = conn.execute("SELECT count(*) FROM incidents WHERE payload_unreadable").fetchone()
    assert {"too_deep", "number_out_of_range", "unknown_topic", "oversized"} <= reasons, reasons
    assert wrapped == (0,), "an integer past the column's range was stored wrapped"
    assert store_failed == (0,), "a message reached SQL that the decoder should have refused"
    assert unreadable is not None
    assert unreadable[0] >= 1, "an unreadable SOS must still open an incident"
