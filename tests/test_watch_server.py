"""gateway/watch_server.py against a real Mosquitto and a real hub over the demo county:
watches connect over TCP, their frames become v1 messages the hub stores, ``LK`` is
answered at once and ``AL`` only after the hub's receipt."""

from __future__ import annotations

import contextlib
import signal
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from devices.contract import MqttChannel
from gateway.watch_messages import make_msg_id
from gateway.watch_server import WatchServer
from hub.service import Hub
from shouhu.embedded.postgres import free_port
from tests.support.hub import query, start_hub, wait_until
from tests.support.services import Mosquitto
from tests.support.watch import BAND, SOS_AT, SOS_BODY, WATCH, Watch, frame, gateway_process, serving


@pytest.fixture
def gateway(broker: Mosquitto) -> Iterator[WatchServer]:
    with serving(broker) as server:
        yield server


def watch(server: WatchServer) -> Watch:
    assert server.port is not None
    return Watch(server.port)


def ledger(url: str, msg_id: str) -> list[tuple[object, ...]]:
    return query(url, "SELECT channel FROM message_ledger WHERE device_id = %s AND msg_id = %s", BAND, msg_id)


def test_a_heartbeat_is_answered_at_once_and_stored(hub: Hub, county_url: str, gateway: WatchServer) -> None:
    band = watch(gateway)
    try:
        band.send(frame("LK,1520,0,64"))
        assert band.answer() == b"[3G*8600000061*0002*LK]"
    finally:
        band.close()
    wait_until(lambda: query(county_url, "SELECT battery FROM device_state WHERE device_id = %s", BAND) == [(64,)])


def test_an_sos_is_answered_only_after_the_hub_has_stored_it(hub: Hub, county_url: str, gateway: WatchServer) -> None:
    band = watch(gateway)
    sos_id = make_msg_id(WATCH, MqttChannel.SOS, f"AL,{SOS_BODY}".encode(), SOS_AT)
    try:
        band.send(frame(f"AL,{SOS_BODY}"))
        assert band.answer() == b"[3G*8600000061*0002*AL]"
        # The receipt exists only after the hub's commit: the alarm is stored already.
        assert ledger(county_url, sos_id) == [("sos",)]
        [(kind, state)] = query(county_url, "SELECT kind, state FROM incidents")
        assert (kind, state) == ("sos", "open")
        # The watch re-sends (it missed the answer): the same msg_id, one incident.
        band.send(frame(f"AL,{SOS_BODY}"))
        assert band.answer() == b"[3G*8600000061*0002*AL]"
    finally:
        band.close()
    assert query(county_url, "SELECT count(*) FROM incidents") == [(1,)]
    assert gateway.counts["answered:after_receipt"] == 2


def test_an_alarm_nobody_stored_is_not_answered_until_a_resend_is(
    county_url: str, broker: Mosquitto, gateway: WatchServer
) -> None:
    band = watch(gateway)
    try:
        band.send(frame(f"AL,{SOS_BODY}"))
        band.send(frame("LK"))
        # No hub: the heartbeat sent after the alarm is answered first, the alarm not at all.
        assert band.answer() == b"[3G*8600000061*0002*LK]"
        assert gateway.counts["answered:after_receipt"] == 0
        worker, thread = start_hub(county_url, broker.url)
        try:
            band.send(frame(f"AL,{SOS_BODY}"))
            assert band.answer() == b"[3G*8600000061*0002*AL]"
        finally:
            worker.stop()
            thread.join(10)
    finally:
        band.close()
    assert query(county_url, "SELECT kind FROM incidents") == [("sos",)]


def test_an_sos_of_a_watch_the_registry_does_not_have_pages_the_county(
    hub: Hub, county_url: str, gateway: WatchServer
) -> None:
    """When in doubt about an SOS, page: an unknown watch's SOS opens ``sos_unregistered``
    under ``watch-<id>``, exactly as an unknown MQTT wristband's, answered after the receipt."""
    stranger = "8699999999"
    band = watch(gateway)
    try:
        band.send(frame(f"AL,{SOS_BODY}", watch=stranger))
        assert band.answer() == b"[3G*8699999999*0002*AL]"
        # Answered only after the receipt: the incident is committed already.
        assert query(county_url, "SELECT kind, device_id, area_id, state FROM incidents") == [
            ("sos_unregistered", f"watch-{stranger}", "county", "open")
        ]
        band.send(frame(f"AL,{SOS_BODY}", watch=stranger))  # re-sent: the same msg_id
        assert band.answer() == b"[3G*8699999999*0002*AL]"
        # A second unknown id on the same connection is no watch: not paged, not answered.
        band.send(frame(f"AL,{SOS_BODY}", watch="8688888888") + frame("LK"))
        assert band.answer() == b"[3G*8600000061*0002*LK]"
    finally:
        band.close()
    assert gateway.counts["dead_letter:unregistered_flood"] == 1
    assert query(county_url, "SELECT count(*), max(urgency) FROM incidents") == [(1, 1)]
    assert gateway.counts["unregistered_alarm"] == 2
    assert gateway.counts["answered:after_receipt"] == 2
    assert gateway.counts["dead_letter:unknown_watch"] == 0


def test_bad_input_is_counted_and_never_stops_the_others(gateway: WatchServer) -> None:
    noisy, flooding, calm = watch(gateway), watch(gateway), watch(gateway)
    try:
        noisy.send(b"GET / HTTP/1.1\r\n\r\n" + frame("LK", watch="8699999999") + frame("TKQ") + "[3G*坏*".encode())
        noisy.send(b"[3G*8600000061*0003*LK]" + frame("LK"))
        assert noisy.answer() == b"[3G*8600000061*0002*LK]"
        # A peer that sends nothing but bad frames is closed after max_rejections.
        flooding.send(b"[x]" * 10)
        assert flooding.closed_by_server()
        calm.send(frame("LK"))
        assert calm.answer() == b"[3G*8600000061*0002*LK]"
    finally:
        for connection in (noisy, flooding, calm):
            connection.close()
    counts = gateway.counts
    assert counts["rejected:garbage"] == 1
    assert counts["rejected:unterminated"] == 1
    assert counts["rejected:wrong_length"] == 1
    assert counts["dead_letter:unknown_watch"] == 1
    assert counts["ignored:unknown_command"] == 1
    assert counts["closed:bad_input"] == 1


def test_unknown_watches_and_bad_frames_reach_the_dead_letters_with_their_bytes(
    hub: Hub, county_url: str, broker: Mosquitto
) -> None:
    """The hub stores what the gateway could not use, the watch's own bytes and a reason;
    one connection sends at most ``max_dead_letters`` and is closed as before."""
    oversize = b"[3G*8600000061*2000*" + b"x" * 9000
    with serving(broker, max_dead_letters=3, max_frame_bytes=8192) as gateway:
        first, second = watch(gateway), watch(gateway)
        try:
            first.send(frame("LK", watch="8699999999") + frame("UD,nonsense") + b"[x]" + b"[x]" + frame("LK"))
            assert first.answer() == b"[3G*8600000061*0002*LK]"
            second.send(oversize + frame("LK"))
            assert second.answer() == b"[3G*8600000061*0002*LK]"
        finally:
            first.close()
            second.close()
        assert gateway.counts["dead_letter_not_sent:connection_limit"] == 1
    wait_until(lambda: len(query(county_url, "SELECT 1 FROM dead_letters")) == 4)
    letters = query(county_url, "SELECT reason, topic, payload, detail FROM dead_letters")
    # Compared as a set: the hub's two bulk lanes may commit two batches in either order.
    reasons = sorted((reason, bytes(payload)) for reason, _topic, payload, _detail in letters)
    assert reasons == sorted(
        [
            ("unknown_watch", frame("LK", watch="8699999999")),
            ("unreadable_frame", frame("UD,nonsense")),
            ("bad_frame", b"[x]"),
            ("bad_frame", oversize[:4096]),
        ]
    )
    assert all(topic.startswith("shouhu/v1/gateway/test-watch-gateway-") for _r, topic, _p, _d in letters)
    (unknown,) = [detail for reason, _t, _p, detail in letters if reason == "unknown_watch"]
    assert "device 8699999999" in unknown
    assert "the first 4096 of" in letters[3][3]


def test_a_peer_that_never_reads_and_hundreds_of_idle_ones_do_not_stop_the_others(broker: Mosquitto) -> None:
    """A peer sending heartbeats without reading the answers is dropped once a write
    waits ``write_timeout_s``; hundreds of connections that say nothing, or half a frame,
    are held; a watch is answered at once through all of it. (10,000 connections:
    bench/watch_gateway.py.)"""
    listener = socket.socket()
    # Inherited by the accepted connections: the deaf peer's answers fill the kernel's
    # buffers after a few thousand bytes, not megabytes.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(2048)
    with serving(broker, listener, write_timeout_s=0.5) as gateway:
        assert gateway.port is not None
        idle = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(300)]
        try:
            for half in idle[::10]:
                half.sendall(b"[3G*8600000061*0002*L")
            deaf = socket.socket()
            deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            deaf.connect(("127.0.0.1", gateway.port))
            deaf.setblocking(False)
            heartbeats = frame("LK") * 200
            sent = 0
            deadline = time.monotonic() + 30
            while gateway.counts["closed:slow_reader"] == 0:
                assert time.monotonic() < deadline, "the deaf peer was never dropped"
                with contextlib.suppress(BlockingIOError):
                    sent += deaf.send(heartbeats)
                calm = watch(gateway)
                calm.send(frame("LK"))
                assert calm.answer() == b"[3G*8600000061*0002*LK]"
                calm.close()
            assert sent > 0
            deaf.close()
            calm = watch(gateway)
            calm.send(frame("LK"))
            assert calm.answer() == b"[3G*8600000061*0002*LK]"
            calm.close()
            assert gateway.counts["connections"] >= 302
        finally:
            for connection in idle:
                connection.close()


def test_an_alarm_that_cannot_be_read_still_pages(hub: Hub, county_url: str, gateway: WatchServer) -> None:
    """It may be an SOS: it goes to the SOS topic as it came and the hub pages it."""
    band = watch(gateway)
    try:
        band.send(frame("AL,041226,101500,A,north"))
        assert band.answer() == b"[3G*8600000061*0002*AL]"  # at once: no msg_id can be receipted
    finally:
        band.close()
    wait_until(lambda: query(county_url, "SELECT kind, payload_unreadable FROM incidents") == [("sos", True)])


def test_a_silent_connection_is_closed(broker: Mosquitto) -> None:
    with serving(broker, idle_timeout_s=0.5) as server:
        silent, talking = watch(server), watch(server)
        try:
            talking.send(frame("LK"))
            assert talking.answer() == b"[3G*8600000061*0002*LK]"
            assert silent.closed_by_server()
        finally:
            silent.close()
            talking.close()
        assert server.counts["closed:idle"] >= 1


# ------------------------------------------------------------- `shouhu gateway watch`


def test_the_verb_serves_the_registry_watches_and_stops_cleanly_on_sigterm(hub: Hub, broker: Mosquitto) -> None:
    port = free_port()
    process = gateway_process(broker, f"test-gateway-{port}", port).start()
    try:
        band = Watch(port)
        try:
            band.send(frame("LK"))  # wb-0061's watch, from the demo county's registry file
            assert band.answer() == b"[3G*8600000061*0002*LK]"
            band.send(frame("LK", watch="8699999999") + frame("LK"))  # an unknown watch: no answer
            assert band.answer() == b"[3G*8600000061*0002*LK]"
        finally:
            band.close()
        assert process.ready_url is not None
        metrics = httpx.get(process.ready_url.replace("/readyz", "/metrics")).text
        assert 'shouhu_watch_gateway_events_total{event="published:telemetry"} 2.0' in metrics
        assert 'shouhu_watch_gateway_events_total{event="dead_letter:unknown_watch"} 1.0' in metrics
        assert process.process is not None
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(15) == 0, process.output()
    finally:
        process.kill()
    assert "watch gateway: 127.0.0.1:" in process.output()
    assert "10 watches registered" in process.output()
    assert "Traceback" not in process.output()


def test_after_a_kill_and_a_restart_the_resent_alarm_is_answered_and_stored_once(
    county_url: str, broker: Mosquitto
) -> None:
    """The gateway dies (SIGKILL) holding an alarm it could not answer yet (the hub was
    away); the watch reconnects to the restarted gateway and re-sends it: answered, and
    one ledger row, one incident, though the first copy waited in the broker for the hub."""
    port = free_port()
    hub_id = f"test-hub-{uuid.uuid4().hex[:8]}"
    worker, thread = start_hub(county_url, broker.url, hub_id)
    worker.stop()  # its sessions stay: the broker keeps the alarm for its return
    thread.join(10)
    first = gateway_process(broker, f"test-gateway-{port}", port).start()
    band = Watch(port)
    try:
        band.send(frame(f"AL,{SOS_BODY}"))
        band.send(frame("LK"))
        assert band.answer() == b"[3G*8600000061*0002*LK]"  # read in order: the AL was published
        first.kill(signal.SIGKILL)
        assert band.closed_by_server()
    finally:
        band.close()
        first.kill()
    worker, thread = start_hub(county_url, broker.url, hub_id)
    second = gateway_process(broker, f"test-gateway-{port}", port).start()
    try:
        band = Watch(port)
        try:
            band.send(frame(f"AL,{SOS_BODY}"))  # the watch never had its answer: it re-sends
            assert band.answer() == b"[3G*8600000061*0002*AL]"
        finally:
            band.close()
    finally:
        second.stop()
        worker.stop()
        thread.join(10)
    sos_id = make_msg_id(WATCH, MqttChannel.SOS, f"AL,{SOS_BODY}".encode(), SOS_AT)
    assert ledger(county_url, sos_id) == [("sos",)]
    assert query(county_url, "SELECT kind, device_id, urgency FROM incidents") == [("sos", BAND, 1)]
