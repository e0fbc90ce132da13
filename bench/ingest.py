"""Ingest: backlog drain (bare paho subscriber, one hub, two hubs) and SOS latency under telemetry load.

Starts its own Mosquitto (tests.support.services.Mosquitto: persistence on, max_queued_messages
1,000,000) and PostgreSQL 18, migrates, and loads the demo county.

Backlog drain. For each consumer the backlog is made first, so the load generator is
not inside the timed window at all: the consumer connects once (a bare subscriber
subscribes and disconnects; a hub starts, becomes ready, and is killed with SIGKILL),
so its persistent session holds its subscriptions; then a publisher process (a lean
raw-socket MQTT client, packets built in advance) sends N QoS 1 telemetry messages,
which queue in the broker (its publish rate is printed separately); then the consumer
starts again and is timed from the first message it received until all N are
consumed — counted in the bare subscriber's process, or committed rows in
``telemetry`` (polled every 20 ms) for the hubs. Consumers:

- bare paho subscriber that only counts, MQTT 3.1.1, clean_session=False: the
  broker's default max_inflight_messages (20) bounds its QoS 1 delivery;
- the same, MQTT 5 with Receive Maximum 5,000 — what the hub's CONNECT sets.
  The faster of the two is the "bare ceiling" the hubs are compared with;
- one ``shouhu hub``; one ``shouhu hub --workers N`` (``--workers``, default 2: the
  hub and N − 1 bulk worker processes on its shared subscription, one process tree);
  two ``shouhu hub`` processes (different SHOUHU_HUB_ID) sharing ``$share/shouhu/…``,
  all subscribed before the backlog is published. A hub's CPU and memory are its
  whole process tree's.

SOS latency under load. One fresh hub runs; the same publisher, paced every 10 ms,
sends telemetry at a steady rate (default 5,500 msg/s) and prints the rate it
achieved (sent, and acknowledged by the broker); meanwhile this process presses SOS
on 200 distinct wristbands (wb-0001…, one every 50 ms) from its own paho client and
polls open ``incidents`` from a thread. Latency is press publish → the incident row
seen committed, both instants from CLOCK_MONOTONIC in this process (poll interval
5 ms, so it reads up to ~5 ms high). The hub's own alarm-lane histogram (receipt by
its network thread → commit) is printed next to it, to show where the time goes. A
second run at a lower load (--context-rate, default 2,000 msg/s) gives context.

Also printed: CPU used by consumer, broker and PostgreSQL over each drain, the hubs'
bulk-lane busy time (from their /metrics), and the peak RSS of each hub (psutil).

A hub's drain is observed through the ledger's ``received_at`` index every 50 ms (a
``count(*)`` of ``telemetry`` every 20 ms took a fifth of a core from the hub) and ends
at the last telemetry commit's timestamp (``track_commit_timestamp`` is turned on).
CPU µs per message is printed for the consumer, the broker and, for hubs, PostgreSQL.
Then a kill -9 check at full speed: a hub (``--workers N``) SIGKILLed halfway through
a backlog and started again at once must store every message exactly once. The
big-ledger drain and the SOS runs use ``--workers N`` too. ``--ledger-keys N`` fills the
ledger to N old keys and drains with one hub again (its cost as the ledger grows);
``--no-sos`` and ``--no-two-hubs`` skip those runs. ``--embedded-broker`` runs only the
embedded broker (amqtt): the bare subscriber and one hub, each subscribed before a
full-speed burst, counting what arrives (amqtt loses most of a burst).

    .venv/bin/python -m bench.ingest --messages 60000
    .venv/bin/python -m bench.ingest --messages 60000 --no-sos --no-two-hubs --ledger-keys 10000000
    .venv/bin/python -m bench.ingest --messages 2000 --embedded-broker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg import sql

from hub.mqtt import alarm_client_id
from hub.workers import REPORT_EVERY_S, bulk_client_id
from shouhu.embedded.broker import start_embedded_broker
from shouhu.embedded.postgres import create_database, free_port, wheel_bin_dir
from shouhu.migrations import MigrationContext, migrate
from simulators.wristband import alarm_payload, publish_raw
from tests.support.services import SHOUHU_BIN, STARTED_PROCESSES, Mosquitto, ShouhuProcess, shouhu_env, start_postgres

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
WRISTBANDS = 240  # wb-0001 … wb-0240 in the demo county
# What the load's msg_ids are (--msg-ids): "time-ordered" (UUIDv7, as the contract
# recommends and Shouhu's gateways and simulators send: each device's new keys land at
# the end of its range of the ledger's primary key) or "random" (UUIDv4: on random leaves).
MSG_IDS = ["time-ordered"]
HUB_RECEIVE_MAXIMUM = 5_000  # hub/service.py BULK_INBOX_SIZE, sent as Receive Maximum
DRAIN_TIMEOUT_S = 600.0
OBSERVE_EVERY_S = 0.05
TELEMETRY = "shouhu/v1/+/+/telemetry"

# The load generator: a lean MQTT 3.1.1 publisher on a raw socket (no paho), so that
# it costs little CPU and cannot be the bottleneck. All PUBLISH packets (QoS 1,
# distinct msg_ids) are built before the clock starts. rate 0: as fast as the broker
# acknowledges (the backlog); rate > 0: paced every 10 ms to the schedule, for
# `duration` s. A reader thread counts PUBACKs; unacknowledged packets stay < 60,000
# (packet ids are 16-bit). Prints one JSON line with what it sent and had acknowledged.
PUBLISHER = textwrap.dedent(
    """
    import json, socket, sys, threading, time, uuid
    from datetime import UTC, datetime
    port, count, rate, duration, devices = (
        int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    ordered = sys.argv[6] == "time-ordered"
    last_ms = seq = 0
    def uuid7():
        # RFC 9562 UUIDv7, method 1: 48 bits of Unix ms, a 12-bit counter within the ms.
        global last_ms, seq
        ms = time.time_ns() // 1_000_000
        if ms > last_ms:
            last_ms, seq = ms, 0
        else:
            seq += 1
            if seq > 0xFFF:
                last_ms, seq = last_ms + 1, 0
        tail = uuid.uuid4().hex
        h = f"{last_ms:012x}"
        return f"{h[:8]}-{h[8:]}-7{seq:03x}-{8 | int(tail[0], 16) & 3:x}{tail[1:4]}-{tail[4:16]}"
    if rate > 0:
        count = int(rate * duration) + 1
    def remaining(n):
        out = bytearray()
        while True:
            byte, n = n % 128, n // 128
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)
    def string(text):
        data = text.encode()
        return len(data).to_bytes(2, "big") + data
    stamp = datetime.now(UTC).isoformat()
    packets = []
    for i in range(count):
        msg_id = uuid7() if ordered else str(uuid.uuid4())
        body = json.dumps({"msg_id": msg_id, "ts": stamp, "battery": 80, "heart_rate": 72, "worn": True}).encode()
        topic = f"shouhu/v1/wristband/wb-{i % devices + 1:04d}/telemetry"
        variable = string(topic) + (i % 65535 + 1).to_bytes(2, "big")
        packets.append(b"\x32" + remaining(len(variable) + len(body)) + variable + body)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connect = string("MQTT") + bytes([4, 0x02, 0, 0]) + string(f"bench-load-{uuid.uuid4().hex[:8]}")
    sock.sendall(b"\x10" + remaining(len(connect)) + connect)
    connack = sock.recv(4)
    if len(connack) != 4 or connack[0] != 0x20 or connack[3] != 0:
        sys.exit(f"CONNACK refused: {connack!r}")
    acked = 0
    def read():
        global acked
        pending = 0
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += len(data)
            acked += pending // 4  # only PUBACKs (4 bytes each) come back
            pending %= 4
    threading.Thread(target=read, daemon=True).start()
    print("ready", flush=True)
    started = time.monotonic()
    sent = worst_lag = 0
    per_second, second_mark, second_sent = [], started, 0
    while sent < count:
        now = time.monotonic()
        if rate > 0 and now - started >= duration:
            break
        due = min(count, int(rate * (now - started)) + 1) if rate > 0 else min(count, sent + 500)
        worst_lag = max(worst_lag, due - sent)
        due = min(due, acked + 60000)
        if due > sent:
            sock.sendall(b"".join(packets[sent:due]))
            sent = due
        if now - second_mark >= 1.0:
            per_second.append((sent - second_sent) / (now - second_mark))
            second_mark, second_sent = now, sent
        if rate > 0:
            time.sleep(max(0.0, 0.01 - (time.monotonic() - now)))
        elif due == sent and sent - acked >= 60000:
            time.sleep(0.001)
    window = time.monotonic() - started
    acked_in_window = acked
    deadline = time.monotonic() + 60
    while acked < sent and time.monotonic() < deadline:
        time.sleep(0.002)
    last_ack = time.monotonic() - started
    sock.close()
    print(json.dumps({"sent": sent, "seconds": window, "until_last_ack": last_ack, "acked": acked,
                      "acked_in_window": acked_in_window, "worst_lag": worst_lag,
                      "min_second": min(per_second or [0.0]), "cpu": time.process_time()}), flush=True)
    """
)

# A bare subscriber that only counts. "prepare": make the persistent session and its
# subscription, then leave. "drain": reconnect to that session and count N messages.
# "live": subscribe, say so, and count N messages as they are published.
SUBSCRIBER = textwrap.dedent(
    """
    import json, sys, threading, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    port, mode, client_id, version, receive_max, topic = (
        int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    count = int(sys.argv[7]) if mode in ("drain", "live") else 0
    seen = 0
    first = None
    cpu_first = 0.0
    connected_at = None
    done = threading.Event()
    subscribed = threading.Event()
    def on_connect(client, userdata, flags, reason_code, properties):
        global connected_at
        connected_at = time.time()
        if mode in ("prepare", "live"):
            client.subscribe(topic, qos=1)
    def on_subscribe(client, userdata, mid, reason_codes, properties):
        subscribed.set()
    def on_message(client, userdata, message):
        global seen, first, cpu_first
        if first is None:
            first = time.time()
            cpu_first = time.process_time()
        seen += 1
        if seen == count:
            done.set()
    if version == 5:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        properties.ReceiveMaximum = receive_max
        connect_args = {"clean_start": False, "properties": properties}
    else:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv311, clean_session=False)
        connect_args = {}
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port, **connect_args)
    client.loop_start()
    if mode == "prepare":
        if not subscribed.wait(10):
            sys.exit("no SUBACK")
        client.disconnect()
        client.loop_stop()
        print(json.dumps({"prepared": True}), flush=True)
        sys.exit(0)
    if mode == "live":
        if not subscribed.wait(30):
            sys.exit("no SUBACK")
        print("subscribed", flush=True)
        # Until all came, or nothing more for 5 s (the embedded broker loses messages).
        counted, quiet_since = -1, time.time()
        while not done.wait(0.1):
            if seen != counted:
                counted, quiet_since = seen, time.time()
            elif time.time() - quiet_since > (5 if seen else 30):
                break
        print(json.dumps({"connected": connected_at, "first": first or time.time(), "last": time.time(),
                          "cpu": time.process_time() - cpu_first, "seen": seen}), flush=True)
        sys.exit(0)
    if not done.wait(600):
        sys.exit(f"only {seen} of {count} received")
    last = time.time()
    cpu = time.process_time() - cpu_first
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"connected": connected_at, "first": first, "last": last,
                      "cpu": cpu}), flush=True)
    """
)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[min(len(ordered), int(rank)) - 1]


def run_json(args: list[str]) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", *args], check=True, capture_output=True, text=True)
    parsed: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def publish_backlog(port: int, count: int) -> float:
    """Queue ``count`` telemetry messages in the broker; returns the publisher's rate (msg/s)."""
    result = run_json([PUBLISHER, str(port), str(count), "0", "0", str(WRISTBANDS), MSG_IDS[0]])
    if result["acked"] < count:
        raise RuntimeError(f"the broker acknowledged only {result['acked']:,.0f} of {count:,}")
    return count / result["until_last_ack"]


def clear_session(port: int, client_id: str, *, version: int = 5) -> None:
    """Delete a client's persistent session: connect with a clean start and no expiry."""
    connected = threading.Event()
    if version == 3:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv311, clean_session=True
        )
        client.on_connect = lambda *_: connected.set()
        client.connect("127.0.0.1", port)
        client.loop_start()
        if not connected.wait(10):
            raise RuntimeError(f"could not clear the session of {client_id}")
        client.disconnect()
        client.loop_stop()
        return
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", port, clean_start=True, properties=properties)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"could not clear the session of {client_id}")
    client.disconnect()
    client.loop_stop()


@dataclass
class Drain:
    name: str
    count: int
    publish_rate: float
    seconds: float
    consumer_cpu: float  # CPU seconds of the consumer process(es) over the window
    broker_cpu: float
    detail: str = ""
    postgres_cpu: float | None = None  # the hubs' drains only

    def per_message_us(self, cpu: float) -> float:
        return 1e6 * cpu / self.count

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def bare_drain(broker: Mosquitto, count: int, version: int, receive_max: int) -> Drain:
    client_id = f"bench-bare-v{version}"
    topic = "$share/bare/shouhu/v1/+/+/telemetry"
    common = [str(broker.port)]
    run_json([SUBSCRIBER, *common, "prepare", client_id, str(version), str(receive_max), topic])
    rate = publish_backlog(broker.port, count)
    broker_process = psutil.Process(broker.process.pid if broker.process else 0)
    broker_before = sum(broker_process.cpu_times()[:2])
    result = run_json([SUBSCRIBER, *common, "drain", client_id, str(version), str(receive_max), topic, str(count)])
    broker_cpu = sum(broker_process.cpu_times()[:2]) - broker_before
    clear_session(broker.port, client_id, version=version)
    name = (
        f"bare paho subscriber, MQTT 5, Receive Maximum {receive_max:,}"
        if version == 5
        else "bare paho subscriber, MQTT 3.1.1 (broker inflight default 20)"
    )
    return Drain(
        name,
        count,
        rate,
        result["last"] - result["first"],
        result["cpu"],
        broker_cpu,
        detail=f"connect → first message {1000 * (result['first'] - result['connected']):.0f} ms",
    )


@dataclass
class Stack:
    broker: Mosquitto
    url: str
    env: dict[str, str]
    data_dir: Path
    peak_rss: dict[str, int] = field(default_factory=dict)
    started: list[ShouhuProcess] = field(default_factory=list)

    def hub(self, hub_id: str, *, wait_ready: bool, workers: int = 1) -> tuple[ShouhuProcess, int]:
        port = free_port()
        env = {**self.env, "SHOUHU_HUB_ID": hub_id, "SHOUHU_METRICS_PORT": str(port)}
        ready = f"http://127.0.0.1:{port}/readyz" if wait_ready else None
        process = ShouhuProcess(["hub", "--workers", str(workers)], env, ready_url=ready)
        self.started.append(process)  # before start(): its log directory is removed at the end
        return process.start(timeout=60), port

    def telemetry_rows(self, conn: psycopg.Connection[tuple[Any, ...]]) -> int:
        row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
        return int(row[0]) if row else 0

    def sample_rss(self, hubs: list[ShouhuProcess]) -> None:
        """Peak resident memory of each hub's process tree (its workers included)."""
        for hub in hubs:
            if hub.process is not None and hub.process.poll() is None:
                rss = 0
                for process in hub_tree(hub):
                    with contextlib.suppress(psutil.Error):
                        rss += process.memory_info().rss
                key = " ".join(hub.env["SHOUHU_HUB_ID"].split())
                self.peak_rss[key] = max(self.peak_rss.get(key, 0), rss)


def hub_tree(hub: ShouhuProcess) -> list[psutil.Process]:
    """A hub process and its children (``--workers``: the bulk workers)."""
    if hub.process is None:
        return []
    try:
        parent = psutil.Process(hub.process.pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(hub: ShouhuProcess) -> None:
    """SIGKILL the hub; its orphaned workers stop by themselves (within a second): wait for them."""
    children = hub_tree(hub)[1:]
    hub.kill(9)
    psutil.wait_procs(children, timeout=30)


METRICS = {
    "stored": r'shouhu_hub_messages_stored_total\{channel="telemetry"\}',
    "batches": r"shouhu_hub_batch_commit_seconds_count",
    "batch_seconds": r"shouhu_hub_batch_commit_seconds_sum",
    "batched": r"shouhu_hub_batch_size_sum",
    "alarm_seconds": r'shouhu_hub_commit_seconds_sum\{lane="alarm"\}',
    "alarms": r'shouhu_hub_commit_seconds_count\{lane="alarm"\}',
}


def hub_metrics(metrics_port: int) -> dict[str, float]:
    """The hub's own counters: telemetry stored, bulk batches, time inside store_batch."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for key, pattern in METRICS.items():
        found = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
        values[key] = float(found.group(1)) if found else 0.0
    return values


def postgres_cpu(stack: Stack) -> float:
    """CPU seconds used so far by the cluster's processes (postmaster and backends)."""
    pid = int((stack.data_dir / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pid)
    total = 0.0
    for process in [postmaster, *postmaster.children()]:
        with contextlib.suppress(psutil.Error):
            total += sum(process.cpu_times()[:2])
    return total


def joined(template: str, values: list[dict[str, float]]) -> str:
    return ", ".join(template.format(**v) for v in values)


def ledger_rows_since(conn: psycopg.Connection[tuple[Any, ...]], since: datetime) -> int:
    row = conn.execute("SELECT count(*) FROM message_ledger WHERE received_at >= %s", (since,)).fetchone()
    return int(row[0]) if row else 0


def last_commit(conn: psycopg.Connection[tuple[Any, ...]], since: datetime) -> datetime:
    """When the last telemetry row received since ``since`` was committed (track_commit_timestamp)."""
    row = conn.execute(
        "SELECT max(pg_xact_commit_timestamp(xmin)) FROM telemetry WHERE received_at >= %s", (since,)
    ).fetchone()
    if row is None or row[0] is None:
        raise RuntimeError("no commit timestamp: is track_commit_timestamp on?")
    committed: datetime = row[0]
    return committed


def wal_written(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[int, int]:
    """WAL bytes and full-page images written so far by the cluster (pg_stat_wal)."""
    row = conn.execute("SELECT wal_bytes, wal_fpi FROM pg_stat_wal").fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def wal_position(conn: psycopg.Connection[tuple[Any, ...]]) -> str:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


FULL_PAGE_REFERENCE = re.compile(r"blkref #\d+: rel \d+/\d+/(\d+)(?: fork (\w+))? blk \d+ FPW")


def full_pages_by_relation(
    conn: psycopg.Connection[tuple[Any, ...]], data_dir: Path, start: str, end: str
) -> list[tuple[str, int]]:
    """Which relations the full-page images between two WAL positions were of, most first
    (``pg_waldump``): what a drain's first touches after a checkpoint landed on."""
    names = {
        str(node): str(name)
        for node, name in conn.execute("SELECT pg_relation_filenode(oid), relname FROM pg_class").fetchall()
        if node is not None
    }
    dumped = subprocess.run(
        [str(wheel_bin_dir() / "pg_waldump"), "-p", str(data_dir / "pg_wal"), "-s", start, "-e", end],
        capture_output=True,
        text=True,
        check=False,
    )
    counts: dict[str, int] = {}
    for match in FULL_PAGE_REFERENCE.finditer(dumped.stdout):
        name = names.get(match.group(1), f"filenode {match.group(1)}")
        if match.group(2):
            name += f" ({match.group(2)})"
        counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    if dumped.returncode != 0:  # e.g. a checkpoint recycled the first segments already
        ranked.insert(0, (f"pg_waldump incomplete: {dumped.stderr.strip()[:80]}", 0))
    return ranked


def lock_waiters(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """Backends of this database waiting on a lock right now."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    return int(row[0]) if row else 0


def hubs_cpu(running: list[tuple[ShouhuProcess, int]]) -> float:
    """CPU seconds (user + system) the hub processes, their workers included, have used so far."""
    total = 0.0
    for hub, _ in running:
        for process in hub_tree(hub):
            with contextlib.suppress(psutil.Error):
                total += sum(process.cpu_times()[:2])
    return total


def clear_hub_sessions(broker: Mosquitto, hub_id: str, workers: int = 1) -> None:
    """Every session of a hub: the bulk one (its id), the alarm one (``<id>-alarm``) and
    its workers' (``<id>-bulk<k>``)."""
    clear_session(broker.port, hub_id)
    clear_session(broker.port, alarm_client_id(hub_id))
    for number in range(2, workers + 1):
        clear_session(broker.port, bulk_client_id(hub_id, number))


def scrape_hubs(running: list[tuple[ShouhuProcess, int]], seconds: float, workers: int) -> list[dict[str, float]]:
    """Each hub's counters after a drain of ``seconds``, with batch size and lane busy time."""
    if workers > 1:
        time.sleep(REPORT_EVERY_S + 0.5)  # the workers' last counts reach the hub's /metrics
    scraped = []
    for _, port in running:
        m = hub_metrics(port)
        batches = max(m["batches"], 1.0)
        busy = m["batch_seconds"] / seconds
        scraped.append(
            {**m, "size": m["batched"] / batches, "busy": busy, "per_batch": 1000 * m["batch_seconds"] / batches}
        )
    return scraped


def make_sessions(stack: Stack, hub_ids: list[str], workers: int) -> None:
    """Fresh sessions for the hubs (and their workers), subscribed, then left by a SIGKILL:
    the sessions and their $share subscriptions stay in the broker for the backlog."""
    for hub_id in hub_ids:
        clear_hub_sessions(stack.broker, hub_id, workers)
    first_run = [stack.hub(hub_id, wait_ready=True, workers=workers)[0] for hub_id in hub_ids]
    for hub in first_run:
        kill_tree(hub)


def hub_drain(stack: Stack, count: int, hub_ids: list[str], sos_device: str | None = None, workers: int = 1) -> Drain:
    """Sessions first (start, ready, SIGKILL), then the backlog, then restart and time the commits.

    With ``sos_device``, an SOS is pressed after the backlog is queued: the time from
    spawning the hub to its incident committed is the issue-12 measure (an SOS behind
    a telemetry backlog), reported in the drain's detail.
    """
    make_sessions(stack, hub_ids, workers)
    rate = publish_backlog(stack.broker.port, count)
    if sos_device is not None:
        publish_raw(stack.broker.url, f"shouhu/v1/wristband/{sos_device}/sos", alarm_payload("sos"))
    sos_seconds: float | None = None
    broker_process = psutil.Process(stack.broker.process.pid if stack.broker.process else 0)
    with psycopg.connect(stack.url, autocommit=True) as conn:
        baseline = stack.telemetry_rows(conn)
        spawned = datetime.now(UTC)
        broker_before, postgres_before = sum(broker_process.cpu_times()[:2]), postgres_cpu(stack)
        wal_before, wal_start = wal_written(conn), wal_position(conn)
        spawned_monotonic = time.monotonic()
        running = [stack.hub(hub_id, wait_ready=False, workers=workers) for hub_id in hub_ids]
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        cpu_at_first_row: float | None = None
        lock_samples: list[int] = []
        # Progress from the ledger's received_at index (only this drain's entries are
        # read): a count(*) of telemetry every 20 ms took a fifth of a core from the hub.
        while (rows := ledger_rows_since(conn, spawned)) < count or stack.telemetry_rows(conn) < baseline + count:
            if cpu_at_first_row is None and rows > 0:
                cpu_at_first_row = hubs_cpu(running)
            lock_samples.append(lock_waiters(conn))
            stack.sample_rss([hub for hub, _ in running])
            if sos_device is not None and sos_seconds is None and sos_opened(conn, sos_device):
                sos_seconds = time.monotonic() - spawned_monotonic
            if time.monotonic() > deadline:
                raise TimeoutError(f"{hub_ids}: not all {count} rows committed in {DRAIN_TIMEOUT_S:.0f} s")
            time.sleep(OBSERVE_EVERY_S)
        finished = last_commit(conn, spawned)
        broker_cpu = sum(broker_process.cpu_times()[:2]) - broker_before
        pg_cpu = postgres_cpu(stack) - postgres_before
        wal_bytes, wal_fpi = (after - before for after, before in zip(wal_written(conn), wal_before, strict=True))
        full_pages = full_pages_by_relation(conn, stack.data_dir, wal_start, wal_position(conn))
        hub_cpu = hubs_cpu(running) - (cpu_at_first_row or 0.0)
        row = conn.execute("SELECT min(received_at) FROM telemetry WHERE received_at >= %s", (spawned,)).fetchone()
        first_received: datetime = row[0] if row and row[0] else spawned
    seconds = (finished - first_received).total_seconds()
    scraped = scrape_hubs(running, seconds, workers)
    direct = sum("direct subscription" in hub.output() for hub, _ in running)
    for hub, _ in running:
        hub.stop()
    for hub_id in hub_ids:
        clear_hub_sessions(stack.broker, hub_id, workers)
    name = "one shouhu hub" if len(hub_ids) == 1 else f"{len(hub_ids)} shouhu hubs sharing $share/shouhu/…"
    name += f" --workers {workers}" if workers > 1 else ""
    detail = (
        f"spawn → first message {(first_received - spawned).total_seconds():.2f} s; "
        f"committed per hub: {joined('{stored:,.0f}', scraped)}; "
        f"mean batch {joined('{size:.0f}', scraped)} messages, bulk lane inside store_batch "
        f"{joined('{busy:.0%}', scraped)} of the window, {joined('{per_batch:.0f}', scraped)}"
        f" ms per batch; PostgreSQL CPU {pg_cpu / seconds:.0%} of a core, WAL {wal_bytes / count:,.0f} bytes and"
        f" {wal_fpi / count:.2f} full-page images per message"
        f" ({', '.join(f'{name} {n:,}' for name, n in full_pages[:4]) or 'none'}); a backend waiting on a row lock in"
        f" {sum(1 for n in lock_samples if n) / max(len(lock_samples), 1):.0%} of {len(lock_samples)} samples"
    )
    if sos_device is not None:
        detail += (
            f"; an SOS pressed behind the backlog: incident committed {sos_seconds:.2f} s after the hub was spawned"
            if sos_seconds is not None
            else "; the SOS pressed behind the backlog was committed only after the whole backlog"
        )
    if direct:
        detail += f"; {direct} hub(s) fell back to a direct telemetry subscription (share probe behind the backlog)"
    return Drain(name, count, rate, seconds, hub_cpu, broker_cpu, detail, pg_cpu)


def embedded_broker_drains(url: str, env: dict[str, str], count: int) -> list[Drain]:
    """The embedded broker (amqtt, MQTT 3.1.1, no shared subscriptions): the bare
    subscriber, then one hub, each subscribed before ``count`` messages are published
    at full speed — a live stream, because amqtt delivers a persistent session's queued
    backlog too slowly to time (20,000 messages not drained in 10 minutes). amqtt
    acknowledges every publish but delivers only part of a burst, so each consumer
    stops 5 s after its last message and says how many came."""
    port = free_port()
    broker = start_embedded_broker(port)
    broker_process = psutil.Process(broker.pid)
    try:
        subscriber = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER, str(port), "live", "bench-bare-amqtt", "3", "0", TELEMETRY, str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert subscriber.stdout is not None
        if subscriber.stdout.readline().strip() != "subscribed":
            raise RuntimeError("the bare subscriber did not subscribe on the embedded broker")
        broker_before = sum(broker_process.cpu_times()[:2])
        rate = publish_backlog(port, count)
        out, _ = subscriber.communicate(timeout=DRAIN_TIMEOUT_S)
        result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
        bare = Drain(
            f"bare paho subscriber, MQTT 3.1.1, embedded broker (amqtt), live stream: {result['seen']:,.0f} of"
            f" {count:,} delivered",
            max(int(result["seen"]), 1),
            rate,
            result["last"] - result["first"],
            result["cpu"],
            sum(broker_process.cpu_times()[:2]) - broker_before,
        )
        return [bare, embedded_hub_drain(url, env, port, broker_process, count)]
    finally:
        broker.terminate()
        broker.wait(15)


def embedded_hub_drain(url: str, env: dict[str, str], port: int, broker_process: psutil.Process, count: int) -> Drain:
    """One hub on the embedded broker, ready before the stream is published."""
    metrics_port = free_port()
    hub = ShouhuProcess(
        ["hub"],
        {
            **env,
            "SHOUHU_MQTT_URL": f"mqtt://127.0.0.1:{port}",
            "SHOUHU_HUB_ID": "bench-hub-amqtt",
            "SHOUHU_METRICS_PORT": str(metrics_port),
        },
        ready_url=f"http://127.0.0.1:{metrics_port}/readyz",
    )
    try:
        hub.start(timeout=90)
        with psycopg.connect(url, autocommit=True) as conn:
            since = datetime.now(UTC)
            hub_before = hubs_cpu([(hub, metrics_port)])
            broker_before = sum(broker_process.cpu_times()[:2])
            rate = publish_backlog(port, count)
            stored, quiet_since = -1, time.monotonic()
            while (rows := ledger_rows_since(conn, since)) < count:
                if rows != stored:
                    stored, quiet_since = rows, time.monotonic()
                elif time.monotonic() - quiet_since > (5 if rows else 30):
                    break
                time.sleep(OBSERVE_EVERY_S)
            stored = ledger_rows_since(conn, since)
            finished = last_commit(conn, since)
            row = conn.execute("SELECT min(received_at) FROM telemetry WHERE received_at >= %s", (since,)).fetchone()
            first: datetime = row[0] if row and row[0] else since
            hub_cpu = hubs_cpu([(hub, metrics_port)]) - hub_before
            broker_cpu = sum(broker_process.cpu_times()[:2]) - broker_before
        return Drain(
            f"one shouhu hub, embedded broker (amqtt), live stream: {stored:,} of {count:,} stored",
            max(stored, 1),
            rate,
            (finished - first).total_seconds(),
            hub_cpu,
            broker_cpu,
            detail="hub CPU counted from its readiness, so it includes its idle ticks",
        )
    finally:
        hub.kill(9)
        shutil.rmtree(hub.log_path.parent, ignore_errors=True)


# Key g of a fill of ``keys``: received from six days and an hour back, evenly over six
# days, the newest an hour before the drains — inside the ledger's 7-day retention, so that no hub's upkeep
# deletes the fill during a drain (it did while the fill was dated 30 days back, and those
# deletes' page writes were counted as the drain's).
FILL_FIRST = "now() - interval '6 days 1 hour'"
FILL_RECEIVED_SQL = f"{FILL_FIRST} + g * (interval '6 days' / {{keys}})"
# A UUIDv7 text for key g, of its receiving time: each device's keys grow with g as a
# device's own would over the week.
ORDERED_ID_SQL = """(
    SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-7' || substr(r, 1, 3) || '-8' || substr(r, 4, 3)
           || '-' || substr(r, 7, 12)
    FROM (SELECT lpad(to_hex((extract(epoch FROM {received}) * 1000)::bigint), 12, '0') AS h,
                 md5(g::text) AS r) parts
)"""


def fill_ledger(url: str, keys: int) -> float:
    """Older entries in ``message_ledger`` until it holds ``keys``, as a week of a county's
    traffic leaves it (its retention is 7 days); returns the seconds it took."""
    started = time.monotonic()
    received = FILL_RECEIVED_SQL.format(keys=int(keys))
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM message_ledger").fetchone()
        have = int(row[0]) if row else 0
        for start in range(have, keys, 1_000_000):
            conn.execute(
                sql.SQL(
                    "INSERT INTO message_ledger (device_id, msg_id, payload_hash, channel, received_at)"
                    " SELECT 'wb-' || lpad((g % {devices} + 1)::text, 4, '0'), {msg_id}, sha256(g::text::bytea),"
                    " 'telemetry', {received} FROM generate_series({first}, {last}) g"
                ).format(
                    devices=sql.Literal(WRISTBANDS),
                    msg_id=sql.SQL(
                        ORDERED_ID_SQL.format(received=received) if MSG_IDS[0] == "time-ordered" else "md5(g::text)"
                    ),
                    received=sql.SQL(received),
                    first=sql.Literal(start),
                    last=sql.Literal(min(start + 1_000_000, keys) - 1),
                )
            )
        conn.execute("VACUUM ANALYZE message_ledger")
        # Written out now, not by a checkpoint inside the next drain's window.
        conn.execute("CHECKPOINT")
    return time.monotonic() - started


def ledger_size(url: str) -> str:
    """The ledger's primary-key index: its size and leaf pages, what a drain's inserts land on."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_relation_size('message_ledger_pkey'), current_setting('checkpoint_timeout'),"
            " current_setting('wal_compression'), current_setting('max_wal_size')"
        ).fetchone()
    assert row is not None
    return (
        f"ledger primary key: {row[0] / 2**20:,.0f} MiB ({row[0] // 8192:,} pages); checkpoint_timeout {row[1]},"
        f" wal_compression {row[2]}, max_wal_size {row[3]}"
    )


def kill_check(stack: Stack, count: int, workers: int) -> str:
    """The hub SIGKILLed halfway through draining a backlog at full speed, then started
    again at once (its orphaned workers still stopping): every message must be stored
    exactly once (no loss, no second row)."""
    hub_id = "bench-hub-kill"
    clear_hub_sessions(stack.broker, hub_id, workers)
    first, _ = stack.hub(hub_id, wait_ready=True, workers=workers)
    kill_tree(first)
    with psycopg.connect(stack.url, autocommit=True) as conn:
        baseline = stack.telemetry_rows(conn)
        letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
        publish_backlog(stack.broker.port, count)
        since = datetime.now(UTC)
        victim, _ = stack.hub(hub_id, wait_ready=False, workers=workers)
        while (rows := ledger_rows_since(conn, since)) < count // 2:
            time.sleep(0.01)
        victim.kill(9)
        at_kill = stack.telemetry_rows(conn) - baseline
        again, _ = stack.hub(hub_id, wait_ready=False, workers=workers)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while stack.telemetry_rows(conn) < baseline + count and time.monotonic() < deadline:
            time.sleep(0.1)
        again.stop()
        stored = stack.telemetry_rows(conn) - baseline
        ledger = ledger_rows_since(conn, since)
        letters_after = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    clear_hub_sessions(stack.broker, hub_id, workers)
    verdict = "kept" if stored == count == ledger and letters == letters_after else "BROKEN"
    return (
        f"kill -9 at full speed (--workers {workers}): SIGKILL after {rows:,} ledger entries"
        f" ({at_kill:,} rows committed), restarted:"
        f" {stored:,} of {count:,} telemetry rows, {ledger:,} ledger entries, dead letters"
        f" {letters[0] if letters else 0} → {letters_after[0] if letters_after else 0}: exactly once {verdict}"
    )


def sos_opened(conn: psycopg.Connection[tuple[Any, ...]], device_id: str) -> bool:
    return conn.execute("SELECT 1 FROM incidents WHERE device_id = %s", (device_id,)).fetchone() is not None


@dataclass
class SosResult:
    latencies: list[float]
    load: dict[str, float]
    target_rate: float
    committed_rate: float
    missing: int
    in_hub: float  # mean receipt by the hub's network thread → commit, alarm lane (hub's own histogram)
    workers: int


class IncidentWatcher(threading.Thread):
    """Polls open SOS incidents every 5 ms; notes when each wristband's first appeared (CLOCK_MONOTONIC)."""

    def __init__(self, stack: Stack, hub: ShouhuProcess) -> None:
        super().__init__(daemon=True)
        self.stack, self.hub = stack, hub
        self.observed: dict[str, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.stack.url, autocommit=True) as conn:
            while not self.stopping.is_set():
                rows = conn.execute("SELECT device_id FROM incidents WHERE kind = 'sos' AND state = 'open'").fetchall()
                now = time.monotonic()
                for (device_id,) in rows:
                    self.observed.setdefault(str(device_id), now)
                self.stack.sample_rss([self.hub])
                time.sleep(0.005)

    def wait_for(self, devices: set[str], timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while not devices <= set(self.observed) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stopping.set()
        self.join(5)
        return dict(self.observed)


def press(stack: Stack, presses: int, spacing: float, first_wristband: int) -> tuple[dict[str, float], float]:
    """SOS presses on distinct wristbands, ``spacing`` s apart; returns publish instants and the
    telemetry rows/s the hub committed meanwhile."""
    published: dict[str, float] = {}
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    publisher.connect("127.0.0.1", stack.broker.port)
    publisher.loop_start()
    with psycopg.connect(stack.url, autocommit=True) as conn:
        rows_before, window_start = stack.telemetry_rows(conn), time.monotonic()
        next_press = time.monotonic()
        for index in range(first_wristband, first_wristband + presses):
            device = f"wb-{index:04d}"
            time.sleep(max(0.0, next_press - time.monotonic()))
            published[device] = time.monotonic()
            publisher.publish(f"shouhu/v1/wristband/{device}/sos", alarm_payload("sos"), qos=1)
            next_press += spacing
        committed_rate = (stack.telemetry_rows(conn) - rows_before) / (time.monotonic() - window_start)
    publisher.loop_stop()
    publisher.disconnect()
    return published, committed_rate


def sos_under_load(
    stack: Stack, presses: int, spacing: float, load_rate: float, first_wristband: int, workers: int
) -> SosResult:
    """Presses on wb-{first_wristband}… while the load generator runs; one fresh hub."""
    hub_id = "bench-hub-sos"
    clear_hub_sessions(stack.broker, hub_id, workers)
    with psycopg.connect(stack.url, autocommit=True) as conn:  # earlier presses' incidents: close them
        conn.execute("UPDATE incidents SET state = 'resolved', resolved_at = now() WHERE kind = 'sos'")
    hub, metrics_port = stack.hub(hub_id, wait_ready=True, workers=workers)
    warmup, tail = 3.0, 2.0
    duration = warmup + presses * spacing + tail
    loadgen = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PUBLISHER,
            str(stack.broker.port),
            "0",
            str(load_rate),
            str(duration),
            str(WRISTBANDS),
            MSG_IDS[0],
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert loadgen.stdout is not None
    if loadgen.stdout.readline().strip() != "ready":
        raise RuntimeError("the load generator did not start")
    watcher = IncidentWatcher(stack, hub)
    watcher.start()
    time.sleep(warmup)
    published, committed_rate = press(stack, presses, spacing, first_wristband)
    observed = watcher.wait_for(set(published), timeout=15)
    out, _ = loadgen.communicate(timeout=60)
    scraped = hub_metrics(metrics_port)
    hub.stop()
    latencies = [observed[d] - published[d] for d in published if d in observed]
    load: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    in_hub = scraped["alarm_seconds"] / max(scraped["alarms"], 1.0)
    return SosResult(latencies, load, load_rate, committed_rate, presses - len(latencies), in_hub, workers)


def drain_line(drain: Drain, wall: float) -> str:
    per_message = f"CPU per message: consumer {drain.per_message_us(drain.consumer_cpu):.0f} µs, broker "
    per_message += f"{drain.per_message_us(drain.broker_cpu):.0f} µs"
    if drain.postgres_cpu is not None:
        per_message += f", PostgreSQL {drain.per_message_us(drain.postgres_cpu):.0f} µs"
    return (
        f"  {drain.name}: {drain.rate:,.0f} msg/s ({drain.count:,} in {drain.seconds:.2f} s; "
        f"consumer CPU {drain.consumer_cpu / wall:.0%} of a core, broker CPU {drain.broker_cpu / wall:.0%}; "
        f"{per_message}); "
        f"backlog published at {drain.publish_rate:,.0f} msg/s; {drain.detail}"
    )


def sos_lines(sos: SosResult) -> str:
    load = sos.load
    ms = [v * 1000 for v in sos.latencies]
    return (
        f"\nload generator, target {sos.target_rate:,.0f} msg/s: sent {load['sent']:,.0f} in {load['seconds']:.1f} s"
        f" = {load['sent'] / load['seconds']:,.0f} msg/s (slowest 1-s window {load['min_second']:,.0f} msg/s;"
        f" broker-acknowledged within the window {load['acked_in_window'] / load['seconds']:,.0f} msg/s;"
        f" worst lag behind schedule {load['worst_lag']:,.0f} messages; generator CPU {load['cpu']:.1f} s"
        f" including building the packets)\n"
        f"hub committed telemetry while the presses ran: {sos.committed_rate:,.0f} msg/s\n"
        f"SOS press → incident committed, load {sos.target_rate:,.0f} msg/s, hub --workers {sos.workers}: n={len(ms)}"
        f" p50={statistics.median(ms):.1f} ms p99={percentile(ms, 0.99):.1f} ms max={max(ms):.1f} ms"
        f" (no incident within 15 s: {sos.missing}); of which inside the hub, receipt → commit (its alarm-lane"
        f" histogram): mean {1000 * sos.in_hub:.1f} ms"
    )


def report(drains: list[Drain], sos: list[SosResult], peak_rss: dict[str, int], started: float) -> None:
    bare = max((d for d in drains if d.name.startswith("bare")), key=lambda d: d.rate)
    print(f"\nbacklog: {drains[0].count:,} QoS 1 telemetry messages per consumer, queued before it connects")
    print("drain (first message received → last counted / last row committed):")
    for drain in drains:
        # The consumer's CPU is measured over its whole process life; the window is the drain.
        print(drain_line(drain, drain.seconds))
    for drain in drains:
        if not drain.name.startswith("bare"):
            print(f"ratio {drain.name} / bare ceiling ({bare.rate:,.0f} msg/s): {drain.rate / bare.rate:.2f}")
    for run in sos:
        print(sos_lines(run))
    for hub_id, rss in sorted(peak_rss.items()):
        print(f"peak RSS {hub_id}: {rss / 2**20:.0f} MiB")
    print(f"total run time: {time.monotonic() - started:.0f} s; load average {psutil.getloadavg()}")


def run(stack: Stack, args: argparse.Namespace) -> tuple[list[Drain], list[SosResult]]:
    broker, url = stack.broker, stack.url
    if args.embedded_broker:
        drains = embedded_broker_drains(url, stack.env, args.messages)
        for drain in drains:
            print(drain_line(drain, drain.seconds), flush=True)
        return drains, []
    drains = [
        bare_drain(broker, args.messages, 3, 0),
        bare_drain(broker, args.messages, 5, HUB_RECEIVE_MAXIMUM),
    ]
    print(drain_line(drains[0], drains[0].seconds), flush=True)
    print(drain_line(drains[1], drains[1].seconds), flush=True)
    drains.append(hub_drain(stack, args.messages, ["bench-hub"], sos_device="wb-0240"))
    print(drain_line(drains[-1], drains[-1].seconds), flush=True)
    if args.workers > 1:
        drains.append(hub_drain(stack, args.messages, ["bench-hub-w"], sos_device="wb-0239", workers=args.workers))
        print(drain_line(drains[-1], drains[-1].seconds), flush=True)
    if not args.no_two_hubs:
        drains.append(hub_drain(stack, args.messages, ["bench-hub-a", "bench-hub-b"]))
        print(drain_line(drains[-1], drains[-1].seconds), flush=True)
    print(kill_check(stack, args.messages, args.workers), flush=True)
    if args.ledger_keys:
        took = fill_ledger(url, args.ledger_keys)
        print(f"ledger filled to {args.ledger_keys:,} keys in {took:.0f} s", flush=True)
        print(ledger_size(url), flush=True)
        # The first drain after a checkpoint writes a full-page image of each index page
        # it touches first; the second finds many already written (a busy hub's state).
        for when in ("first after a checkpoint", "again at once"):
            drains.append(hub_drain(stack, args.messages, ["bench-hub-big-ledger"], workers=args.workers))
            drains[-1].name += f", ledger holding {args.ledger_keys:,} keys, {when}"
            print(drain_line(drains[-1], drains[-1].seconds), flush=True)
    sos: list[SosResult] = []
    if not args.no_sos:
        sos.append(sos_under_load(stack, args.presses, args.spacing, args.load_rate, 1, args.workers))
        print(sos_lines(sos[0]), flush=True)
    if args.context_rate > 0 and not args.no_sos:
        sos.append(sos_under_load(stack, args.presses, args.spacing, args.context_rate, 1, args.workers))
        print(sos_lines(sos[1]), flush=True)
    return drains, sos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=60_000, help="backlog size per consumer")
    parser.add_argument("--load-rate", type=float, default=5_500, help="telemetry msg/s during the SOS presses")
    parser.add_argument(
        "--context-rate", type=float, default=2_000, help="a second SOS run at this lower load, for context (0: skip)"
    )
    parser.add_argument("--presses", type=int, default=200)
    parser.add_argument("--spacing", type=float, default=0.05, help="seconds between SOS presses")
    parser.add_argument(
        "--ledger-keys", type=int, default=0, help="then fill the ledger to this many keys and drain with one hub again"
    )
    parser.add_argument("--no-sos", action="store_true", help="skip the SOS-under-load runs")
    parser.add_argument(
        "--embedded-broker",
        action="store_true",
        help="only the embedded broker (amqtt): a bare subscriber and one hub on a live stream",
    )
    parser.add_argument(
        "--postgres-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting for the benchmark's PostgreSQL (repeatable), e.g. wal_compression=lz4",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="shouhu hub --workers for a second one-hub drain, the kill check, the big ledger and the SOS runs",
    )
    parser.add_argument("--no-two-hubs", action="store_true", help="skip the two-hub drain")
    parser.add_argument(
        "--msg-ids",
        choices=["time-ordered", "random"],
        default="time-ordered",
        help="the load's (and the ledger fill's) msg_ids: UUIDv7, as the contract recommends, or UUIDv4",
    )
    args = parser.parse_args()
    MSG_IDS[0] = args.msg_ids
    started = time.monotonic()
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {psutil.cpu_count()} cores, load average {psutil.getloadavg()},"
        f" msg_ids {args.msg_ids}"
    )
    broker = Mosquitto()
    broker.start()
    cluster = start_postgres(wheel_bin_dir())
    stack: Stack | None = None
    try:
        # A drain ends at its last commit, read afterwards, not when a poll notices it.
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
            # The production image (timescale/timescaledb in docker-compose.yml) runs
            # timescaledb-tune at initialisation, which sizes shared_buffers to a quarter
            # of memory; 1 GB here, not PostgreSQL's 128 MB default, so that a large
            # ledger's index is measured as a tuned server holds it.
            conn.execute("ALTER SYSTEM SET shared_buffers = '1GB'")
            for setting in args.postgres_setting:
                name, _, value = setting.partition("=")
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        cluster.stop()
        cluster.start()
        create_database(cluster.url(), "bench")
        url = cluster.url("bench")
        migrate(url, MigrationContext(90, datetime.now(UTC)))
        env = shouhu_env(SHOUHU_DATABASE_URL=url, SHOUHU_MQTT_URL=broker.url)
        subprocess.run([SHOUHU_BIN, "registry", "load", str(DEMO)], env=env, check=True, capture_output=True)
        stack = Stack(broker, url, env, cluster.spec.data_dir)
        drains, sos = run(stack, args)
        report(drains, sos, stack.peak_rss, started)
    finally:
        if stack is not None:
            for hub in stack.started:
                hub.kill(9)
                shutil.rmtree(hub.log_path.parent, ignore_errors=True)
        for process in STARTED_PROCESSES:  # only the hubs this run started
            if process.poll() is None:
                process.kill()
                process.wait(15)
        broker.remove()
        cluster.remove()


if __name__ == "__main__":
    main()
