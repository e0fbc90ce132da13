"""Ingest throughput of `shouhu hub` against a bare paho subscriber, same broker, same publisher.

Starts its own Mosquitto and PostgreSQL 18 and loads the demo county. A publisher
process sends N QoS 1 telemetry messages as fast as paho allows (1,000 in flight).
Reference: a bare paho subscriber process (QoS 1, acknowledging on receipt, storing
nothing) — the ceiling the MQTT client sets. Measured: `shouhu hub` storing every
message (ledger, telemetry partition, dead letters) and acknowledging after commit,
timed from the first publish until the last row is committed. Also prints the hub's
peak resident memory.

    .venv/bin/python -m bench.ingest_throughput --messages 20000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg

from shouhu.embedded.postgres import create_database, free_port, wheel_bin_dir
from shouhu.migrations import MigrationContext, migrate
from tests.services import SHOUHU_BIN, Mosquitto, ShouhuProcess, shouhu_env, start_postgres

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"

PUBLISHER = textwrap.dedent(
    """
    import json, sys, time, uuid
    from datetime import UTC, datetime
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    port, count = int(sys.argv[1]), int(sys.argv[2])
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    now = datetime.now(UTC).isoformat()
    infos = []
    for i in range(count):
        body = json.dumps({"msg_id": str(uuid.uuid4()), "ts": now, "battery": 50, "worn": True})
        infos.append(client.publish(f"shouhu/v1/wristband/wb-{i % 240 + 1:04d}/telemetry", body, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    """
)

SUBSCRIBER = textwrap.dedent(
    """
    import sys, time, threading
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    port, count = int(sys.argv[1]), int(sys.argv[2])
    seen = 0
    done = threading.Event()
    first = None
    def on_message(client, userdata, message):
        global seen, first
        if first is None:
            first = time.monotonic()
        seen += 1
        if seen == count:
            done.set()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-reference",
                         protocol=MQTTProtocolVersion.MQTTv311, clean_session=True)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe("shouhu/v1/+/+/telemetry", qos=1)
    client.loop_start()
    print("ready", flush=True)
    done.wait(300)
    print(time.monotonic(), flush=True)
    """
)


def publish(port: int, count: int) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", PUBLISHER, str(port), str(count)], check=True)
    return started


def reference(port: int, count: int) -> float:
    subscriber = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, str(port), str(count)], stdout=subprocess.PIPE, text=True
    )
    assert subscriber.stdout is not None
    assert subscriber.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # let the SUBACK land before the first publish
    started = publish(port, count)
    finished = float(subscriber.stdout.readline())
    subscriber.wait(30)
    return count / (finished - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    broker = Mosquitto()
    broker.start()
    cluster = start_postgres(wheel_bin_dir())
    hub: ShouhuProcess | None = None
    try:
        create_database(cluster.url(), "bench")
        url = cluster.url("bench")
        migrate(url, MigrationContext(90, datetime.now(UTC)))
        env = shouhu_env(SHOUHU_DATABASE_URL=url, SHOUHU_MQTT_URL=broker.url, SHOUHU_HUB_ID="bench-hub")
        subprocess.run([SHOUHU_BIN, "registry", "load", str(DEMO)], env=env, check=True, capture_output=True)

        reference_rate = reference(broker.port, args.messages)

        port = free_port()
        hub = ShouhuProcess(["hub"], {**env, "SHOUHU_METRICS_PORT": str(port)},
                            ready_url=f"http://127.0.0.1:{port}/readyz").start()
        assert hub.process is not None
        hub_process = psutil.Process(hub.process.pid)
        peak_rss = 0
        started = publish(broker.port, args.messages)
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
                peak_rss = max(peak_rss, hub_process.memory_info().rss)
                if row and row[0] >= args.messages:
                    break
                time.sleep(0.01)
        hub_rate = args.messages / (time.monotonic() - started)
        print(f"reference: bare paho subscriber, QoS 1: {reference_rate:,.0f} msg/s")
        print(f"shouhu hub, QoS 1, stored and acknowledged after commit: {hub_rate:,.0f} msg/s")
        print(f"ratio hub / reference: {hub_rate / reference_rate:.2f}")
        print(f"hub peak RSS: {peak_rss / 2**20:.0f} MiB")
    finally:
        if hub is not None:
            hub.stop()
        broker.remove()
        cluster.remove()


if __name__ == "__main__":
    main()
