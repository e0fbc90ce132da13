"""Ingest: backlog drain (bare paho subscriber, one hub, two hubs) and SOS latency under telemetry load.

Starts its own Mosquitto (tests.services.Mosquitto: persistence on, max_queued_messages
1,000,000) and PostgreSQL 18, migrates, and loads the demo county.

Backlog drain. For each consumer the backlog is made first, so the load generator is
not inside the timed window at all: the consumer connects once (a bare subscriber
subscribes and disconnects; a hub starts, becomes ready, and is killed with SIGKILL),
so its persistent session holds its subscriptions; then a publisher process sends N
QoS 1 telemetry messages, which queue in the broker (its publish rate is printed
separately); then the consumer starts again and is timed from the first message it
received until all N are consumed — counted in the bare subscriber's process, or
committed rows in ``telemetry`` (polled) for the hubs. Consumers:

- bare paho subscriber, MQTT 3.1.1, clean_session=False: the broker's default
  max_inflight_messages (20) bounds its QoS 1 delivery;
- bare paho subscriber, MQTT 5, Receive Maximum 5,000 — what the hub's CONNECT sets:
  the like-for-like ceiling of the Python client;
- one ``shouhu hub``; two ``shouhu hub`` processes (different SHOUHU_HUB_ID) sharing
  ``$share/shouhu/…``, both subscribed before the backlog is published.

SOS latency under load. One hub runs; a load-generator process publishes telemetry
at a paced, steady rate (default 5,500 msg/s) and prints the rate it achieved (sent
and acknowledged by the broker); meanwhile this process presses SOS on 200 distinct
wristbands (wb-0001…, one every 50 ms) from its own client and polls ``incidents``
from a thread. Latency is press publish → the incident row seen committed, both
instants from CLOCK_MONOTONIC in this process (poll interval 5 ms).

    .venv/bin/python -m bench.ingest --messages 50000
"""

from __future__ import annotations

import argparse
import json
import re
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

import paho.mqtt.client as mqtt
import psutil
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shouhu.embedded.postgres import create_database, free_port, wheel_bin_dir
from shouhu.migrations import MigrationContext, migrate
from simulators.wristband import alarm_payload
from tests.services import SHOUHU_BIN, Mosquitto, ShouhuProcess, shouhu_env, start_postgres

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
WRISTBANDS = 240  # wb-0001 … wb-0240 in the demo county
HUB_RECEIVE_MAXIMUM = 5_000  # hub/service.py BULK_INBOX_SIZE, sent as Receive Maximum
DRAIN_TIMEOUT_S = 600.0

# Publishes N QoS 1 telemetry messages as fast as paho allows (1,000 in flight). The
# payloads are built before the clock starts; prints the publish → last PUBACK time.
PUBLISHER = textwrap.dedent(
    """
    import json, sys, threading, time, uuid
    from datetime import UTC, datetime
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    port, count, devices = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    now = datetime.now(UTC).isoformat()
    messages = [
        (f"shouhu/v1/wristband/wb-{i % devices + 1:04d}/telemetry",
         json.dumps({"msg_id": str(uuid.uuid4()), "ts": now, "battery": 80, "heart_rate": 72, "worn": True}))
        for i in range(count)
    ]
    acked = 0
    done = threading.Event()
    def on_publish(client, userdata, mid, reason_code, properties):
        global acked
        acked += 1
        if acked == count:
            done.set()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.monotonic()
    for topic, body in messages:
        client.publish(topic, body, qos=1)
    if not done.wait(600):
        sys.exit(f"only {acked} of {count} acknowledged")
    elapsed = time.monotonic() - started
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"seconds": elapsed, "cpu": time.process_time()}), flush=True)
    """
)

# A bare subscriber that only counts. "prepare": make the persistent session and its
# subscription, then leave. "drain": reconnect to that session and count N messages.
SUBSCRIBER = textwrap.dedent(
    """
    import json, resource, sys, threading, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    port, mode, client_id, version, receive_max, topic = (
        int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    count = int(sys.argv[7]) if mode == "drain" else 0
    seen = 0
    first = None
    connected_at = None
    done = threading.Event()
    subscribed = threading.Event()
    def on_connect(client, userdata, flags, reason_code, properties):
        global connected_at
        connected_at = time.time()
        if mode == "prepare":
            client.subscribe(topic, qos=1)
    def on_subscribe(client, userdata, mid, reason_codes, properties):
        subscribed.set()
    def on_message(client, userdata, message):
        global seen, first
        if first is None:
            first = time.time()
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
    if not done.wait(600):
        sys.exit(f"only {seen} of {count} received")
    last = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"connected": connected_at, "first": first, "last": last,
                      "cpu": usage.ru_utime + usage.ru_stime}), flush=True)
    """
)

# Publishes telemetry at a paced rate for a duration: every 10 ms it sends what the
# schedule says is due. Prints what it sent, what the broker acknowledged, and the rate.
LOADGEN = textwrap.dedent(
    """
    import json, sys, threading, time, uuid
    from datetime import UTC, datetime
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    port, rate, duration, devices = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    acked = 0
    def on_publish(client, userdata, mid, reason_code, properties):
        global acked
        acked += 1
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(0.3)
    print("ready", flush=True)
    started = time.monotonic()
    sent = 0
    worst_lag = 0
    per_second = []
    second_mark, second_sent = started, 0
    while True:
        now = time.monotonic()
        if now - started >= duration:
            break
        due = int(rate * (now - started))
        worst_lag = max(worst_lag, due - sent)
        stamp = datetime.now(UTC).isoformat()
        while sent < due:
            body = json.dumps({"msg_id": str(uuid.uuid4()), "ts": stamp, "battery": 80, "heart_rate": 72,
                               "worn": True})
            client.publish(f"shouhu/v1/wristband/wb-{sent % devices + 1:04d}/telemetry", body, qos=1)
            sent += 1
        if now - second_mark >= 1.0:
            per_second.append((sent - second_sent) / (now - second_mark))
            second_mark, second_sent = now, sent
        time.sleep(max(0.0, 0.01 - (time.monotonic() - now)))
    elapsed = time.monotonic() - started
    acked_in_window = acked
    deadline = time.monotonic() + 30
    while acked < sent and time.monotonic() < deadline:
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"sent": sent, "seconds": elapsed, "acked_in_window": acked_in_window, "acked": acked,
                      "worst_lag": worst_lag, "min_second": min(per_second or [0.0]),
                      "cpu": time.process_time()}), flush=True)
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
    result = run_json([PUBLISHER, str(port), str(count), str(WRISTBANDS)])
    return count / result["seconds"]


def clear_session(port: int, client_id: str) -> None:
    """Delete a client's persistent session: connect with a clean start and no expiry."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    connected = threading.Event()
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
    clear_session(broker.port, client_id)
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
    peak_rss: dict[str, int] = field(default_factory=dict)

    def hub(self, hub_id: str, *, wait_ready: bool) -> tuple[ShouhuProcess, int]:
        port = free_port()
        env = {**self.env, "SHOUHU_HUB_ID": hub_id, "SHOUHU_METRICS_PORT": str(port)}
        ready = f"http://127.0.0.1:{port}/readyz" if wait_ready else None
        return ShouhuProcess(["hub"], env, ready_url=ready).start(timeout=60), port

    def telemetry_rows(self, conn: psycopg.Connection[tuple[object, ...]]) -> int:
        row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
        return int(row[0]) if row else 0

    def sample_rss(self, hubs: list[ShouhuProcess]) -> None:
        for hub in hubs:
            if hub.process is not None and hub.process.poll() is None:
                rss = psutil.Process(hub.process.pid).memory_info().rss
                key = " ".join(hub.env["SHOUHU_HUB_ID"].split())
                self.peak_rss[key] = max(self.peak_rss.get(key, 0), rss)


def stored_telemetry(metrics_port: int) -> int:
    """The hub's own count of telemetry stored and acknowledged (Prometheus counter)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    found = re.search(r'^shouhu_hub_messages_stored_total\{channel="telemetry"\} (\S+)$', text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def hub_drain(stack: Stack, count: int, hub_ids: list[str]) -> Drain:
    """Sessions first (start, ready, SIGKILL), then the backlog, then restart and time the commits."""
    for hub_id in hub_ids:
        clear_session(stack.broker.port, hub_id)
    first_run = [stack.hub(hub_id, wait_ready=True)[0] for hub_id in hub_ids]
    for hub in first_run:
        hub.kill(9)  # session and its $share subscriptions stay in the broker
    rate = publish_backlog(stack.broker.port, count)
    broker_process = psutil.Process(stack.broker.process.pid if stack.broker.process else 0)
    with psycopg.connect(stack.url, autocommit=True) as conn:
        baseline = stack.telemetry_rows(conn)
        spawned = datetime.now(UTC)
        broker_before = sum(broker_process.cpu_times()[:2])
        running = [stack.hub(hub_id, wait_ready=False) for hub_id in hub_ids]
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while stack.telemetry_rows(conn) < baseline + count:
            stack.sample_rss([hub for hub, _ in running])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{hub_ids}: not all {count} rows committed in {DRAIN_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        finished = datetime.now(UTC)
        broker_cpu = sum(broker_process.cpu_times()[:2]) - broker_before
        hub_cpu = sum(
            sum(psutil.Process(hub.process.pid).cpu_times()[:2]) for hub, _ in running if hub.process is not None
        )
        row = conn.execute("SELECT min(received_at) FROM telemetry WHERE received_at >= %s", (spawned,)).fetchone()
        first_received: datetime = row[0] if row and row[0] else spawned
    per_hub = [stored_telemetry(port) for _, port in running]
    direct = sum("direct subscription" in hub.output() for hub, _ in running)
    for hub, _ in running:
        hub.stop()
    for hub_id in hub_ids:
        clear_session(stack.broker.port, hub_id)
    name = "one shouhu hub" if len(hub_ids) == 1 else f"{len(hub_ids)} shouhu hubs sharing $share/shouhu/…"
    detail = (
        f"spawn → first message {(first_received - spawned).total_seconds():.2f} s; "
        f"committed per hub: {', '.join(f'{n:,}' for n in per_hub)}"
    )
    if direct:
        detail += f"; {direct} hub(s) fell back to a direct telemetry subscription (share probe behind the backlog)"
    return Drain(name, count, rate, (finished - first_received).total_seconds(), hub_cpu, broker_cpu, detail)


@dataclass
class SosResult:
    latencies: list[float]
    load: dict[str, float]
    target_rate: float
    committed_rate: float
    missing: int


def sos_under_load(stack: Stack, presses: int, spacing: float, load_rate: float) -> SosResult:
    hub_id = "bench-hub-sos"
    clear_session(stack.broker.port, hub_id)
    hub, _ = stack.hub(hub_id, wait_ready=True)
    warmup, tail = 3.0, 2.0
    duration = warmup + presses * spacing + tail
    loadgen = subprocess.Popen(
        [sys.executable, "-c", LOADGEN, str(stack.broker.port), str(load_rate), str(duration), str(WRISTBANDS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert loadgen.stdout is not None
    if loadgen.stdout.readline().strip() != "ready":
        raise RuntimeError("the load generator did not start")
    published: dict[str, float] = {}
    observed: dict[str, float] = {}
    stop = threading.Event()

    def poll() -> None:
        with psycopg.connect(stack.url, autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute("SELECT device_id FROM incidents WHERE kind = 'sos'").fetchall()
                now = time.monotonic()
                for (device_id,) in rows:
                    observed.setdefault(str(device_id), now)
                stack.sample_rss([hub])
                time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    publisher.connect("127.0.0.1", stack.broker.port)
    publisher.loop_start()
    time.sleep(warmup)
    with psycopg.connect(stack.url, autocommit=True) as conn:
        rows_before, window_start = stack.telemetry_rows(conn), time.monotonic()
        next_press = time.monotonic()
        for index in range(1, presses + 1):
            device = f"wb-{index:04d}"
            time.sleep(max(0.0, next_press - time.monotonic()))
            published[device] = time.monotonic()
            publisher.publish(f"shouhu/v1/wristband/{device}/sos", alarm_payload("sos"), qos=1)
            next_press += spacing
        committed_rate = (stack.telemetry_rows(conn) - rows_before) / (time.monotonic() - window_start)
    deadline = time.monotonic() + 15
    while len(set(published) & set(observed)) < presses and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    poller.join(5)
    out, _ = loadgen.communicate(timeout=60)
    publisher.loop_stop()
    publisher.disconnect()
    hub.stop()
    latencies = [observed[d] - published[d] for d in published if d in observed]
    load: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return SosResult(latencies, load, load_rate, committed_rate, presses - len(latencies))


def drain_line(drain: Drain, wall: float) -> str:
    return (
        f"  {drain.name}: {drain.rate:,.0f} msg/s ({drain.count:,} in {drain.seconds:.2f} s; "
        f"consumer CPU {drain.consumer_cpu / wall:.0%} of a core, broker CPU {drain.broker_cpu / wall:.0%}); "
        f"backlog published at {drain.publish_rate:,.0f} msg/s; {drain.detail}"
    )


def report(drains: list[Drain], sos: SosResult, peak_rss: dict[str, int], started: float) -> None:
    bare = max((d for d in drains if d.name.startswith("bare")), key=lambda d: d.rate)
    print(f"\nbacklog: {drains[0].count:,} QoS 1 telemetry messages per consumer, queued before it connects")
    print("drain (first message received → last counted / last row committed):")
    for drain in drains:
        # The consumer's CPU is measured over its whole process life; the window is the drain.
        print(drain_line(drain, drain.seconds))
    for drain in drains:
        if not drain.name.startswith("bare"):
            print(f"ratio {drain.name} / bare ceiling ({bare.rate:,.0f} msg/s): {drain.rate / bare.rate:.2f}")
    load = sos.load
    print(
        f"\nload generator: target {sos.target_rate:,.0f} msg/s, sent {load['sent']:,.0f} in {load['seconds']:.1f} s "
        f"= {load['sent'] / load['seconds']:,.0f} msg/s (slowest 1-s window {load['min_second']:,.0f} msg/s; "
        f"broker-acked within the window {load['acked_in_window'] / load['seconds']:,.0f} msg/s; "
        f"worst lag behind schedule {load['worst_lag']:,.0f} messages; CPU {load['cpu']:.1f} s)"
    )
    print(f"hub committed telemetry during the SOS presses: {sos.committed_rate:,.0f} msg/s")
    ms = [v * 1000 for v in sos.latencies]
    print(
        f"SOS press → incident committed under load: n={len(ms)} p50={statistics.median(ms):.1f} ms "
        f"p99={percentile(ms, 0.99):.1f} ms max={max(ms):.1f} ms (missing: {sos.missing})"
    )
    for hub_id, rss in sorted(peak_rss.items()):
        print(f"peak RSS {hub_id}: {rss / 2**20:.0f} MiB")
    print(f"total run time: {time.monotonic() - started:.0f} s; load average {psutil.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=50_000, help="backlog size per consumer")
    parser.add_argument("--load-rate", type=float, default=5_500, help="telemetry msg/s during the SOS presses")
    parser.add_argument("--presses", type=int, default=200)
    parser.add_argument("--spacing", type=float, default=0.05, help="seconds between SOS presses")
    args = parser.parse_args()
    started = time.monotonic()
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {psutil.cpu_count()} cores, load average {psutil.getloadavg()}")
    broker = Mosquitto()
    broker.start()
    cluster = start_postgres(wheel_bin_dir())
    try:
        create_database(cluster.url(), "bench")
        url = cluster.url("bench")
        migrate(url, MigrationContext(90, datetime.now(UTC)))
        env = shouhu_env(SHOUHU_DATABASE_URL=url, SHOUHU_MQTT_URL=broker.url)
        subprocess.run([SHOUHU_BIN, "registry", "load", str(DEMO)], env=env, check=True, capture_output=True)
        stack = Stack(broker, url, env)
        drains = [
            bare_drain(broker, args.messages, 3, 0),
            bare_drain(broker, args.messages, 5, HUB_RECEIVE_MAXIMUM),
        ]
        print(drain_line(drains[0], drains[0].seconds), flush=True)
        print(drain_line(drains[1], drains[1].seconds), flush=True)
        drains.append(hub_drain(stack, args.messages, ["bench-hub"]))
        print(drain_line(drains[-1], drains[-1].seconds), flush=True)
        drains.append(hub_drain(stack, args.messages, ["bench-hub-a", "bench-hub-b"]))
        print(drain_line(drains[-1], drains[-1].seconds), flush=True)
        sos = sos_under_load(stack, args.presses, args.spacing, args.load_rate)
        report(drains, sos, stack.peak_rss, started)
    finally:
        broker.remove()
        cluster.remove()


if __name__ == "__main__":
    main()
