"""The shipped Mosquitto configuration with its accounts, ACL and TLS listener, made
local: the files `shouhu broker credentials` writes and a test session's CA."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from shouhu.embedded.postgres import free_port
from shouhu.mqtt_address import with_tls_files
from tests.support.broker import SHIPPED_CONF
from tests.support.services import STARTED_PROCESSES, wait_for_port
from tests.support.tls import TestPki


@dataclass
class SecureBroker:
    directory: Path
    pki: TestPki
    port: int
    tls_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def password_file(self) -> Path:
        return self.directory / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.directory / "acl"

    def url(self, user: str, password: str, *, tls: bool = False, ca: bool = True) -> str:
        """An account's URL: plain 1883's stand-in, or TLS trusting the session's CA."""
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1"
        if not tls:
            return f"mqtt://{credentials}:{self.port}"
        return with_tls_files(f"mqtts://{credentials}:{self.tls_port}", str(self.pki.ca_file) if ca else "")

    def start(self) -> None:
        # Mosquitto started as root reads them as its own user.
        for path in (self.password_file, self.acl_file):
            path.chmod(0o644)
        conf = self.directory / "mosquitto.conf"
        conf.write_text(_localised(self.directory, self.pki, self.port, self.tls_port))
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        STARTED_PROCESSES.append(self.process)
        wait_for_port(self.port)
        wait_for_port(self.tls_port)

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the password and ACL files."""
        for path in (self.password_file, self.acl_file):
            path.chmod(0o644)
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def log(self) -> str:
        return (self.directory / "mosquitto.log").read_text(errors="replace")


def _localised(directory: Path, pki: TestPki, port: int, tls_port: int) -> str:
    """The shipped file with its listeners on free loopback ports and its paths here."""
    data = directory / "data"
    data.mkdir(exist_ok=True)
    data.chmod(0o777)
    log = directory / "mosquitto.log"
    log.touch()
    log.chmod(0o666)
    replaced = {
        "listener 1883": f"listener {port} 127.0.0.1",
        "listener 8883": f"listener {tls_port} 127.0.0.1",
        "listener 1880 127.0.0.1": f"listener {free_port()} 127.0.0.1",
        "password_file /mosquitto/config/passwd": f"password_file {directory / 'passwd'}",
        "acl_file /mosquitto/config/acl": f"acl_file {directory / 'acl'}",
        "cafile /mosquitto/config/tls/ca.pem": f"cafile {pki.ca_file}",
        "certfile /mosquitto/config/tls/server.pem": f"certfile {pki.cert_file}",
        "keyfile /mosquitto/config/tls/server.key": f"keyfile {pki.key_file}",
        "persistence_location /mosquitto/data/": f"persistence_location {data}/",
        "log_dest stdout": f"log_dest file {log}",
    }
    lines = [replaced.get(line, line) for line in SHIPPED_CONF.read_text().splitlines()]
    missing = set(replaced) - set(SHIPPED_CONF.read_text().splitlines())
    assert not missing, f"the shipped mosquitto.conf no longer has {missing}"
    return "\n".join(lines) + "\n"
