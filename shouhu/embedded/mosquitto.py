"""A local Mosquitto for ``shouhu up``: the broker production runs, when it is installed.

The embedded amqtt broker (``shouhu.embedded.broker``) acknowledges a burst of QoS 1
messages and delivers a few percent of it (docs/BENCHMARKS.md); an SOS in such a burst
would be acknowledged to the wristband and lost. Where Debian's ``mosquitto`` is
installed, ``shouhu up`` starts it instead: on 127.0.0.1 only, anonymous (a local
install), its sessions and queued messages persisted under the data directory, so the
hub's session and anything queued for it survive a restart. The queue and in-flight
limits are the shipped configuration's (``deploy/mosquitto/mosquitto.conf``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from shouhu.embedded.broker import wait_until_listening


def mosquitto_binary() -> str | None:
    """Mosquitto's executable, if installed (Debian puts it in /usr/sbin)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    debian = Path("/usr/sbin/mosquitto")
    return str(debian) if debian.exists() else None


def mosquitto_config(directory: Path, port: int) -> str:
    """The configuration: a loopback listener, persistence in ``directory``, the shipped limits."""
    return (
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {directory}/\n"
        "autosave_interval 10\n"
        "max_queued_messages 1000000\n"
        "max_queued_bytes 536870912\n"
        "queue_qos0_messages false\n"
        "max_inflight_messages 1000\n"
        "persistent_client_expiration 7d\n"
        "message_size_limit 2097152\n"
        # Run as root, Mosquitto would switch to the user "mosquitto", who cannot write
        # here; run as anyone else it ignores the option (so it is left out).
        + ("user root\n" if os.geteuid() == 0 else "")
        + f"log_dest file {directory}/mosquitto.log\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
    )


def start_local_mosquitto(directory: Path, port: int, binary: str) -> subprocess.Popen[bytes]:
    """Start Mosquitto with its state in ``directory`` and wait until it listens on 127.0.0.1:``port``."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "mosquitto.conf"
    conf.write_text(mosquitto_config(directory, port))
    log = directory / "mosquitto.log"
    with log.open("ab") as stderr:  # not a pipe nobody reads: a full one would stop the broker
        # Its own process group: a terminal's Ctrl-C reaches `shouhu up`, which stops the
        # hub first and the broker after it, not the broker at once.
        process = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=stderr, process_group=0
        )
    wait_until_listening(
        process,
        "127.0.0.1",
        port,
        "Mosquitto",
        log=lambda: log.read_text(errors="replace")[-2000:] if log.exists() else "",
    )
    return process
