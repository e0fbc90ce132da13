"""Real services for the test session: PostgreSQL clusters and a Mosquitto broker.

Each is started on a free port under a fresh directory, so the suite never depends
on (or disturbs) services already running on the machine.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
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
