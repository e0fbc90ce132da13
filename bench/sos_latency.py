"""SOS press → first provider request, through the real stack, against a bare paho reference.

Starts its own Mosquitto and PostgreSQL 18, loads the demo county, runs `shouhu hub`
and `shouhu router` as processes and the phone-network simulator in this process,
then presses SOS on N different wristbands one after another. For each press it
measures from the publish to the simulator receiving the first call request
(CLOCK_MONOTONIC, shared by every process on the machine). The reference is a bare
paho subscriber in this process: publish → on_message through the same broker.

    .venv/bin/python -m bench.sos_latency --presses 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.stats import percentile
from shouhu.embedded.postgres import create_database, free_port, wheel_bin_dir
from shouhu.migrations import MigrationContext, migrate
from simulators.phone_network import create_phone_network
from simulators.wristband import alarm_payload
from tests.support.services import SHOUHU_BIN, Mosquitto, ShouhuProcess, serve_app, shouhu_env, start_postgres

DEMO = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
SID, TOKEN = "AC" + "2" * 32, "bench-token"


def summary(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{name}: n={len(ms)} p50={statistics.median(ms):.1f} ms p95={percentile(ms, 0.95):.1f} ms max={max(ms):.1f} ms"
    )


def reference_latencies(port: int, count: int) -> list[float]:
    """Publish → on_message through the broker, for a bare paho subscriber."""
    received = threading.Event()
    subscriber = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    subscriber.on_message = lambda *_: received.set()
    subscriber.connect("127.0.0.1", port)
    subscriber.subscribe("bench/reference", qos=1)
    subscriber.loop_start()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    time.sleep(0.5)
    latencies = []
    for _ in range(count):
        received.clear()
        started = time.monotonic()
        publisher.publish("bench/reference", alarm_payload("sos"), qos=1)
        if not received.wait(5):
            raise RuntimeError("the reference subscriber got nothing")
        latencies.append(time.monotonic() - started)
    for client in (subscriber, publisher):
        client.loop_stop()
        client.disconnect()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presses", type=int, default=60)
    args = parser.parse_args()

    broker = Mosquitto()
    broker.start()
    cluster = start_postgres(wheel_bin_dir())
    create_database(cluster.url(), "bench")
    url = cluster.url("bench")
    migrate(url, MigrationContext(90, datetime.now(UTC)))
    processes: list[ShouhuProcess] = []
    phone = serve_app(create_phone_network(SID, TOKEN, announce=lambda _line: None))
    phone_base = next(phone)
    try:
        env = shouhu_env(
            SHOUHU_DATABASE_URL=url,
            SHOUHU_MQTT_URL=broker.url,
            SHOUHU_HUB_ID="bench-hub",
            SHOUHU_TWILIO_ACCOUNT_SID=SID,
            SHOUHU_TWILIO_AUTH_TOKEN=TOKEN,
            SHOUHU_TWILIO_FROM="+12025550100",
            SHOUHU_TWILIO_API_BASE=phone_base,
        )
        subprocess.run([SHOUHU_BIN, "registry", "load", str(DEMO)], env=env, check=True, capture_output=True)
        for verb in ("hub", "router"):
            port = free_port()
            processes.append(
                ShouhuProcess(
                    [verb], {**env, "SHOUHU_METRICS_PORT": str(port)}, ready_url=f"http://127.0.0.1:{port}/readyz"
                ).start()
            )
        reference = reference_latencies(broker.port, args.presses)
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        sos: list[float] = []
        for index in range(1, args.presses + 1):
            before = len(httpx.get(f"{phone_base}/_sim/calls").json())
            payload = json.dumps({"msg_id": str(uuid.uuid4()), "ts": datetime.now(UTC).isoformat(), "action": "press"})
            started = time.monotonic()
            publisher.publish(f"shouhu/v1/wristband/wb-{index:04d}/sos", payload, qos=1)
            deadline = started + 10
            while True:
                calls = httpx.get(f"{phone_base}/_sim/calls").json()
                if len(calls) > before:
                    sos.append(calls[before]["monotonic"] - started)
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"press {index}: no call within 10 s")
                time.sleep(0.005)
            # Let this incident's remaining attempts go out before the next press.
            time.sleep(0.2)
        publisher.loop_stop()
        publisher.disconnect()
        print(summary("reference: bare paho publish → on_message", reference))
        print(summary("SOS press → first provider request", sos))
        print(f"ratio of medians: {statistics.median(sos) / statistics.median(reference):.1f}x")
        print(f"presses over 1 s: {sum(1 for v in sos if v >= 1.0)} of {len(sos)}")
    finally:
        for process in processes:
            process.stop()
        for _ in phone:
            pass
        broker.remove()
        cluster.remove()


if __name__ == "__main__":
    main()
