"""The end-to-end alarm receipt (docs/contract.md, "Receipts"): after an alarm commits,
the hub publishes `shouhu/v1/wristband/{id}/receipt`; a wristband re-sends the same
alarm until it has one, so a broker that acknowledged a press and then died before
saving it loses nothing."""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from hub.service import Hub
from shouhu.embedded.postgres import free_port
from simulators.wristband import Wristband, alarm_payload, publish_raw
from tests.support.broker import run_shipped_broker, shipped_broker
from tests.support.hub import query, wait_until
from tests.support.services import SHOUHU_BIN, Mosquitto, ShouhuProcess, scratch_dir, shouhu_env


class ReceiptListener:
    """Every receipt published for one wristband, as a raw subscriber sees them."""

    def __init__(self, port: int, device_id: str) -> None:
        self.receipts: list[dict[str, Any]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
        self.client.on_message = lambda _c, _u, m: self.receipts.append(json.loads(m.payload))
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"shouhu/v1/wristband/{device_id}/receipt", qos=1)
        assert self._subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_press_gets_a_receipt_naming_its_incident(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    band = Wristband(broker.url, "wb-0061")
    try:
        msg_id = band.alarm("sos", action="press")
        receipt = band.wait_for_receipt(msg_id, timeout=10)
    finally:
        band.close()
    assert receipt is not None, "no receipt within 10 s"
    code, state = query(county_url, "SELECT code, state FROM incidents")[0]
    assert receipt == {"msg_id": msg_id, "incident": code, "state": state}
    assert state == "open"


def test_a_redelivered_press_is_receipted_again_with_the_same_incident(
    hub: Hub,
    county_url: str,
    broker: Mosquitto,
) -> None:
    """A wristband that missed its receipt re-sends; the ledger makes the copy a no-op,
    and the copy is receipted too — or the wristband would re-send forever."""
    listener = ReceiptListener(broker.port, "wb-0062")
    try:
        payload = alarm_payload("sos", action="press")
        for _ in range(2):
            publish_raw(broker.url, "shouhu/v1/wristband/wb-0062/sos", payload)
            wait_until(lambda: listener.receipts, what="a receipt")
        wait_until(lambda: len(listener.receipts) == 2, what="a receipt for the re-sent copy")
    finally:
        listener.close()
    first, second = listener.receipts
    assert first == second
    assert first["msg_id"] == json.loads(payload)["msg_id"]
    assert query(county_url, "SELECT count(*), max(urgency) FROM incidents") == [(1, 1)]


def test_simulate_wristbands_waits_for_the_receipt(hub: Hub, county_url: str, broker: Mosquitto) -> None:
    result = subprocess.run(
        [SHOUHU_BIN, "simulate", "wristbands", "--press", "wb-0063"],
        env=shouhu_env(SHOUHU_MQTT_URL=broker.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    code = query(county_url, "SELECT code FROM incidents")[0][0]
    assert f"wb-0063: receipt: incident {code} (open)" in result.stdout


def test_no_hub_no_receipt_is_a_clear_failure(broker: Mosquitto) -> None:
    """A broker with no hub on it: the press is acknowledged by the broker, but no receipt
    comes back, and the simulator says so and fails."""
    result = subprocess.run(
        [SHOUHU_BIN, "simulate", "wristbands", "--press", "wb-0064", "--receipt-timeout", "1"],
        env=shouhu_env(SHOUHU_MQTT_URL=broker.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no receipt within 1s" in result.stderr


def test_broker_sigkilled_with_presses_queued_loses_none_of_a_wristband_that_waits_for_receipts(
    county_url: str,
) -> None:
    """Issue 12, item 5: with the shipped configuration (autosave every 10 s) a broker
    SIGKILL lost presses it had already acknowledged to the wristbands. Here 150 presses
    wait in the broker for a hub that is restarting when the broker is killed: whatever
    the broker had not saved is gone from it. Wristbands that follow the receipt
    protocol re-send until receipted, so all 150 are stored.

    (Without the re-sends this test fails: checked by setting ``resend_s`` past the
    test's timeout.)
    """
    directory = scratch_dir("shouhu-receipts-")
    port = free_port()
    conf = shipped_broker(directory, port)

    def start_broker() -> subprocess.Popen[bytes]:
        return run_shipped_broker(conf, port)

    def start_hub() -> ShouhuProcess:
        return ShouhuProcess(
            ["hub"],
            shouhu_env(
                SHOUHU_DATABASE_URL=county_url,
                SHOUHU_MQTT_URL=url,
                SHOUHU_HUB_ID=hub_id,
                SHOUHU_METRICS_PORT=str(metrics_port),
            ),
            ready_url=f"http://127.0.0.1:{metrics_port}/readyz",
        ).start()

    broker = start_broker()
    url, hub_id, metrics_port = f"mqtt://127.0.0.1:{port}", f"hub-{uuid.uuid4().hex[:6]}", free_port()
    hub_process = start_hub()
    store = directory / "data" / "mosquitto.db"
    wait_until(store.exists, timeout=15, what="the first autosave (the hub's sessions on disk)")
    hub_process.stop()  # a deploy: the hub's sessions keep its subscriptions
    bands = [Wristband(url, f"wb-{index:04d}", resend_s=2.0) for index in range(170, 185)]
    sent: list[str] = []
    try:
        for _round in range(10):
            for band in bands:
                sent.append(band.alarm("sos", action="press"))
        wait_until(
            lambda: not any(band.client._out_messages for band in bands), what="every press acknowledged by the broker"
        )
        broker.kill()  # SIGKILL: what arrived since the last autosave is gone
        broker.wait(10)
        broker = start_broker()
        hub_process = start_hub()
        wait_until(lambda: all(not band.unreceipted for band in bands), timeout=90, what="a receipt for every press")
    finally:
        for band in bands:
            band.close()
        hub_process.stop()
        broker.kill()
    stored = {row[0] for row in query(county_url, "SELECT msg_id FROM message_ledger WHERE channel = 'sos'")}
    assert len(sent) == 150
    assert set(sent) <= stored
    assert query(county_url, "SELECT count(*) FROM incidents") == [(15,)]


def test_an_oversized_sos_through_the_shipped_broker_is_paged_and_past_its_cap_is_never_receipted(
    county_url: str,
) -> None:
    """A 1 MiB SOS (issue 12, item 7: it used to vanish) reaches the hub through the
    shipped configuration and is paged as unreadable, its bytes dead-lettered as
    `oversized`. Past the broker's 2 MiB cap Mosquitto 2.0.11 drops it silently (a
    PUBACK, no log line): it never reaches the hub, so no receipt is ever sent for it —
    a wristband following the receipt protocol is where that loss shows."""
    directory = scratch_dir("shouhu-oversize-")
    port = free_port()
    conf = shipped_broker(directory, port)
    broker = run_shipped_broker(conf, port)
    url, metrics_port = f"mqtt://127.0.0.1:{port}", free_port()
    hub_process = ShouhuProcess(
        ["hub"],
        shouhu_env(
            SHOUHU_DATABASE_URL=county_url,
            SHOUHU_MQTT_URL=url,
            SHOUHU_HUB_ID=f"hub-{uuid.uuid4().hex[:6]}",
            SHOUHU_METRICS_PORT=str(metrics_port),
        ),
        ready_url=f"http://127.0.0.1:{metrics_port}/readyz",
    ).start()
    listener = ReceiptListener(port, "wb-0066")
    try:
        one_mib = json.dumps({"msg_id": str(uuid.uuid4()), "ts": "2026-12-03T10:00:00+08:00", "action": "press",
                              "x": "a" * (1024 * 1024)}).encode()
        publish_raw(url, "shouhu/v1/wristband/wb-0066/sos", one_mib)
        wait_until(lambda: listener.receipts, timeout=15, what="the 1 MiB SOS receipted")
        assert query(county_url, "SELECT kind, payload_unreadable FROM incidents") == [("sos", True)]
        assert query(county_url, "SELECT reason, length(payload) FROM dead_letters") == [("oversized", len(one_mib))]
        past_cap = b"x" * (2 * 1024 * 1024 + 1)
        publish_raw(url, "shouhu/v1/wristband/wb-0067/sos", past_cap)  # the broker acknowledges it
        fine = alarm_payload("sos", action="press")
        publish_raw(url, "shouhu/v1/wristband/wb-0067/sos", fine)  # and the next press still gets through
        wait_until(
            lambda: query(county_url, "SELECT count(*) FROM incidents WHERE device_id = 'wb-0067'") == [(1,)],
            what="the next press of the same wristband",
        )
        assert query(county_url, "SELECT count(*) FROM dead_letters") == [(1,)]  # the 2 MiB one never arrived
    finally:
        listener.close()
        hub_process.stop()
        broker.kill()
