"""Real services for the test session: PostgreSQL clusters and a Mosquitto broker.

Each is started on a free port under a fresh directory, so the suite never depends
on (or disturbs) services already running on the machine.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shouhu.embedded.mosquitto import mosquitto_binary
from shouhu.embedded.postgres import ClusterSpec, LocalPostgres, free_port


def scratch_dir(prefix: str) -> Path:
    # World-traversable so a service user (PostgreSQL as root) can reach inside.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def start_postgres(bin_dir: Path) -> LocalPostgres:
    cluster = LocalPostgres(ClusterSpec(bin_dir, scratch_dir("shouhu-pg-") / "data", free_port()))
    cluster.start()
    return cluster


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Mosquitto:
    """A Mosquitto broker on a free port with persistence in its own directory."""

    directory: Path = field(default_factory=lambda: scratch_dir("shouhu-mqtt-"))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # Mosquitto's default of 20 QoS 1 messages in flight to one client; the shipped
    # configuration allows more (a benchmark of a mass event passes its value).
    max_inflight: int = 20

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed: run the README's test command, which installs it")
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        data.chmod(0o777)
        conf = self.directory / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {data}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 1000000\n"
            f"max_inflight_messages {self.max_inflight}\n"
            "queue_qos0_messages false\n"
            "persistent_client_expiration 1d\n"
            f"log_dest file {self.directory}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        (self.directory / "mosquitto.log").touch()
        (self.directory / "mosquitto.log").chmod(0o666)
        self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port)

    def stop(self, signal_number: int = 15) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal_number)
            self.process.wait(10)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class Packet:
    direction: str  # "up": client → broker, "down": broker → client
    kind: int  # MQTT control packet type: 3 PUBLISH, 4 PUBACK, …
    packet_id: int | None
    topic: str | None
    at: float


def _remaining_length(buffer: bytes, start: int) -> tuple[int, int] | None:
    multiplier, value, index = 1, 0, start
    while index < len(buffer):
        byte = buffer[index]
        value += (byte & 0x7F) * multiplier
        index += 1
        if not byte & 0x80:
            return value, index
        multiplier *= 128
    return None


def _decode(direction: str, header: int, body: bytes) -> Packet:
    kind = header >> 4
    packet_id: int | None = None
    topic: str | None = None
    if kind == 3:  # PUBLISH: topic, then a packet id when QoS > 0
        length = int.from_bytes(body[:2], "big")
        topic = body[2 : 2 + length].decode(errors="replace")
        if (header >> 1) & 0x03:
            packet_id = int.from_bytes(body[2 + length : 4 + length], "big")
    elif kind in (4, 5, 6, 7):  # PUBACK, PUBREC, PUBREL, PUBCOMP
        packet_id = int.from_bytes(body[:2], "big")
    return Packet(direction, kind, packet_id, topic, time.monotonic())


class MqttWireTap:
    """A TCP proxy between a client and the broker that decodes the packets it carries.

    It lets a test watch the wire: which PUBLISH the broker delivered, and when (or
    whether) the client sent its PUBACK.
    """

    def __init__(self, broker_port: int, *, refuse_filters: frozenset[str] = frozenset()) -> None:
        import threading

        self.broker_port = broker_port
        # A fault to inject: the broker's SUBACK for these topic filters says "refused".
        self.refuse_filters = refuse_filters
        self.packets: list[Packet] = []
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(8)
        self.port: int = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            except OSError:  # the broker is down (restarting): the client tries again
                client.close()
                continue
            self._sockets += [client, upstream]
            state: dict[str, Any] = {}  # per connection: protocol level, SUBSCRIBEs to refuse
            threading.Thread(target=self._pump, args=(client, upstream, "up", state), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down", state), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str, state: dict[str, Any]) -> None:
        """Forward whole packets, decoding each; a SUBACK for a refused filter is rewritten."""
        buffer = b""
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (source, sink):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                return
            buffer += data
            out = b""
            while len(buffer) >= 2:
                decoded = _remaining_length(buffer, 1)
                if decoded is None:
                    break
                length, offset = decoded
                if len(buffer) < offset + length:
                    break
                raw = buffer[: offset + length]
                packet = _decode(direction, buffer[0], buffer[offset : offset + length])
                with self._lock:
                    self.packets.append(packet)
                out += self._fault(direction, raw, offset, state)
                buffer = buffer[offset + length :]
            try:
                sink.sendall(out)
            except OSError:
                return

    def _fault(self, direction: str, raw: bytes, offset: int, state: dict[str, Any]) -> bytes:
        """Refuse (in the SUBACK) any SUBSCRIBE naming a filter in ``refuse_filters``."""
        if not self.refuse_filters:
            return raw
        kind, body = raw[0] >> 4, raw[offset:]
        if direction == "up" and kind == 1:  # CONNECT: remember the protocol level
            name_length = int.from_bytes(body[:2], "big")
            state["v5"] = body[2 + name_length] == 5
        elif direction == "up" and kind == 8:  # SUBSCRIBE: packet id, [properties], filters
            packet_id, index = int.from_bytes(body[:2], "big"), 2
            if state.get("v5"):
                properties, index = _remaining_length(body, index) or (0, index)
                index += properties
            while index < len(body):
                length = int.from_bytes(body[index : index + 2], "big")
                if body[index + 2 : index + 2 + length].decode(errors="replace") in self.refuse_filters:
                    state.setdefault("refuse", set()).add(packet_id)
                index += 2 + length + 1
        elif direction == "down" and kind == 9:  # SUBACK: packet id, [properties], one code per filter
            packet_id, index = int.from_bytes(body[:2], "big"), 2
            if packet_id in state.get("refuse", set()):
                if state.get("v5"):
                    properties, index = _remaining_length(body, index) or (0, index)
                    index += properties
                refused = 0x87 if state.get("v5") else 0x80  # Not authorized / Failure
                return raw[: offset + index] + bytes([refused]) * (len(body) - index)
        return raw

    def seen(self, direction: str, kind: int, packet_id: int | None = None, topic: str | None = None) -> list[Packet]:
        with self._lock:
            return [
                p
                for p in self.packets
                if p.direction == direction
                and p.kind == kind
                and (packet_id is None or p.packet_id == packet_id)
                and (topic is None or p.topic == topic)
            ]

    def wait_for(
        self,
        direction: str,
        kind: int,
        *,
        topic: str | None = None,
        packet_id: int | None = None,
        timeout: float = 10.0,
    ) -> Packet:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.seen(direction, kind, packet_id, topic)
            if found:
                return found[-1]
            time.sleep(0.01)
        raise TimeoutError(f"no packet {kind} {direction} {topic or ''} {packet_id or ''} in {timeout}s")

    def cut(self) -> None:
        """Drop every connection passing through, as a network fault would; keep listening."""
        sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._server.close()
        self.cut()


SHOUHU_BIN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "shouhu")


def shouhu_env(**settings: str) -> dict[str, str]:
    """The process environment with only the given SHOUHU_* settings, and a data
    directory of the test session's own (never the machine's /var/lib/shouhu)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOUHU_")}
    env["SHOUHU_DATA_DIR"] = str(session_data_dir())
    env.update(settings)
    return env


_SESSION_DATA_DIR: list[Path] = []


def session_data_dir() -> Path:
    """One scratch data directory for the test session (hub spools live under it, one per hub id)."""
    if not _SESSION_DATA_DIR:
        _SESSION_DATA_DIR.append(scratch_dir("shouhu-data-"))
    return _SESSION_DATA_DIR[0]


def http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


STARTED_PROCESSES: list[subprocess.Popen[bytes]] = []


@dataclass
class ShouhuProcess:
    """A ``shouhu`` verb running as its own process, as an operator would run it."""

    args: list[str]
    env: dict[str, str]
    ready_url: str | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: scratch_dir("shouhu-proc-") / "output.log")

    def start(self, timeout: float = 30.0) -> ShouhuProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [SHOUHU_BIN, *self.args], env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        STARTED_PROCESSES.append(self.process)
        if self.ready_url:
            deadline = time.monotonic() + timeout
            while http_status(self.ready_url) != 200:
                if self.process.poll() is not None:
                    raise RuntimeError(f"shouhu {' '.join(self.args)} exited:\n{self.output()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"shouhu {' '.join(self.args)} not ready:\n{self.output()}")
                time.sleep(0.05)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, signal_number: int = 9) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal_number)
            self.process.wait(15)

    def stop(self) -> None:
        self.kill(15)


def serve_app(app: Any, *, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free port (or ``port``) in a thread; yields its base URL.

    Pass ``port`` (from ``free_port()``) when the app must know its own URL before it
    is built, as the API does for the callback URLs Twilio signs.
    """
    import threading

    import uvicorn

    port = port or free_port()
    # An open live feed (a browser test's page) never ends by itself: after 1 s of
    # graceful shutdown uvicorn cancels it, instead of each such test's teardown waiting
    # out the join below.
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def wristband_with_grid_worker_on_duty(url: str, exclude: set[str] | None = None) -> tuple[str, set[str]]:
    """A wristband whose own grid has a grid worker on duty now, and their phones."""
    from datetime import UTC, datetime

    import psycopg

    from alerts.recipients import duty_chain
    from shouhu.settings import Settings

    zone = Settings(_env_file=None).zone  # type: ignore[call-arg]
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT d.id, r.grid_id FROM devices d JOIN residents r ON r.id = d.resident_id"
            " WHERE d.kind = 'wristband' ORDER BY d.id"
        ).fetchall()
        for device_id, grid_id in rows:
            if device_id in (exclude or set()):
                continue
            people = duty_chain(conn, grid_id, datetime.now(UTC), zone)
            if people and all(p.area_id == grid_id and p.role == "grid_worker" for p in people):
                return device_id, {p.phone for p in people}
    raise AssertionError("no grid has a grid worker on duty now")


@dataclass(frozen=True)
class Ring:
    """The first call a press caused, and how long after the press it reached the network."""

    call: dict[str, Any]
    seconds: float


def press_and_wait_for_ring(broker_port: int, device_id: str, phone_base: str, timeout: float = 10.0) -> Ring:
    """Press SOS with `mosquitto_pub`, as a wristband would, and wait for the next call.

    The simulator stamps each request with CLOCK_MONOTONIC, shared by every process on
    the machine, so the latency is measured across processes.
    """
    import json
    import uuid
    from datetime import UTC, datetime

    import httpx

    before = len(httpx.get(f"{phone_base}/_sim/calls").json())
    payload = json.dumps({"msg_id": str(uuid.uuid4()), "ts": datetime.now(UTC).isoformat(), "action": "press"})
    pressed = time.monotonic()
    subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            str(broker_port),
            "-q",
            "1",
            "-t",
            f"shouhu/v1/wristband/{device_id}/sos",
            "-m",
            payload,
        ],
        check=True,
        timeout=10,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        calls: list[dict[str, Any]] = httpx.get(f"{phone_base}/_sim/calls").json()
        if len(calls) > before:
            return Ring(calls[before], float(calls[before]["monotonic"]) - pressed)
        time.sleep(0.02)
    raise AssertionError(f"no call reached the phone network within {timeout}s of the press")


def shouhu_stack(
    database_url: str,
    mosquitto: Mosquitto,
    *,
    name: str,
    registry: Path | None = None,
    hub_args: tuple[str, ...] = (),
    **settings: str,
) -> Iterator[dict[str, Any]]:
    """The demo county (or ``registry``) loaded, then `shouhu simulate phone-network`,
    `shouhu hub` (with ``hub_args``) and `shouhu router` as processes, each ready before
    this yields; stopped afterwards.

    ``settings`` are extra ``SHOUHU_*`` variables (short holds, say).
    """
    import uuid

    demo = registry or Path(__file__).resolve().parents[2] / "simulators" / "demo_county.yaml"
    phone_port, hub_metrics, router_metrics = free_port(), free_port(), free_port()
    hub_id = f"{name}-{uuid.uuid4().hex[:8]}"
    env = shouhu_env(
        SHOUHU_DATABASE_URL=database_url,
        SHOUHU_MQTT_URL=mosquitto.url,
        SHOUHU_HUB_ID=hub_id,
        SHOUHU_TWILIO_ACCOUNT_SID="AC" + "1" * 32,
        SHOUHU_TWILIO_AUTH_TOKEN=f"{name}-token",
        SHOUHU_TWILIO_FROM="+12025550100",
        SHOUHU_TWILIO_API_BASE=f"http://127.0.0.1:{phone_port}",
        **settings,
    )
    load = subprocess.run([SHOUHU_BIN, "registry", "load", str(demo)], env=env, capture_output=True, text=True)
    assert load.returncode == 0, load.stderr
    processes = [
        ShouhuProcess(
            ["simulate", "phone-network", "--port", str(phone_port)],
            env,
            ready_url=f"http://127.0.0.1:{phone_port}/_sim/calls",
        ),
        ShouhuProcess(
            ["hub", *hub_args],
            {**env, "SHOUHU_METRICS_PORT": str(hub_metrics)},
            ready_url=f"http://127.0.0.1:{hub_metrics}/readyz",
        ),
        ShouhuProcess(
            ["router"],
            {**env, "SHOUHU_METRICS_PORT": str(router_metrics)},
            ready_url=f"http://127.0.0.1:{router_metrics}/readyz",
        ),
    ]
    try:
        for process in processes:
            process.start()
        yield {
            "phone": f"http://127.0.0.1:{phone_port}",
            "router_metrics": router_metrics,
            "database_url": database_url,
            "mosquitto": mosquitto,
            "processes": processes,
            "hub_id": hub_id,
        }
    finally:
        for process in processes:
            process.stop()
