"""The embedded defaults: PostgreSQL from the wheel (as root and as a normal user) and
the amqtt broker."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from shouhu.embedded.broker import ensure_local_broker
from shouhu.embedded.defaults import recorded_database_url, start_embedded_database
from shouhu.embedded.postgres import _make_traversable, free_port
from tests.support.services import Mosquitto, scratch_dir


def test_embedded_database_initialises_records_and_restarts() -> None:
    data_dir = scratch_dir("shouhu-up-")
    first = start_embedded_database(data_dir)
    try:
        assert (data_dir / "postgres" / "PG_VERSION").read_text().strip() == "18"
        assert recorded_database_url(data_dir) == first.url
        with psycopg.connect(first.url) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        first.cluster.stop()
        assert recorded_database_url(data_dir) is None  # stopped: nothing to reach
        second = start_embedded_database(data_dir)
        with psycopg.connect(second.url) as conn:
            assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
        second.cluster.stop()
    finally:
        first.cluster.remove()


NORMAL_USER_SCRIPT = """
import sys
from pathlib import Path
from shouhu.embedded.defaults import start_embedded_database
db = start_embedded_database(Path(sys.argv[1]))
import psycopg
with psycopg.connect(db.url) as conn:
    print(conn.execute("SELECT current_setting('data_directory')").fetchone()[0])
db.cluster.stop()
"""


def test_embedded_database_runs_as_a_normal_user() -> None:
    data_dir = scratch_dir("shouhu-user-")
    demote = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        # The normal user needs to reach this interpreter (pyenv under /root is 0700):
        # grant only the search bit on its parents, as the embedded wheel itself does.
        _make_traversable(Path(os.path.realpath(sys.executable)).parent)
        os.chown(data_dir, nobody.pw_uid, nobody.pw_gid)

        def demote() -> None:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

    result = subprocess.run(
        [sys.executable, "-c", NORMAL_USER_SCRIPT, str(data_dir / "shouhu")],
        capture_output=True,
        text=True,
        preexec_fn=demote,
        timeout=120,
        env={**os.environ, "HOME": str(data_dir), "XDG_RUNTIME_DIR": str(data_dir)},
        cwd=str(data_dir),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(data_dir / "shouhu" / "postgres")


def _roundtrip(port: int, protocol: MQTTProtocolVersion) -> list[bytes]:
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        got.append(bytes(message.payload))
        done.set()

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe("shouhu/test", qos=1)[1]
        subscribed = threading.Event()
        client.on_subscribe = lambda *_: subscribed.set()
        client.subscribe("shouhu/test", qos=1)
        assert subscribed.wait(5)
        client.publish("shouhu/test", b"ping", qos=1).wait_for_publish(5)
        assert done.wait(5)
    finally:
        client.loop_stop()
        client.disconnect()
    return got


def test_embedded_broker_starts_when_nothing_listens() -> None:
    port = free_port()
    process = ensure_local_broker(port)
    assert process is not None
    try:
        assert _roundtrip(port, MQTTProtocolVersion.MQTTv311) == [b"ping"]
    finally:
        process.terminate()
        process.wait(10)


def test_existing_broker_is_used(mosquitto: Mosquitto) -> None:
    assert ensure_local_broker(mosquitto.port) is None


def test_embedded_broker_refuses_mqtt5() -> None:
    port = free_port()
    process = ensure_local_broker(port)
    assert process is not None
    try:
        codes: list[ReasonCode] = []
        connected = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)

        def on_connect(*args: Any) -> None:
            codes.append(args[3])
            connected.set()

        client.on_connect = on_connect
        client.connect("127.0.0.1", port)
        client.loop_start()
        assert connected.wait(5)
        client.loop_stop()
        assert codes[0].is_failure
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("as_root", [os.geteuid() == 0])
def test_service_user_owns_data_when_root(as_root: bool) -> None:
    data_dir = scratch_dir("shouhu-owner-")
    db = start_embedded_database(data_dir)
    try:
        owner = pwd.getpwuid(Path(data_dir / "postgres").stat().st_uid).pw_name
        expected = "shouhu-pg" if as_root else pwd.getpwuid(os.geteuid()).pw_name
        assert owner == expected
    finally:
        db.cluster.remove()


# -- `shouhu up`'s local broker: Mosquitto when installed, else amqtt -----------------


def _queued_for_a_parked_session(port: int, count: int) -> None:
    """A persistent session subscribes and goes away; ``count`` QoS 1 messages are published for it."""
    subscribed = threading.Event()
    parked = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="parked-hub", clean_session=False)
    parked.on_subscribe = lambda *_: subscribed.set()
    parked.connect("127.0.0.1", port)
    parked.loop_start()
    parked.subscribe("shouhu/parked", qos=1)
    assert subscribed.wait(5)
    parked.loop_stop()
    parked.disconnect()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="parked-pub")
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    try:
        for info in [publisher.publish("shouhu/parked", b"%d" % n, qos=1) for n in range(count)]:
            info.wait_for_publish(10)  # the broker's PUBACK: it has them
    finally:
        publisher.loop_stop()
        publisher.disconnect()


def _collect_parked(port: int, count: int) -> int:
    """The parked session comes back: how many of its queued messages it is given."""
    received: list[bytes] = []
    all_in = threading.Event()
    parked = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="parked-hub", clean_session=False)

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        received.append(bytes(message.payload))
        if len(received) >= count:
            all_in.set()

    parked.on_message = on_message
    parked.connect("127.0.0.1", port)
    parked.loop_start()
    try:
        all_in.wait(10)
    finally:
        parked.loop_stop()
        parked.disconnect()
    return len(received)


def test_shouhu_up_starts_mosquitto_when_installed_and_what_it_acknowledged_survives_its_restart(
    tmp_path: Path,
) -> None:
    """With Mosquitto installed `shouhu up` starts it, its state in the data directory: a
    hub's session and the messages queued for it outlive a restart of `shouhu up` (amqtt
    keeps them in memory, and loses most of a burst besides, docs/BENCHMARKS.md)."""
    from launch.wiring import resolve_broker
    from shouhu.embedded.mosquitto import mosquitto_binary
    from shouhu.settings import Settings

    assert mosquitto_binary() is not None, "the README's test command installs Debian's mosquitto"
    port = free_port()
    settings = Settings(_env_file=None, data_dir=str(tmp_path), mqtt_url="")  # type: ignore[call-arg]
    with contextlib.ExitStack() as stack:
        assert resolve_broker(settings, stack, port) == f"mqtt://127.0.0.1:{port}"
        assert (tmp_path / "mosquitto" / "mosquitto.conf").exists()
        _queued_for_a_parked_session(port, 200)
    assert (tmp_path / "mosquitto" / "mosquitto.db").exists()  # saved at its SIGTERM
    with contextlib.ExitStack() as stack:
        resolve_broker(settings, stack, port)
        assert _collect_parked(port, 200) == 200


def test_shouhu_up_falls_back_to_amqtt_without_mosquitto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.wiring import resolve_broker
    from shouhu.embedded import mosquitto
    from shouhu.settings import Settings

    monkeypatch.setattr(mosquitto, "mosquitto_binary", lambda: None)
    port = free_port()
    settings = Settings(_env_file=None, data_dir=str(tmp_path), mqtt_url="")  # type: ignore[call-arg]
    with contextlib.ExitStack() as stack:
        assert resolve_broker(settings, stack, port) == f"mqtt://127.0.0.1:{port}"
        assert _roundtrip(port, MQTTProtocolVersion.MQTTv311) == [b"ping"]
        assert not (tmp_path / "mosquitto").exists()


def test_shouhu_up_uses_a_broker_already_listening(tmp_path: Path, mosquitto: Mosquitto) -> None:
    from launch.wiring import resolve_broker
    from shouhu.settings import Settings

    settings = Settings(_env_file=None, data_dir=str(tmp_path), mqtt_url="")  # type: ignore[call-arg]
    with contextlib.ExitStack() as stack:
        assert resolve_broker(settings, stack, mosquitto.port) == mosquitto.url
    assert not (tmp_path / "mosquitto").exists()
